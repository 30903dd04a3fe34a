"""Master as a concurrent.futures.Executor, over local workers and real SSH
hosts: submit and map (results, order, batching), exceptions with the
remote traceback, map's timeout, a worker SIGKILLed mid-map, shutdown and
cancellation, runs and futures on one Master, and every bad input."""

import concurrent.futures as cf
import os
import signal
import sys
import threading
import time

import pytest

from qjamfab import BadJob, DataSet, ExecutorShutdown, Master, QjamfabError, RemoteError
from tests.conftest import processes_mentioning
from tests.gates import held

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local", "ssh"])
def where(request):
    return request.param


@pytest.fixture
def master(where, request):
    """Two workers: local processes, or one per SSH host on two hosts."""
    if where == "local":
        m = Master("local:2")
    else:
        ssh = request.getfixturevalue("ssh")
        m = Master(
            ssh.aliases[:2],
            workers_per_host=1,
            ssh_config=ssh.ssh_config,
            heartbeat_timeout=3.0,
        )
    with m:
        yield m


@pytest.fixture
def local2():
    with Master("local:2") as m:
        yield m


def square(x):
    return x * x


def slow_identity(x, delay=0.05):
    time.sleep(delay)
    return x


def fails_on_3(x):
    if x == 3:
        raise ValueError(f"three is bad ({x})")
    return x


def worker_pid(x):
    return os.getpid()


# --- submit and map -------------------------------------------------------


def test_master_is_an_executor_and_submit_returns_at_once(master, gate):
    assert isinstance(master, cf.Executor)
    future = master.submit(held, "done", gate.path)
    assert not future.done()  # it did not wait for the task
    assert isinstance(future, cf.Future)
    gate.open()
    assert future.result(timeout=30) == "done"


def test_submit_runs_on_the_workers_with_args_kwargs_and_closures(master):
    offset = 100
    futures = [master.submit(lambda x, *, k: x * k + offset, i, k=3) for i in range(20)]
    assert [f.result(timeout=30) for f in futures] == [i * 3 + 100 for i in range(20)]
    pids = {master.submit(worker_pid, 0).result(timeout=30) for _ in range(3)}
    assert os.getpid() not in pids


def test_map_yields_results_in_order(master):
    assert list(master.map(square, range(1000))) == [x * x for x in range(1000)]
    # Several iterables zip, stopping at the shortest, as the stdlib does.
    assert list(master.map(pow, [2, 3, 4], [5, 6, 7, 8])) == [32, 729, 16384]
    assert list(master.map(square, [])) == []


def test_map_spreads_over_every_worker(master):
    pids = set(master.map(lambda x: (time.sleep(0.05), os.getpid())[1], range(16)))
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_big_map_of_trivial_calls_is_a_few_dozen_tasks(local2, tasks):
    assert list(local2.map(square, range(200))) == [x * x for x in range(200)]
    assert sum(tasks) == 200  # up to 64 items a worker: a call each
    assert tasks[0] == 1  # adaptive: one call first, then more
    assert len(tasks) < 40, tasks  # not 200 round trips
    tasks.clear()
    assert list(local2.map(square, range(10_000))) == [x * x for x in range(10_000)]
    assert sum(tasks) == 129  # beyond: chunks of 10,000 // 128 = 78 items
    assert len(tasks) < 40, tasks
    tasks.clear()
    assert list(local2.map(square, range(1000), chunksize=100)) == [
        x * x for x in range(1000)
    ]
    # An explicit chunksize: 10 calls of 100 items, batched as any calls.
    assert sum(tasks) == 10


def test_a_function_a_task_calls_many_times_travels_once_in_it(local2, tasks):
    big = bytes(2_000_000)  # closed over by the function
    results = local2.map(lambda x: len(big) + x, range(80))
    assert list(results) == [2_000_000 + x for x in range(80)]
    assert max(tasks) > 1
    # Pickled once per task, however many calls it has.
    assert all(2_000_000 < n < 2_100_000 for n in tasks.payloads)


def test_submits_made_together_are_batched(local2, tasks):
    futures = [local2.submit(square, i) for i in range(300)]
    assert [f.result(timeout=30) for f in futures] == [i * i for i in range(300)]
    assert len(tasks) < 60, tasks  # not 300 round trips


