"""The task core: what every place that runs a job does with it.

A worker daemon (worker.py), a host agent combining its workers' results
(agent.py) and the Dask worker plugin (engines/dask/worker.py) all run a
task the same way, phase by phase, and this module is that one way:

- `task_refs`: what a TASK needs in the cache (slices, broadcasts);
- `check_job`, `load_job`: a job's bytes, checked against the hash they
  came under, unpickled to (mapfunc, reduce);
- `execute`: mapfunc over a TASK's slices, combined in the run's fixed tree
  (reduce.ReduceTree), encoded; or, when anything raises, the ERROR
  head's fields naming the phase it raised in;
- `combine`: encoded results (their tree nodes) combined in that tree and
  encoded again; `collect`, a host agent's COLLECT answered with it;
- `encode_result`: pickle, else cloudpickle;
- `error_fields`: the ERROR head's fields for an exception in a phase.

Standard library, cloudpickle and the shipped protocol.py and reduce.py
only: this file is shipped to hosts (runtime/__init__.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, cast

from .. import protocol
from ..reduce import ReduceTree, reduce_in_place

_PROGRESS_S = 0.25  # a task running longer says how far it is this often


def task_refs(head: dict) -> list:
    """What a TASK needs in the cache: its slices and its params'
    broadcasts."""
    return [*(head["refs"] or ()), *head.get("broadcasts", ())]


def check_job(data: bytes, func_hash: str) -> None:
    """Raise ValueError unless `data` is the job `func_hash` names: once
    per job and process, before its first load (hashing costs about as
    much as unpickling)."""
    if hashlib.sha256(data).hexdigest() != func_hash:
        raise ValueError("job bytes do not match their hash")


def load_job(data: bytes) -> tuple:
    """(mapfunc, reduce) from a job's bytes."""
    return cast(tuple, pickle.loads(data))


def encode_result(value: object) -> list:
    """A result's payload parts (protocol.encode)."""
    # Plain pickle is several times faster; cloudpickle handles the rest
    # (functions, classes that came by value).
    try:
        return protocol.encode(value, pickle.dumps)
    except Exception:
        import cloudpickle

        return protocol.encode(value, cloudpickle.dumps)


def error_fields(phase: str, exc: BaseException) -> dict:
    """What an ERROR head says of `exc`, raised while doing `phase`."""
    return {
        "phase": phase,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)
        ),
    }


@dataclasses.dataclass
class Outcome:
    """How a task ended: its payload, or `error` (error_fields)."""

    payload: list
    compute_s: float
    slices: int  # how many slices it ran over (0 without a dataset)
    error: dict | None = None


def execute(
    head: dict,
    job: Callable[[], tuple],
    params_parts: list,
    get_slice: Callable[[Any], object],
    progress: Callable[[int], None] | None = None,
    passes: tuple[type[Exception], ...] = (),
) -> Outcome:
    """Run the TASK `head`: `job()` gives (mapfunc, reduce), `get_slice`
    a slice by its ref, `progress(done)` hears how far a long task is.
    An exception of a type in `passes` is not the job's: it propagates
    (so does SystemExit); any other becomes the outcome's error."""
    phase = "loading the job"
    started = time.perf_counter()
    refs = head["refs"]
    slices = 0 if refs is None else len(refs)
    try:
        mapfunc, reduce = job()
        phase = "loading params"
        # Each Broadcast in params comes from the cache, unpickled there
        # once per process (broadcast.py).
        params = protocol.decode(
            params_parts, get_slice if head.get("broadcasts") else None
        )
        # What this task sends on is the nodes its slices make in the run's
        # fixed tree: whoever combines them, the root is the same.
        tree = ReduceTree(head["leaves"], reduce)
        report_at = started + _PROGRESS_S
        for i, index in enumerate(head["slices"]):
            phase = "mapfunc"
            data = None if refs is None else get_slice(refs[i])
            result = mapfunc(params, data)
            phase = "reduce"
            tree.add(index, 1, result)
            if (
                progress is not None
                and i + 1 < slices
                and time.perf_counter() >= report_at
            ):
                report_at = time.perf_counter() + _PROGRESS_S
                progress(i + 1)
        phase = "pickling the result"
        payload = encode_result(tree.items())
    except passes:
        raise
    except Exception as exc:
        return Outcome(
            [], time.perf_counter() - started, slices, error_fields(phase, exc)
        )
    return Outcome(payload, time.perf_counter() - started, slices)


def combine(leaves: int, reduce: Callable | None, results: Iterable[list]) -> list:
    """Encoded results (each a RESULT's payload: the nodes of its slices)
    combined in the run's fixed tree of `leaves`, encoded again."""
    # Each result is decoded here and held by nobody else: the default
    # reduce may add arrays into them.
    tree = ReduceTree(leaves, reduce or reduce_in_place)
    for parts in results:
        nodes = cast(list[tuple[int, int, object]], protocol.decode(parts))
        del parts  # its buffers now live only as long as the values made of them
        tree.add_all(nodes)
    return encode_result(tree.items())


def collect(
    head: dict, reduce_of: Callable[[str], Callable | None], held: dict[int, list]
) -> tuple[int, dict, list]:
    """A host agent's COLLECT: the held results it names (taken out of
    `held`) combined in the run's fixed tree with the job's reduce
    (`reduce_of(job hash)`: LookupError when the host lacks the job); the
    answer as (kind, head, payload): one RESULT, or an ERROR."""
    started = time.perf_counter()
    tasks = head["tasks"]
    try:
        reduce = reduce_of(head["func"])
        # Each result is let go of once combined.
        payload = combine(head["leaves"], reduce, map(held.pop, tasks))
    except Exception as exc:
        for task in tasks:
            held.pop(task, None)
        fields = error_fields("reduce on the host", exc)
        return (
            protocol.ERROR,
            {"task": tasks[0], "run": head["run"], "tasks": tasks, **fields},
            [],
        )
    elapsed = time.perf_counter() - started
    return (
        protocol.RESULT,
        {"tasks": tasks, "run": head["run"], "compute_s": elapsed},
        payload,
    )
