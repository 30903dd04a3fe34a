"""Fault injection on real SSH hosts: a worker SIGKILLed, its connection
cut, its host's sshd killed or its host frozen, mid-run; stragglers; replicas;
every worker lost. Each run must return the exact result, every slice
counted once."""

import os
import signal
import threading
import time

import pytest

from qjamfab import DataSet, Master, WorkerLost, hostspec
from qjamfab.engines import cluster
from tests.netns_host import NetnsHost, netns_available

pytestmark = pytest.mark.timeout(120)

DATA = DataSet(list(range(60)), slice_size=5)  # 12 slices, 4 per worker
EXPECTED = sum(range(60))


def slow_sum(delay, xs):
    time.sleep(delay)
    return sum(xs)


def _master(ssh, **options):
    options.setdefault("heartbeat_timeout", 3.0)
    return Master(ssh.aliases, workers_per_host=1, ssh_config=ssh.ssh_config, **options)


@pytest.fixture(params=["openssh", "paramiko"])
def client(request):
    """What carries the frames (Master's ssh_client): faults behave alike."""
    return request.param


def _run_with_fault(master, fault, after_s=0.6, delay=0.4):
    timer = threading.Timer(after_s, fault)
    timer.start()
    try:
        return master.run(slow_sum, params=delay, dataset=DATA)
    finally:
        timer.cancel()
        timer.join()


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _run_until_all_workers(master, timeout_s=20.0):
    """Run until the Master has reconnected every host (backoff allowing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert master.run(slow_sum, params=0, dataset=DATA) == EXPECTED
        done = master.last_run.workers == 3 and not master.last_run.lost_workers
        if done or time.monotonic() > deadline:
            return master.last_run.workers
        time.sleep(0.5)


def test_sigkilled_worker_mid_run(ssh, client):
    with _master(ssh, ssh_client=client) as m:
        pid = m.worker_stats()["host2-0"]["pid"]
        assert _run_with_fault(m, lambda: os.kill(pid, signal.SIGKILL)) == EXPECTED
        stats = m.last_run
        assert stats.lost_workers == ["host2-0"] and stats.rerun_slices >= 1
        # The daemon is restarted before the next run.
        assert m.run(slow_sum, params=0, dataset=DATA) == EXPECTED
        assert m.last_run.workers == 3
        assert m.worker_stats()["host2-0"]["pid"] != pid


def _cut_connections(host):
    """SIGKILL the agents of a host: their SSH channels close."""
    for p in host.processes():
        if "runtime.agent" in _cmdline(p):
            os.kill(p, signal.SIGKILL)


def _until_lost(master, name, timeout_s=10.0):
    """Wait until the Master has seen that worker `name` is gone: its
    stats call fails on it, or leaves it out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if name not in master.worker_stats():
                return
        except WorkerLost as exc:
            assert exc.worker == name
            return
        time.sleep(0.1)
    raise AssertionError(f"the Master did not notice that {name} was cut")


def test_connection_cut_mid_run(ssh, client):
    with _master(ssh, ssh_client=client) as m:
        assert _run_with_fault(m, lambda: _cut_connections(ssh["host2"])) == EXPECTED
        assert m.last_run.lost_workers == ["host2-0"]
        # The daemon ends if it saw the hangup mid-task (nobody wants that
        # result), else it stays; either way the host is used again.
        assert _run_until_all_workers(m) == 3


def test_connection_cut_between_runs_keeps_the_worker(ssh, client):
    with _master(ssh, ssh_client=client) as m:
        assert m.run(slow_sum, params=0, dataset=DATA) == EXPECTED
        pid = m.worker_stats()["host2-0"]["pid"]
        _cut_connections(ssh["host2"])
        _until_lost(m, "host2-0")
        # An idle daemon outlives its connection: the Master reconnects to
        # the same process, which still holds its slices in memory.
        assert _run_until_all_workers(m) == 3
        assert m.worker_stats()["host2-0"]["pid"] == pid


def test_host_sshd_killed_mid_run_then_back(ssh):
    with _master(ssh) as m:
        try:
            assert _run_with_fault(m, ssh["host2"].kill) == EXPECTED
            assert m.last_run.lost_workers == ["host2-0"]
            # Down: the next run goes on without it.
            assert m.run(slow_sum, params=0, dataset=DATA) == EXPECTED
            assert m.last_run.workers == 2
        finally:
            ssh["host2"].start()
        # Back: it is used again after the backoff.
        assert _run_until_all_workers(m) == 3


