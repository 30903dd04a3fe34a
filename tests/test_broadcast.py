"""Broadcast: a value that does not change crosses to each worker (each SSH
host) once, stays in the hosts' caches for the next Master, reaches mapfunc
as the value itself, unpickled once per worker process; and what cannot be
a Broadcast (unpicklable, changed after it was made, nested) is refused
with an error saying what to do."""

import os
import pickle
import threading

import numpy as np
import pytest

from qjamfab import BadParams, Broadcast, DataSet, Master

pytestmark = pytest.mark.timeout(120)


def _lookup(params, rows):
    table = params["table"]
    assert isinstance(table, np.ndarray)  # the value, not its wrapper
    total = float(table.sum()) * params["k"]
    return total if rows is None else total + float(table[rows].sum())


def _identity(params, rows):
    import sys

    # Held, so that a fresh copy per task could not reuse a freed one's id.
    sys.__dict__.setdefault("_broadcast_test_held", []).append(params["table"])
    return [(os.getpid(), id(params["table"]))]


def _expected(table: np.ndarray, k: int) -> float:
    return float(table.sum()) * k


def test_local_workers_get_it_once_and_a_new_master_finds_it_on_disk():
    table = np.arange(200_000, dtype=np.float64)
    shared = Broadcast(table)
    assert shared.nbytes > table.nbytes
    with Master("local:2") as m:
        assert m.run(_lookup, {"table": shared, "k": 2}) == 2 * _expected(table, 2)
        first = m.last_run
        # Each local worker is a link of its own: one asking after the
        # other stored it finds it on the disk they share.
        assert first.broadcasts_sent in (1, 2)
        assert first.broadcast_bytes_sent >= first.broadcasts_sent * table.nbytes
        assert first.bytes_sent >= first.broadcast_bytes_sent
        assert m.run(_lookup, {"table": shared, "k": 3}) == 2 * _expected(table, 3)
        second = m.last_run
        assert second.broadcasts_sent == second.broadcast_bytes_sent == 0
        assert second.bytes_sent < 10_000
    with Master("local:2") as m:  # new worker processes, the same disk cache
        assert m.run(_lookup, {"table": shared, "k": 1}) == 2 * _expected(table, 1)
        assert m.last_run.broadcast_bytes_sent == 0
        assert m.last_run.bytes_sent < 10_000
        m.clear_cache()  # a host that lost its cache gets it again
        assert m.run(_lookup, {"table": shared, "k": 1}) == 2 * _expected(table, 1)
        assert m.last_run.broadcasts_sent in (1, 2)
        assert m.last_run.broadcast_bytes_sent >= table.nbytes


def test_with_a_dataset_and_unpickled_once_per_worker_process():
    table = np.arange(1_000, dtype=np.float64)
    rows = np.arange(100, dtype=np.int64)
    params = {"table": Broadcast(table), "k": 1}
    with Master("local:1") as m:
        got = m.run(_lookup, params, DataSet(rows, slice_size=25))
        assert got == 4 * _expected(table, 1) + float(table[rows].sum())
        data = DataSet(rows, slice_size=25)
        seen = m.run(_identity, params, data, reduce=lambda a, b: a + b)
        seen += m.run(_identity, params, data, reduce=lambda a, b: a + b)
    assert len(seen) == 8 and len(set(seen)) == 1  # one object, every task


def test_in_process_workers_and_a_broadcast_as_the_whole_params():
    with Master("inproc:2") as m:
        words = Broadcast({"a": 1, "b": 2})
        assert m.run(lambda p, _: p["a"] + p["b"], words) == 6
        assert m.run(lambda p, _: p["b"], words) == 4
        assert m.last_run.broadcast_bytes_sent == 0


def test_copies_of_params_share_their_broadcasts():
    import copy

    shared = Broadcast(np.arange(5))
    params = {"t": shared, "lr": [0.1]}
    assert copy.deepcopy(params)["t"] is shared
    assert copy.copy(shared) is shared


def test_pickled_outside_a_run_it_travels_inline_as_its_value():
    table = np.arange(5)
    copy = pickle.loads(pickle.dumps({"t": Broadcast(table)}))
    assert isinstance(copy["t"], np.ndarray) and list(copy["t"]) == list(table)
    with Master("local:1") as m:
        future = m.submit(lambda t: int(t.sum()), Broadcast(table))
        assert future.result(timeout=60) == 10


# --- bad inputs --------------------------------------------------------------


def test_a_value_that_cannot_be_pickled_is_refused_when_made():
    with pytest.raises(BadParams) as caught:
        Broadcast({"lock": threading.Lock()})
    first = str(caught.value).splitlines()[0]
    assert first.startswith("a Broadcast's value of type dict cannot be pickled")
    assert "lock" in first and "send data that pickle can copy" in first


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_a_broadcast_inside_a_broadcast_is_refused(where):
    inner = Broadcast([1, 2, 3])
    with pytest.raises(BadParams) as caught:
        Broadcast(inner if where == "itself" else {"inner": inner, "x": 1})
    assert str(caught.value).splitlines()[0] == (
        "a Broadcast inside another Broadcast's value: wrap only the outer "
        "value (what it holds travels with it), or put the inner Broadcast "
        "next to it in params"
    )


