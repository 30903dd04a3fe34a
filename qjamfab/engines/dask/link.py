"""One qjamfab worker on a Dask worker, as the inbox and the Run see a link.

`DaskLink.send` turns frames into Dask operations: TASK is a `client.submit`
of `dask_worker.run_task` pinned to the Dask worker (`workers=[address]`,
`allow_other_workers=False`, `pure=False`), carrying the run's params and
the job's bytes when FUNC came first. The task answers "blocked" when the
worker lacks the job or slices; the Run then sends FUNC and REFS as it does
to any worker, and once the task has all it lacked, its slices are
scattered to that worker (`client.scatter(workers=[address])`) and the task
is submitted again with them. CANCEL cancels the future; CLEAR and STATS are
`Client.run` on that worker. Results come back on the Client's event loop
(`client.gather`), and become events in a queue (`_Mailbox`): a byte written
to a pipe makes `fileno()` readable for the inbox's poll, and
`read_events()` takes what is queued, on the Run's thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ... import protocol
from ...errors import ProtocolError, WorkerLost
from ...links.foreign import mapped
from ...links.outbox import Outbox
from ...links.workers import LOST, Event, WorkerHandle
from ...runtime.task import error_fields
from .session import DaskSession

if TYPE_CHECKING:
    from distributed import Future

log = logging.getLogger("qjamfab")


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


def _picklable(parts: Sequence) -> list:
    """Parts Dask can pickle (it pickles what it scatters and a task's
    arguments): a memoryview, as protocol.encode gives a numpy buffer and
    supply.py a slice's part, cannot be pickled; its bytes can."""
    return [bytes(p) if isinstance(p, memoryview) else p for p in parts]


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


def _never_written(views: list) -> int:
    raise AssertionError("a Dask link queues nothing")


class DaskLink:
    """One qjamfab worker on a Dask worker, as the inbox and the Run see
    a link: protocol messages in (`send`), events out (`read_events`)."""

    agent = False
    remote = False  # WorkerLost from send names the worker already
    local = False  # params go as Dask task arguments (params_place.py)
    python = ""  # what runs the worker, for messages: Dask's own

    def hold(self) -> None:
        """Sends are Dask operations, each on its way at once."""

    def release(self) -> None:
        pass

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
        self.outbox = Outbox(_never_written)  # nothing waits: see send
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
        queued: bool = False,
    ) -> int:
        """Sends are Dask operations, each on its way at once: `queued`
        (a big frame that may wait in a stream's outbox) changes nothing."""
        name = to or self.address
        if not self.alive:
            raise WorkerLost(f"worker {name} is gone", worker=name)
        size = len(pickle.dumps(head, protocol=5)) + sum(
            memoryview(p).nbytes for p in payload
        )
        try:
            with mapped(f"sending to worker {name} through Dask", worker=name):
                if kind == protocol.TASK:
                    if head["params"]:
                        self._params = _picklable(payload)
                    # Inline calls carry their own payload (runtime/calls.py).
                    own = _picklable(payload) if head.get("calls") else self._params
                    task = self._tasks[head["task"]] = _Task(head, own)
                    self._submit(task, None)
                elif kind == protocol.FUNC:
                    self._funcs[head["hash"]] = bytes(payload[0])
                    self._supplied()
                elif kind == protocol.REFS:
                    self._refs[head["ref"]] = _picklable(payload)
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
        except (RuntimeError, ValueError) as exc:  # a closed client's
            raise WorkerLost(
                f"worker {name} is unreachable through Dask "
                f"({type(exc).__name__}: {exc})",
                worker=name,
            ) from exc
        self.bytes_sent += size
        return size

    def _submit(self, task: _Task, slices: list | None) -> None:
        from .worker import run_task

        scattered = self._scatter(slices) if slices else None
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

    def _scatter(self, data: list) -> Any:
        """Data onto this worker, within the heartbeat deadline: a frozen
        worker would hold the Run's thread here, where no deadline is
        checked."""
        timeout = self.session.timeout
        with mapped(
            f"sending data to Dask worker {self.address} (deadline {timeout:g} s)",
            worker=self.handles[0].name if self.handles else self.address,
        ):
            [scattered] = self.client.scatter(
                [data], workers=[self.address], hash=False, timeout=timeout
            )
        return scattered

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
            from .worker import store

            scattered = self._scatter(spare)
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
                "error": error_fields("running qjamfab's task on Dask", exc),
            }
        finally:
            del scattered  # the worker has stored the slices
        self.transport.push(("reply", task_id, future, reply))

    async def _ask(self, kind: int) -> None:
        """CLEAR or STATS, by Client.run on the worker."""
        from . import worker as dask_worker

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
                f"the job called sys.exit (exit status {reply['exit']})",
                died=True,
                task=task_id,
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

    def lost(
        self, reason: str, died: bool | None = None, task: int | None = None
    ) -> list[Event]:
        """The worker is gone: its LOST event, its tasks dropped. `died`:
        its process ended running a task (not: the scheduler lost it);
        `task`: that task. Dask runs a worker's tasks in an order of its
        own, not the order they were sent in (seen: a slice sent after
        another run first; and a task sent back for what it lacked is
        submitted again behind later ones), so the Run cannot take the
        first of the worker's queue for the one that ended it."""
        self.alive = False
        head: dict = {"reason": reason, "died": bool(died)}
        if task is not None:
            head["task"] = task
        events = [
            Event(h, LOST, dict(head), []) for h in self.handles.values() if h.alive
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
