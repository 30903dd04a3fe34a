"""Job pickles are reused between runs only while nothing they are made of
can have changed; every change a user can make still reaches the workers."""

import numpy as np
import pytest

from qjamfab import Master
from qjamfab.data import serialize

pytestmark = pytest.mark.timeout(60)

SCALE = 2
WEIGHTS = [1, 2, 3]


def scaled(params, xs):
    return SCALE * sum(xs)


def weighted(params, xs):
    return sum(WEIGHTS) * sum(xs)


def uses_numpy(params, xs):
    return int(np.sum(xs))


def _encode(func):
    return serialize.encode_job(func, None)


def test_an_unchanged_job_reuses_its_pickle():
    first = _encode(scaled)
    again = _encode(scaled)
    assert again[0] == first[0] and again[1] is first[1]
    assert _encode(uses_numpy)[1] is _encode(uses_numpy)[1]


def test_rebinding_a_global_makes_a_new_pickle():
    global SCALE
    before = _encode(scaled)
    SCALE = 3
    try:
        after = _encode(scaled)
    finally:
        SCALE = 2
    assert after[0] != before[0]
    assert _encode(scaled)[0] == before[0]


def test_a_job_using_a_mutable_global_is_pickled_every_time():
    before = _encode(weighted)
    again = _encode(weighted)
    assert again[1] is not before[1] and again[0] == before[0]
    WEIGHTS.append(4)
    try:
        assert _encode(weighted)[0] != before[0]
    finally:
        WEIGHTS.pop()


def test_closure_defaults_and_code_changes_make_a_new_pickle():
    factor = 2

    def by_closure(params, xs):
        return factor * sum(xs)

    first = _encode(by_closure)
    factor = 5
    assert _encode(by_closure)[0] != first[0]

    def by_default(params, xs, k=2):
        return k * sum(xs)

    first = _encode(by_default)
    by_default.__defaults__ = (7,)
    assert _encode(by_default)[0] != first[0]

    def by_code(params, xs):
        return sum(xs)

    first = _encode(by_code)
    by_code.__code__ = scaled.__code__
    assert _encode(by_code)[0] != first[0]

    holder = {"k": 1}

    def by_mutable_closure(params, xs):
        return holder["k"] * sum(xs)

    first = _encode(by_mutable_closure)
    holder["k"] = 9
    assert _encode(by_mutable_closure)[0] != first[0]


def test_workers_see_every_change_between_runs():
    global SCALE
    with Master("local:2") as m:
        data = list(range(10))
        assert m.run(scaled, dataset=data) == 90
        SCALE = 10
        try:
            assert m.run(scaled, dataset=data) == 450
        finally:
            SCALE = 2
        assert m.run(weighted, dataset=data) == 270
        WEIGHTS.append(4)
        try:
            assert m.run(weighted, dataset=data) == 450
        finally:
            WEIGHTS.pop()
        offset = 1
        job = lambda p, xs: sum(xs) + offset  # noqa: E731
        assert m.run(job, dataset=[1]) == 2
        offset = 100
        assert m.run(job, dataset=[1]) == 101


class Point:  # defined here: only cloudpickle can send it by value
    def __init__(self, x):
        self.x = x


def test_plain_params_skip_cloudpickle_and_the_rest_use_it(monkeypatch):
    """Plain data (scalars, arrays, small containers of them) is pickled
    by the C pickler to the bytes cloudpickle would give; anything else
    still goes through cloudpickle."""
    import cloudpickle

    from qjamfab import protocol

    plain = [
        1,
        "s",
        None,
        (np.arange(5.0), 30),
        {"lr": 0.1, "w": [1, 2]},
        np.zeros((2, 3), dtype=[("a", "i4"), ("b", "f8")]),
    ]
    for value in plain:
        assert [bytes(p) for p in serialize.encode_params(value)] == [
            bytes(p) for p in protocol.encode(value, cloudpickle.dumps)
        ]
    # Every cloudpickle pickler (qjamfab's own is one) dumps through this.
    cloudpickled = []
    real = cloudpickle.Pickler.dump

    def spy(pickler, obj):
        cloudpickled.append(obj)
        return real(pickler, obj)

    monkeypatch.setattr(cloudpickle.Pickler, "dump", spy)
    for value in plain:
        serialize.encode_params(value)
    assert cloudpickled == []
    others = [
        Point(1),
        (1, Point(2)),
        lambda x: x,
        np.array([Point(3)], dtype=object),
        [[[[[1]]]]],
    ]
    for value in others:
        serialize.encode_params(value)
    assert cloudpickled == others
