"""Run's logic through public behaviour, on in-process workers
(`Master("inproc:N")`, qjamfab/inproc.py): the split rule, a worker that
runs dry taking queued work, backups of stragglers, loss and re-planning,
frozen workers, and every slice counted once. Jobs act out slowness and
failures from inside mapfunc; `m.last_run` says what the run did."""

import os
import time

import pytest

from qjamfab import DataSet, Master, WorkerLost
from qjamfab.engines import inproc

pytestmark = pytest.mark.timeout(60)

DATA = DataSet(list(range(48)), slice_size=4)  # 12 slices
TOTAL = sum(range(48))


def quick(params, xs):
    return sum(xs)


def slow_on_first_slices(params, xs):
    """Uneven: the first slices (worker 0's in the default layout) slow."""
    time.sleep(params if xs[0] < 12 else 0.0)
    return sum(xs)


def test_the_first_run_splits_and_a_balanced_run_is_followed_by_unsplit_ones():
    with Master("inproc:3") as m:
        assert m.run(quick, dataset=DATA) == TOTAL
        assert m.last_run.tasks == 6  # two tasks per worker at first
        assert m.run(lambda p, xs: time.sleep(0.03) or sum(xs), dataset=DATA) == TOTAL
        assert m.last_run.tasks == 3  # balanced: one task each
        assert m.run(quick, dataset=DATA) == TOTAL
        assert m.last_run.tasks == 3


def test_an_uneven_run_makes_the_next_one_split_again():
    with Master("inproc:3") as m:
        m.run(quick, dataset=DATA)
        m.run(quick, dataset=DATA)
        assert m.last_run.tasks == 3
        assert m.run(slow_on_first_slices, params=0.05, dataset=DATA) == TOTAL
        assert m.run(quick, dataset=DATA) == TOTAL
        assert m.last_run.tasks == 6  # uneven before: split


def _slow_on_first_half(params, xs):
    time.sleep(params if xs[0] < 24 else 0.0)
    return sum(xs)


def test_a_worker_that_runs_dry_takes_a_queued_task_it_holds():
    """Moving a queued task costs its data unless the idle worker holds
    it: with a second copy of every slice (replicas=2), the master moves
    it. (Local workers: no host agent between them and the master.)"""
    # No backup copies (a loaded machine may start one): moves only.
    with Master("local:2", replicas=2, straggler_factor=1000) as m:
        assert m.run(_slow_on_first_half, params=0.05, dataset=DATA) == TOTAL
        # Unsplit now; uneven, so the next run splits again.
        assert m.run(_slow_on_first_half, params=0.05, dataset=DATA) == TOTAL
        assert m.last_run.tasks - m.last_run.backup_tasks == 2
        assert m.run(_slow_on_first_half, params=0.2, dataset=DATA) == TOTAL
        stats = m.last_run
        assert stats.moved_tasks >= 1 and stats.moved_at_hosts == 0
        assert stats.dataset_bytes_sent == 0  # the moved task's slices held
        # (a loaded machine may start a backup of a slow copy too)
        assert stats.tasks == 4 + stats.moved_tasks + stats.backup_tasks


def test_a_host_s_worker_that_runs_dry_takes_a_sibling_s_waiting_task():
    """On one host, a run's tasks wait at its agent, each worker running
    one at a time, and a worker that runs dry takes a sibling's: the same
    task, moved at the host, with no new copy sent. The slices are in the
    host's cache already: a second copy of them costs nothing there."""
    with Master("inproc:2", replicas=2, straggler_factor=1000) as m:
        assert m.run(_slow_on_first_half, params=0.05, dataset=DATA) == TOTAL
        assert m.last_run.replica_bytes_sent == 0
        assert m.run(_slow_on_first_half, params=0.05, dataset=DATA) == TOTAL
        assert m.last_run.tasks - m.last_run.backup_tasks == 2
        assert m.run(_slow_on_first_half, params=0.2, dataset=DATA) == TOTAL
        stats = m.last_run
        assert stats.moved_at_hosts >= 1, stats
        assert stats.dataset_bytes_sent == 0
        assert stats.tasks == 4 + stats.moved_tasks + stats.backup_tasks


def test_a_straggler_gets_a_backup_copy_and_the_first_result_wins():
    def straggles(params, xs):
        flag = os.path.join(params, "slow")
        if xs[0] == 0 and not os.path.exists(flag):
            open(flag, "w").close()  # only the first copy is slow: it
            release = os.path.join(params, "release")  # ends after the run
            deadline = time.monotonic() + 30
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.05)
        return sum(xs)

    with Master("inproc:3") as m:
        m.run(quick, dataset=DATA)
        m.run(quick, dataset=DATA)  # now unsplit: nothing queued
        import tempfile

        scratch = tempfile.mkdtemp()
        try:
            # The first copy of slice 0 waits until the run has ended: only
            # its backup can end the run.
            assert m.run(straggles, params=scratch, dataset=DATA) == TOTAL
            assert m.last_run.backup_tasks >= 1
        finally:
            open(os.path.join(scratch, "release"), "w").close()