def test_frozen_host_mid_run(ssh, client):
    with _master(ssh, ssh_client=client) as m:
        # Paused until the run ends: only the heartbeat deadline ends it.
        try:
            assert _run_with_fault(m, ssh["host2"].pause) == EXPECTED
        finally:
            ssh["host2"].resume()
        assert m.last_run.lost_workers == ["host2-0"]
        assert _run_until_all_workers(m) == 3


def _ignore_params(params, xs):
    return sum(xs)


@pytest.mark.timeout(60)
def test_a_big_send_over_a_cut_link_gives_up_at_the_deadline(ssh, client):
    """The link to a host cut before a run whose params (48 MiB, more than
    the link's buffers hold) go to every worker: the send to it stalls,
    gives up after the heartbeat timeout, the host is lost and the run ends
    on the others (issue 21 item 6: over paramiko the send blocked until
    the link came back). The test's timeout is the bound."""
    import numpy as np

    why_not = netns_available()
    if why_not:
        pytest.skip(f"{why_not}: the cut-link test runs as root")
    big = np.ones(6 << 20)
    ns = NetnsHost(ssh)
    try:
        with Master(
            ["host1", ns.alias],
            workers_per_host=1,
            ssh_config=ns.ssh_config,
            heartbeat_timeout=3.0,
            ssh_client=client,
        ) as m:
            assert m.run(slow_sum, params=0, dataset=DATA) == EXPECTED
            ns.cut()
            assert m.run(_ignore_params, params=big, dataset=DATA) == EXPECTED
            assert m.last_run.lost_workers == [f"{ns.alias}-0"]
            ns.restore()
    finally:
        ns.restore()
        ns.stop()


def test_host_behind_a_cut_network_link(ssh):
    """A real link (veth into a network namespace) cut mid-run: the host goes
    silent, nothing is reset; the heartbeat deadline notices."""
    why_not = netns_available()
    if why_not:
        pytest.skip(f"{why_not}: the cut-link test runs as root")
    ns = NetnsHost(ssh)
    try:
        with Master(
            ["host1", "host3", ns.alias],
            workers_per_host=1,
            ssh_config=ns.ssh_config,
            heartbeat_timeout=3.0,
        ) as m:
            # Cut until the run ends: only the heartbeat deadline ends it.
            assert _run_with_fault(m, ns.cut) == EXPECTED
            assert m.last_run.lost_workers == [f"{ns.alias}-0"]
            ns.restore()
            assert _run_until_all_workers(m) == 3
    finally:
        ns.restore()
        ns.stop()


def test_straggler_gets_a_backup_copy(ssh, tmp_path):
    release = str(tmp_path / "release")

    def slow_on_host2(params, xs):
        # host2's copies wait until the run has ended: only backups end it.
        if os.environ.get("QJAMFAB_HOME", "").endswith("host2/qjamfab-home"):
            deadline = time.monotonic() + 30
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.1)
        return sum(xs)

    try:
        with _master(ssh) as m:
            try:
                assert m.run(slow_on_host2, dataset=DATA) == EXPECTED
            finally:
                open(release, "w").close()
            assert m.last_run.backup_tasks >= 1
            assert not m.last_run.lost_workers
    finally:
        # host2's worker is still asleep in the discarded copy.
        cluster.stop_workers(hostspec.parse_hosts("host2"), ssh_config=ssh.ssh_config)


def test_replicas_make_failover_need_no_data(ssh):
    with _master(ssh, replicas=2) as m:
        m.clear_cache()
        assert m.run(slow_sum, params=0, dataset=DATA) == EXPECTED
        m.worker_stats()  # a round trip: each worker has stored what it got
        entries = sum(
            len(os.listdir(os.path.join(ssh.homes[a], "cache"))) for a in ssh.aliases
        )
        assert entries == 2 * len(DATA.for_workers(3))
        pid = m.worker_stats()["host1-0"]["pid"]
        assert _run_with_fault(m, lambda: os.kill(pid, signal.SIGKILL)) == EXPECTED
        assert m.last_run.lost_workers == ["host1-0"]
        assert m.last_run.dataset_bytes_sent == 0
        assert m.last_run.replica_bytes_sent > 0  # second copies restored


def test_every_worker_lost_is_a_clear_error(ssh):
    with _master(ssh) as m:
        pids = [s["pid"] for s in m.worker_stats().values()]

        def kill_all():
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

        with pytest.raises(WorkerLost, match=r"and no worker is left"):
            _run_with_fault(m, kill_all)
        assert m.run(slow_sum, params=0, dataset=DATA) == EXPECTED
