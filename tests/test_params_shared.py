"""Params once per host (issue 20 item 1): big params cross to a host once
and sit in shared memory there, mapped copy-on-write by each worker; on
this machine, local workers map one copy the master wrote. Small params,
and QJAMFAB_SHARE_PARAMS=0, go with each worker's first task."""

import os

import numpy as np
import pytest

from qjamfab import Master
from qjamfab.runtime.shared_params import SHARE_MIN_BYTES

pytestmark = pytest.mark.timeout(120)

BIG = np.arange(1_000_000, dtype=np.float64)  # 8 MB
MB = 1 << 20


def _look(params, data):
    """What one worker saw: its pid, whether its params came from a shared
    memory file, their values before and after it wrote into them."""
    with open("/proc/self/maps") as f:
        shared = "memfd:qjamfab-params" in f.read()
    before = float(params[:8].sum())
    params[:8] = -1.0  # this worker's pages only
    return [(os.getpid(), shared, before, float(params[8:].sum()))]


def _join(a, b):
    return a + b


def _runs(m, params, times=2):
    seen = []
    for _ in range(times):
        seen.append(m.run(_look, params, reduce=_join, progress=False))
        seen.append(m.last_run.bytes_sent)
    return seen


def _check_values(results, params):
    for _, _, before, rest in results:
        assert before == float(params[:8].sum())  # no one's writes seen
        assert rest == float(params[8:].sum())


def test_local_workers_map_one_copy_the_master_wrote():
    with Master("local:3") as m:
        first, sent, second, sent_again = _runs(m, BIG)
    for results in (first, second):
        assert len({pid for pid, *_ in results}) == 3
        assert all(shared for _, shared, *_ in results)
        _check_values(results, BIG)
    assert sent < MB and sent_again < MB  # nothing of the 8 MB on the pipes
    assert float(BIG[:8].sum()) == 28.0  # the master's own copy untouched


def test_turned_off_each_local_worker_gets_its_own_copy(monkeypatch):
    monkeypatch.setenv("QJAMFAB_SHARE_PARAMS", "0")
    with Master("local:2") as m:
        results, sent = _runs(m, BIG, times=1)
    assert not any(shared for _, shared, *_ in results)
    _check_values(results, BIG)
    assert sent >= 2 * BIG.nbytes


def test_small_params_go_with_each_first_task():
    small = np.arange(SHARE_MIN_BYTES // 16, dtype=np.float64)
    with Master("local:2") as m:
        results, sent = _runs(m, small, times=1)
    assert not any(shared for _, shared, *_ in results)
    _check_values(results, small)
    assert sent >= 2 * small.nbytes


def test_over_ssh_params_cross_once_per_host(ssh):
    opts = dict(workers_per_host=3, ssh_config=ssh.ssh_config)
    with Master(ssh.aliases[:2], **opts) as m:
        first, sent, second, sent_again = _runs(m, BIG)
    for results in (first, second):
        assert len({pid for pid, *_ in results}) == 6
        assert all(shared for _, shared, *_ in results)
        _check_values(results, BIG)
    for total in (sent, sent_again):
        # Once per host: twice the params, not six times.
        assert 2 * BIG.nbytes <= total < 2 * BIG.nbytes + MB