def test_as_completed_and_wait_work(local2):
    futures = [local2.submit(slow_identity, i) for i in range(6)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == list(
        range(6)
    )
    done, not_done = cf.wait(futures, timeout=30)
    assert len(done) == 6 and not not_done


def test_task_output_reaches_the_master(local2, capfd):
    local2.submit(print, "hello from a future").result(timeout=30)
    assert "] hello from a future" in capfd.readouterr().out


# --- exceptions -------------------------------------------------------------


def test_a_raising_task_fails_only_its_own_future(master):
    futures = [master.submit(fails_on_3, i) for i in range(6)]
    for i, future in enumerate(futures):
        if i != 3:
            assert future.result(timeout=30) == i
    with pytest.raises(ValueError, match=r"^three is bad \(3\)$") as info:
        futures[3].result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    first = str(cause).splitlines()[0]
    assert first.startswith("a task raised ValueError: three is bad (3) (on ")
    assert first.endswith("fix the function or its arguments")
    assert cause.remote_type == "ValueError"
    # The remote traceback names the function, its file, line and source.
    assert "in fails_on_3" in cause.remote_traceback
    assert __file__ in cause.remote_traceback
    assert 'raise ValueError(f"three is bad ({x})")' in cause.remote_traceback
    # The workers stay up for the next call.
    assert master.submit(square, 7).result(timeout=30) == 49


def test_map_yields_items_before_the_failing_one_then_raises(master):
    results = master.map(fails_on_3, range(6), chunksize=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three is bad") as info:
        next(results)
    assert isinstance(info.value.__cause__, RemoteError)


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):  # pickles, but cannot be re-created
        super().__init__(f"{a}-{b}")


def raises_unrebuildable(x):
    raise NeedsTwoArgs(x, x)


def raises_with_a_lock(x):
    err = RuntimeError("holding a lock")
    err.lock = threading.Lock()  # cannot be pickled at all
    raise err


@pytest.mark.parametrize(
    "fn,kind,message",
    [
        (raises_unrebuildable, "tests.test_futures.NeedsTwoArgs", "1-1"),
        (raises_with_a_lock, "RuntimeError", "holding a lock"),
    ],
)
def test_an_exception_that_cannot_come_back_is_a_remote_error(
    local2, fn, kind, message
):
    with pytest.raises(RemoteError) as info:
        local2.submit(fn, 1).result(timeout=30)
    err = info.value
    assert str(err).splitlines()[0].startswith(f"a task raised {kind}: {message} (on ")
    assert f"in {fn.__name__}" in err.remote_traceback


def test_a_result_that_cannot_be_pickled_fails_only_its_call(local2):
    futures = [
        local2.submit(lambda x: threading.Lock() if x == 1 else x, i) for i in range(3)
    ]
    assert futures[0].result(timeout=30) == 0
    assert futures[2].result(timeout=30) == 2
    with pytest.raises(
        RemoteError,
        match=r"^a task's result, a _thread\.lock, "
        r"cannot be pickled to go back to the master \(TypeError: "
        r"cannot pickle '_thread.lock' object; on .*\): return "
        "data that pickle can copy\n",
    ):
        futures[1].result(timeout=30)


def test_an_argument_that_cannot_be_pickled_fails_only_its_call(local2):
    good = local2.submit(square, 4)
    bad = local2.submit(square, threading.Lock())
    with pytest.raises(
        BadJob,
        match=r"^the function or arguments given to "
        r"submit\(\) cannot be pickled \(TypeError: .*lock",
    ):
        bad.result(timeout=30)
    assert good.result(timeout=30) == 16


def test_sys_exit_in_a_task_fails_its_future_not_the_worker(local2):
    pid_before = sorted(w["pid"] for w in local2.worker_stats().values())
    with pytest.raises(SystemExit):
        local2.submit(sys.exit, 3).result(timeout=30)
    assert sorted(w["pid"] for w in local2.worker_stats().values()) == pid_before


# --- map's timeout ----------------------------------------------------------


def test_map_timeout(master, gate):
    started = time.monotonic()
    results = master.map(held, [1, 2], [gate.path] * 2, timeout=0.5)
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert time.monotonic() - started >= 0.4  # not before its timeout
    gate.open()
    # A timeout long enough gives every result.
    assert list(master.map(slow_identity, [1, 2], [0.1, 0.1], timeout=30)) == [1, 2]


def test_map_timeout_cancels_what_has_not_started(local2, gate, tasks):
    blockers = [local2.submit(held, "blocker", gate.path) for _ in range(2)]
    while not all(b.running() for b in blockers):
        time.sleep(0.01)
    results = local2.map(square, range(10), timeout=0.2)  # queued behind them
    with pytest.raises(cf.TimeoutError):
        list(results)
    gate.open()
    assert [b.result(timeout=30) for b in blockers] == ["blocker"] * 2
    assert local2.submit(square, 3).result(timeout=30) == 9  # after the map's
    assert tasks == [1, 1, 1]  # the map's calls were never sent


# --- a worker lost mid-map ------------------------------------------------------


def test_worker_sigkilled_during_map_every_item_back_exactly_once(master):
    victim = master.workers[1]
    pid = master.worker_stats()[victim]["pid"]
    timer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    timer.start()
    try:
        results = list(master.map(slow_identity, range(48), [0.05] * 48, timeout=60))
    finally:
        timer.cancel()
        timer.join()
    assert results == list(range(48))
    # The worker is replaced.
    assert list(master.map(square, range(10))) == [x * x for x in range(10)]
    assert master.worker_stats()[victim]["pid"] != pid


def test_a_silent_worker_is_lost_and_its_call_runs_elsewhere_once(tmp_path):
    flag = str(tmp_path / "froze-once")

    def freezes_once():
        from qjamfab.engines import inproc  # a job's import: where it runs

        if not os.path.exists(flag):
            open(flag, "w").close()
            inproc.freeze(6.0)  # no heartbeat, not computing: a stopped process
        return "done"

    with Master("inproc:2", heartbeat_timeout=2.0) as m:
        frozen = m.submit(freezes_once)
        while not os.path.exists(flag):
            time.sleep(0.01)
        calls = []
        frozen.add_done_callback(calls.append)
        # The other worker takes new calls meanwhile.
        assert m.submit(square, 5).result(timeout=30) == 25
        assert not frozen.done()
        # At the heartbeat deadline the call runs again on a live worker.
        assert frozen.result(timeout=30) == "done"
        assert calls == [frozen]


# --- runs and futures on one Master ------------------------------------------------


def test_run_and_futures_on_one_master_one_after_the_other(master):
    data = DataSet(list(range(100)))
    assert master.run(lambda p, xs: sum(xs), dataset=data) == 4950
    assert list(master.map(square, range(5))) == [0, 1, 4, 9, 16]
    assert master.run(lambda p, xs: p * sum(xs), params=2, dataset=data) == 9900
    assert master.last_run.dataset_bytes_sent == 0  # the run's cache held
    assert master.submit(square, 9).result(timeout=30) == 81
    assert master.run(lambda p, xs: sum(xs), dataset=data) == 4950


def test_run_from_another_thread_waits_for_the_futures_run(local2):
    data = DataSet(list(range(100)))
    futures = [local2.submit(slow_identity, i, delay=0.3) for i in range(4)]
    while not futures[0].running():
        time.sleep(0.01)
    got = []
    thread = threading.Thread(
        target=lambda: got.append(local2.run(lambda p, xs: sum(xs), dataset=data))
    )
    thread.start()
    thread.join(30)
    assert got == [4950]
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3]


