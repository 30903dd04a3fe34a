"""Master-side pickling of jobs, params and slices, with errors that say why.

Functions travel by value with cloudpickle. cloudpickle sends a function of
an importable module by reference, which a worker can only load if it has
that module; so every loaded module that lives outside the standard library
and site-packages (a script's helpers, a notebook's local modules, the test
suite) is pickled by value.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import sys
import sysconfig
import types
from collections import ChainMap
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import cloudpickle

from .. import protocol
from ..errors import BadDataSet, BadJob, BadParams, QjamfabError

if TYPE_CHECKING:
    import numpy as np

_INSTALLED_PREFIXES = tuple(
    os.path.realpath(p) + os.sep
    for p in {
        sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")
    }
)
# qjamfab's own directory (this module is in qjamfab/data/)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep
_local_by_name: dict[str, bool] = {}


def _code_reduce_keeping_filename(
    code: types.CodeType,
) -> tuple[Callable[..., types.CodeType], tuple[object, ...]]:
    # cloudpickle blanks co_filename to "<dynamic-code>"; keeping it lets a
    # remote traceback name the user's file and line.
    constructor, args = cloudpickle.cloudpickle._code_reduce(code)
    return constructor, tuple(
        code.co_filename if a == "<dynamic-code>" else a for a in args
    )


class _JobPickler(cloudpickle.Pickler):
    dispatch_table = ChainMap(
        {types.CodeType: _code_reduce_keeping_filename},
        cloudpickle.Pickler.dispatch_table,
    )


PersistentId = Callable[[object], object]


def dumps_job(
    obj: object,
    protocol: int = 5,
    buffer_callback: Callable[[pickle.PickleBuffer], object] | None = None,
    persistent_id: PersistentId | None = None,
) -> bytes:
    """cloudpickle as jobs travel: functions and classes by value, code
    keeping its file name (for remote tracebacks). Call
    register_local_modules() first so the user's own modules go by value.
    `persistent_id` (pickle's hook) may name objects that travel apart
    (a Broadcast: broadcast.py)."""
    out = io.BytesIO()
    pickler = _JobPickler(out, protocol=protocol, buffer_callback=buffer_callback)
    if persistent_id is not None:
        pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return out.getvalue()


def _is_local(module: types.ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    if not path or module.__name__ == "__main__":
        return False
    path = os.path.realpath(path)
    return not path.startswith(_INSTALLED_PREFIXES + (_PACKAGE_DIR,))


def register_local_modules() -> None:
    """Have cloudpickle send the user's own modules (not installed ones,
    not qjamfab) by value: the hosts do not have them."""
    if len(sys.modules) == len(_local_by_name):
        return  # nothing imported since the last look (a hot path)
    for name, module in list(sys.modules.items()):
        if name not in _local_by_name and module is not None:
            _local_by_name[name] = _is_local(module)
            if _local_by_name[name]:
                cloudpickle.register_pickle_by_value(module)


def job_functions(
    job: object, reduce: Callable | None
) -> tuple[Callable, Callable | None]:
    """(mapfunc, reduce) from a module with mapfunc, or a callable."""
    if isinstance(job, types.ModuleType):
        mapfunc = getattr(job, "mapfunc", None)
        if not callable(mapfunc):
            raise BadJob(
                f"module {job.__name__} has no mapfunc(params, slice): "
                "define one in it, or pass a function to run()"
            )
        reduce = reduce if reduce is not None else getattr(job, "reduce", None)
    elif callable(job):
        mapfunc = job
    else:
        raise BadJob(
            f"cannot run a {type(job).__name__}: pass a module with "
            "mapfunc(params, slice), or a function of (params, slice)"
        )
    if reduce is not None and not callable(reduce):
        raise BadJob(
            f"reduce must be a function of (a, b), not a "
            f"{type(reduce).__name__}: pass a callable or None"
        )
    return mapfunc, reduce


def encode_job(mapfunc: Callable, reduce: Callable | None) -> tuple[str, bytes]:
    """(hash, bytes) of the job, pickled by value.

    Pickling a function by value costs 50-500 us, on every run. So the last
    jobs are kept with a snapshot of everything their pickle is made of;
    when that is all immutable and still the same objects, the pickle
    would be the same too and is reused (see `_snapshot`)."""
    register_local_modules()
    key = (id(mapfunc), id(reduce))
    snapshot = _snapshot((mapfunc, reduce))
    cached = _job_cache.get(key)
    if cached is not None and snapshot is not None and _same(cached[0], snapshot):
        return cached[1], cached[2]
    try:
        data = dumps_job((mapfunc, reduce))
    except Exception as exc:
        raise BadJob(
            f"the job cannot be pickled ({type(exc).__name__}: "
            f"{exc}): keep the function free of open files, locks "
            "and sockets"
        ) from exc
    func_hash = hashlib.sha256(data).hexdigest()
    if snapshot is not None:
        _job_cache.pop(key, None)
        _job_cache[key] = (snapshot, func_hash, data)
        while len(_job_cache) > _JOB_CACHE_SIZE:
            del _job_cache[next(iter(_job_cache))]
    return func_hash, data


_JOB_CACHE_SIZE = 16
# (id(mapfunc), id(reduce)) -> (snapshot, hash, bytes); the snapshot holds
# the functions themselves, so their ids are not reused while cached.
_job_cache: dict[tuple[int, int], tuple[list, str, bytes]] = {}
_IMMUTABLE = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    range,
    types.BuiltinFunctionType,
    type(Ellipsis),
)
_ABSENT = object()  # a global name the code uses that is not defined (yet)
# What a snapshot takes as it is, told by exact type: the common case, fast.
_LEAVES = frozenset({*_IMMUTABLE, types.CodeType, type(_ABSENT)})


def _same(old: list, new: list) -> bool:
    return len(old) == len(new) and all(a is b for a, b in zip(old, new))


@functools.lru_cache(maxsize=256)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name a code object (and the code nested in it) may look up
    as a global: what cloudpickle takes from the function's globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def _snapshot(job: tuple) -> list | None:
    """The objects a job's pickle is made of, or None when one of them is
    mutable (a list, a dict, an array, an instance, a class or module that
    travels by value): then only pickling again can tell what changed.

    Functions that travel by value contribute their code, defaults,
    closure, attributes and the globals their code names, recursively."""
    parts: list = []
    todo = list(job)
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        parts.append(obj)
        if type(obj) in _LEAVES or isinstance(obj, _IMMUTABLE):
            continue
        if isinstance(obj, (tuple, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, types.FunctionType):
            if id(obj) in seen or _by_reference(obj):
                continue
            seen.add(id(obj))
            if obj.__dict__ or obj.__kwdefaults__:
                return None
            todo += [
                obj.__code__,
                obj.__name__,
                obj.__qualname__,
                obj.__module__,
                obj.__doc__,
                obj.__defaults__ or (),
            ]
            todo += [v for kv in obj.__annotations__.items() for v in kv]
            for cell in obj.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # not assigned yet
                    todo.append(_ABSENT)
            env = obj.__globals__
            todo += [env.get(name, _ABSENT) for name in _global_names(obj.__code__)]
        elif isinstance(obj, (type, types.ModuleType)):
            if not _by_reference(obj):
                return None
        else:
            return None
    return parts


def _by_reference(obj: object) -> bool:
    """Whether cloudpickle pickles this function, class or module by name
    (then its pickle does not depend on its contents)."""
    try:
        return cloudpickle.cloudpickle._should_pickle_by_reference(obj)
    except Exception:
        return False


_PLAIN_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _plain(value: object, depth: int = 0) -> bool:
    """Whether `value` is plain data that the C pickler copies exactly as
    cloudpickle would: builtin scalars, numpy arrays without Python
    objects inside, and small tuples, lists and dicts of them. Pickling
    those without cloudpickle's per-object hook is 3x faster (params go
    out on every run)."""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if type(value) is tuple or type(value) is list:
        return (
            depth < 4 and len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
        )
    if type(value) is dict:
        return (
            depth < 4
            and len(value) <= 64
            and all(
                _plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items()
            )
        )
    numpy = sys.modules.get("numpy")
    return (
        numpy is not None
        and kind is numpy.ndarray
        # An ndarray, as just checked (numpy is looked up, not imported).
        and not cast("np.ndarray", value).dtype.hasobject
    )


def _encode(
    value: object,
    error: type[QjamfabError],
    what: str,
    persistent_id: PersistentId | None = None,
) -> list:
    # Plain data holds no object that persistent_id would name.
    dumps = (
        pickle.dumps
        if _plain(value)
        else dumps_job
        if persistent_id is None
        else functools.partial(dumps_job, persistent_id=persistent_id)
    )
    try:
        return protocol.encode(value, dumps)
    except QjamfabError:
        raise  # persistent_id's own, saying what is wrong
    except Exception as exc:
        raise error(
            f"{what} of type {type(value).__name__} cannot be pickled "
            f"({type(exc).__name__}: {exc}): send data that pickle "
            "can copy (no open files, locks, sockets, generators)"
        ) from exc


def encode_params(params: object, persistent_id: PersistentId | None = None) -> list:
    """A run's params as payload parts; `persistent_id` as in dumps_job."""
    register_local_modules()
    return _encode(params, BadParams, "params", persistent_id)


def encode_broadcast(value: object, persistent_id: PersistentId | None = None) -> list:
    """A Broadcast's value as payload parts (broadcast.py)."""
    register_local_modules()
    return _encode(value, BadParams, "a Broadcast's value", persistent_id)


def encode_slice(value: object, index: int) -> list:
    return _encode(value, BadDataSet, f"dataset slice {index}")
