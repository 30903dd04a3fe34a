"""The `command` engine: a host is a command line run here that starts
python3 somewhere (``command:docker exec -i BOX python3``, ``command:kubectl
exec -i POD -- python3``, ``command:ssh -T HOST python3 {args}``); its stdin
and stdout are the stream to the host's agent, as an SSH session's or an
srun step's are.

The agent's arguments (``-c PROGRAM``, runtime.boot_code) are appended to
the command's words as they are, for commands that hand them on unchanged
(docker, kubectl, env, sudo); where the far side reads a shell line (ssh),
the word ``{args}`` says where they go, quoted for that shell as one word.
The runtime travels over the stream on first contact, so the far side
needs only python3 (the master's minor version), numpy and cloudpickle.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence

from .. import runtime
from ..errors import HostUnreachable, PreflightFailed, WorkerLost, describe_exit
from ..hostkinds import ARGS
from ..hostspec import HostSpec
from ..links import handshake
from ..links.transport import ProcessTransport
from ..links.workers import Link
from ..text import stderr_tail
from . import Engine, EngineSettings, Host, cluster, register
from .agent_host import AgentHost

__all__ = ["CommandTransport", "command_argv", "command_host"]

_FIX = (
    "the command must start python3 with the arguments qjamfab adds "
    f"(-c PROGRAM; where a shell reads them, as over ssh, write {ARGS} where "
    "they go) and pass its stdin and stdout through"
)


def command_argv(spec: HostSpec, args: Sequence[str]) -> list[str]:
    """The argv that runs python3 with `args` as `spec`'s command says."""
    words = shlex.split(dict(spec.options)["command"])
    if ARGS not in words:
        return [*words, *args]
    return [shlex.join(args) if w == ARGS else w for w in words]


class CommandTransport(ProcessTransport):
    """A host's agent under a command of the user's."""

    _what = "the host's command"
    preamble = ("the command", _FIX)


class CommandHost(AgentHost):
    """One `command:` host: its agent started by running its command."""

    def __init__(self, spec: HostSpec, settings: EngineSettings):
        super().__init__(
            spec, spec.raw, spec.workers or settings.workers_per_host, settings
        )
        self.command = dict(spec.options)["command"]

    def open_link(self) -> Link:
        argv = command_argv(self.spec, ["-c", runtime.boot_code("agent", install=True)])
        if shutil.which(argv[0]) is None:
            raise PreflightFailed(
                f"command {self.command!r}: {argv[0]!r} is no program found on "
                "this machine (PATH): install it, or give its full path",
                host=self.label,
            )
        link = Link(
            self.label,
            CommandTransport(self.label, argv),
            agent=True,
            stall_timeout=self.settings.heartbeat_timeout,
        )
        try:
            handshake.start_agent(link, self.command)
        except WorkerLost as exc:  # it ended, or never spoke
            tail = exc.stderr_tail.strip()
            said = tail.splitlines()[-1] if tail else "it wrote nothing"
            ended = (
                f"said nothing for {handshake.HANDSHAKE_TIMEOUT_S:g} s"
                if isinstance(exc.__cause__, TimeoutError)
                else f"ended ({describe_exit(exc.exit_status)})"
            )
            raise HostUnreachable(
                f"command {self.command!r} {ended} before qjamfab's agent "
                f"started ({said}): {_FIX}{stderr_tail(self.label, tail)}",
                host=self.label,
            ) from exc
        return link


def command_host(spec: HostSpec) -> cluster.CommandHost:
    """A `command:` host as the lifecycle tasks reach it: each of their
    python commands run through the host's command."""

    def run(argv: list[str], timeout: float, stdin: bytes) -> tuple[int, str, str]:
        return cluster.run_command(command_argv(spec, argv[1:]), timeout, stdin)

    return cluster.CommandHost(spec, spec.raw, run)


def _make(specs: Sequence[HostSpec], settings: EngineSettings) -> list[Host]:
    return [CommandHost(spec, settings) for spec in specs]


register(Engine("command", ("command",), _make))
