"""The `ssh` engine: one stream per host to the host's agent.

The stream runs through the system's OpenSSH client, or paramiko where
that client cannot reach the host (or is not wanted): the agent
(runtime/agent.py) installs the runtime if it is missing, starts the
daemons that are not up and attaches them all in one pass; the host's
workers' frames then share the one stream (workers.py's `Link`).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence

from ... import runtime
from ...errors import WorkerLost
from ...hostspec import HostSpec
from ...links.handshake import start_agent
from ...links.workers import Link
from .. import Engine, EngineSettings, Host, register
from ..agent_host import AgentHost
from ..cluster import remote_python
from . import hosts as hostlib
from . import openssh
from .channel import SSHChannelTransport
from .openssh import OPENSSH_FAILED, OpenSSHTransport, openssh_client

log = logging.getLogger("qjamfab")


class SSHHost(AgentHost):
    """One SSH host of the Master's: its stream and its workers."""

    def __init__(self, spec: HostSpec, settings: EngineSettings):
        # None until the agent says (its recorded count, or one per core).
        super().__init__(
            spec, spec.raw, spec.workers or settings.workers_per_host, settings
        )
        self._openssh_failed = False

    @property
    def client(self) -> str | None:  # type: ignore[override]
        if self.link is None or not self.link.alive:
            return None
        return (
            "openssh"
            if isinstance(self.link.transport, OpenSSHTransport)
            else ("paramiko")
        )

    def open_link(self) -> Link:
        """One stream to the host's agent: through the OpenSSH client, or
        paramiko where it cannot reach the host (or is not wanted)."""
        settings = self.settings
        python = self.spec.python or remote_python()
        command = shlex.join([python, "-c", runtime.boot_code("agent", install=True)])
        ssh = None if self._openssh_failed else openssh_client(settings.ssh_client)
        if ssh is not None:
            link = Link(
                self.label,
                OpenSSHTransport(
                    self.label,
                    openssh.openssh_command(
                        ssh, self.spec, command, ssh_config=settings.ssh_config
                    ),
                ),
                agent=True,
                stall_timeout=settings.heartbeat_timeout,
            )
            try:
                start_agent(link, python)
                return link
            except WorkerLost as exc:
                if exc.exit_status != OPENSSH_FAILED:
                    raise
                why = (exc.stderr_tail or "no message").splitlines()[-1]
            # paramiko says why (host key, auth, unreachable) or works; out
            # of the except block, its error does not chain the OpenSSH one.
            log.warning(
                "the OpenSSH client cannot reach %s (%s); trying paramiko",
                self.spec.raw,
                why,
            )
            conn = hostlib.connect(self.spec, ssh_config=settings.ssh_config)
            self._openssh_failed = True
        else:
            conn = hostlib.connect(self.spec, ssh_config=settings.ssh_config)
        link = Link(
            self.label,
            SSHChannelTransport(self.label, conn, command),
            agent=True,
            stall_timeout=settings.heartbeat_timeout,
        )
        start_agent(link, python)
        return link


def _make(specs: Sequence[HostSpec], settings: EngineSettings) -> list[Host]:
    return [SSHHost(spec, settings) for spec in specs]


register(Engine("ssh", ("ssh",), _make))