def test_a_method_needing_the_workers_is_refused_in_a_done_callback(local2, gate):
    said = []
    called = threading.Event()

    def callback(future):
        try:
            local2.worker_stats()
        except QjamfabError as exc:
            said.append(str(exc))
        called.set()

    future = local2.submit(held, 1, gate.path)
    future.add_done_callback(callback)
    assert not future.done()  # so the callback runs on the dispatcher
    gate.open()
    assert called.wait(30)
    assert said == [
        "a future's done-callback called a Master method that needs the "
        "workers (run, clear_cache, worker_stats): call it from your own "
        "thread, after the future is done"
    ]
    assert local2.submit(square, 2).result(timeout=30) == 4


# --- shutdown, close, cancel ----------------------------------------------------


def _queued_behind_a_blocker(m, n=5, gate=None):
    """A blocker on each of the two workers (held until the gate opens, or
    1 s without one); n calls queued behind them."""
    blocker, other = (
        m.submit(held, "blocker", gate.path)
        if gate
        else m.submit(slow_identity, "blocker", delay=1.0)
        for _ in "ab"
    )
    while not (blocker.running() and other.running()):
        time.sleep(0.01)
    return blocker, [m.submit(square, i) for i in range(n)]


def test_shutdown_waits_for_queued_futures_then_closes(qjamfab_home):
    m = Master("local:2")
    blocker, queued = _queued_behind_a_blocker(m)
    m.shutdown()
    assert blocker.result(timeout=0) == "blocker"
    assert [f.result(timeout=0) for f in queued] == [0, 1, 4, 9, 16]
    assert m.closed and not processes_mentioning(str(qjamfab_home))


def test_shutdown_cancel_futures_cancels_the_queued_ones():
    m = Master("local:2")
    blocker, queued = _queued_behind_a_blocker(m)
    m.shutdown(cancel_futures=True)
    assert blocker.result(timeout=0) == "blocker"
    assert all(f.cancelled() for f in queued)
    with pytest.raises(cf.CancelledError):
        queued[0].result()
    assert m.closed


