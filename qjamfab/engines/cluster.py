"""Lifecycle over many hosts at once: bootstrap, start, status, clear, stop.

`HostSession` is one host: its connection (none for `local`), the Python it
runs workers with, and the runtime commands (`runtime/probe.py` before
anything is uploaded, `runtime/manage.py` after). The functions at the
bottom run one step on every host in parallel and return a `HostResult` per
host, in the order given; one host failing never stops the others. A host
is a HostSpec (local, or SSH), or a `CommandHost`: one reached by running
a command line (`srun` onto a Slurm node: `engines/slurm.py` makes them).

Hosts run in a thread pool rather than a Fabric ThreadingGroup: each host
needs its own sequence of steps, and a ThreadingGroup keys results by
(host, user, port), which merges two aliases of one endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

from .. import runtime
from ..errors import BadHostSpec, HostError, PreflightFailed, QjamfabError
from ..hostspec import HostSpec, env_setting, python_mismatch
from ..links.foreign import mapped
from ..links.packages import Distribution, check_platform
from ..links.transport import tail
from ..runtime.procs import STOP_WAIT_S
from .ssh import hosts as hostlib
from .ssh.channel import sftp_upload, ssh_exec

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing has it from 3.11 on

log = logging.getLogger(__name__)

with open(os.path.join(os.path.dirname(runtime.__file__), "probe.py")) as _f:
    _PROBE_SOURCE = _f.read()


def remote_python() -> str:
    """The Python hosts run without a python= setting: $QJAMFAB_REMOTE_PYTHON,
    else $QJAM_REMOTE_PYTHON, else python3."""
    return env_setting("REMOTE_PYTHON")[0] or "python3"


class _NoRuntime(QjamfabError):
    """The host lacks this master's runtime bundle: bootstrap it."""


Runner = Callable[[list[str], float, bytes], tuple[int, str, str]]
"""Runs an argv on a host: (argv, timeout in seconds, its stdin) -> its exit
status, stdout and stderr."""


def run_command(
    argv: list[str], timeout: float, stdin: bytes = b""
) -> tuple[int, str, str]:
    """argv here, as a Runner: exit status 127 when it is not found."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        return 127, "", "not found"
    return (
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


@dataclass(frozen=True)
class CommandHost:
    """A host whose commands `runner` runs (e.g. through srun onto a Slurm
    node), named `name`; `spec` gives its settings (python=, workers=);
    `cpus`, when known, the CPUs it may use (what "auto" workers means)."""

    spec: HostSpec
    name: str
    runner: Runner
    cpus: int | None = None


Target = HostSpec | CommandHost  # what the steps below act on


def target_name(target: Target) -> str:
    """A host's name in results and tables: a command host's, or its spec's."""
    return target.name if isinstance(target, CommandHost) else target.raw


