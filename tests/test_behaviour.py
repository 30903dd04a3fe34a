"""What a run does, the same on every engine: each test here runs on
in-process threads, local processes, an SSH host and a Dask LocalCluster
(the `engine` fixture, tests/engines.py), but where it names an engine a
behaviour does not apply to, and why.

The original qjam cases, functions by value, the reduce, output that
names its worker, errors from mapfunc with their messages, bad input
refused with the Master still usable, workers a job kills, slices re-run
after a loss, the slice cache (a second run and a new Master send no
dataset bytes; clear_cache), run statistics and the progress bar. What
is one engine's own stays in its file: test_master.py (local),
test_ssh.py, test_dask.py, test_run.py (inproc)."""

import os
import re
import threading
import time

import numpy as np
import pytest

from qjamfab import (
    BadDataSet,
    BadJob,
    BadParams,
    DataSet,
    ReduceError,
    RemoteError,
    RunStats,
    WorkerLost,
)
from tests.engines import ENGINES, die
from tests.jobs import (
    constant,
    exiting,
    hard_exit,
    inner_product,
    killed,
    multiply_sum,
    no_mapfunc,
    printing,
    raising,
    sum_params,
    uses_helpers,
    with_reduce,
)

pytestmark = pytest.mark.timeout(120)


def on(*kinds: str, why: str):
    """Run a test on these engines only; `why` says why not on the rest."""
    assert why and set(kinds) < set(ENGINES)
    return pytest.mark.parametrize("engine", kinds, indirect=True)


def _still_usable(m) -> None:
    assert m.run(multiply_sum, params=3, dataset=list(range(100))) == 14850


# --- what runs ------------------------------------------------------------


@pytest.mark.parametrize(
    "engine,workers",
    [(kind, n) for kind in ENGINES for n in (1, 2, 3) if kind != "dask" or n == 2],
    indirect=["engine"],  # Dask decides how many workers (two here)
)
def test_the_original_qjam_cases(engine, workers):
    with engine.master(workers) as m:
        assert m.workers == [f"{engine.prefix}{i}" for i in range(workers)]
        assert m.run(constant) == 42 * workers
        assert m.run(sum_params, params=[1, 2, 3, 6, 7, 9]) == 28 * workers
        assert m.run(multiply_sum, params=3, dataset=DataSet(list(range(100)))) == (
            14850
        )
        data = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
        assert m.run(inner_product, params=[2, 4], dataset=DataSet(data)) == 170
        assert (
            m.run(
                inner_product, params=np.array([2, 4]), dataset=DataSet(np.array(data))
            )
            == 170
        )
        assert m.run(with_reduce, dataset=DataSet(list(range(3, 60)))) == [3, 59]


def test_lambdas_closures_and_modules_the_workers_cannot_import(engine):
    with engine.master() as m:
        assert (
            m.run(
                lambda p, xs: p * sum(xs), params=3, dataset=DataSet(list(range(100)))
            )
            == 14850
        )
        offset = 1000

        def shifted(params, xs):
            return sum(x + offset for x in xs)

        assert m.run(shifted, dataset=list(range(10))) == 45 + 10 * offset
        # tests.jobs.uses_helpers imports tests.jobs.helpers; neither is on
        # the workers' path, so both must travel by value.
        assert m.run(uses_helpers, dataset=list(range(10))) == 450


def test_the_default_reduce_adds_arrays_and_numbers_in_tuples(engine):
    with engine.master() as m:
        matrix = np.arange(600, dtype=np.float64).reshape(60, 10)
        total, count = m.run(
            lambda p, x: (x.sum(axis=0), len(x)), dataset=DataSet(matrix)
        )
        assert count == 60
        np.testing.assert_array_equal(total, matrix.sum(axis=0))


@on("local", "ssh", "dask", why="inproc jobs print to this process, unprefixed")
def test_output_reaches_the_master_prefixed_by_its_worker(engine, capfd):
    with engine.master() as m:
        assert m.run(printing) == 84
        out = capfd.readouterr().out
        for worker in m.workers:
            for text in (
                "hello from python print",
                "hello from python stderr",
                "hello from fd 1",
                "hello from C printf",
            ):
                assert f"[{worker}] {text}" in out


# --- errors from the job, and bad input ---------------------------------------


def test_mapfunc_raising_gives_the_remote_traceback(engine):
    with engine.master() as m:
        with pytest.raises(RemoteError) as info:
            m.run(raising, params=5)
        err = info.value
        first = str(err).splitlines()[0]
        assert first.startswith(
            f"mapfunc raised ValueError: bad value 5 (worker {engine.prefix}"
        )
        assert "fix the job" in first
        assert "helper_that_fails" in err.remote_traceback
        assert err.remote_type == "ValueError"
        where = 'raising.py", line 2, in helper_that_fails'
        assert where in err.remote_traceback and where in str(err)
        assert 'raise ValueError(f"bad value {x}")' in str(err)  # its source line
        _still_usable(m)


class _Unloadable:
    """Pickles on the master, cannot be unpickled on a worker."""

    def __reduce__(self):
        return (_fail_to_load, ())