def test_shutdown_without_wait_returns_at_once_and_closes_later(gate):
    m = Master("local:2")
    blocker, queued = _queued_behind_a_blocker(m, gate=gate)
    m.shutdown(wait=False)
    assert not all(f.done() for f in queued)  # it did not wait for them
    gate.open()
    assert [f.result(timeout=30) for f in queued] == [0, 1, 4, 9, 16]
    deadline = time.monotonic() + 10
    while not m.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.closed


def test_leaving_the_with_block_waits_for_submitted_futures():
    with Master("local:2") as m:
        futures = [m.submit(slow_identity, i, delay=0.2) for i in range(4)]
    assert m.closed
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]


def test_a_queued_future_can_be_cancelled_a_running_one_not(local2, gate):
    blocker, queued = _queued_behind_a_blocker(local2, n=2, gate=gate)
    assert not blocker.cancel()
    assert queued[0].cancel() and queued[0].cancelled()
    gate.open()
    assert queued[1].result(timeout=30) == 1
    assert blocker.result(timeout=30) == "blocker"


@pytest.mark.parametrize("stop", ["shutdown", "close"])
def test_submit_and_map_after_shutdown_are_refused(stop):
    m = Master("local:1")
    getattr(m, stop)()
    message = (
        r"^cannot submit: this Master was shut down \(shutdown\(\) or "
        r"close\(\) was called\); create a new Master for more work$"
    )
    with pytest.raises(ExecutorShutdown, match=message) as info:
        m.submit(square, 1)
    assert isinstance(info.value, RuntimeError)  # as the stdlib raises
    assert isinstance(info.value, QjamfabError)
    with pytest.raises(ExecutorShutdown, match=message):
        m.map(square, range(3))
    m.shutdown()  # again: nothing happens


# --- bad input ------------------------------------------------------------------


def test_a_function_that_is_not_callable_is_refused(local2):
    with pytest.raises(
        BadJob,
        match=r"^submit\(\) needs a function first, "
        r"not an int: pass a callable, e.g. m.submit\(f, x\)$",
    ):
        local2.submit(42, 1)
    with pytest.raises(
        BadJob,
        match=r"^map\(\) needs a function first, not "
        r"a list: pass a callable, e.g. m.map\(f, x\)$",
    ):
        local2.map([1, 2], range(3))


@pytest.mark.parametrize("chunksize", [0, -3, 2.5, "4", True, None])
def test_a_bad_chunksize_is_refused(local2, chunksize):
    with pytest.raises(
        ValueError,
        match=r"^chunksize must be a positive "
        r"int, not .*: give the items per call, or 1 \(the "
        r"default\) to let qjamfab batch them$",
    ):
        local2.map(square, range(3), chunksize=chunksize)


@pytest.mark.parametrize("timeout", ["5", [1], True])
def test_a_bad_timeout_is_refused(local2, timeout):
    with pytest.raises(
        TypeError,
        match=r"^timeout must be a number of "
        r"seconds or None, not .*: e.g. timeout=30$",
    ):
        local2.map(square, range(3), timeout=timeout)


def test_a_map_argument_that_is_not_iterable_is_refused(local2):
    with pytest.raises(
        TypeError,
        match=r"^map\(\) argument 3 is an int, "
        r"which is not iterable: pass the function, then one "
        r"iterable per parameter, e.g. m.map\(f, range\(10\)\)$",
    ):
        local2.map(pow, range(3), 7)


def test_a_call_that_kills_two_workers_fails_its_own_future_only():
    from qjamfab import WorkerLost

    def exits_on_0(x):
        if x == 0:
            os._exit(9)
        return x

    with Master("local:1") as m:
        futures = [m.submit(exits_on_0, x) for x in range(3)]
        with pytest.raises(
            WorkerLost,
            match=r"^submit\(.*exits_on_0, 0\) killed workers local-0 and "
            r"local-0 \(last: exit status 9\): fix the function for these "
            r"arguments; the workers are restarted",
        ):
            futures[0].result(timeout=60)
        assert [f.result(timeout=60) for f in futures[1:]] == [1, 2]
        # The worker is restarted for what comes next.
        assert m.submit(square, 3).result(timeout=30) == 9


def test_a_master_that_ran_futures_is_garbage_collected(qjamfab_home):
    import gc

    def dispatchers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "qjamfab-futures"}

    m = Master("local:2")
    before = dispatchers()
    future = m.submit(square, 5)
    assert dispatchers() - before  # started for it, gone once idle
    assert future.result(timeout=30) == 25
    del future
    deadline = time.monotonic() + 5
    while dispatchers() - before and time.monotonic() < deadline:
        time.sleep(0.01)  # the dispatcher ends when idle
    assert not dispatchers() - before
    del m
    gc.collect()
    deadline = time.monotonic() + 5
    while processes_mentioning(str(qjamfab_home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_mentioning(str(qjamfab_home))