class HostSession:
    """One host and the commands that set up and manage its workers."""

    def __init__(
        self,
        spec: HostSpec,
        *,
        ssh_config: str | None = None,
        connect_timeout: float = 10.0,
        command: CommandHost | None = None,
    ):
        """`command`: the host is reached by its runner, not SSH; its
        Python is the spec's python=, else this one (the same path)."""
        self.spec = spec
        self.name = target_name(command or spec)
        self.ssh_config = ssh_config
        self.runner = command.runner if command else None
        self.cpus = command.cpus if command else None
        if command is None and spec.kind == "slurm":
            raise BadHostSpec(
                f"{spec.raw}: the nodes of a Slurm allocation are reached by "
                "the tasks (inv status --hosts=slurm) run inside it, not by "
                "cluster's functions: pass engines.slurm.command_hosts(spec)",
                host=spec.raw,
            )
        if command is None and spec.kind == "command":
            raise BadHostSpec(
                f"{spec.raw}: a command host is reached through its command: "
                "pass engines.command.command_host(spec) to cluster's functions",
                host=spec.raw,
            )
        if command is not None:
            self.conn = None
            self.python = spec.python or sys.executable
        elif spec.is_local:
            self.conn = None
            self.python = sys.executable
        else:
            self.conn = hostlib.connect(
                spec, ssh_config=ssh_config, connect_timeout=connect_timeout
            )
            self.python = spec.python or remote_python()

    @property
    def connected(self) -> bool:
        if self.conn is None:
            return True
        transport = self.conn.client.get_transport()
        return transport is not None and transport.is_active()

    def _python(
        self, args: list[str], timeout: float = 120.0, stdin: bytes = b""
    ) -> tuple[int, str, str]:
        """Our Python on the host; `stdin` only for local and command hosts."""
        if self.conn is None:
            run = self.runner or run_command
            status, out, err = run([self.python, *args], timeout, stdin)
        else:
            status, out, err = ssh_exec(
                self.conn, shlex.join([self.python, *args]), timeout=timeout
            )
        if status == 127:
            raise PreflightFailed(
                f"{self.name}: python {self.python!r} was not found: install "
                f"python3 there, or set {env_setting('REMOTE_PYTHON')[1]} to "
                f"its path\n"
                f"{tail(err)}",
                host=self.name,
            )
        return status, out, err

    def preflight(self) -> dict:
        """Check the host can run workers; its probe report."""
        status, out, err = self._python(["-c", _PROBE_SOURCE, runtime.bundle_hash()])
        if status != 0:
            raise PreflightFailed(
                f"{self.name}: the preflight probe failed with exit status "
                f"{status}: check {self.python!r} runs there\n{tail(err)}",
                host=self.name,
            )
        info = self._answer(out, "the preflight probe")
        mismatch = python_mismatch(self.name, info, self.name)
        if mismatch is not None:
            raise mismatch
        if info["insecure"]:  # its line names the directory and what to do
            raise PreflightFailed(f"{self.name}: {info['insecure']}", host=self.name)
        if not info["writable"]:
            raise PreflightFailed(
                f"{self.name}: base directory {info['base']} is not writable "
                f"({info['error']}): fix its permissions or set QJAMFAB_HOME "
                "for that host",
                host=self.name,
            )
        return info

    def bootstrap(self, packages: Sequence[Distribution] = ()) -> dict:
        """Preflight, then upload the runtime unless it is there already,
        and the `packages` (packages.Distribution) the host lacks."""
        info = self.preflight()
        info["runtime"] = "present"
        if not info["runtime_present"]:
            if self.runner is not None:
                self._send_runtime()
            elif self.conn is None:
                runtime.ensure_local_bundle(info["base"])
            else:
                root = f"{info['base']}/runtime"
                sftp_upload(
                    self.conn,
                    runtime.bundle_files(),
                    staging=f"{root}/.staging-{uuid.uuid4().hex}",
                    target=f"{root}/{runtime.bundle_hash()}",
                )
            info["runtime"] = "uploaded"
        info["runtime_hash"] = runtime.bundle_hash()
        if packages:
            info["packages"] = self.upload_packages(info, packages)
        return info

    def _send_runtime(self) -> None:
        """Install the bundle over the command's stdin, as an agent's boot
        code takes it (the host may not share this machine's files); the
        manage command it then runs, status, changes nothing."""
        bundle = runtime.bundle_zip()
        status, _, err = self._python(
            ["-c", runtime.boot_code("manage", install=True), "status"],
            stdin=struct.pack("!Q", len(bundle)) + bundle,
        )
        if status != 0:
            raise HostError(
                f"{self.name}: installing the runtime failed with exit status "
                f"{status}: see the output below\n{tail(err)}",
                host=self.name,
            )

    def upload_packages(self, info: dict, dists: Sequence[Distribution]) -> dict:
        """`inv bootstrap --packages`: the same zips to the same place, over
        the session's SFTP, unpacked there by runtime/packages.py. `info` is
        the host's probe report. What happened, as `ship` says it."""
        report: dict = {
            "host": self.name,
            "sent": [],
            "cached": [],
            "on_host": [],
            "bytes": 0,
        }
        if self.runner is not None:
            report["note"] = "not sent (the node runs this Python: install there)"
            return report
        if self.conn is None:
            report["note"] = "not needed (local workers run this Python)"
            return report
        check_platform(dists, info, self.name, info.get("executable") or self.python)
        offers = [{"hash": d.hash, "name": d.name, "version": d.version} for d in dists]
        answer = self._packages(["offer", json.dumps(offers)], "offer")
        root = f"{info['base']}/packages"
        for dist in dists:
            if dist.hash in answer["on_host"]:
                report["on_host"].append(str(dist))
                continue
            if dist.hash not in answer["missing"]:
                report["cached"].append(str(dist))
                continue
            data = dist.zip()
            path = f"{root}/.incoming-{uuid.uuid4().hex}.zip"
            with mapped(
                f"{self.name}: uploading {dist} to {root}",
                host=self.name,
                advice="check free disk space there and retry",
            ):
                sftp = self.conn.client.open_sftp()
                try:
                    with sftp.open(path, "wb") as f:
                        f.set_pipelined(True)
                        f.write(data)
                    sftp.chmod(path, 0o600)
                finally:
                    sftp.close()
            self._packages(["install", path, dist.hash], f"installing {dist}")
            report["sent"].append(str(dist))
            report["bytes"] += len(data)
        return report

    def _packages(self, args: list[str], what: str) -> dict:
        status, out, err = self._python(["-c", runtime.boot_code("packages"), *args])
        if status != 0:
            said = (
                err.strip().splitlines()[-1] if err.strip() else f"exit status {status}"
            )
            raise HostError(f"{self.name}: {what} failed: {said}", host=self.name)
        return self._answer(out, what)

    def manage(self, command: str, *args: str) -> dict:
        """A runtime/manage.py command on the host; its JSON answer."""
        status, out, err = self._python(
            ["-c", runtime.boot_code("manage"), command, *args]
        )
        if status != 0 and runtime.NO_RUNTIME in err:
            raise _NoRuntime(f"{self.name} has no runtime {runtime.bundle_hash()}")
        if status != 0:
            said = tail(err)
            raise HostError(
                f"{self.name}: {command} failed with exit status "
                f"{status}: "
                + (
                    f"see the output below\n{said}"
                    if said.strip()
                    else "it wrote nothing; run inv status --verbose there"
                ),
                host=self.name,
            )
        return self._answer(out, command)

    def _answer(self, out: str, what: str) -> dict:
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise HostError(
                f"{self.name}: {what} gave no answer ({exc}): "
                "check that the host's shell prints nothing on "
                f"its own\n{tail(out)}",
                host=self.name,
            ) from exc

    def manage_bootstrapped(self, command: str, *args: str) -> dict:
        """manage(), bootstrapping first when this runtime is missing."""
        try:
            return self.manage(command, *args)
        except _NoRuntime:
            self.bootstrap()
            return self.manage(command, *args)

    def start_workers(self, count: int | str = "auto") -> dict:
        """Start missing worker daemons (bootstrapping when needed): the
        host's own `workers=` setting, else `count`; with its `env.`
        settings. "auto": a command host's `cpus`, else the host's cores."""
        env = [a for k, v in self.spec.env for a in ("--env", f"{k}={v}")]
        wanted = self.spec.workers or count
        if wanted == "auto" and self.cpus is not None:
            wanted = self.cpus
        return self.manage_bootstrapped("start", "--count", str(wanted), *env)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class HostResult:
    """What one lifecycle step did on one host."""

    host: str
    ok: bool
    seconds: float
    info: dict = field(default_factory=dict)
    error: str = ""