@pytest.mark.parametrize("kind", ["array in place", "dict"])
def test_a_value_changed_after_it_was_made_fails_the_next_run(kind):
    table = np.arange(100_000, dtype=np.float64)
    value = table if kind == "array in place" else {"t": table, "n": 1}
    shared = Broadcast(value)
    job = (lambda p, _: float(p.sum())) if kind == "array in place" else None
    job = job or (lambda p, _: float(p["t"].sum()) + p["n"])
    with Master("local:1") as m:
        m.run(job, shared)
        before = m.last_run
        if kind == "array in place":
            table[12_345] += 1.0
        else:
            value["n"] = 2
        with pytest.raises(BadParams) as caught:
            m.run(job, {"x": [shared]})
        first = str(caught.value).splitlines()[0]
        assert first.startswith(
            f"a Broadcast's value (a {type(value).__name__}) changed since "
            "the Broadcast was made: wrap the new value in a new "
            "qjamfab.Broadcast"
        )
        assert m.last_run is before  # refused before anything was sent
        assert m.run(job, Broadcast(value)) == job(value, None)


def test_each_of_two_broadcasts_of_equal_content_is_checked():
    first, second = np.arange(10.0), np.arange(10.0)
    params = [Broadcast(first), Broadcast(second)]
    assert params[0].ref == params[1].ref
    with Master("inproc:1") as m:
        assert m.run(lambda p, _: float(p[0].sum() + p[1].sum()), params) == 90.0
        first[0] = 5.0
        with pytest.raises(BadParams, match="changed since the Broadcast was made"):
            m.run(lambda p, _: float(p[0].sum() + p[1].sum()), params)


def test_without_the_check_a_changed_object_is_not_seen_a_changed_array_is():
    table = np.arange(1_000, dtype=np.float64)
    value = {"t": table, "n": 1}
    shared = Broadcast(value, check=False)
    job = lambda p, _: float(p["t"].sum()) + p["n"]  # noqa: E731
    expected = float(table.sum()) + 1
    with Master("local:1") as m:
        assert m.run(job, shared) == expected
        value["n"] = 2  # not seen: the value as it was when made
        assert m.run(job, shared) == expected
        table[0] += 1.0  # the array's data is not copied: refused
        with pytest.raises(BadParams, match="changed since the Broadcast was made"):
            m.run(job, shared)


# --- SSH hosts ---------------------------------------------------------------


def test_ssh_hosts_get_it_once_per_host_and_keep_it_for_the_next_master(ssh):
    opts = dict(workers_per_host=2, ssh_config=ssh.ssh_config)
    aliases = ssh.aliases[:2]
    table = np.arange(500_000, dtype=np.float64)
    shared = Broadcast(table)
    data = DataSet(np.arange(400, dtype=np.int64), slice_size=50)
    expected = 8 * _expected(table, 1) + float(table[:400].sum())
    with Master(aliases, **opts) as m:
        m.clear_cache()
        assert m.run(_lookup, {"table": shared, "k": 1}, data) == expected
        first = m.last_run
        assert first.broadcasts_sent == 2  # once per host, not per worker
        assert 2 * table.nbytes <= first.broadcast_bytes_sent < 3 * table.nbytes
        assert m.run(_lookup, {"table": shared, "k": 1}, data) == expected
        assert m.last_run.broadcast_bytes_sent == 0
        assert m.last_run.bytes_sent < 20_000
    with Master(aliases, **opts) as m:
        assert m.run(_lookup, {"table": shared, "k": 1}, data) == expected
        assert m.last_run.broadcast_bytes_sent == 0
        assert m.last_run.bytes_sent < 20_000
    # The first host loses its cache on disk (its daemons still map it).
    cache = os.path.join(ssh.homes[aliases[0]], "cache")
    os.unlink(os.path.join(cache, shared.ref))
    with Master(aliases, **opts) as m:
        assert m.run(_lookup, {"table": shared, "k": 1}, data) == expected
        assert m.last_run.broadcasts_sent == 1
        assert table.nbytes <= m.last_run.broadcast_bytes_sent < 2 * table.nbytes


def test_a_host_with_no_room_on_disk_hands_it_to_all_its_workers(ssh):
    table = np.arange(100_000, dtype=np.float64)
    shared = Broadcast(table)
    opts = dict(workers_per_host=2, ssh_config=ssh.ssh_config, cache_limit=0)
    with Master(ssh.aliases[:1], **opts) as m:
        assert m.run(_lookup, {"table": shared, "k": 1}) == 2 * _expected(table, 1)
        # Sent once; both workers ran their own task (none waited for a
        # backup copy of it on the other).
        assert m.last_run.broadcasts_sent == 1 and not m.last_run.backup_tasks
        assert set(m.last_run.worker_compute_s) == set(m.workers)
        assert m.run(_lookup, {"table": shared, "k": 1}) == 2 * _expected(table, 1)
        assert m.last_run.broadcasts_sent == 0
