"""The Dask side's session: the `Client` a Master holds for a Dask cluster,
and what the scheduler says of its workers.

`DaskSession` (in the DaskHost's `link` slot, so the Master's close closes
it) registers the worker plugin (worker.py) once, and a watcher thread
asks the scheduler every second or less which Dask workers are up
(`scheduler.identity`): a worker that is no longer there is a LOST event for
the links on it, one whose scheduler heartbeat moved keeps their
`last_seen` fresh (so the Run's heartbeat check works as for SSH hosts),
and one that joined gets handles before the next run (engine.py's DaskHost).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ... import runtime
from ...errors import PreflightFailed
from ...links.foreign import mapped

if TYPE_CHECKING:
    from distributed import Client
    from distributed.diagnostics.plugin import WorkerPlugin

log = logging.getLogger("qjamfab")


class WatchedLink(Protocol):
    """What the watcher uses of a link on a Dask worker (a DaskLink)."""

    address: str
    alive: bool

    def gone(self, reason: str) -> None: ...

    def beat(self, now: float) -> None: ...


class DaskSession:
    """The Client and what the scheduler says of its workers."""

    def __init__(self, client: Client, owned: bool, heartbeat_timeout: float):
        self.client = client
        self.owned = owned  # made by us: closed with the Master
        # distributed types a Client's scheduler Optional (None until it
        # connects: this one runs) and an rpc's address too (set when made).
        self.address: str = client.scheduler.address  # type: ignore[union-attr,assignment]
        self.timeout = heartbeat_timeout
        self.interval = min(1.0, heartbeat_timeout / 5)
        # address -> {name, nthreads, status, last_seen}: the latest view
        self.members: dict[str, dict] = {}
        self._links: dict[str, list[WatchedLink]] = {}
        self._seen: dict[str, float] = {}  # address -> its last heartbeat
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # At exit, before distributed's own handler closes a LocalCluster
        # of this process (registered earlier, so run later): else an
        # unclosed Master's Client waits 10 s for a scheduler that is gone.
        atexit.register(self.close)

    def start(self) -> None:
        """Register the worker plugin, learn the workers, start watching."""
        from ...version import __version__
        from . import worker as dask_worker

        plugin = dask_worker.QjamfabPlugin()
        try:
            # First the bundle, by value: the plugin, then every task,
            # import from it (Dask workers need no qjamfab installed).
            self.client.register_plugin(_installer())
            self.client.register_plugin(plugin)
        except Exception as exc:
            try:  # the scheduler keeps it for workers to come: take it back
                self.client.unregister_worker_plugin(plugin.name)
            except Exception:
                pass
            said = (
                str(exc) if type(exc) is Exception else f"{type(exc).__name__}: {exc}"
            )  # a worker's, passed on
            raise PreflightFailed(
                f"the Dask workers cannot take qjamfab's worker plugin "
                f"({said}): install this qjamfab "
                f"({__version__}) in the Dask workers' environment "
                "(or the image they run)",
                host=self.address,
            ) from exc
        with mapped(
            f"asking the Dask scheduler at {self.address} for its workers",
            host=self.address,
            advice="check that it runs",
        ):
            self.refresh()
        self._thread = threading.Thread(
            target=self._watch, daemon=True, name="qjamfab-dask-watch"
        )
        self._thread.start()

    def call(self, method: Callable, *args: Any, **kwargs: Any) -> Any:
        """A Client method, on the Client's loop, waited for at most
        heartbeat_timeout s (TimeoutError after)."""

        async def waited() -> object:
            return await asyncio.wait_for(
                method(*args, asynchronous=True, **kwargs), self.timeout
            )

        return self.client.sync(waited)

    def refresh(self) -> None:
        """Ask the scheduler which workers are up: report the ones gone,
        freshen the heartbeats of the ones whose own heartbeat moved."""

        async def identity() -> dict:
            return await asyncio.wait_for(
                self.client.scheduler.identity(),  # type: ignore[union-attr]
                self.timeout,
            )  # all workers

        info = self.client.sync(identity)
        members = {
            address: {
                "name": str(w["name"]),
                "nthreads": w["nthreads"],
                "status": w["status"],
                "last_seen": w["last_seen"],
            }
            for address, w in info["workers"].items()
        }
        now = time.monotonic()
        with self._lock:
            self.members = members
            for address, links in list(self._links.items()):
                links = [x for x in links if x.alive]
                worker = members.get(address)
                if worker is None:
                    for link in links:
                        link.gone(f"the Dask scheduler removed Dask worker {address}")
                    del self._links[address]
                    self._seen.pop(address, None)
                    continue
                self._links[address] = links
                if worker["last_seen"] != self._seen.get(address):
                    self._seen[address] = worker["last_seen"]
                    for link in links:
                        link.beat(now)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception as exc:  # the scheduler away: no heartbeats
                log.debug(
                    "Dask scheduler %s: %s: %s", self.address, type(exc).__name__, exc
                )

    def watch(self, link: WatchedLink) -> None:
        with self._lock:
            self._links.setdefault(link.address, []).append(link)

    def hellos(self, addresses: list[str]) -> dict[str, dict | BaseException]:
        """address -> the worker's hello, or the exception it raised."""
        from . import worker as dask_worker

        try:
            return self.call(
                self.client.run, dask_worker.hello, workers=addresses, on_error="return"
            )
        except (OSError, TimeoutError) as exc:
            return {address: exc for address in addresses}

    def close(self) -> None:
        atexit.unregister(self.close)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
        if self.owned:
            self.client.close()


def _installer() -> WorkerPlugin:
    """The plugin that installs qjamfab's worker bundle in each Dask
    worker (boot.py), pickled by value: the runtime, protocol,
    errors and reduce as shipped to SSH hosts, and worker.py (Dask
    workers have their own cloudpickle)."""
    import cloudpickle

    from . import boot as dask_boot
    from . import worker as dask_worker

    cloudpickle.register_pickle_by_value(dask_boot)
    files = {
        path: content
        for path, content in runtime.bundle_files().items()
        if path.startswith("qjamfab/")
    }
    files["qjamfab/engines/__init__.py"] = b'"""Engines in a Dask worker."""\n'
    files["qjamfab/engines/dask/__init__.py"] = b'"""qjamfab in a Dask worker."""\n'
    with open(dask_worker.__file__, "rb") as f:
        files["qjamfab/engines/dask/worker.py"] = f.read()
    return dask_boot.RuntimeInstaller(files)