def for_each_host(
    hosts: Sequence[Target],
    step: Callable[[HostSession], dict],
    *,
    ssh_config: str | None = None,
    connect_timeout: float = 10.0,
    on_result: Callable[[HostResult], None] | None = None,
) -> list[HostResult]:
    """Connect to every host and run step on it, all hosts in parallel.

    `on_result(result)` is called (on a pool thread) as each host finishes,
    e.g. to show progress. An unexpected exception on one host becomes that
    host's error, with its traceback in the debug log.
    """

    def attempt(host: Target) -> HostResult:
        started = time.monotonic()
        command, spec = (
            (host, host.spec) if isinstance(host, CommandHost) else (None, host)
        )
        name = target_name(host)
        session = None
        try:
            session = HostSession(
                spec,
                ssh_config=ssh_config,
                connect_timeout=connect_timeout,
                command=command,
            )
            info = step(session)
            return HostResult(name, True, time.monotonic() - started, info)
        except QjamfabError as exc:
            return HostResult(name, False, time.monotonic() - started, error=str(exc))
        except Exception as exc:  # a bug, not the host: keep the others
            log.debug("%s: unexpected error", name, exc_info=True)
            return HostResult(
                name,
                False,
                time.monotonic() - started,
                error=f"{name}: unexpected {type(exc).__name__}: {exc}: "
                "run again with --verbose for the traceback, and "
                "report it",
            )
        finally:
            if session is not None:
                session.close()

    def one(host: Target) -> HostResult:
        result = attempt(host)
        if on_result is not None:
            try:
                on_result(result)
            except Exception:  # showing progress never fails a step
                log.debug("on_result failed", exc_info=True)
        return result

    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(one, hosts))


class HostOptions(TypedDict, total=False):
    """The keyword options of for_each_host, passed on by the steps below."""

    ssh_config: str | None
    connect_timeout: float
    on_result: Callable[[HostResult], None] | None


def bootstrap(
    hosts: Sequence[Target],
    packages: Sequence[Distribution] = (),
    **kw: Unpack[HostOptions],
) -> list[HostResult]:
    """`packages`: packages.Distribution objects (packages.resolve)."""
    return for_each_host(hosts, lambda s: s.bootstrap(packages), **kw)


def start_workers(
    hosts: Sequence[Target], count: int | str = "auto", **kw: Unpack[HostOptions]
) -> list[HostResult]:
    return for_each_host(hosts, lambda s: s.start_workers(count), **kw)


# manage.py works from pid files, so this runtime also sees and stops the
# daemons of an earlier one.


def status(hosts: Sequence[Target], **kw: Unpack[HostOptions]) -> list[HostResult]:
    return for_each_host(hosts, lambda s: s.manage_bootstrapped("status"), **kw)


def clear_cache(hosts: Sequence[Target], **kw: Unpack[HostOptions]) -> list[HostResult]:
    return for_each_host(hosts, lambda s: s.manage_bootstrapped("clear"), **kw)


def stop_workers(
    hosts: Sequence[Target], **kw: Unpack[HostOptions]
) -> list[HostResult]:
    """Stop every worker daemon on these hosts; each host's answer comes
    once its daemons and their keepers have exited. Info: "stopped" (how
    many) and "killed" (the daemons that had not ended STOP_WAIT_S after
    SIGTERM and were killed, with a warning)."""
    return for_each_host(hosts, stop_host, **kw)


def stop_host(session: HostSession) -> dict:
    """stop_workers on one host."""
    info = session.manage_bootstrapped("stop")
    if info.get("killed"):
        log.warning(
            "%s: %s did not end within %g s of SIGTERM: killed (SIGKILL)",
            session.name,
            ", ".join(info["killed"]),
            STOP_WAIT_S,
        )
    return info
