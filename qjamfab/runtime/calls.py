"""A TASK of inline calls, on a worker: the futures path (futures/executor.py,
futures/stream.py) sends calls in the frame itself, not through the slice cache.

The TASK head says `calls: n` (its `refs` None, its `func` unused); its one
payload part is the master's cloudpickle of n `(fn, args, kwargs or None)`.
Every call runs on its own, inside `try`, so one that raises (even
SystemExit) fails only its own future. One RESULT answers: head `{task,
run, compute_s, calls}`, payload the pickle of `(values, errors)`:
`values[i]` is call i's return value (None where it failed) and `errors`
maps a failed call's position to `error_report()`: a call that raised, or
whose result cannot be pickled. A payload that cannot be unpickled here (a
module this Python lacks) is the task's ERROR, phase "loading the calls".

The master side reads `error_report()`'s tuples back (futures/executor.py), so this
module is also imported there; here it uses only the standard library and
the worker's vendored cloudpickle.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable

from .task import error_fields

PHASE = "loading the calls"  # the ERROR of a payload that cannot be loaded


def execute(parts: list) -> tuple[float, bytes]:
    """Run the calls of a TASK's payload: (seconds taken, pack()'s bytes).
    Raises what unpickling the payload raised (see load_error)."""
    started = time.perf_counter()
    calls = pickle.loads(parts[0])
    values: list = []
    errors: dict = {}
    for fn, args, kwargs in calls:
        try:
            values.append(fn(*args, **kwargs) if kwargs else fn(*args))
        except BaseException as exc:  # as ProcessPoolExecutor does
            errors[len(values)] = error_report(exc, skip_frames=1)
            values.append(None)
    del calls
    return time.perf_counter() - started, pack(values, errors)


def load_error(exc: Exception) -> dict:
    """The ERROR head's fields for a payload that cannot be unpickled."""
    return error_fields(PHASE, exc)


def apply_chunk(fn: Callable, items: list) -> bytes:
    """One call of a map with chunksize > 1: fn over the chunk's items, each
    in its own try; pack()'s bytes, so each item fails on its own."""
    values: list = []
    errors: dict = {}
    for args in items:
        try:
            values.append(fn(*args))
        except BaseException as exc:
            errors[len(values)] = error_report(exc, skip_frames=1)
            values.append(None)
    return pack(values, errors)


def _dumps(obj: object) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle  # the worker's vendored copy

        return cloudpickle.dumps(obj, protocol=5)


def pack(values: list, errors: dict) -> bytes:
    """The pickle of (values, errors); a value that cannot be pickled
    becomes an error of its own call (the others still arrive)."""
    try:
        return _dumps((values, errors))
    except Exception:
        pass
    for i, value in enumerate(values):
        if i in errors:
            continue
        try:
            _dumps(value)
        except Exception as exc:
            errors[i] = error_report(exc, result=value)
            values[i] = None
    return _dumps((values, errors))


def type_name(kind: type) -> str:
    """A type's name as a user reads it: bare for builtins."""
    if kind.__module__ in ("builtins", "__main__"):
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


_NO_RESULT = object()


def error_report(
    exc: BaseException, skip_frames: int = 0, result: object = _NO_RESULT
) -> tuple:
    """What the master needs to re-raise an exception of a call:
    (what, type name, message, traceback text, where, exception pickle or
    None). what is "raised" (the call raised exc) or "result" (its result
    could not be pickled: exc is why; the type name is the result's).
    skip_frames drops our own frames from the traceback."""
    where = f"{socket.gethostname()} pid {os.getpid()}"
    if result is not _NO_RESULT:
        return (
            "result",
            type_name(type(result)),
            f"{type(exc).__name__}: {exc}",
            "".join(traceback.format_exception_only(type(exc), exc)),
            where,
            None,
        )
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        blob = _dumps(exc)
    except Exception:
        blob = None
    return ("raised", type_name(type(exc)), str(exc), text, where, blob)