def _fail_to_load():
    raise ImportError("No module named 'only_on_the_master'")


def test_bad_jobs_params_and_datasets_are_refused_and_the_master_goes_on(engine):
    with engine.master() as m:
        with pytest.raises(
            BadJob,
            match=r"^module tests\.jobs\.no_mapfunc has no "
            r"mapfunc\(params, slice\): define one",
        ):
            m.run(no_mapfunc)
        with pytest.raises(BadJob, match="^cannot run a int: pass a module"):
            m.run(5)
        with pytest.raises(BadJob, match="^reduce must be a function"):
            m.run(constant, reduce=3)
        poison = _Unloadable()
        with pytest.raises(
            BadJob,
            match=rf"^worker {re.escape(engine.prefix)}\d cannot load the job "
            r"\(ImportError: No module named 'only_on_the_master'"
            r"\): make what it uses importable there",
        ):
            m.run(lambda p, x: poison)
        with pytest.raises(
            BadParams,
            match=r"^params of type lock cannot be "
            "pickled .*: send data that pickle can copy",
        ):
            m.run(constant, params=threading.Lock())
        with pytest.raises(
            BadDataSet,
            match=r"^a list slice cannot be pickled "
            r"\(cannot pickle '_thread.lock' object\): keep slices",
        ):
            m.run(
                lambda p, xs: 1,
                dataset=DataSet([1, 2, threading.Lock(), 4], slice_size=1),
            )
        with pytest.raises(BadDataSet, match="^cannot slice a dict"):
            m.run(constant, dataset={"a": 1})
        with pytest.raises(BadDataSet, match="empty"):
            m.run(constant, dataset=[])
        _still_usable(m)


def test_results_the_reduce_cannot_combine(engine):
    with engine.master() as m:
        with pytest.raises(ReduceError, match="^cannot combine results of lengths"):
            m.run(
                lambda p, xs: list(range(len(xs))),
                dataset=DataSet(list(range(7)), slice_size=2),
            )
        with pytest.raises(ReduceError, match="^cannot combine results of type"):
            m.run(
                lambda p, xs: "a" if 0 in xs else 1,
                dataset=DataSet(list(range(8)), slice_size=4),
            )
        _still_usable(m)


# --- workers lost -----------------------------------------------------------


@pytest.mark.parametrize(
    "engine,job,status,said",
    [
        pytest.param(kind, job, status, said, id=f"{kind}-{how}")
        # Not inproc: its workers are threads. Not Dask: a job there runs on
        # both workers and os._exit or SIGKILL end the Dask worker process
        # itself (test_dask.py).
        for kind in ("local", "ssh")
        for job, status, said, how in (
            (exiting, 3, "about to exit", "sys.exit"),
            (hard_exit, 7, "leaving with os._exit", "os._exit"),
            (killed, -9, None, "SIGKILL"),
        )
    ],
    indirect=["engine"],
)
def test_a_job_that_ends_its_worker_says_how(engine, job, status, said):
    """sys.exit, os._exit and SIGKILL from inside mapfunc: the worker is
    lost with its own status, and a new one serves the next run."""
    with engine.master(1) as m:
        before = {w: s["pid"] for w, s in m.worker_stats().items()}
        with pytest.raises(WorkerLost) as info:
            m.run(job)
        err = info.value
        assert err.worker in m.workers and err.exit_status == status
        first = str(err).splitlines()[0]
        how = f"exit status {status}" if status >= 0 else "killed by SIGKILL"
        assert first.startswith(
            f"worker {err.worker} was lost ({how}) running mapfunc(params, None)"
        )
        assert "restarted for the next run" in first
        if said:
            assert said in err.stderr_tail and said in str(err)
        _still_usable(m)  # a new worker replaced the lost one
        assert m.last_run.workers == len(m.workers)
        assert m.worker_stats()[err.worker]["pid"] != before[err.worker]


def test_a_lost_workers_slices_run_again_on_the_survivor(engine, tmp_path):
    kind = engine.kind

    def dies_once(params, xs):
        # The first worker that runs slice 0 dies; the re-run succeeds.
        flag = os.path.join(params, "died")
        if 0 in xs and not os.path.exists(flag):
            open(flag, "w").close()
            die(kind, 1)
        return sum(xs)

    with engine.master() as m:
        data = DataSet(list(range(40)))
        assert m.run(dies_once, params=str(tmp_path), dataset=data) == 780
        stats = m.last_run
        assert len(stats.lost_workers) == 1 and stats.rerun_slices >= 1
        _still_usable(m)


def test_a_slice_that_kills_two_workers_is_named(engine):
    kind = engine.kind

    def dies_on_7(params, xs):
        if 7 in xs:
            die(kind, 5)
        return sum(xs)

    p = re.escape(engine.prefix)
    with engine.master() as m:
        with pytest.raises(
            WorkerLost,
            match=rf"^dataset slice 3 killed workers {p}\d and {p}\d "
            r"\(last: exit status 5\): fix mapfunc for this input",
        ):
            m.run(dies_on_7, dataset=DataSet(list(range(16)), slice_size=2))
        _still_usable(m)


