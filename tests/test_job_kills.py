"""A job that ends the workers it runs on: the run stops at the second
worker it ends (any slices), says what the job did, and names what each
lost worker was running; the Master stays usable."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from qjamfab import DataSet, Master, WorkerLost

pytestmark = pytest.mark.timeout(60)

DATA = DataSet(list(range(16)), slice_size=1)


def _exits(params, xs):
    sys.exit(3)


def _hard_exits(params, xs):
    os._exit(4)


@pytest.mark.parametrize(
    "job, status", [(_exits, 3), (_hard_exits, 4)], ids=["sys.exit", "os._exit"]
)
def test_a_job_that_exits_every_worker_stops_at_the_second(job, status):
    with Master("local:4") as m:
        with pytest.raises(WorkerLost) as info:
            m.run(job, dataset=DATA)
        first = str(info.value).splitlines()[0]
        assert first.startswith(
            "the job ended 2 workers by exiting while running mapfunc (local-"
        ), first
        assert first.count(f"exit status {status}, dataset slice") == 2, first
        assert first.endswith(
            "mapfunc (or what it calls) exits its process, with sys.exit, "
            "os._exit or exit(): fix mapfunc so it returns or raises; the "
            "workers are restarted for the next run"
        ), first
        assert len(m.last_run.lost_workers) == 2  # not all four
        assert m.run(lambda p, xs: sum(xs), dataset=DATA) == sum(range(16))


def test_when_no_worker_is_left_each_lost_worker_is_named_with_its_slices():
    def killed(params, xs):
        os.kill(os.getpid(), signal.SIGKILL)  # a signal: not the job exiting

    with Master("local:2") as m:
        with pytest.raises(WorkerLost) as info:
            m.run(killed, dataset=DataSet(list(range(4)), slice_size=1))
        first = str(info.value).splitlines()[0]
        if first.startswith("dataset slice"):  # both died on one slice
            assert "killed workers local-" in first
        else:
            assert first.startswith("workers were lost (local-"), first
            for name in ("local-0", "local-1"):
                assert f"{name}: killed by SIGKILL, dataset slice " in first
            assert "and no worker is left" in first
        assert m.run(lambda p, xs: sum(xs), dataset=DATA) == sum(range(16))
