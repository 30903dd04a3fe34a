"""The task core (qjamfab/runtime/task.py) that the worker daemon, the host
agent's COLLECT and the Dask worker plugin all run, driven directly."""

from __future__ import annotations

import hashlib
import pickle
import threading

import pytest

from qjamfab import protocol
from qjamfab.reduce import ReduceTree
from qjamfab.runtime.task import (
    check_job,
    combine,
    encode_result,
    error_fields,
    execute,
    load_job,
)


def _head(slices: list[int], leaves: int) -> dict:
    return {
        "task": 7,
        "run": 3,
        "func": "f",
        "refs": [f"r{i}" for i in slices],
        "slices": slices,
        "leaves": leaves,
    }


def _run(mapfunc, reduce=None, slices=(0, 1, 2), get=int, **kw):
    head = _head(list(slices), 4)
    return execute(
        head, lambda: (mapfunc, reduce), protocol.encode(10), lambda r: get(r[1:]), **kw
    )


def _boom(*_):
    raise ZeroDivisionError("no")


def test_a_task_sends_the_nodes_its_slices_make_in_the_run_tree():
    outcome = _run(lambda p, x: p * x)
    assert outcome.error is None and outcome.slices == 3
    # Slices 0 and 1 combine; slice 2 waits for slice 3, which is not here.
    assert protocol.decode(outcome.payload) == [(0, 2, 10), (2, 1, 20)]


def _lock(*_):
    return threading.Lock()  # neither pickle nor cloudpickle takes it


@pytest.mark.parametrize(
    "job, get, phase",
    [
        (_boom, int, "loading the job"),
        (lambda: (_boom, None), int, "mapfunc"),
        (lambda: (lambda p, x: x, None), _boom, "mapfunc"),
        (lambda: (lambda p, x: x, _boom), int, "reduce"),
        (lambda: (_lock, None), int, "pickling the result"),
    ],
)
def test_an_error_names_the_phase_it_raised_in(job, get, phase):
    head = _head([0] if phase == "pickling the result" else [0, 1], 2)
    outcome = execute(head, job, protocol.encode(None), lambda r: get(r[1:]))
    assert outcome.error is not None
    assert outcome.error["phase"] == phase
    if phase != "pickling the result":
        assert outcome.error["type"] == "ZeroDivisionError"
        assert outcome.error["message"] == "no"
        assert "_boom" in outcome.error["traceback"]


def test_bad_params_fail_in_loading_params():
    outcome = execute(
        _head([0], 1), lambda: (None, None), [b"not a pickle"], lambda r: None
    )
    assert outcome.error is not None and outcome.error["phase"] == "loading params"


def test_what_passes_propagates_and_exit_is_not_an_error():
    with pytest.raises(LookupError):
        _run(lambda p, x: x, get=lambda r: {}[r], passes=(LookupError,))
    with pytest.raises(SystemExit):
        _run(lambda p, x: exit(3))


def test_a_long_task_says_how_far_it_is_but_not_at_its_last_slice(monkeypatch):
    import qjamfab.runtime.task as task

    monkeypatch.setattr(task, "_PROGRESS_S", 0.0)
    said: list[int] = []
    _run(lambda p, x: x, progress=said.append)
    assert said == [1, 2]


def test_a_job_whose_bytes_do_not_match_its_hash_is_refused():
    data = pickle.dumps((len, None))
    check_job(data, hashlib.sha256(data).hexdigest())
    assert load_job(data) == (len, None)
    with pytest.raises(ValueError, match="job bytes do not match their hash"):
        check_job(data + b".", hashlib.sha256(data).hexdigest())


def test_combine_makes_the_same_root_as_one_tree():
    values = [0.1, 0.2, 0.3, 1e16, -1e16]
    whole = ReduceTree(len(values))
    for i, v in enumerate(values):
        whole.add(i, 1, v)
    parts = []
    for group in ([0, 3], [1, 2, 4]):
        tree = ReduceTree(len(values))
        for i in group:
            tree.add(i, 1, values[i])
        parts.append(encode_result(tree.items()))
    assert protocol.decode(combine(len(values), None, parts)) == whole.items()


def test_a_result_pickle_cannot_take_goes_by_cloudpickle():
    value = [lambda: 42]
    assert protocol.decode(encode_result(value))[0]() == 42


def test_error_fields_say_what_format_exc_says():
    import traceback

    try:
        _boom()
    except ZeroDivisionError as exc:
        assert error_fields("mapfunc", exc) == {
            "phase": "mapfunc",
            "type": "ZeroDivisionError",
            "message": "no",
            "traceback": traceback.format_exc(),
        }
