"""Master as a concurrent.futures.Executor, held to the standard library's
documented semantics (the `concurrent.futures` docs for `Executor`,
`Future`, `wait` and `as_completed`), over two local workers, one SSH host
with two workers, and a Dask cluster of two. Quick calls take tens of ms;
where the semantics need a slow call beside them, it is held until the
test has seen what it must see while that call runs (tests/gates.py: the
`gate` fixture, asked for after `executor`), or takes 1.5 s where it must
end on its own while the Master waits for it; the tests assert what is
done and what is not, never how long it took."""

import concurrent.futures as cf
import gc
import threading
import time
import weakref

import pytest

from tests.engines import Engine
from tests.gates import held, touch_when_open

pytestmark = pytest.mark.timeout(120)

SLOW_S = 1.5


def mul(a, b):
    return a * b


def sleep_then(x, seconds=0.02):
    time.sleep(seconds)
    return x


def raises(message):
    raise ValueError(message)


class Box:
    """A result a weakref can point to."""

    def __init__(self, value):
        self.value = value


@pytest.fixture(params=["local", "ssh", "dask"])
def executor(request):
    """A Master of two worker processes: local, on one SSH host, or Dask
    (tests/engines.py)."""
    engine = Engine(request.param, request.getfixturevalue)
    options = {"heartbeat_timeout": 3.0} if engine.kind == "ssh" else {}
    with engine.master(**options) as m:
        yield m


