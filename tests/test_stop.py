"""Stopping workers returns once they are gone: every daemon and its keeper
has exited when `cluster.stop_workers` (and `inv stop-workers`) answers,
locally and over SSH; one that does not end on SIGTERM within the bound is
killed, and the answer says so."""

import os
import signal
import time

import pytest

from qjamfab import hostspec, runtime
from qjamfab.engines import cluster
from qjamfab.runtime import manage, procs

pytestmark = pytest.mark.timeout(120)


def _daemons_and_keepers(status: dict) -> dict[int, str]:
    """pid -> what it is, for every daemon `status` (an `inv status` info)
    lists and the keeper that waits for it (its parent)."""
    found = {}
    for w in status["workers"]:
        found[w["pid"]] = w["name"]
        stat = runtime.process_stat(w["pid"])
        assert stat is not None, w
        found[stat[1]] = f"{w['name']}'s keeper"
    return found


def _still_there(pids: dict[int, str]) -> list[str]:
    """Which of them exist now, read from /proc at once (a zombie has
    ended: only its parent's wait is left)."""
    left = []
    for pid, what in pids.items():
        stat = runtime.process_stat(pid)
        if stat is not None and stat[0] not in "ZX":
            left.append(f"{what} (pid {pid}, state {stat[0]})")
    return left


def _start_and_stop(specs, **kw) -> tuple[dict, list[str]]:
    [started] = cluster.start_workers(specs, 4, **kw)
    assert started.ok, started.error
    [status] = cluster.status(specs, **kw)
    assert status.ok and len(status.info["workers"]) == 4, status
    pids = _daemons_and_keepers(status.info)
    assert len(pids) == 8, pids
    [stopped] = cluster.stop_workers(specs, **kw)
    left = _still_there(pids)  # at once: no waiting
    assert stopped.ok, stopped.error
    return stopped.info, left


def test_local_stop_workers_returns_when_daemons_and_keepers_are_gone():
    info, left = _start_and_stop(hostspec.parse_hosts(["local"]))
    assert left == []
    assert info == {"stopped": 4, "killed": [], "template": True}


def test_stop_workers_over_ssh_returns_when_they_are_gone(ssh):
    info, left = _start_and_stop(
        hostspec.parse_hosts(["host1"]), ssh_config=ssh.ssh_config
    )
    assert left == []
    assert info == {"stopped": 4, "killed": [], "template": True}


def test_a_daemon_that_does_not_end_is_killed_after_the_bound_and_named(
    qjamfab_home,
):
    """A daemon stopped with SIGSTOP cannot act on SIGTERM: after the
    bound it is killed, its keeper ends, and the answer names it."""
    specs = hostspec.parse_hosts(["local"])
    [started] = cluster.start_workers(specs, 3)
    assert started.ok, started.error
    base = str(qjamfab_home)
    workers = manage.live_workers(base)
    pids = _daemons_and_keepers({"workers": workers})
    stuck = next(w for w in workers if w["name"] == "worker-1")
    os.kill(stuck["pid"], signal.SIGSTOP)
    healthy = [p for p, what in pids.items() if not what.startswith("worker-1")]

    def clock() -> float:
        # The bound passes once the others have ended: they were never
        # killed, whatever the load.
        return time.monotonic() + (
            0 if _still_there({p: pids[p] for p in healthy}) else procs.STOP_WAIT_S
        )

    try:
        done = procs.stop_daemons(base, workers, clock=clock)
        assert _still_there(pids) == []
    finally:
        if not runtime.process_ended(stuck["pid"]):
            os.kill(stuck["pid"], signal.SIGKILL)
        cluster.stop_workers(specs)  # the template they were forked from
    assert done.names == ["worker-0", "worker-1", "worker-2"]
    assert done.killed == ["worker-1"]


class _Session:
    name = "host1"

    def manage_bootstrapped(self, command: str) -> dict:
        assert command == "stop"
        return {"stopped": 3, "killed": ["worker-1"]}


def test_killed_daemons_are_said_in_the_log_and_the_table(caplog):
    from qjamfab.cli.tasks import stopped_cell

    with caplog.at_level("WARNING", logger="qjamfab.engines.cluster"):
        info = cluster.stop_host(_Session())  # type: ignore[arg-type]
    assert caplog.messages == [
        f"host1: worker-1 did not end within {procs.STOP_WAIT_S:g} s of "
        "SIGTERM: killed (SIGKILL)"
    ]
    assert stopped_cell(info) == "3 (1 killed)"
    assert stopped_cell({"stopped": 3, "killed": []}) == "3"


def test_stop_workers_ends_the_daemons_an_earlier_qjamfab_ran_from_the_base(
    qjamfab_home,
):
    """Those kept their sockets and pid files in <base>/run/: after an
    upgrade, stop-workers still finds and ends them."""
    import subprocess
    import sys

    base = str(qjamfab_home)
    runtime.ensure_local_bundle(base)
    legacy = qjamfab_home / "run"
    legacy.mkdir(mode=0o700)
    old = subprocess.Popen(
        [
            sys.executable,
            "-c",
            runtime.boot_code("worker"),
            "--socket",
            str(legacy / "worker-0.sock"),
            "--name",
            "worker-0",
            "--base",
            base,
        ],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not (legacy / "worker-0.pid").exists():
            assert old.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        [stopped] = cluster.stop_workers(hostspec.parse_hosts(["local"]))
        assert stopped.ok and stopped.info == {
            "stopped": 1,
            "killed": [],
            "template": False,
        }, stopped
        assert old.wait(timeout=10) == 0  # its keeper, once the daemon ended
        assert os.listdir(legacy) == ["worker-0.exit"]
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
