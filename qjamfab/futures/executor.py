"""`Master` as a `concurrent.futures.Executor`: `submit`, `map`, `shutdown`.

This module owns the Executor side of a Master: the queue of submitted
calls, the dispatcher thread that sends them to the workers as a stream of
tasks (stream.py), and the run lock that `Master.run` and the futures
share. A call and how its outcome reaches its future are
calls.py's; map's calls and its result iterator map.py's.

How a call travels
------------------
- `submit(fn, *args, **kwargs)` queues the call and returns a `Future` at
  once. A dispatcher thread (started on demand, gone when nothing is queued
  or in flight) sends queued calls to idle workers, one task per worker at
  a time, and reads the answers: a future completes when its task's RESULT
  arrives, so `wait`, `as_completed`, callbacks and `map` see each call as
  it finishes, and calls submitted meanwhile go to workers as they free up.
- A task carries its calls inline (runtime/calls.py): the cloudpickle of
  their `(fn, args, kwargs)` is in the TASK frame itself, never written to
  the workers' caches, and functions and arguments travel by value like
  `run`'s jobs (lambdas, closures, notebook cells); a function several
  calls of one task share is pickled once in it. Each call runs in its own
  `try`.
- Batching is adaptive, as joblib's auto-batching (stream.BatchSizer): a
  task takes one call at first, then as many as fill about 50 ms by the
  calls' mean time so far (growing 8-fold per task at most, shrinking at
  once when calls get long), and never more than 1/(2 x workers) of what
  waits, so 10,000 trivial calls are a few dozen tasks and a long call
  does not hold back a quick one submitted beside it.
- A worker lost while running a task: its calls run again on the others
  (each future resolves once). A worker that *died* (its process ended)
  may have been killed by one of its calls: those run again one per task,
  and a call that killed two workers fails its own future with WorkerLost
  naming it. Lost workers are restarted once nothing is in flight.

`map(fn, *iterables, timeout=None, chunksize=1)`
------------------------------------------------
Collects the iterables at once (as the standard library does) and queues
one call per item (chunksize=1, the default: batched adaptively as
above; in a map of more than 64 items per worker, calls of as many items
as make 64 per worker), or per `chunksize` items (a chunk is one call,
its items each in their own `try` on the worker). It yields results in
order, each as soon as it is in, and does not keep them once yielded.
`timeout` counts from the call to `map`: `TimeoutError` when a result is
not there in time. Closing the iterator, or a timeout, cancels the items
not started.

Errors
------
A call that raises fails only its own future (in `map`, the result
iterator raises when it reaches that item). `.result()` raises the
*original* exception type (so `except ValueError` works), re-created from
its pickle, with a `RemoteError` as its `__cause__` carrying the remote
traceback (`.remote_traceback`), the way ProcessPoolExecutor chains a
`_RemoteTraceback`. An exception that cannot be pickled or re-created
here is raised as the `RemoteError` itself. A call whose function or
arguments cannot be pickled fails its future with `BadJob`. When no worker
is left and none can be started, the futures in flight and queued fail
with that `WorkerLost`.

Runs and futures on one Master
------------------------------
The Master is not thread-safe, so every `run`, `clear_cache`,
`worker_stats` and `close` takes the Master's run lock (`exclusive`), and
so does the dispatcher while futures are in flight. A `run()` (from any
other thread) waits until the tasks in flight finish, while no new task
is sent (new submits queue meanwhile); it then has every worker, and the
futures resume after it. `m.last_run` describes runs only. Callbacks run
on the dispatcher thread: do not wait on a future there, nor call `run`,
`clear_cache` or `worker_stats` (QjamfabError says so).

`shutdown(wait=True, cancel_futures=False)` is `close()`: no new calls
(`ExecutorShutdown`), queued ones run unless `cancel_futures`, then the
Master closes; `close()` and leaving `with Master(...)` wait for queued
calls the same way. With `wait=False` it returns at once and the
dispatcher closes the Master when the queue is done.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import cloudpickle

from .. import text
from ..data import serialize
from ..errors import BadJob, ExecutorShutdown, QjamfabError, WorkerLost
from . import remote as futures_remote
from .calls import Call, deliver, start, unpicklable
from .map import MapResults, check_chunksize, deadline_of, map_calls
from .stream import BatchSizer, Failed, Finished, Lost, Outcome, TaskStream

if TYPE_CHECKING:
    from .stream import StreamTask

cloudpickle.register_pickle_by_value(futures_remote)

log = logging.getLogger("qjamfab")

_STATE_LOCK = threading.Lock()  # creates each Master's _ExecutorState once
# How long the dispatcher waits for an answer before looking at its queue
# again: short while a worker is idle (a submit goes out at once), longer
# while all are busy (a submit waits for one anyway).
_IDLE_TICK_S = 0.002
_BUSY_TICK_S = 0.05

S = TypeVar("S")  # the Master a decorated method is called on
P = ParamSpec("P")
R = TypeVar("R")


class _ExecutorState:
    """A Master's queue of calls, its dispatcher thread and its run lock."""

    def __init__(self) -> None:
        self.run_lock = threading.RLock()
        self.cond = threading.Condition()
        self.queue: collections.deque[Call] = collections.deque()
        self.thread: threading.Thread | None = None
        self.shut = False
        self.close_when_idle = False
        self.runs_waiting = 0  # threads waiting for the run lock
        self.streaming = False  # the dispatcher holds the workers
        self.sizer = BatchSizer()

    def enqueue(self, master: Any, calls: list[Call]) -> None:
        with self.cond:
            if self.shut:
                raise ExecutorShutdown(
                    "cannot submit: this Master was shut down (shutdown() or "
                    "close() was called); create a new Master for more work"
                )
            self.queue.extend(calls)
            if self.thread is not None:
                self.cond.notify_all()
                return
            thread = threading.Thread(
                target=self._dispatch_loop,
                args=(master,),
                name="qjamfab-futures",
                daemon=False,
            )
            try:
                thread.start()
            except RuntimeError:  # e.g. while the interpreter exits
                for _ in calls:
                    self.queue.pop()
                raise
            self.thread = thread

    def lock_for_run(self) -> None:
        """Take the run lock for a run (or another exclusive method): the
        dispatcher stops sending tasks and lets go once those in flight
        are done."""
        if self.streaming and self.thread is threading.current_thread():
            raise QjamfabError(
                "a future's done-callback called a Master method that needs "
                "the workers (run, clear_cache, worker_stats): call it from "
                "your own thread, after the future is done"
            )
        with self.cond:
            self.runs_waiting += 1
        try:
            self.run_lock.acquire()
        finally:
            with self.cond:
                self.runs_waiting -= 1
                self.cond.notify_all()

    def _dispatch_loop(self, master: Any) -> None:
        close = False
        while True:
            with self.cond:
                while self.queue and self.runs_waiting:
                    self.cond.wait()  # a run goes first
                if not self.queue:
                    self.thread = None
                    close = self.close_when_idle
                    self.cond.notify_all()
                    break
            with self.run_lock:
                self.streaming = True
                try:
                    _Session(master, self).run()
                finally:
                    self.streaming = False
        if close:
            master.close()

    def stop(self, master: Any, wait: bool, cancel_futures: bool) -> None:
        """No more calls; cancel the queued ones if asked; with wait, until
        the dispatcher is done (never from the dispatcher itself)."""
        with self.cond:
            self.shut = True
            if cancel_futures:
                while self.queue:
                    call = self.queue.popleft()
                    if call.future.cancel():
                        start(call)  # tells wait() and as_completed()
            thread = self.thread
            if thread is threading.current_thread():
                self.close_when_idle = True  # shut down from a callback
                return
            if not wait:
                self.close_when_idle = thread is not None
        if wait and thread is not None:
            thread.join()

    @property
    def idle(self) -> bool:
        with self.cond:
            return self.thread is None


