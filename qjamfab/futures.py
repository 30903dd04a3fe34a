"""`Master` as a `concurrent.futures.Executor`: `submit`, `map`, `shutdown`.

This module owns the Executor side of a Master, built on its public
behaviour only (`run`, `workers`, `close`): the queue of submitted calls,
the dispatcher thread that turns them into runs, the lock that keeps runs
one at a time, and how outcomes come back to futures.

How a call travels
------------------
- `submit(fn, *args, **kwargs)` queues the call and returns a `Future` at
  once. A dispatcher thread (started on demand, gone when the queue is
  empty) takes *every* call queued meanwhile into one `Master.run`, so
  1,000 submits are a few runs, not 1,000. It lingers up to 5 ms after a
  submit while more keep coming (1 ms apart at most), so a loop of
  submits lands in one run.
- The calls of one run are cut into slices, about `SLICES_PER_WORKER` (4)
  per worker, and travel as a `ListDataSet` of those slices: each slice is
  the cloudpickle of its calls, so functions and arguments travel by value
  like `run`'s jobs (lambdas, closures, notebook cells). A function that
  several slices call (a map's, one submitted in a loop) is pickled once
  and travels in the run's `params`, once per worker, so a closure over
  big data is not copied into every slice; one called in a single slice
  (a joblib batch, which carries its data) travels in it. The job is
  always the same, `futures_remote.apply_slice` (sent once per worker,
  then by hash); it runs each call in its own `try`.
- Slices are content-addressed like any dataset: each is written to the
  cache directory of the worker that runs it (and held in its memory).
  That costs a small file per slice per run, kept until `m.clear_cache()`
  or `inv clear-cache`; submitting the very same calls again finds them
  there and sends no data. (Avoiding the cache for one-shot data would
  need the TASK frame to carry its data inline: a protocol change.)
- The run's reduce concatenates the slices' results (the default would
  add lists element-wise); each is tagged with its slice number, so order
  never depends on how workers combined them.
- Everything else is `Master.run`'s: spread over all workers, work
  stealing, backups of stragglers, and worker loss (a lost worker's
  slices run again elsewhere, each result delivered once).

`map(fn, *iterables, timeout=None, chunksize=1)`
------------------------------------------------
Collects the iterables at once (as the standard library does), queues
them as parts of `chunksize` items, and yields results in order.
`chunksize` is the number of items per slice; the default, 1, lets
qjamfab choose: 4 slices per worker, their sizes within one item of each
other (10,000 items on 2 workers: 8 slices of 1,250, each worker running
its share as one or two tasks; 20 items: 8 slices of 2 or 3).
`timeout` counts from the call to `map`: `concurrent.futures.TimeoutError`
when a result is not there in time, and the calls not started yet are
cancelled.

Errors
------
A call that raises fails only its own future (in `map`, the result
iterator raises when it reaches that item). `.result()` raises the
*original* exception type (so `except ValueError` works), re-created from
its pickle, with a `RemoteError` as its `__cause__` carrying the remote
traceback (`.remote_traceback`), the way ProcessPoolExecutor chains a
`_RemoteTraceback`. An exception that cannot be pickled or re-created
here is raised as the `RemoteError` itself. A call whose function or
arguments cannot be pickled fails its future with `BadJob`. A run that
fails as a whole (every worker lost, or one call killing two workers
with `os._exit` or a signal) fails every future of that run with its
`WorkerLost`.

Runs and futures on one Master
------------------------------
The Master is not thread-safe, so every `run`, `clear_cache`,
`worker_stats` and `close` takes the Master's run lock (`exclusive`), and
so does the dispatcher: `m.run(...)` in your thread waits for the futures
run in flight and the next futures run waits for yours. `m.last_run`
describes whichever ran last. Results arrive when their run ends, so
`as_completed` sees a run's futures finish together; calls submitted
while a run is in flight go in the next one. Do not wait on a future
from inside a done-callback (callbacks run on the dispatcher thread).

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
import numbers
import operator
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import cloudpickle

from . import futures_remote, serialize, text
from .dataset import SLICES_PER_WORKER, ListDataSet
from .errors import BadJob, ExecutorShutdown, QjamfabError, RemoteError

cloudpickle.register_pickle_by_value(futures_remote)

_LINGER_S = 0.001  # a submit within this of the last one joins its run
_LINGER_MAX_S = 0.005  # ... but a run waits no longer than this for more
_STATE_LOCK = threading.Lock()  # creates each Master's _ExecutorState once

S = TypeVar("S")  # the Master a decorated method is called on
P = ParamSpec("P")
R = TypeVar("R")


class _Failure:
    """One item of a map part that raised: re-raised when reached."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class _Call:
    """One submit (single) or one part of a map: fn over args_list."""

    __slots__ = ("fn", "args_list", "kwargs_list", "future", "single")

    def __init__(
        self, fn: Callable, args_list: list, kwargs_list: list | None, single: bool
    ):
        self.fn = fn
        self.args_list = args_list
        self.kwargs_list = kwargs_list
        self.future: Future = Future()
        self.single = single

    def group(self) -> tuple:
        return (self.fn, self.args_list, self.kwargs_list)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def deliver(self, values: list, errors: dict) -> None:
        """values[i] is item i's result unless errors[i] (an exception)."""
        if self.single:
            if 0 in errors:
                self.future.set_exception(errors[0])
            else:
                self.future.set_result(values[0])
            return
        for i, exc in errors.items():
            values[i] = _Failure(exc)
        self.future.set_result(values)


