"""Big results (issue 11 item 7): a result of PARK_BYTES or more waits at
its worker until the master fetches it, one at a time in tree order; the
master's held tree nodes past HELD_BYTES wait in temporary files; the
default reduce adds arrays into the master's own. None of it changes a
bit of the result, and a worker lost with a parked result loses nothing."""

import dataclasses
import logging

import numpy as np
import pytest

from qjamfab import Master, protocol
from qjamfab.core import results
from qjamfab.core.spill import SpilledNodes, nbytes
from qjamfab.reduce import ReduceTree, add_in_place, default_reduce, reduce_in_place
from tests.daemon_client import Daemon, job, result_value, task_head

pytestmark = pytest.mark.timeout(120)


def noisy(params, rows):
    # Floats whose sum depends on the order it is taken in.
    import numpy as np

    seed = int(np.asarray(rows).ravel()[0])
    return np.random.default_rng(seed).standard_normal(params) * 10.0**seed


def tree_sum(values):
    tree = ReduceTree(len(values))
    for i, v in enumerate(values):
        tree.add(i, 1, v)
    return tree.result()


# --- the pieces -------------------------------------------------------------


def test_adding_in_place_gives_the_bits_of_a_plus_b_and_reuses_a():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(1000), rng.standard_normal(1000) * 1e-9
    expected = (a + b).tobytes()
    out = add_in_place(a, b)
    assert out is a and out.tobytes() == expected


@pytest.mark.parametrize(
    "case",
    ["read-only", "other dtype", "other shape", "overlapping", "not an array"],
)
def test_adding_in_place_falls_back_to_a_plus_b(case):
    a = np.arange(6.0)
    b = np.ones(6)
    if case == "read-only":
        a.flags.writeable = False
    elif case == "other dtype":
        b = np.ones(6, dtype=np.float32)
    elif case == "other shape":
        b = np.ones((1, 6))
    elif case == "overlapping":
        b = a[::-1]
    else:
        a, b = [1, 2], [3]
    before = a.copy() if isinstance(a, np.ndarray) else list(a)
    out = add_in_place(a, b)
    assert out is not a
    assert np.array_equal(a, before)  # a untouched
    assert np.array_equal(out, a + b if case != "not an array" else [1, 2, 3])


def test_reduce_in_place_adds_lists_of_arrays_element_wise():
    a = (np.ones(3), 2)
    out = reduce_in_place(a, (np.ones(3), 5))
    assert isinstance(out, tuple) and out[1] == 7 and out[0] is a[0]
    assert np.array_equal(out[0], [2.0, 2.0, 2.0])
    assert default_reduce((1, 2), (3, 4), add_in_place) == (4, 6)


def test_nbytes_counts_arrays_through_pytrees():
    assert nbytes([np.zeros(10), (np.zeros(5, dtype=np.float32), 3)]) == 100
    assert nbytes({"a": np.zeros(10), "b": {"c": np.zeros(2)}}) == 96
    assert nbytes(Counts(np.zeros(4), 1)) == 32
    assert nbytes({"a"}) == 0  # of unknown size: kept in memory


@dataclasses.dataclass
class Counts:
    total: np.ndarray
    n: int


def test_a_tree_over_spilled_nodes_gives_the_same_bits_and_leaves_no_files():
    values = [noisy(2000, [i]) for i in range(13)]
    expected = tree_sum(values).tobytes()
    nodes = SpilledNodes(budget=0)  # everything but the newest to disk
    tree = ReduceTree(13, reduce_in_place)
    tree.nodes = nodes
    order = [12, 3, 5, 0, 7, 9, 11, 1, 2, 10, 4, 8, 6]  # a bad one
    for i in order:
        tree.add(i, 1, values[i].copy())
    assert tree.result().tobytes() == expected
    assert nodes.spilled > 0
    assert not nodes.files and len(nodes) == 1 and nodes.in_memory == 16000


def test_a_tree_of_dict_results_spills_and_gives_the_same_bits():
    values = [{"w": noisy(500, [i]), "n": i} for i in range(6)]
    expected = tree_sum([{"w": v["w"].copy(), "n": v["n"]} for v in values])
    nodes = SpilledNodes(budget=0)
    tree = ReduceTree(6, reduce_in_place)
    tree.nodes = nodes
    for i in [5, 0, 3, 1, 4, 2]:
        tree.add(i, 1, values[i])
    assert tree.result()["w"].tobytes() == expected["w"].tobytes()
    assert tree.result()["n"] == 15 and nodes.spilled > 0


def test_spilled_nodes_stay_in_memory_when_the_disk_refuses(monkeypatch, caplog):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/qjamfab-spill")
    nodes = SpilledNodes(budget=0)
    nodes[(0, 1)] = np.ones(10)
    with caplog.at_level(logging.WARNING, logger="qjamfab"):
        nodes[(2, 1)] = np.ones(10)
    assert nodes.spilled == 0 and (0, 1) in nodes.memory
    assert "could not write a held result to /nonexistent/qjamfab-spill" in (
        caplog.text
    )
    assert np.array_equal(nodes.pop((0, 1)), np.ones(10))


# --- a worker's side ----------------------------------------------------------


@pytest.fixture
def daemon(qjamfab_home):
    d = Daemon(str(qjamfab_home))
    yield d
    d.stop()


