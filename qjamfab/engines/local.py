"""The `local` engine: `local[:N]`, N worker processes on this machine,
each over its own pipes (one `Link` per worker, no agent between), ending
with their Master. (`inproc[:N]`, its workers threads behind a host agent
thread, is inproc.py.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import QjamfabError
from ..hostspec import HostSpec
from ..links.handshake import start_direct
from ..links.inbox import Inbox
from ..links.transport import LocalPipeTransport, Transport
from ..links.workers import Link, WorkerHandle
from . import Engine, EngineSettings, Host, register


class LocalHost:
    """This machine as one entry of the Master's hosts."""

    client = ""  # no stream to name

    def __init__(self, spec: HostSpec, settings: EngineSettings):
        self.spec = spec
        self.label = spec.kind
        self.count: int | None = (
            spec.workers or settings.workers_per_host or os.cpu_count() or 1
        )
        self.handles: dict[int, WorkerHandle] = {}
        self.failures = 0
        self.retry_at = 0.0
        self._settings = settings

    def _transport(self, name: str, k: int) -> Transport:
        env = self.spec.worker_env(k)
        if self._settings.cache_limit is not None:
            env["QJAMFAB_CACHE_LIMIT"] = str(self._settings.cache_limit)
        return LocalPipeTransport(name, self._settings.base, env)

    def _start(self, k: int) -> WorkerHandle:
        name = f"{self.label}-{k}"
        link = Link(
            self.label,
            self._transport(name, k),
            agent=False,
            stall_timeout=self._settings.heartbeat_timeout,
        )
        link.local = True
        return start_direct(link, name)

    def prepare(self, inbox: Inbox) -> None:
        missing = [
            k
            for k in range(self.count or 0)
            if k not in self.handles or not self.handles[k].alive
        ]
        for k in missing:
            old = self.handles.pop(k, None)
            if old is not None:
                old.close()
        failure = None
        with ThreadPoolExecutor(max_workers=max(1, len(missing))) as pool:
            for k, future in [(k, pool.submit(self._start, k)) for k in missing]:
                try:
                    self.handles[k] = future.result()
                    inbox.add(self.handles[k].link)
                except QjamfabError as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def _make(specs: Sequence[HostSpec], settings: EngineSettings) -> list[Host]:
    return [LocalHost(spec, settings) for spec in specs]


register(Engine("local", ("local",), _make))
