"""A run's first tasks to a host whose agent serves several of its
workers travel in one TASKS frame, which the agent passes on as each
worker's TASK (issue 20 item 2, in part): the master writes and frames
once per host, and params sent with first tasks cross once per host. A
job goes to such a host's agent once, which hands it to each worker."""

import logging
import re

import numpy as np
import pytest

from qjamfab import DataSet, Master

pytestmark = pytest.mark.timeout(120)


def _frames_sent(text: str) -> list[tuple[str, str]]:
    """(destination, kind) of each frame the master logged sending."""
    return re.findall(r"-> (\S+) ([A-Z]+) ", text)


def test_first_tasks_go_in_one_frame_per_host(ssh, caplog):
    small = np.arange(1000, dtype=np.float64)  # with the tasks, not shared
    data = DataSet(list(range(12)), slice_size=1)
    opts = dict(workers_per_host=3, ssh_config=ssh.ssh_config, straggler_factor=1000)
    with Master(ssh.aliases[:2], **opts) as m:
        m.run(lambda p, xs: 0, dataset=data)  # slices cached, jobs loaded
        with caplog.at_level(logging.DEBUG, logger="qjamfab"):
            total = m.run(lambda p, xs: float(p[1]) + sum(xs), small, dataset=data)
        stats = m.last_run
    assert total == 12 * 1.0 + sum(range(12))
    sent = _frames_sent(caplog.text)
    kinds = [kind for _, kind in sent]
    assert sorted(host for host, kind in sent if kind == "TASKS") == ["host1", "host2"]
    # Only tasks moved to a worker that ran dry go alone.
    assert kinds.count("TASK") == stats.moved_tasks + stats.backup_tasks
    # The params went with each host's frame: twice, not once per worker.
    assert 2 * small.nbytes <= stats.bytes_sent < 3 * small.nbytes + 20_000


def test_a_job_crosses_once_per_host(ssh, caplog):
    table = np.arange(125_000, dtype=np.float64)  # 1 MB, in the job itself

    def job(params, data):
        return float(table[-1])

    opts = dict(workers_per_host=3, ssh_config=ssh.ssh_config)
    with Master(ssh.aliases[:2], **opts) as m:
        m.run(lambda p, x: 0)  # the workers are up and have run a job
        with caplog.at_level(logging.DEBUG, logger="qjamfab"):
            total = m.run(job, reduce=_add)
        sent = m.last_run.bytes_sent
        assert total == 6 * float(table[-1])
        jobs = [to for to, kind in _frames_sent(caplog.text) if kind == "FUNC"]
        assert sorted(jobs) == ["host1", "host2"]  # to each agent, none per worker
        assert 2 * table.nbytes < sent < 3 * table.nbytes
        # After clear_cache the workers have dropped the job while their
        # agents think they hold it: each asks the master, and gets it.
        m.clear_cache()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="qjamfab"):
            assert m.run(job, reduce=_add) == total
        asked = [to for to, kind in _frames_sent(caplog.text) if kind == "FUNC"]
        assert len(asked) == 6 and all("-" in to for to in asked)  # per worker


def _add(a, b):
    return a + b
