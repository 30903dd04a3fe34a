"""qjamfab on an existing Dask cluster: the Dask side of the engine seam.

`Master(client)` or `Master("tcp://scheduler:8786")` puts one `DaskHost`
in the Master's host list where SSH hosts would be. The Master and its
`Run` go on as they do for our own workers: a Run sends protocol messages
to `WorkerHandle`s and reads `Event`s from the inbox. Here, what carries
them is Dask, built from its own pieces:

- `DaskSession` (in the DaskHost's `link` slot, so the Master's close
  closes it) holds the Client: it registers the worker plugin
  (dask_worker.py) once, and a watcher thread asks the scheduler every
  second or less which Dask workers are up (`scheduler.identity`): a
  worker that is no longer there is a LOST event for its handles, one
  whose scheduler heartbeat moved keeps its handles' `last_seen` fresh
  (so the Run's heartbeat check works as for SSH hosts), and one that
  joined gets handles before the next run.
- One qjamfab worker per Dask worker thread (Dask's unit of work, as a
  core is ours), named `dask-<n>`; a Dask worker's name keeps its
  numbers across restarts by its nanny. Each is a `WorkerHandle` on a
  `DaskLink` of its own, the way a local worker has a Link of its own, so
  the Run treats its loss alone.
- `DaskLink.send` turns frames into Dask operations: TASK is a
  `client.submit` of `dask_worker.run_task` pinned to the Dask worker
  (`workers=[address]`, `allow_other_workers=False`, `pure=False`),
  carrying the run's params and the job's bytes when FUNC came first.
  The task answers "blocked" when the worker lacks the job or slices; the
  Run then sends FUNC and REFS as it does to any worker, and once the
  task has all it lacked, its slices are scattered to that worker
  (`client.scatter(workers=[address])`) and the task is submitted again
  with them. CANCEL cancels the future; CLEAR and STATS are `Client.run`
  on that worker. Results come back on the Client's event loop
  (`client.gather`), and become events in a queue: a byte written to a
  pipe makes `fileno()` readable for the inbox's poll, and
  `read_events()` takes what is queued, on the Run's thread.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import pickle
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from .. import protocol, runtime
from ..errors import (
    HostUnreachable,
    PreflightFailed,
    ProtocolError,
    QjamfabError,
    WorkerLost,
)
from ..hostspec import HostSpec
from ..workers import LOST, Event, Inbox, Link, WorkerHandle
from . import Engine, EngineSettings, register

if TYPE_CHECKING:
    from distributed import Client, Future
    from distributed.diagnostics.plugin import WorkerPlugin

log = logging.getLogger("qjamfab")

LABEL = "dask"  # workers are dask-0, dask-1, ...
CONNECT_TIMEOUT_S = 10.0  # to reach a scheduler given by address
_SCHEMES = ("tcp://", "tls://", "ucx://", "ws://", "wss://", "inproc://")
_OPTIONS = {  # Master options that mean nothing to a Dask cluster
    "workers_per_host": "Dask decides: one qjamfab worker per Dask worker thread",
    "ssh_config": "Dask workers are not reached over SSH",
    "ssh_client": "Dask workers are not reached over SSH",
    "packages": "install them in the Dask workers' environment, for example "
    "with distributed's PipInstall worker plugin",
}


def is_dask(hosts: object) -> TypeGuard[str | Client]:
    """Whether Master(hosts) names a Dask cluster: a `distributed.Client`,
    or a scheduler address such as "tcp://10.0.0.5:8786"."""
    if isinstance(hosts, str):
        return hosts.strip().lower().startswith(_SCHEMES)
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(hosts, distributed.Client)


def dask_host(hosts: object, settings: EngineSettings) -> DaskHost:
    """The Master's host entry for a Dask cluster (`hosts` is_dask). The
    Master's SSH options must be left out. A scheduler address gets a
    Client of its own, closed with the Master."""
    assert is_dask(hosts)
    heartbeat_timeout = settings.heartbeat_timeout
    options = {
        "workers_per_host": settings.workers_per_host,
        "ssh_config": settings.ssh_config,
        "ssh_client": settings.ssh_client,
        "packages": settings.packages or None,
    }
    for option, value in options.items():
        if value is not None:
            raise ValueError(
                f"{option} does not apply to a Dask cluster "
                f"({_OPTIONS[option]}): leave it out"
            )
    shown = hosts.strip() if isinstance(hosts, str) else "a Client"
    try:
        import distributed
    except ImportError as exc:
        raise QjamfabError(
            f"Master({shown!r}) needs Dask's distributed package: "
            f"pip install 'qjamfab[dask]'\n({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(hosts, str):
        if hosts.asynchronous:
            raise ValueError(
                "Master needs a synchronous Client: create it "
                "with Client(..., asynchronous=False)"
            )
        if hosts.status != "running":
            raise ValueError(
                f"this Client is {hosts.status}, not running: pass a connected Client"
            )
        return DaskHost(DaskSession(hosts, False, heartbeat_timeout))
    try:
        client = distributed.Client(
            shown, timeout=CONNECT_TIMEOUT_S, set_as_default=False
        )
    except (OSError, TimeoutError) as exc:
        raise HostUnreachable(
            f"cannot reach the Dask scheduler at {shown} in "
            f"{CONNECT_TIMEOUT_S:g} s: check the address and that the "
            f"scheduler runs ({type(exc).__name__}: {exc})",
            host=shown,
        ) from exc
    return DaskHost(DaskSession(client, True, heartbeat_timeout))


def check_hello(address: str, hello: dict | BaseException) -> QjamfabError | None:
    """What is wrong with a Dask worker, from its hello (or the exception
    that came instead), or None: it can serve this Master."""
    from ..version import __version__

    install = (
        f"install this qjamfab ({__version__}) in the Dask "
        "workers' environment (or the image they run)"
    )
    if isinstance(hello, BaseException):
        return PreflightFailed(
            f"Dask worker {address} cannot run qjamfab "
            f"({type(hello).__name__}: {hello}): {install}",
            host=address,
        )
    if hello["version"] != protocol.VERSION:
        return PreflightFailed(
            f"Dask worker {address} speaks qjamfab protocol "
            f"{hello['version']}, this Master {protocol.VERSION}: {install}",
            host=address,
        )
    theirs, ours = tuple(hello["python"][:2]), sys.version_info[:2]
    if theirs != ours:
        return PreflightFailed(
            f"Dask worker {address} runs Python "
            f"{'.'.join(map(str, hello['python']))}, the master "
            f"{ours[0]}.{ours[1]}: cloudpickle needs the same minor version; "
            f"run the Dask workers with a python{ours[0]}.{ours[1]}",
            host=address,
        )
    if hello["error"]:
        return PreflightFailed(f"Dask worker {address}: {hello['error']}", host=address)
    return None


class DaskHost:
    """A Dask cluster as one entry of the Master's hosts: its workers
    (one per Dask worker thread, `handles` by number) and the session."""

    def __init__(self, session: DaskSession):
        self.spec = HostSpec(session.address, "dask")
        self.label = LABEL
        self.link = session
        self.handles: dict[int, WorkerHandle] = {}
        self.failures = 0
        self.retry_at = 0.0
        self._slots: dict[tuple[str, int], int] = {}  # (name, thread) -> n
        self._refused: set[str] = set()  # Dask workers left out, warned once
        self._started = False

    @property
    def count(self) -> int | None:
        """Workers numbered so far (None before the first start): every
        Dask worker thread seen, up or not."""
        if not self._started:
            return None
        self._number(self.link.members)
        return len(self._slots)

    client = ""  # carried by Dask: nothing to name

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        # Its session stays: a closed Master still counts its workers.
        self.link.close()

    def _number(self, members: dict) -> None:
        for _, info in sorted(members.items(), key=lambda m: _natural(m[1]["name"])):
            for thread in range(info["nthreads"]):
                self._slots.setdefault((info["name"], thread), len(self._slots))

    def prepare(self, inbox: Inbox) -> None:
        """Give a handle to every numbered worker whose Dask worker is up
        and has none alive (the Master calls this before each run)."""
        first = not self._started
        if first:
            self.link.start()
            self._started = True
        members = self.link.members
        self._number(members)
        by_name = {
            info["name"]: address
            for address, info in members.items()
            if info["status"] == "running"
        }
        wanted: dict[str, list[int]] = {}
        for (name, thread), n in self._slots.items():
            handle = self.handles.get(n)
            address = by_name.get(name)
            if (
                (handle is not None and handle.alive)
                or address is None
                or address in self._refused
                or thread >= members[address]["nthreads"]
            ):
                continue
            wanted.setdefault(address, []).append(n)
        if wanted:
            hellos = self.link.hellos(list(wanted))
            for address, numbers in wanted.items():
                if address not in hellos:
                    continue  # it left meanwhile
                problem = check_hello(address, hellos[address])
                if problem is not None:
                    if first:
                        raise problem
                    self._refused.add(address)
                    log.warning("left out: %s", str(problem).splitlines()[0])
                    continue
                hello = cast(dict, hellos[address])  # not an exception: checked
                for n in numbers:
                    self._attach(inbox, address, n, hello)
        if first and not any(h.alive for h in self.handles.values()):
            raise WorkerLost(
                f"the Dask cluster at {self.spec.raw} has no running workers: "
                "start some (cluster.scale(n)) or wait for them "
                "(client.wait_for_workers(n)), then create the Master"
            )

    def _attach(self, inbox: Inbox, address: str, n: int, hello: dict) -> None:
        old = self.handles.pop(n, None)
        if old is not None:
            old.close()
        link = DaskLink(self.link, address)
        # A DaskLink serves as a Link (the attributes and methods that
        # WorkerHandle and Inbox use), without being one.
        as_link = cast(Link, link)
        handle = link.handles[0] = WorkerHandle(as_link, n, f"{LABEL}-{n}", hello)
        handle.refs.update(hello["refs"])  # the slices it has already
        self.handles[n] = handle
        inbox.add(as_link)
        self.link.watch(link)


def _natural(name: str) -> list:
    """Sort key: "worker-2" before "worker-10"."""
    return [
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)
    ]


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
        self._links: dict[str, list[DaskLink]] = {}
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
        from ..version import __version__
        from . import dask_worker

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
        try:
            self.refresh()
        except (OSError, TimeoutError) as exc:
            raise HostUnreachable(
                f"the Dask scheduler at {self.address} does not answer "
                f"({type(exc).__name__}: {exc}): check that it runs",
                host=self.address,
            ) from exc
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

    def watch(self, link: DaskLink) -> None:
        with self._lock:
            self._links.setdefault(link.address, []).append(link)

    def hellos(self, addresses: list[str]) -> dict[str, dict | BaseException]:
        """address -> the worker's hello, or the exception it raised."""
        from . import dask_worker

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