def test_a_big_result_waits_at_the_worker_until_fetched(daemon):
    client = daemon.connect()
    func, data = job(lambda params, _: np.full(params, 2.0))
    client.send(protocol.FUNC, {"hash": func}, [data])
    for task, n in [(1, 10), (2, 1000), (3, 1000)]:
        head = {**task_head(task, func), "park": 4000}
        client.send(protocol.TASK, head, protocol.encode(n))
    kind, head, parts = client.next()
    assert (kind, head["task"]) == (protocol.RESULT, 1)  # small: at once
    for task in (2, 3):
        kind, head, _ = client.next()
        assert (kind, head["task"], head["state"]) == (protocol.STATE, task, "parked")
        assert head["bytes"] >= 8000 and head["slices"] == 0
    client.send(protocol.CANCEL, {"task": 2})  # another copy won
    client.send(protocol.FETCH, {"task": 3})
    kind, head, parts = client.next()
    assert (kind, head["task"]) == (protocol.RESULT, 3)
    assert np.array_equal(result_value(parts), np.full(1000, 2.0))
    client.send(protocol.FETCH, {"task": 2})  # dropped by the CANCEL
    assert client.closed_by_peer(within=5)
    client.close()
    assert daemon.alive()


# --- through a Master -----------------------------------------------------------


def test_big_results_give_the_bits_of_small_ones(monkeypatch):
    data = np.arange(16.0).reshape(16, 1)
    with Master("local", workers_per_host=4) as m:
        whole = m.run(noisy, dataset=data, params=3000)
        assert m.last_run.spilled_results == 0
        monkeypatch.setattr(results, "PARK_BYTES", 1000)  # every result parks
        monkeypatch.setattr(results, "HELD_BYTES", 0)  # and waits on disk
        parked = m.run(noisy, dataset=data, params=3000)
        assert m.last_run.spilled_results > 0
    assert parked.tobytes() == whole.tobytes()
    assert whole.tobytes() == tree_sum([noisy(3000, [i]) for i in range(16)]).tobytes()


def test_a_worker_lost_after_its_result_parked_loses_no_slice(monkeypatch, tmp_path):
    """Its first task's result parks; its second task kills it: whether
    that result was still parked, on its way, or delivered when it died,
    the total counts every slice once."""

    def big_then_die(markers, rows):
        # The first worker to start a second task dies in it.
        import os

        import numpy as np

        mine = os.path.join(markers, str(os.getpid()))
        if os.path.exists(mine):
            died = markers + "/died"
            try:  # O_EXCL: of two workers starting a second task at once, one dies
                os.close(os.open(died, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), 9)
        open(mine, "w").close()
        return np.full(2000, float(np.asarray(rows).ravel()[0] + 1))

    data = np.arange(4.0).reshape(4, 1)
    with Master("local", workers_per_host=2) as m:
        m.run(lambda p, rows: 0, dataset=data)  # the slices in the cache
    monkeypatch.setattr(results, "PARK_BYTES", 1000)
    with Master("local", workers_per_host=2) as m:
        # A Master's first run sends each worker its slices as two tasks.
        total = m.run(big_then_die, dataset=data, params=str(tmp_path))
        stats = m.last_run
    assert np.array_equal(total, np.full(2000, 10.0))
    assert len(stats.lost_workers) == 1
    assert stats.tasks >= 4 + 1, stats  # two per worker, then the re-runs
    assert stats.rerun_slices in (1, 2), stats


def _asked(caplog) -> list[str]:
    """The COLLECTs the master sent, from its debug log of frames out."""
    sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("-> ")]
    return [line for line in sent if " COLLECT " in line]


def test_small_results_held_at_hosts_come_combined_unasked(ssh, caplog):
    """A host's agent sends its workers' small results combined once they
    are all in, with its notes of them: one frame per host per run, no
    COLLECT asked, and the bits of the run's tree."""
    data = np.arange(8.0).reshape(8, 1)
    expected = tree_sum([noisy(100, [i]) for i in range(8)])
    unasked = 0
    with Master(["host1", "host2"], workers_per_host=2, ssh_config=ssh.ssh_config) as m:
        for _ in range(10):
            if unasked == 3:
                break
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="qjamfab"):
                total = m.run(noisy, dataset=data, params=100)
            assert total.tobytes() == expected.tobytes()
            stats = m.last_run
            assert stats.lost_workers == []
            # A copy moved late may finish at its first host too, and lose:
            # that host's offer is declined and its winners asked for.
            if not (stats.moved_tasks or stats.backup_tasks):
                assert _asked(caplog) == []
                unasked += 1
    assert unasked == 3


def test_big_results_held_at_hosts_give_the_bits_of_small_ones(
    ssh, monkeypatch, caplog
):
    """On hosts of several workers the agent holds the results; big ones
    are asked for (COLLECT), one host at a time, the first in the tree
    first."""
    data = np.arange(8.0).reshape(8, 1)
    with Master(["host1", "host2"], workers_per_host=2, ssh_config=ssh.ssh_config) as m:
        whole = m.run(noisy, dataset=data, params=3000)
        monkeypatch.setattr(results, "PARK_BYTES", 1000)
        monkeypatch.setattr(results, "HELD_BYTES", 0)
        for _ in range(3):
            with caplog.at_level(logging.DEBUG, logger="qjamfab"):
                total = m.run(noisy, dataset=data, params=3000)
            assert total.tobytes() == whole.tobytes()
            assert m.last_run.lost_workers == []
            assert _asked(caplog), "a big result held at a host is asked for"
            caplog.clear()
    # The agents add into what they hold: still the bits of the tree.
    assert whole.tobytes() == tree_sum([noisy(3000, [i]) for i in range(8)]).tobytes()