class _ExecutorState:
    """A Master's queue of calls, its dispatcher thread and its run lock."""

    def __init__(self) -> None:
        self.run_lock = threading.RLock()
        self.cond = threading.Condition()
        self.queue: collections.deque[_Call] = collections.deque()
        self.thread: threading.Thread | None = None
        self.shut = False
        self.close_when_idle = False
        self.linger_until = 0.0

    def enqueue(self, master: Any, calls: list[_Call], linger: bool) -> None:
        with self.cond:
            if self.shut:
                raise ExecutorShutdown(
                    "cannot submit: this Master was shut down (shutdown() or "
                    "close() was called); create a new Master for more work"
                )
            self.queue.extend(calls)
            self.linger_until = time.monotonic() + _LINGER_S if linger else 0.0
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

    def _dispatch_loop(self, master: Any) -> None:
        close = False
        while True:
            with self.cond:
                first = time.monotonic()
                while self.queue and time.monotonic() < min(
                    self.linger_until, first + _LINGER_MAX_S
                ):
                    self.cond.wait(
                        max(
                            0.0,
                            min(self.linger_until, first + _LINGER_MAX_S)
                            - time.monotonic(),
                        )
                    )
                if not self.queue:
                    self.thread = None
                    close = self.close_when_idle
                    self.cond.notify_all()
                    break
                batch = list(self.queue)
                self.queue.clear()
            _run_batch(master, self, batch)
            del batch
        if close:
            master.close()

    def stop(self, master: Any, wait: bool, cancel_futures: bool) -> None:
        """No more calls; cancel the queued ones if asked; with wait, until
        the dispatcher is done (never from the dispatcher itself)."""
        with self.cond:
            self.shut = True
            if cancel_futures:
                while self.queue:
                    self.queue.popleft().future.cancel()
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
    time per Master, whichever thread calls (the futures dispatcher too)."""

    @functools.wraps(method)
    def one_at_a_time(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        with _state(self).run_lock:
            return method(self, *args, **kwargs)

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

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run fn(*args, **kwargs) on a worker; its Future, at once."""
        _check_callable(fn, "submit")
        call = _Call(fn, [args], [kwargs] if kwargs else None, single=True)
        _state(self).enqueue(self, [call], linger=True)
        return call.future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """fn over the items of the iterables, on the workers; results in
        order. chunksize: items per slice; 1 (the default) lets qjamfab
        choose (about 4 slices per worker)."""
        _check_callable(fn, "map")
        chunksize = _check_chunksize(chunksize)
        deadline = (
            None if timeout is None else time.monotonic() + _check_timeout(timeout)
        )
        for k, it in enumerate(iterables):
            if not isinstance(it, collections.abc.Iterable):
                raise TypeError(
                    f"map() argument {k + 2} is {_a(type(it).__name__)}, "
                    "which is not iterable: pass the function, then one "
                    "iterable per parameter, e.g. m.map(f, range(10))"
                )
        items = list(zip(*iterables))
        if not items:
            return iter(())
        if chunksize == 1:  # let qjamfab choose: sizes within one
            k = min(len(items), SLICES_PER_WORKER * max(1, len(self.workers)))
            bounds = [i * len(items) // k for i in range(k + 1)]
        else:
            bounds = [*range(0, len(items), chunksize), len(items)]
        calls = [
            _Call(fn, items[a:b], None, single=False)
            for a, b in zip(bounds, bounds[1:])
        ]
        _state(self).enqueue(self, calls, linger=False)
        return _results([c.future for c in calls], deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Executor.shutdown: no new calls; cancel the queued ones if asked;
        then close the Master (with wait=False, once the queue is done)."""
        state = _state(self)
        state.stop(self, wait=wait, cancel_futures=cancel_futures)
        if wait or state.idle:
            self.close()


def _results(futures: list[Future], deadline: float | None) -> Iterator[Any]:
    futures.reverse()
    try:
        while futures:
            future = futures.pop()
            try:
                outcomes = (
                    future.result()
                    if deadline is None
                    else future.result(deadline - time.monotonic())
                )
            except BaseException:
                future.cancel()
                raise
            for outcome in outcomes:
                if type(outcome) is _Failure:
                    raise outcome.exc
                yield outcome
    finally:
        for future in futures:
            future.cancel()


# --- one run -----------------------------------------------------------------


def _run_batch(master: Any, state: _ExecutorState, batch: list[_Call]) -> None:
    calls = [c for c in batch if c.future.set_running_or_notify_cancel()]
    if not calls:
        return
    try:
        slices, shared = _payloads(_cut(calls, max(1, len(master.workers))))
        if not slices:
            return
        with state.run_lock:
            out = master.run(
                futures_remote.apply_slice,
                params=shared,
                dataset=ListDataSet([p for _, p in slices], slice_size=1),
                reduce=operator.add,
                progress=False,
            )
        by_number = dict(enumerate(s for s, _ in slices))
        for slice_no, blob, errors in out:
            _deliver(by_number.pop(slice_no), blob, errors)
        if by_number:
            raise QjamfabError(
                f"the run returned no result for {len(by_number)} slices: "
                "this is a qjamfab bug, please report it"
            )
    except BaseException as exc:  # never leave a future pending
        for call in calls:
            call.fail(exc)


def _cut(calls: list[_Call], n_workers: int) -> list[list[_Call]]:
    """The slices of a run: each map part alone, the submits pooled into
    about SLICES_PER_WORKER slices per worker."""
    slices = [[c] for c in calls if not c.single]
    single = [c for c in calls if c.single]
    if single:
        k = min(len(single), SLICES_PER_WORKER * n_workers)
        bounds = [i * len(single) // k for i in range(k + 1)]
        slices += [single[a:b] for a, b in zip(bounds, bounds[1:])]
    return slices


def _payloads(
    slices: list[list[_Call]],
) -> tuple[list[tuple[list[_Call], bytes]], tuple[bytes, ...]]:
    """Each slice's calls and their pickle, and the run's params: the
    pickles of the functions that several slices call (a map's, or one
    submitted in a loop), which so travel once per worker, not once per
    slice; the slices name them by index. A function called in one slice
    only (a joblib batch) travels in that slice. Calls whose function or
    arguments cannot be pickled fail their futures with BadJob and are
    left out."""
    serialize.register_local_modules()  # user modules travel by value
    uses: dict[int, int] = {}
    for calls in slices:
        for fid in {id(c.fn) for c in calls}:
            uses[fid] = uses.get(fid, 0) + 1
    shared: list[bytes] = []
    index: dict[int, int | None] = {}  # id(fn) -> its place in params
    for calls in slices:
        for call in calls:
            fid = id(call.fn)
            if uses[fid] < 2 or fid in index:
                continue
            try:
                shared.append(serialize.dumps_job(call.fn))
                index[fid] = len(shared) - 1
            except Exception:
                index[fid] = None  # its calls fail one by one below

    def group(call: _Call) -> tuple:
        fn = index.get(id(call.fn), call.fn)
        return (call.fn if fn is None else fn, call.args_list, call.kwargs_list)

    out: list[tuple[list[_Call], bytes]] = []
    for calls in slices:
        try:
            payload = serialize.dumps_job((len(out), [group(c) for c in calls]))
        except Exception:
            good = []
            for call in calls:
                try:
                    serialize.dumps_job(group(call))
                    good.append(call)
                except Exception as exc:
                    call.fail(_unpicklable(call, exc))
            if not good:
                continue
            calls = good
            payload = serialize.dumps_job((len(out), [group(c) for c in calls]))
        out.append((calls, payload))
    return out, tuple(shared)


def _unpicklable(call: _Call, exc: Exception) -> BadJob:
    what = "submit()" if call.single else "map()"
    err = BadJob(
        f"the function or arguments given to {what} cannot be pickled "
        f"({type(exc).__name__}: {exc}): pass a function and data that "
        "cloudpickle can copy (no open files, locks, sockets, generators)"
    )
    err.__cause__ = exc
    return err


def _deliver(calls: list[_Call], blob: bytes, reports: dict) -> None:
    errors = {i: _rebuild(r) for i, r in reports.items()}
    try:
        values = pickle.loads(blob)
    except Exception as exc:
        err = RemoteError(
            f"the results of {len(calls)} calls cannot be unpickled here "
            f"({type(exc).__name__}: {exc}): return types this Python can "
            "import (builtins, numpy, your own modules)"
        )
        for call in calls:
            call.fail(err)
        return
    pos = 0
    for call in calls:
        n = len(call.args_list)
        call.deliver(
            values[pos : pos + n],
            {i - pos: e for i, e in errors.items() if pos <= i < pos + n},
        )
        pos += n


def _rebuild(report: tuple) -> BaseException:
    """The remote exception, re-created, with a RemoteError as its cause;
    or the RemoteError itself when it cannot be re-created."""
    what, type_name, message, trace, where, blob = report
    trace = text.with_source_lines(trace.rstrip())
    if what == "result":
        return RemoteError(
            f"a task's result, {_a(type_name)}, cannot be pickled to go back "
            f"to the master ({message}; on {where}): return data that "
            f"pickle can copy\n--- remote error ---\n{trace}",
            worker=where,
            remote_type=type_name,
            remote_traceback=trace,
        )
    remote = RemoteError(
        f"a task raised {type_name}: {message} (on {where}); fix the "
        f"function or its arguments\n--- remote traceback ---\n{trace}",
        worker=where,
        remote_type=type_name,
        remote_traceback=trace,
    )
    try:
        exc = pickle.loads(blob) if blob is not None else None
    except Exception:
        exc = None
    if not isinstance(exc, BaseException):
        return remote
    exc.__cause__ = remote
    return exc


# --- checks ------------------------------------------------------------------


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _check_callable(fn: object, where: str) -> None:
    if not callable(fn):
        raise BadJob(
            f"{where}() needs a function first, not {_a(type(fn).__name__)}: "
            f"pass a callable, e.g. m.{where}(f, x)"
        )


def _check_chunksize(chunksize: object) -> int:
    if (
        isinstance(chunksize, bool)
        or not isinstance(chunksize, numbers.Integral)
        or chunksize < 1
    ):
        raise ValueError(
            f"chunksize must be a positive int, not {chunksize!r}: give the "
            "items per slice, or 1 (the default) to let qjamfab choose"
        )
    return int(chunksize)


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds or None, not "
            f"{timeout!r}: e.g. timeout=30"
        )
    return float(timeout)


__all__ = ["FuturesMixin", "exclusive", "closes_executor"]