class _Mailbox:
    """Events for the Master, pushed from Dask's threads, taken on the
    Run's: a queue and a pipe whose read end the inbox polls. It also
    serves as the link's `reader` and `transport` for the inbox and for
    `WorkerHandle.exit_report`."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self.exit: tuple[int | None, str] = (None, "")

    def fileno(self) -> int:
        return self._read

    def buffered(self) -> bool:
        return bool(self._items)

    def has_input(self) -> bool:
        return True

    def computing(self) -> bool:
        # A silent Dask worker is judged by the scheduler's heartbeats
        # (the watcher), not from here.
        return False

    def push(self, item: tuple) -> None:
        with self._lock:
            if self._closed:
                return
            self._items.append(item)
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:
                pass  # full: readable already

    def take(self) -> list[tuple]:
        with self._lock:
            if self._closed:
                return []
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass
            items = list(self._items)
            self._items.clear()
        return items

    def exit_report(self, _log_path: str | None) -> tuple[int | None, str]:
        return self.exit

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


class _Task:
    """A TASK sent to a Dask worker: submitted (`future`), or waiting for
    what its worker lacks (`missing` refs, `needs_func`)."""

    __slots__ = ("head", "params", "future", "missing", "needs_func")

    def __init__(self, head: dict, params: list):
        self.head = head
        self.params = params
        self.future: Future | None = None
        self.missing: set[str] | None = None
        self.needs_func = False


class DaskLink:
    """One qjamfab worker on a Dask worker, as the inbox and the Run see
    a link: protocol messages in (`send`), events out (`read_events`)."""

    agent = False
    remote = False  # WorkerLost from send names the worker already
    python = ""  # what runs the worker, for messages: Dask's own

    @staticmethod
    def install_advice(ship: str | None) -> str:
        """What a worker lacks is installed Dask's way."""
        return (
            "install it in the Dask workers' environment (for example with "
            "distributed's PipInstall worker plugin)"
        )

    def computing(self) -> bool:
        return self.transport.computing()

    def __init__(self, session: DaskSession, address: str):
        self.session = session
        self.client = session.client
        self.address = address
        self.label = address  # handle.host: one Dask worker, one cache
        self.handles: dict[int, WorkerHandle] = {}
        self.alive = True
        self.last_seen = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reader = self.transport = _Mailbox()
        self._tasks: dict[int, _Task] = {}
        self._funcs: dict[str, bytes] = {}  # FUNC not yet sent on
        self._refs: dict[str, list] = {}  # REFS not yet sent on
        self._params: list = []  # the run's params
        self._stores: set[Future] = set()  # replicas on their way

    def fileno(self) -> int:
        return self.transport.fileno()

    # --- frames out ------------------------------------------------------

    def send(
        self,
        kind: int,
        head: dict,
        payload: Sequence = (),
        worker: int = 0,
        to: str | None = None,
    ) -> int:
        name = to or self.address
        if not self.alive:
            raise WorkerLost(f"worker {name} is gone", worker=name)
        size = len(pickle.dumps(head, protocol=5)) + sum(
            memoryview(p).nbytes for p in payload
        )
        try:
            if kind == protocol.TASK:
                if head["params"]:
                    self._params = list(payload)
                task = self._tasks[head["task"]] = _Task(head, self._params)
                self._submit(task, None)
            elif kind == protocol.FUNC:
                self._funcs[head["hash"]] = bytes(payload[0])
                self._supplied()
            elif kind == protocol.REFS:
                self._refs[head["ref"]] = list(payload)
                self._supplied()
            elif kind == protocol.CANCEL:
                self._cancel(head["task"])
            elif kind in (protocol.CLEAR, protocol.STATS):
                self.client.loop.add_callback(  # type: ignore[union-attr]
                    self._ask, kind
                )
            else:
                raise ProtocolError(
                    f"a Dask worker takes no "
                    f"{protocol.KIND_NAMES.get(kind, kind)} frame"
                )
        except (OSError, TimeoutError, RuntimeError, ValueError) as exc:
            raise WorkerLost(
                f"worker {name} is unreachable through Dask "
                f"({type(exc).__name__}: {exc})",
                worker=name,
            ) from exc
        self.bytes_sent += size
        return size

    def _submit(self, task: _Task, slices: list | None) -> None:
        from .dask_worker import run_task

        scattered = None
        if slices:
            [scattered] = self.client.scatter(
                [slices], workers=[self.address], hash=False
            )
        # One opaque blob: Dask walks dicts and lists given as arguments
        # into task nodes of their own (2 ms a round trip, measured).
        blob = pickle.dumps(
            (task.head, task.params[0], self._funcs.pop(task.head["func"], None)),
            protocol=5,
        )
        task.future = self.client.submit(
            run_task,
            blob,
            scattered,
            *task.params[1:],
            key=f"qjamfab-task-{task.head['task']}-{uuid.uuid4().hex[:12]}",
            workers=[self.address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        self.client.loop.add_callback(  # type: ignore[union-attr]
            self._await_reply, task.head["task"], task.future, scattered
        )

    def _supplied(self) -> None:
        """After FUNC or REFS: submit again each blocked task that now has
        what it lacked, with those slices; keep any other slice there."""
        for task in self._tasks.values():
            if (
                task.missing is not None
                and task.missing <= self._refs.keys()
                and (not task.needs_func or task.head["func"] in self._funcs)
            ):
                slices = [(ref, self._refs.pop(ref)) for ref in task.missing]
                task.missing = None
                self._submit(task, slices)
        wanted = set().union(
            *(t.missing for t in self._tasks.values() if t.missing is not None)
        )
        spare = [
            (ref, self._refs.pop(ref)) for ref in list(self._refs) if ref not in wanted
        ]
        if spare:  # a replica: no task waits for it
            from .dask_worker import store

            [scattered] = self.client.scatter(
                [spare], workers=[self.address], hash=False
            )
            future = self.client.submit(
                store,
                scattered,
                workers=[self.address],
                allow_other_workers=False,
                pure=False,
            )
            self._stores.add(future)
            future.add_done_callback(self._stored)

    def _stored(self, future: Future) -> None:
        self._stores.discard(future)
        if future.status == "error":
            log.warning(
                "worker %s could not keep a replica: %s",
                self.address,
                future.exception(),
            )

    def _cancel(self, task_id: int) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None:
            return
        if task.future is not None:
            self.client.loop.add_callback(  # type: ignore[union-attr]
                self.client.cancel, [task.future], asynchronous=True
            )
        self.transport.push(
            ("event", protocol.STATE, {"task": task_id, "state": "cancelled"})
        )

    async def _await_reply(
        self, task_id: int, future: Future, scattered: Future | None
    ) -> None:
        """On the Client's loop: the task's reply, queued for the Run."""
        try:
            reply = await self.client.gather(future, asynchronous=True)
        except asyncio.CancelledError:
            return  # cancelled: nobody waits for it
        except Exception as exc:
            if future.cancelled():
                return
            reply = {
                "log": "",
                "error": {
                    "phase": "running qjamfab's task on Dask",
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "traceback": "".join(traceback.format_exception(exc)),
                },
            }
        finally:
            del scattered  # the worker has stored the slices
        self.transport.push(("reply", task_id, future, reply))

    async def _ask(self, kind: int) -> None:
        """CLEAR or STATS, by Client.run on the worker."""
        from . import dask_worker

        func = dask_worker.clear if kind == protocol.CLEAR else dask_worker.stats
        try:
            replies = await self.client.run(
                func, workers=[self.address], asynchronous=True
            )
        except Exception as exc:  # the Master's wait says it
            log.debug(
                "%s on %s failed: %s", protocol.KIND_NAMES[kind], self.address, exc
            )
            return
        self.transport.push(("event", kind, replies[self.address]))

    # --- events in -------------------------------------------------------

    def read_events(self) -> list[Event]:
        events: list[Event] = []
        for item in self.transport.take():
            handle = self.handles.get(0)
            if handle is None or not handle.alive:
                break
            self.last_seen = handle.last_seen = time.monotonic()
            if item[0] == "reply":
                events += self._reply(handle, *item[1:])
            elif item[0] == "gone":
                events += self.lost(item[1])
            else:
                events.append(Event(handle, item[1], item[2], []))
        return events

    def _reply(
        self, handle: WorkerHandle, task_id: int, future: Future, reply: dict
    ) -> list[Event]:
        task = self._tasks.get(task_id)
        if task is None or task.future is not future:
            return []  # cancelled meanwhile
        task.future = None
        if "blocked" in reply:
            blocked = reply["blocked"]
            task.missing = set(blocked["refs"])
            task.needs_func = blocked["func"]
            return [
                Event(
                    handle,
                    protocol.STATE,
                    {
                        "task": task_id,
                        "state": "blocked",
                        "refs": blocked["refs"],
                        "func": blocked["func"],
                    },
                    [],
                )
            ]
        del self._tasks[task_id]
        text = reply["log"]
        self.bytes_received += len(text.encode())
        events = [Event(handle, protocol.LOG, {"text": text}, [])] if text else []
        if "result" in reply:
            parts = reply["result"]
            self.bytes_received += sum(memoryview(p).nbytes for p in parts)
            events.append(
                Event(
                    handle,
                    protocol.RESULT,
                    {
                        "task": task_id,
                        "compute_s": reply["compute_s"],
                        "slices": reply["slices"],
                    },
                    parts,
                )
            )
        elif "error" in reply:
            events.append(
                Event(handle, protocol.ERROR, {"task": task_id, **reply["error"]}, [])
            )
        else:
            self.transport.exit = (reply["exit"], text)
            events += self.lost(
                f"the job called sys.exit (exit status {reply['exit']})", died=True
            )
        return events

    # --- from the session's watcher --------------------------------------

    def gone(self, reason: str) -> None:
        """The scheduler no longer lists the Dask worker."""
        self.transport.push(("gone", reason))

    def beat(self, now: float) -> None:
        self.last_seen = now
        for handle in self.handles.values():
            handle.last_seen = now

    # --- the end ---------------------------------------------------------

    def lost(self, reason: str, died: bool | None = None) -> list[Event]:
        """The worker is gone: its LOST event, its tasks dropped. `died`:
        its process ended running a task (not: the scheduler lost it)."""
        self.alive = False
        events = [
            Event(h, LOST, {"reason": reason, "died": bool(died)}, [])
            for h in self.handles.values()
            if h.alive
        ]
        for handle in self.handles.values():
            handle.alive = False
        self._drop_tasks()
        return events

    def _drop_tasks(self) -> None:
        futures = [t.future for t in self._tasks.values() if t.future is not None]
        self._tasks.clear()
        self._refs.clear()
        if futures:
            try:
                self.client.loop.add_callback(  # type: ignore[union-attr]
                    self.client.cancel, futures, asynchronous=True
                )
            except RuntimeError:
                pass  # the Client's loop has ended: nothing runs anyway

    def close(self) -> None:
        self.alive = False
        for handle in self.handles.values():
            handle.alive = False
        self._drop_tasks()
        self.transport.close()


register(Engine("dask", claims=is_dask, make_for=dask_host))


def _installer() -> WorkerPlugin:
    """The plugin that installs qjamfab's worker bundle in each Dask
    worker (dask_boot.py), pickled by value: the runtime, protocol,
    errors and reduce as shipped to SSH hosts, and dask_worker.py (Dask
    workers have their own cloudpickle)."""
    import cloudpickle

    from . import dask_boot, dask_worker

    cloudpickle.register_pickle_by_value(dask_boot)
    files = {
        path: content
        for path, content in runtime.bundle_files().items()
        if path.startswith("qjamfab/")
    }
    files["qjamfab/engines/__init__.py"] = b'"""Engines in a Dask worker."""\n'
    with open(dask_worker.__file__, "rb") as f:
        files["qjamfab/engines/dask_worker.py"] = f.read()
    return dask_boot.RuntimeInstaller(files)