def _hold_the_gil(seconds: int) -> int:
    """A C call that keeps the GIL for `seconds` (ctypes.PyDLL does not
    release it), without using the CPU: libc's sleep."""
    import ctypes

    return ctypes.PyDLL(None).sleep(seconds)


@pytest.mark.parametrize(
    "engine,workers",
    [("local", 2), ("ssh", 1), ("ssh", 2)],
    ids=["local", "ssh-direct", "ssh-through-the-agent"],
    indirect=["engine"],  # not inproc: the GIL is the master's too
)
def test_a_long_c_call_holding_the_gil_is_not_a_lost_worker(engine, workers):
    """The worker's heartbeat thread cannot run while a C call holds its
    GIL; its process is seen running from outside (an SSH host's agent
    beats for it: for a host of one worker on the stream it handed the
    daemon, under the stream's lock), so it is busy, not lost, and its
    slice is not blamed."""
    with engine.master(workers, heartbeat_timeout=2.0) as m:
        started = time.monotonic()
        assert m.run(
            lambda p, xs: _hold_the_gil(3) or sum(xs),
            dataset=DataSet(list(range(2 * workers)), slice_size=2),
        ) == sum(range(2 * workers))
        assert time.monotonic() - started > 2.0  # longer than the timeout
        assert m.last_run.lost_workers == []
        assert m.last_run.rerun_slices == 0


# --- the slice cache ----------------------------------------------------------


def test_a_second_run_sends_no_dataset_bytes(engine):
    data = DataSet(np.arange(100000, dtype=np.float64).reshape(1000, 100))
    expected = float(np.arange(100000).sum())
    with engine.master() as m:
        m.clear_cache()  # what an earlier test on these hosts left
        assert m.run(lambda p, x: float(x.sum()), dataset=data) == expected
        first = m.last_run
        assert first.slices_sent == first.slices > 0
        assert first.dataset_bytes_sent > 800000
        assert m.run(lambda p, x: float(x.sum()), dataset=data) == expected
        second = m.last_run
        assert second.dataset_bytes_sent == 0 and second.slices_sent == 0
        assert second.slices_cached == second.slices
        assert second.bytes_sent < 5000
        assert set(second.worker_compute_s) == set(m.workers)


def test_a_new_master_reads_the_slices_from_disk(engine):
    data = np.arange(50000, dtype=np.int64).reshape(500, 100)
    with engine.master() as m:
        m.clear_cache()
        m.run(lambda p, x: int(x.sum()), dataset=DataSet(data))
        assert m.last_run.slices_sent > 0
        slices = m.last_run.slices
    if (cache := engine.cache_dir()) is not None:
        assert len(os.listdir(cache)) == slices
    with engine.master() as m:
        assert m.run(lambda p, x: int(x.sum()), dataset=DataSet(data)) == int(
            data.sum()
        )
        assert m.last_run.slices_sent == 0
        assert m.last_run.dataset_bytes_sent == 0


def test_clear_cache_empties_memory_and_disk(engine):
    with engine.master() as m:
        m.run(lambda p, xs: sum(xs), dataset=list(range(40)))
        stats = m.worker_stats()
        assert set(stats) == set(m.workers)
        assert all(s["entries"] > 0 and s["pid"] > 0 for s in stats.values())
        removed = m.clear_cache()
        assert sum(r["entries"] for r in removed.values()) > 0
        assert all(s["entries"] == 0 for s in m.worker_stats().values())
        if (cache := engine.cache_dir()) is not None:
            assert os.listdir(cache) == []
        assert m.run(lambda p, xs: sum(xs), dataset=list(range(40))) == 780
        assert m.last_run.slices_sent == m.last_run.slices


# --- what a run says ------------------------------------------------------------


def test_run_stats(engine):
    with engine.master() as m:
        m.run(multiply_sum, params=3, dataset=list(range(100)))
        stats = m.last_run
        assert isinstance(stats, RunStats)
        assert stats.elapsed_s > 0 and stats.workers == 2
        assert stats.bytes_sent > stats.dataset_bytes_sent > 0
        assert stats.bytes_received > 0
        assert set(stats.worker_compute_s) == set(m.workers)
        text = repr(stats)
        assert "2 workers" in text and "sent" in text and m.workers[0] in text


@on("inproc", "local", "ssh", why="a Dask worker reports a task when it is done")
def test_the_progress_bar_moves_per_slice_within_a_task(engine, monkeypatch):
    """One task of 6 slices on one worker: the bar shows slices as they are
    done, not 0 until the task's result arrives."""
    from qjamfab import display

    seen = []
    real = display.RunProgress.advance

    def advance(self, n=1):
        real(self, n)
        seen.append(self.done)

    monkeypatch.setattr(display.RunProgress, "advance", advance)
    with engine.master(1) as m:
        m.run(lambda p, xs: sum(xs), dataset=DataSet(list(range(6)), slice_size=1))
        seen.clear()
        assert (
            m.run(
                lambda p, xs: time.sleep(0.15) or sum(xs),
                dataset=DataSet(list(range(6)), slice_size=1),
            )
            == 15
        )
    assert seen[-1] == 6 and len([d for d in seen if 0 < d < 6]) >= 2
