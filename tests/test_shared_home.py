"""Machines that share a home directory (NFS): two hosts, each with a
process table of its own (its sshd under `unshare --pid`) and its own
XDG_RUNTIME_DIR, sharing one QJAMFAB_HOME. Each keeps its daemons (and its
template) to itself (never counted or signalled by the other host; the
next session on a host gets fresh ones), and a slice one host stored is
found by the other."""

import os
import shutil
import time

import pytest

from qjamfab import DataSet, Master, hostspec
from qjamfab.engines import cluster
from tests.conftest import processes_mentioning
from tests.jobs import multiply_sum
from tests.sshd_hosts import SshdHosts, sshd_available

pytestmark = pytest.mark.timeout(120)
DATA = list(range(60))
TOTAL = sum(DATA)


@pytest.fixture(scope="module")
def shared():
    if not sshd_available() or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs sshd, root and unshare (util-linux)")
    with SshdHosts(2, shared_home=True, pid_namespaces=True) as servers:
        yield servers
    # Stopping the hosts ended every process of both namespaces.
    assert not processes_mentioning(servers.shared_home)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _inner_pid(pid: int) -> int:
    """Process `pid`'s pid in its own (innermost) pid namespace."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")


def _daemons(host) -> set[int]:
    """The worker daemons running on `host`, as its own process table
    numbers them (what worker_stats reports)."""
    found = set()
    for pid in host.processes():
        if _comm(pid).startswith("qjamfab-w"):
            try:
                found.add(_inner_pid(pid))
            except OSError:
                pass  # ended meanwhile
    return found


def _pids(master, alias: str) -> set[int]:
    return {s["pid"] for w, s in master.worker_stats().items() if w.startswith(alias)}


def _stop(shared, alias: str) -> None:
    (result,) = cluster.stop_workers(
        hostspec.parse_hosts([alias]), ssh_config=shared.ssh_config
    )
    assert result.ok, result


def test_hosts_sharing_a_home_keep_their_daemons_to_themselves(shared):
    host1, host2 = shared["host1"], shared["host2"]
    assert host1.home == host2.home and host1.host_dir != host2.host_dir
    with Master(["host1"], workers_per_host=2, ssh_config=shared.ssh_config) as m:
        assert m.run(multiply_sum, params=1, dataset=DataSet(DATA)) == TOTAL
        first = _pids(m, "host1")
    assert len(first) == 2 and first == _daemons(host1)
    # As many workers, so the same slices: host2 finds on the shared disk
    # those that host1 stored.
    opts = dict(workers_per_host=1, ssh_config=shared.ssh_config)
    with Master(["host1", "host2"], **opts) as m:
        assert m.run(multiply_sum, params=1, dataset=DataSet(DATA)) == TOTAL
        assert m.last_run.dataset_bytes_sent == 0
        # Fresh daemons for this session; the first session's retired.
        again = _pids(m, "host1")
        assert len(again) == 1 and again.isdisjoint(first)
        second = _pids(m, "host2")
    assert len(second) == 1 and second == _daemons(host2)
    assert again == _daemons(host1)
    with Master(["host2"], **opts) as m:
        assert m.run(multiply_sum, params=2, dataset=DataSet(DATA)) == 2 * TOTAL
        third = _pids(m, "host2")
        assert third.isdisjoint(second)
    assert again == _daemons(host1)  # host2's session left them alone
    # Each host counts its own daemons, not the other's.
    results = cluster.status(
        hostspec.parse_hosts(["host1", "host2"]), ssh_config=shared.ssh_config
    )
    for result in results:
        counted = {w["pid"] for w in result.info["workers"]}
        assert counted == _daemons(shared[result.host]), result.host
        assert result.info["host_dir"] == shared[result.host].host_dir
    # Stopping one host's daemons leaves the other's running.
    _stop(shared, "host1")
    assert _daemons(host1) == set()
    assert _daemons(host2) == third
    _stop(shared, "host2")
    deadline = time.monotonic() + 10
    while any(_comm(p).startswith("qjamfab") for h in shared for p in h.processes()):
        assert time.monotonic() < deadline, [
            (p, _comm(p)) for h in shared for p in h.processes()
        ]
        time.sleep(0.05)