def _until(condition, what, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


def _busy(executor, gate=None, n=2):
    """A slow call on each of the n workers, running: held until the gate
    opens, or SLOW_S seconds without one."""
    slow = [
        executor.submit(held, "slow", gate.path)
        if gate
        else executor.submit(sleep_then, "slow", SLOW_S)
        for _ in range(n)
    ]
    _until(lambda: all(f.running() for f in slow), "the slow calls run")
    return slow


# --- wait -------------------------------------------------------------------


def test_wait_all_completed_returns_every_future_done(executor):
    futures = [executor.submit(sleep_then, i) for i in range(6)]
    done, not_done = cf.wait(futures, timeout=60, return_when=cf.ALL_COMPLETED)
    assert done == set(futures) and not not_done
    assert [f.result() for f in futures] == list(range(6))


def test_wait_first_completed_returns_the_quick_call_alone(executor, gate):
    slow = executor.submit(held, "slow", gate.path)
    quick = executor.submit(mul, 21, 2)
    done, not_done = cf.wait([slow, quick], timeout=60, return_when=cf.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    assert quick.result() == 42
    gate.open()
    assert slow.result(timeout=60) == "slow"


def test_wait_first_exception_returns_at_the_first_failure(executor, gate):
    slow = executor.submit(held, "slow", gate.path)
    failing = executor.submit(raises, "boom")
    done, not_done = cf.wait(
        [slow, failing], timeout=60, return_when=cf.FIRST_EXCEPTION
    )
    assert done == {failing} and not_done == {slow}
    assert isinstance(failing.exception(), ValueError)
    gate.open()
    slow.result(timeout=60)


def test_wait_first_exception_with_one_failed_already_returns_at_once(executor, gate):
    failing = executor.submit(raises, "boom")
    with pytest.raises(ValueError, match="^boom$"):
        failing.result(timeout=60)
    slow = executor.submit(held, "slow", gate.path)
    done, not_done = cf.wait(
        [failing, slow], timeout=60, return_when=cf.FIRST_EXCEPTION
    )
    assert done == {failing} and not_done == {slow}
    gate.open()
    slow.result(timeout=60)


def test_wait_first_exception_without_one_waits_for_all(executor):
    futures = [executor.submit(sleep_then, i) for i in range(4)]
    done, not_done = cf.wait(futures, timeout=60, return_when=cf.FIRST_EXCEPTION)
    assert done == set(futures) and not not_done


def test_wait_timeout_returns_what_is_not_done(executor, gate):
    slow = executor.submit(held, "slow", gate.path)
    quick = executor.submit(mul, 2, 3)
    quick.result(timeout=60)
    done, not_done = cf.wait([slow, quick], timeout=0.1)
    assert done == {quick} and not_done == {slow}
    gate.open()
    slow.result(timeout=60)


# --- as_completed -----------------------------------------------------------


def test_as_completed_yields_each_as_it_finishes(executor, gate):
    slow = executor.submit(held, "slow", gate.path)
    quick = [executor.submit(mul, i, 2) for i in range(3)]
    seen = []
    for future in cf.as_completed([slow, *quick]):
        if not seen:
            assert not slow.done()  # a quick one came first
        seen.append(future)
        if set(seen) == set(quick):
            gate.open()
    assert seen[-1] is slow and set(seen) == {slow, *quick}


def test_as_completed_yields_finished_futures_first(executor, gate):
    finished = executor.submit(mul, 1, 1)
    finished.result(timeout=60)
    slow = executor.submit(held, "slow", gate.path)
    iterator = cf.as_completed([slow, finished], timeout=60)
    assert next(iterator) is finished
    gate.open()
    assert next(iterator) is slow


def test_as_completed_timeout_raises_for_what_is_not_done(executor, gate):
    slow = executor.submit(held, "slow", gate.path)
    quick = executor.submit(mul, 3, 3)
    seen = []
    with pytest.raises(cf.TimeoutError):
        for future in cf.as_completed([slow, quick], timeout=0.5):
            seen.append(future)
    assert seen == [quick]
    gate.open()
    assert slow.result(timeout=60) == "slow"


# --- submit while others run ---------------------------------------------------


def test_a_submit_made_while_a_call_runs_goes_to_an_idle_worker(executor, gate):
    slow = executor.submit(held, "slow", gate.path)
    _until(slow.running, "the slow call runs")
    quick = executor.submit(mul, 21, 2)
    assert quick.result(timeout=60) == 42
    assert not slow.done()
    gate.open()
    assert slow.result(timeout=60) == "slow"


# --- map ----------------------------------------------------------------------


def test_map_timeout_yields_what_is_in_then_raises(executor, gate):
    results = executor.map(held, [1, 2, 3], [None, None, gate.path], timeout=0.5)
    assert next(results) == 1
    assert next(results) == 2
    with pytest.raises(cf.TimeoutError):
        next(results)


def test_map_yields_each_result_before_later_items_finish(executor, gate, tmp_path):
    marker = tmp_path / "slow-done"
    results = executor.map(
        touch_when_open, [str(tmp_path / "quick"), str(marker)], [None, gate.path]
    )
    assert next(results) == str(tmp_path / "quick")
    assert not marker.exists()  # the second item still runs
    gate.open()
    assert next(results) == str(marker)


def test_map_with_chunksize_gives_every_result_in_order(executor):
    assert list(executor.map(mul, range(20), range(20), chunksize=3)) == [
        x * x for x in range(20)
    ]


def test_map_with_chunksize_raises_at_the_failing_item(executor):
    results = executor.map(
        lambda x: x if x != 4 else raises("four"), range(8), chunksize=3
    )
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="^four$"):
        next(results)


def test_map_does_not_keep_what_it_yielded(executor):
    results = executor.map(Box, range(3))
    first = next(results)
    assert first.value == 0
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None
    assert [b.value for b in results] == [1, 2]


def test_closing_a_map_cancels_the_items_not_started(executor, gate, tmp_path):
    slow = _busy(executor, gate)
    where = tmp_path / "touched"
    where.mkdir()
    results = executor.map(touch_when_open, [str(where / f"{i}") for i in range(4)])
    results.close()
    gate.open()
    assert [f.result(timeout=60) for f in slow] == ["slow", "slow"]
    assert executor.submit(mul, 1, 2).result(timeout=60) == 2  # after the map's
    assert not list(where.iterdir())  # none of the map's calls ran


# --- callbacks and cancel ----------------------------------------------------------


def test_a_done_callback_runs_once_with_its_future(executor):
    called = []
    event = threading.Event()
    future = executor.submit(sleep_then, "x")
    future.add_done_callback(lambda f: (called.append(f), event.set()))
    assert event.wait(60)
    assert called == [future] and future.result() == "x"
    # Added to a done future, a callback runs at once, in this thread.
    mine = []
    future.add_done_callback(lambda f: mine.append(threading.current_thread()))
    assert mine == [threading.current_thread()]


def test_cancel_works_on_a_pending_future_only(executor, gate):
    slow = _busy(executor, gate)
    pending = executor.submit(mul, 2, 2)
    assert not slow[0].cancel() and slow[0].running()
    assert pending.cancel() and pending.cancelled() and pending.done()
    with pytest.raises(cf.CancelledError):
        pending.result()
    called = []
    pending.add_done_callback(called.append)
    assert called == [pending]
    gate.open()
    assert [f.result(timeout=60) for f in slow] == ["slow", "slow"]
    done = executor.submit(mul, 3, 3)
    assert done.result(timeout=60) == 9
    assert not done.cancel() and not done.cancelled()


# --- shutdown ---------------------------------------------------------------------


def test_shutdown_waits_for_queued_calls(executor):
    slow = _busy(executor)
    queued = [executor.submit(mul, i, 2) for i in range(4)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in [*slow, *queued])
    assert [f.result() for f in queued] == [0, 2, 4, 6]
    with pytest.raises(RuntimeError):
        executor.submit(mul, 1, 1)


def test_shutdown_without_wait_returns_and_the_calls_still_finish(executor, gate):
    slow = _busy(executor, gate)
    queued = [executor.submit(mul, i, 2) for i in range(4)]
    executor.shutdown(wait=False)
    assert not slow[0].done()
    gate.open()
    assert [f.result(timeout=60) for f in queued] == [0, 2, 4, 6]
    _until(lambda: executor.closed, "the Master closes")


def test_shutdown_cancel_futures_cancels_the_queued_calls(executor):
    slow = _busy(executor)
    queued = [executor.submit(mul, i, 2) for i in range(4)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert [f.result() for f in slow] == ["slow", "slow"]
    assert all(f.cancelled() for f in queued)
    # The waiters of a cancelled future are told: wait() returns them done.
    done, not_done = cf.wait(queued, timeout=0)
    assert done == set(queued) and not not_done


# --- runs and futures ---------------------------------------------------------------


def test_a_run_waits_for_the_tasks_in_flight_and_submits_resume_after(executor):
    slow = executor.submit(sleep_then, "slow", SLOW_S)
    _until(slow.running, "the slow call runs")
    got = []

    def run():
        value = executor.run(lambda p, s: 1)  # once per worker: all of them
        got.append((value, slow.done()))

    thread = threading.Thread(target=run)
    thread.start()
    after = executor.submit(mul, 5, 5)
    thread.join(60)
    assert got == [(2, True)]  # the run had both workers, after the call
    assert slow.result() == "slow"
    assert after.result(timeout=60) == 25
