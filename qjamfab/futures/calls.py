"""One call of a Master's Executor, and how its outcome reaches its future.

A `Call` is one `submit`, or one chunk of a `map` (its function
runtime/calls.py's `apply_chunk`). `deliver` takes a task's RESULT (the
values and error reports runtime/calls.py packs) to its calls' futures;
`rebuild` re-creates a remote exception, chained to a `RemoteError`
carrying the remote traceback; `unpicklable` is the error of a call that
cannot be pickled. The dispatching is executor.py's.
"""

from __future__ import annotations

import pickle
import reprlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .. import text
from ..errors import BadJob, RemoteError
from ..runtime.calls import apply_chunk


class Call:
    """One submit, or one chunk of a map (fn: apply_chunk)."""

    __slots__ = ("fn", "args", "kwargs", "future", "kills", "alone", "what")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict | None, what: str):
        self.fn = fn
        self.args = args
        self.kwargs = kwargs or None
        self.future: Future = Future()
        self.kills: list[str] = []  # workers that died running it
        self.alone = False  # in a task of its own (it may kill workers)
        self.what = what  # "submit()" or "map()", for messages

    def job(self) -> tuple:
        return (self.fn, self.args, self.kwargs)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def describe(self) -> str:
        if self.fn is apply_chunk:
            fn, items = self.args
            return f"a chunk of {len(items)} items of map({_name(fn)})"
        args = [_SHOWN.repr(a) for a in self.args]
        return f"{self.what[:-2]}({', '.join([_name(self.fn), *args])})"


_SHOWN = reprlib.Repr()  # arguments, shortened, in messages
_SHOWN.maxstring = _SHOWN.maxother = 30


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def start(call: Call) -> bool:
    """Mark the call's future running; False if it was cancelled (its
    waiters are told) or is done. A call sent again is running already."""
    if call.future.running():
        return True
    try:
        return call.future.set_running_or_notify_cancel()
    except RuntimeError:  # done: it failed already
        return False


def deliver(calls: list[Call], payload: Any) -> None:
    """A task's RESULT (runtime/calls.py's pack): each call's outcome to its
    future."""
    try:
        values, reports = pickle.loads(payload)
    except Exception as exc:
        err = RemoteError(
            f"the results of {len(calls)} calls cannot be unpickled here "
            f"({type(exc).__name__}: {exc}): return types this Python can "
            "import (builtins, numpy, your own modules)"
        )
        for call in calls:
            call.fail(err)
        return
    for i, call in enumerate(calls):
        if call.future.done():
            continue
        if i in reports:
            call.future.set_exception(rebuild(reports[i]))
        else:
            call.future.set_result(values[i])
        values[i] = None


def unpicklable(call: Call, exc: Exception) -> BadJob:
    err = BadJob(
        f"the function or arguments given to {call.what} cannot be pickled "
        f"({type(exc).__name__}: {exc}): pass a function and data that "
        "cloudpickle can copy (no open files, locks, sockets, generators)"
    )
    err.__cause__ = exc
    return err


def rebuild(report: tuple) -> BaseException:
    """The remote exception, re-created, with a RemoteError as its cause;
    or the RemoteError itself when it cannot be re-created."""
    what, type_name, message, trace, where, blob = report
    trace = text.with_source_lines(trace.rstrip())
    if what == "result":
        return RemoteError(
            f"a task's result, {text.a_or_an(type_name)}, cannot be pickled to go back "
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
