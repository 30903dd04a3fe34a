"""A host reached as a byte stream to its agent (runtime/agent.py): the
part every such engine shares. The engine opens the stream (`open_link`:
an SSH session, an `srun` step, tomorrow `kubectl exec -i`); the agent
installs the runtime if it is missing, starts the daemons that are not up
and attaches them all in one pass, and the host's workers' frames share
the one stream (workers.py's `Link`)."""

from __future__ import annotations

import os
import secrets
import shutil
import time

from ..errors import WorkerLost
from ..hostspec import HostSpec
from ..links.handshake import attach
from ..links.inbox import Inbox
from ..links.workers import Link, WorkerHandle
from ..runtime import spool
from . import EngineSettings

# A daemon without a session for this long ends.
IDLE_TIMEOUT_S = 3600.0


class AgentHost:
    """One host whose workers its agent attaches over one stream."""

    client: str | None = ""  # what carries the stream, where it matters
    idle_timeout_s = IDLE_TIMEOUT_S
    # Whether the stream holds big frames back (srun): they then go
    # through a directory under this machine's base, if the host sees it
    # too (a home shared by NFS; runtime/spool.py).
    spools = False

    def __init__(
        self, spec: HostSpec, label: str, count: int | None, settings: EngineSettings
    ):
        self.spec = spec
        self.label = label
        self.count = count  # None until the agent says
        self.link: Link | None = None
        self.handles: dict[int, WorkerHandle] = {}
        self.failures = 0
        self.retry_at = 0.0
        self.settings = settings
        # This Master's claim on the host: a reconnect may attach the
        # daemons it served, no other session may.
        self.session = secrets.token_hex(8)
        self.spool_dir: str | None = None  # this link's, while it lives

    def open_link(self) -> Link:
        """A new stream to the host's agent, started (handshake.start_agent)."""
        raise NotImplementedError

    def prepare(self, inbox: Inbox) -> None:
        offer = None
        if self.link is None or not self.link.alive:
            self.link = self.open_link()
            inbox.add(self.link)
            offer = self._new_spool()
            if self.settings.packages:
                from ..links import package_ship

                package_ship.ship(self.link, self.settings.packages)
        missing = (
            None
            if self.count is None
            else [
                k
                for k in range(self.count)
                if k not in self.handles or not self.handles[k].alive
            ]
        )
        new, failed = attach(
            self.link,
            missing or None,
            self.count,
            self.idle_timeout_s,
            self.settings.cache_limit,
            dict(self.spec.env),
            self.session,
            offer,
        )
        if self.count is None:
            self.count = self.link.count
        for handle in new:
            handle.last_seen = time.monotonic()
            self.handles[handle.index] = handle
        if failed:
            reasons = "; ".join(
                f"{self.label}-{k}: {why}" for k, why in sorted(failed.items())
            )
            raise WorkerLost(
                f"{len(failed)} of the workers of {self.label} "
                f"did not start: {reasons}",
                worker=f"{self.label}-{min(failed)}",
            )

    def _new_spool(self) -> dict | None:
        """A fresh spool directory for a new link, offered to its agent
        with ATTACH; the last link's removed."""
        self._drop_spool()
        if not self.spools:
            return None
        root = os.path.join(self.settings.base, "spool")
        self.spool_dir, token = spool.new_dir(root, self.session)
        return {"dir": self.spool_dir, "token": token}

    def _drop_spool(self) -> None:
        if self.spool_dir is not None:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
            self.spool_dir = None

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        if self.link is not None:
            self.link.close()
            self.link = None
        self._drop_spool()