def test_a_lost_worker_s_slices_run_elsewhere_each_counted_once(tmp_path):
    def dies_once(params, xs):
        flag = os.path.join(params, "died")
        if 20 in xs and not os.path.exists(flag):
            open(flag, "w").close()
            inproc.die(5)
        time.sleep(0.02)  # over 50 ms in all: worth splitting after
        return sum(xs)

    with Master("inproc:3") as m:
        assert m.run(dies_once, params=str(tmp_path), dataset=DATA) == TOTAL
        stats = m.last_run
        assert len(stats.lost_workers) == 1 and stats.rerun_slices >= 1
        # Restarted before the next run, which splits: the last was uneven.
        assert m.run(quick, dataset=DATA) == TOTAL
        assert m.last_run.workers == 3 and not m.last_run.lost_workers
        assert m.last_run.tasks - m.last_run.moved_tasks == 6


def test_a_slice_that_kills_two_workers_fails_the_run_naming_it():
    def always_dies(params, xs):
        if 20 in xs:
            inproc.die(3)
        return sum(xs)

    with Master("inproc:3") as m:
        with pytest.raises(
            WorkerLost,
            match=r"^dataset slice 5 killed "
            r"workers inproc-\d and inproc-\d \(last: exit "
            "status 3\\): fix mapfunc for this input",
        ):
            m.run(always_dies, dataset=DATA)
        assert m.run(quick, dataset=DATA) == TOTAL


def test_a_frozen_worker_is_lost_to_the_heartbeat_deadline(tmp_path):
    def freezes_once(params, xs):
        flag = os.path.join(params, "froze")
        if 20 in xs and not os.path.exists(flag):
            open(flag, "w").close()
            inproc.freeze(5)
        time.sleep(0.01)
        return sum(xs)

    # No backup copy of the frozen task (it would end the run first): the
    # median slice's 10 ms times 1000 is far past the deadline.
    with Master("inproc:3", heartbeat_timeout=2.0, straggler_factor=1000) as m:
        # Frozen for longer than the deadline: only the deadline ends the
        # run with a worker lost (waiting out the freeze would lose none).
        assert m.run(freezes_once, params=str(tmp_path), dataset=DATA) == TOTAL
        assert len(m.last_run.lost_workers) == 1
        # Silence is not death: the slice is not blamed, and a run right
        # after (the worker still frozen, then replaced) is right too.
        assert m.run(quick, dataset=DATA) == TOTAL


@pytest.mark.timeout(20)  # a wait for heartbeats (30 s) would fail it
def test_every_worker_lost_is_an_error_at_once_not_a_hang():
    with Master("inproc:2", heartbeat_timeout=30) as m:
        with pytest.raises(WorkerLost, match=r"and no worker is left"):
            # Killed by a signal (not the job exiting): every worker goes.
            m.run(lambda p, xs: inproc.die(-9), dataset=DATA)
        assert m.run(quick, dataset=DATA) == TOTAL


def test_heartbeats_left_unread_while_the_master_sends_count():
    """The master reads its workers only between its own steps: while it
    spends longer than the heartbeat deadline producing a slice (a slow
    dataset here), heartbeats wait unread, and must count before a worker
    is declared silent."""
    from qjamfab import BaseDataSet

    class SlowSlices(BaseDataSet):
        hashed = False

        def chunks(self):
            return 4

        def slice(self, i):
            if self.hashed:  # slow only when sent: 2 x 1.2 s per worker
                time.sleep(1.2)
            return [i]

    data = SlowSlices()
    data.refs()
    data.hashed = True
    with Master("inproc:2", heartbeat_timeout=2.0) as m:
        assert m.run(quick, dataset=data) == 6
        assert m.last_run.lost_workers == []


def test_an_in_process_agent_that_fails_says_why(monkeypatch):
    """The agent is a thread here: what it raised is what a process's
    stderr would have said, and the Master's error shows it."""

    def fails(self):
        raise RuntimeError("the agent broke")

    monkeypatch.setattr(inproc._ThreadAgent, "hello", fails)
    with pytest.raises(WorkerLost) as info:
        Master("inproc:2")
    message = str(info.value)
    assert message.splitlines()[0] == (
        "inproc did not start (exit status unknown): RuntimeError: the agent broke"
    ), message
    assert "Traceback" in message and ", in fails" in message  # where it raised
