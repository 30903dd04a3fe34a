"""The worker side of the Master's Executor (futures.py): the one job that
every futures run sends, and how it reports each call's outcome.

This module is never imported on a worker: futures.py registers it with
`cloudpickle.register_pickle_by_value`, so `apply_slice` and its helpers
travel by value inside the job (once per worker, then by hash, like any
job). So it uses only the standard library, and the worker's own
cloudpickle (vendored in its runtime bundle) where pickle cannot.

A slice of a futures run is `[payload]`, the payload the master's
cloudpickle of `(slice_no, groups)`, each group `(fn, args_list,
kwargs_list or None)`: one `submit()` or one part of a `map()`; `fn` is
the function, or the index of its pickle in the run's params (functions
that several slices share travel there, once per worker). Every call
runs on its own, inside `try`, so one that raises fails only its own
future. The slice's result is `[(slice_no, values, errors)]`, a list so
that `operator.add` (the run's reduce) concatenates slices in any order:
`values` is the pickle of the list of return values (None where a call
failed) and `errors` maps a failed call's position to `error_report()`:
a call that raised, or whose result cannot be pickled.

`call_batch` is the function the joblib backend (joblib_backend.py)
submits for each batch: the batch's calls as plain (function, args,
kwargs), so a host needs no joblib unless the calls themselves use it.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

# (params, their functions) of the last task, on a worker. None on the
# master, always: an immutable global keeps the job's pickle cacheable
# (serialize.encode_job) and this module travels by value, so the worker's
# copy has globals of its own.
_last_shared = None


def _functions(params: tuple) -> list:
    """The run's shared functions, unpickled once per task (a task's
    slices all see the same params object)."""
    global _last_shared
    if _last_shared is None or _last_shared[0] is not params:
        _last_shared = (params, [pickle.loads(b) for b in params])
    return _last_shared[1]


def apply_slice(params: tuple, chunk: list) -> list:
    """mapfunc(params, slice) of every futures run. params: the pickles of
    the functions several slices share; a group names one by its index."""
    (payload,) = chunk
    slice_no, groups = pickle.loads(payload)
    values: list = []
    errors: dict = {}
    for fn, args_list, kwargs_list in groups:
        if type(fn) is int:
            fn = _functions(params)[fn]
        for k, args in enumerate(args_list):
            try:
                values.append(fn(*args, **kwargs_list[k]) if kwargs_list else fn(*args))
            except BaseException as exc:  # as ProcessPoolExecutor does
                errors[len(values)] = error_report(exc, skip_frames=1)
                values.append(None)
    return [(slice_no, pack_values(values, errors), errors)]


def call_batch(calls: list) -> list:
    """A joblib batch on a worker: each (fn, args, kwargs) in turn, their
    results in order; the first to raise fails the batch, as in joblib's
    BatchedCalls. Where joblib is installed, a Parallel inside a call runs
    sequentially: the workers are one per core already."""
    try:
        from joblib import parallel_config
    except ImportError:  # then no call here can start a Parallel either
        return [fn(*args, **kwargs) for fn, args, kwargs in calls]
    with parallel_config(backend="sequential"):
        return [fn(*args, **kwargs) for fn, args, kwargs in calls]


def _dumps(obj: object) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle  # the worker's vendored copy

        return cloudpickle.dumps(obj, protocol=5)


def pack_values(values: list, errors: dict) -> bytes:
    """The pickle of values; a value that cannot be pickled becomes an
    error of its own call (the others still arrive)."""
    try:
        return _dumps(values)
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
    return _dumps(values)


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
