"""What a run takes in is its own: replayed failure sequences over the
engines (the `engine` fixture, tests/engines.py).

- A slice that kills two workers of one host fails its run; the next run on
  the same Master is right and raises nothing (an answer the failed run
  asked for and never read must not be taken into the next).
- A queued group moved to a worker that ran dry, whose new copy is then
  killed, runs again: the run ends with the right sum instead of waiting
  forever. Where the master moves it (local workers, Dask), the old
  copy's cancel is still unconfirmed then; where the host's agent does
  (one host of two workers: inproc, ssh), the same task moved there.

On Dask a job's exit ends the task it ran, not the Dask worker, and the
worker runs its tasks in an order of its own: the slice named is the one
whose task exited (the link says which), not the first of the worker's
queue, which there may not have started.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from qjamfab import DataSet, Master, RemoteError, WorkerLost
from tests.engines import die

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("engine", ["inproc", "local", "ssh", "dask"], indirect=True)
def test_the_run_after_a_slice_killed_two_workers_is_right(engine):
    kind = engine.kind

    def dies_on_15(params, xs):
        if 15 in xs:
            # The last slice: once the others are in (held at the host,
            # where it has an agent, and asked for), its worker dies.
            time.sleep(0.2)
            die(kind)
        return sum(xs)

    data = DataSet(list(range(16)), slice_size=2)
    with engine.master() as m:
        for _ in range(3):
            with pytest.raises(WorkerLost, match=r"^dataset slice 7 killed workers"):
                m.run(dies_on_15, dataset=data)
            assert m.run(lambda p, xs: sum(xs), dataset=data) == sum(range(16))


def _wait_for(path: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def test_a_moved_group_whose_new_copy_is_killed_runs_again(engine, tmp_path):
    """Slice 0 runs long on one worker with slice 1 queued behind it; the
    other worker runs dry and takes slice 1; that copy dies. Slice 0 ends
    only after the death, so the old copy's cancel is confirmed after the
    master has seen the loss."""
    kind = engine.kind
    scratch = str(tmp_path)

    def job(params, xs):
        (i,) = xs
        me = f"{os.getpid()}-{threading.get_ident()}"  # a worker (or thread)
        if i == 0:
            # Hold slice 0 until the moved copy of slice 1 has died.
            _wait_for(os.path.join(scratch, "moved-died"))
        elif i == 1 and any(
            os.path.exists(os.path.join(scratch, f"ran-{me}-{k}")) for k in (2, 3)
        ):
            open(os.path.join(scratch, "moved-died"), "w").close()
            die(kind)
        else:
            time.sleep(0.3)  # long enough that moving slice 1 pays
        open(os.path.join(scratch, f"ran-{me}-{i}"), "w").close()
        return i + 1

    data = DataSet([0, 1, 2, 3], slice_size=1)
    with engine.master(straggler_factor=1000) as m:
        assert m.run(job, dataset=data) == 10
        stats = m.last_run
    assert os.path.exists(os.path.join(scratch, "moved-died"))
    moved = stats.moved_at_hosts if kind in ("inproc", "ssh") else stats.moved_tasks
    assert moved >= 1 and stats.lost_workers, stats


def test_an_answer_of_a_failed_run_is_not_taken_into_the_next(ssh, tmp_path):
    """Host 1's agent is combining its workers' results (COLLECT) when a
    job on host 2 raises: the run fails with host 1's answer on its way.
    The next run drops that answer (it names the failed run's id)."""
    scratch = str(tmp_path)

    def job(params, xs):
        if xs == [3]:  # on host 2: raise while host 1's agent combines
            _wait_for(os.path.join(scratch, "combining"))
            open(os.path.join(scratch, "raised"), "w").close()
            raise ValueError("slice 3 is bad")
        return sum(xs)

    def slow_reduce(a, b):
        # Only host 1's agent combines: every task is one slice.
        open(os.path.join(scratch, "combining"), "w").close()
        _wait_for(os.path.join(scratch, "raised"))
        time.sleep(0.3)  # host 2's error reaches the master first
        return a + b

    data = DataSet([0, 1, 2, 3], slice_size=1)
    with Master(["host1", "host2"], workers_per_host=2, ssh_config=ssh.ssh_config) as m:
        with pytest.raises(RemoteError, match="slice 3 is bad"):
            m.run(job, dataset=data, reduce=slow_reduce)
        for _ in range(3):
            assert m.run(lambda p, xs: sum(xs), dataset=data) == 6