class _Session:
    """The dispatcher's hold on the workers: from its first task sent until
    nothing is queued or in flight, or a run waits for the workers."""

    def __init__(self, master: Any, state: _ExecutorState):
        self.master = master
        self.state = state
        self.again: collections.deque[Call] = collections.deque()  # first

    def run(self) -> None:
        stream: TaskStream | None = None
        try:
            stream = self.master.task_stream()
            self._loop(stream)
        except BaseException as exc:  # never leave a future pending
            in_flight = [] if stream is None else list(stream.busy.values())
            with self.state.cond:
                queued = list(self.state.queue)
                self.state.queue.clear()
            for call in [c for t in in_flight for c in t.items] + [
                *self.again,
                *queued,
            ]:
                if start(call):
                    call.fail(exc)

    def _loop(self, stream: TaskStream) -> None:
        # The work is done in methods of their own so that no local here
        # keeps a call (and so its result) alive: map's are not kept.
        state = self.state
        while True:
            stream.refill()
            stopping, waiting = self._send_more(stream)
            if not stream.in_flight and (stopping or not waiting):
                with state.cond:
                    if state.runs_waiting or not (state.queue or self.again):
                        state.queue.extendleft(reversed(self.again))
                        return
                continue
            self._take_in(stream.step(_IDLE_TICK_S if stream.idle else _BUSY_TICK_S))

    def _send_more(self, stream: TaskStream) -> tuple[bool, bool]:
        """A task to each idle worker, unless a run waits; (whether one
        does, whether calls wait)."""
        state = self.state
        idle = stream.idle
        with state.cond:
            stopping = state.runs_waiting > 0
            batches = [] if stopping else self._take(idle, len(stream.workers))
            waiting = bool(state.queue or self.again)
        for handle, calls in zip(idle, batches):
            payload = self._payload(calls)
            if payload is not None:
                stream.send(handle, calls, payload)
        return stopping, waiting

    def _take_in(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self._outcome(outcome)

    def _take(self, idle: list, workers: int) -> list[list[Call]]:
        """The next task's calls for each idle worker (under cond)."""
        batches: list[list[Call]] = []
        for _ in idle:
            batch = self._next_batch(workers)
            if not batch:
                break
            batches.append(batch)
        return batches

    def _next_batch(self, workers: int) -> list[Call]:
        again, queue = self.again, self.state.queue
        if again and again[0].alone:
            return [again.popleft()]
        n = self.state.sizer.next(len(again) + len(queue), workers)
        batch: list[Call] = []
        for source in (again, queue):
            while source and len(batch) < n and not source[0].alone:
                batch.append(source.popleft())
        return batch

    def _payload(self, calls: list[Call]) -> bytes | None:
        """Mark the calls running (dropping cancelled ones) and pickle them;
        those that cannot be pickled fail with BadJob. None: nothing to
        send."""
        calls[:] = [c for c in calls if start(c)]
        serialize.register_local_modules()  # user modules travel by value
        try:
            return serialize.dumps_job([c.job() for c in calls]) if calls else None
        except Exception:
            pass
        good = []
        for call in calls:
            try:
                serialize.dumps_job(call.job())
                good.append(call)
            except Exception as exc:
                call.fail(unpicklable(call, exc))
        calls[:] = good
        return serialize.dumps_job([c.job() for c in good]) if good else None

    def _outcome(self, outcome: Outcome) -> None:
        task = outcome.task
        if isinstance(outcome, Finished):
            self.state.sizer.add(len(task.items), outcome.compute_s)
            deliver(task.items, outcome.payload)
        elif isinstance(outcome, Failed):
            for call in task.items:
                call.fail(outcome.error)
        else:
            self._lost(task, outcome)

    def _lost(self, task: StreamTask, lost: Lost) -> None:
        """A worker ended running the task: its calls run again elsewhere;
        if its process died, each alone, and one that killed two workers
        fails."""
        name = task.worker.name
        again = []
        for call in task.items:
            if lost.died:
                call.kills.append(name)
                call.alone = True
                if len(call.kills) >= 2:
                    call.fail(
                        WorkerLost(
                            f"{call.describe()} killed workers "
                            f"{' and '.join(call.kills)} (last: {lost.detail}): "
                            "fix the function for these arguments; the "
                            "workers are restarted"
                            f"{text.stderr_tail(name, lost.tail)}",
                            worker=name,
                            exit_status=lost.status,
                            stderr_tail=lost.tail,
                        )
                    )
                    continue
            again.append(call)
        if again:
            log.warning(
                "worker %s lost (%s); running its %s again",
                name,
                lost.detail,
                text.plural(len(again), "call"),
            )
        self.again.extendleft(reversed(again))


def _state(master: Any) -> _ExecutorState:
    state = master.__dict__.get("_qjamfab_executor")
    if state is None:
        with _STATE_LOCK:
            state = master.__dict__.get("_qjamfab_executor")
            if state is None:
                state = master.__dict__["_qjamfab_executor"] = _ExecutorState()
    return state


# --- the edits master.py carries -------------------------------------------


def exclusive(
    method: Callable[Concatenate[S, P], R],
) -> Callable[Concatenate[S, P], R]:
    """Decorator for Master methods that talk to the workers: one at a
    time per Master, whichever thread calls; futures in flight finish
    their tasks first (see the module docstring)."""

    @functools.wraps(method)
    def one_at_a_time(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        state = _state(self)
        state.lock_for_run()
        try:
            return method(self, *args, **kwargs)
        finally:
            state.run_lock.release()

    return one_at_a_time


def closes_executor(
    close: Callable[Concatenate[S, P], None],
) -> Callable[Concatenate[S, P], None]:
    """Decorator for Master.close: first stop taking calls and wait for the
    queued ones (Executor.shutdown(wait=True)), then close."""

    @functools.wraps(close)
    def shut_then_close(self: S, *args: P.args, **kwargs: P.kwargs) -> None:
        state = _state(self)
        state.stop(self, wait=True, cancel_futures=False)
        if state.thread is threading.current_thread():
            return None  # the dispatcher closes the Master when it is done
        with state.run_lock:
            return close(self, *args, **kwargs)

    return shut_then_close


class FuturesMixin(Executor):
    """The Executor methods of a Master (see the module docstring)."""

    if TYPE_CHECKING:  # what the Master provides

        @property
        def workers(self) -> list[str]: ...

        def close(self) -> None: ...

        def task_stream(self) -> TaskStream: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run fn(*args, **kwargs) on a worker; its Future, at once."""
        _check_callable(fn, "submit")
        call = Call(fn, args, kwargs, "submit()")
        _state(self).enqueue(self, [call])
        return call.future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """fn over the items of the iterables, on the workers; results in
        order, each as soon as it is in. chunksize: items per call; 1 (the
        default) lets qjamfab batch them adaptively."""
        _check_callable(fn, "map")
        chunksize = check_chunksize(chunksize)
        deadline = deadline_of(timeout)
        calls, chunked = map_calls(fn, iterables, chunksize, len(self.workers))
        if not calls:
            return iter(())
        _state(self).enqueue(self, calls)
        return MapResults([c.future for c in calls], chunked, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Executor.shutdown: no new calls; cancel the queued ones if asked;
        then close the Master (with wait=False, once the queue is done)."""
        state = _state(self)
        state.stop(self, wait=wait, cancel_futures=cancel_futures)
        if wait or state.idle:
            self.close()


# --- checks ------------------------------------------------------------------


def _check_callable(fn: object, where: str) -> None:
    if not callable(fn):
        raise BadJob(
            f"{where}() needs a function first, not {text.a_or_an(type(fn).__name__)}: "
            f"pass a callable, e.g. m.{where}(f, x)"
        )


__all__ = ["FuturesMixin", "exclusive", "closes_executor"]
