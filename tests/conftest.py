"""Shared fixtures: every test gets its own QJAMFAB_HOME and
XDG_RUNTIME_DIR (where a host keeps its daemons' sockets and logs), and no
test may leave a process behind that names its QJAMFAB_HOME."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests import dask_clusters
from tests.engines import ENGINES, Engine
from tests.gates import Gate
from tests.slurm_cluster import SlurmCluster, slurm_available
from tests.sshd_hosts import SshdHosts, sshd_available


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture(autouse=True)
def qjamfab_home(tmp_path, monkeypatch):
    home = tmp_path / "qjamfab-home"
    monkeypatch.setenv("QJAMFAB_HOME", str(home))
    # Short: Unix socket paths live under it (108 bytes at most).
    runtime_dir = tempfile.mkdtemp(prefix="qjr-")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    for name in (
        "QJAMFAB_HOSTS",
        "QJAMFAB_SSH_CONFIG",
        "QJAMFAB_USER",
        "QJAMFAB_REMOTE_PYTHON",
        "QJAM_USER",
        "QJAM_REMOTE_PYTHON",
    ):
        monkeypatch.delenv(name, raising=False)
    yield home
    deadline = time.monotonic() + 5
    while processes_mentioning(str(home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = processes_mentioning(str(home))
    shutil.rmtree(runtime_dir, ignore_errors=True)
    assert not leftover, f"the test left processes behind: {leftover}"


@pytest.fixture(scope="module")
def ssh():
    """Three private OpenSSH servers on 127.0.0.2-4 (aliases host1..host3),
    for one test module; their workers are stopped at the end."""
    if not sshd_available():
        if os.environ.get("QJAMFAB_REQUIRE_SSHD") == "1":
            pytest.fail(
                "sshd is required (QJAMFAB_REQUIRE_SSHD=1) but not "
                "installed: apt-get install -y openssh-server"
            )
        pytest.skip(
            "OpenSSH sshd is not installed: apt-get install -y "
            "openssh-server to run the SSH tests"
        )
    from qjamfab import hostspec
    from qjamfab.engines import cluster

    with SshdHosts(3) as servers:
        yield servers
        for host in servers:
            if not host.running:
                host.start()
        cluster.stop_workers(
            hostspec.parse_hosts(servers.aliases), ssh_config=servers.ssh_config
        )


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A real Dask LocalCluster of two worker processes, one thread each,
    and a Client of it, for the session (its start and stop take seconds):
    (cluster, client). test_dask.py, whose tests kill, stop and add Dask
    workers, has one of its own. Skips when Dask's distributed is not
    installed."""
    with dask_clusters.cluster_of_two(tmp_path_factory) as both:
        yield both


@pytest.fixture(params=ENGINES)
def engine(request) -> Engine:
    """Each engine in turn (tests/engines.py): inproc, local, ssh (the
    `ssh` fixture's host1) and dask (the session's `dask_cluster`)."""
    return Engine(request.param, request.getfixturevalue)


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> str:
    """A Python with the standard library only (a venv without pip, made
    once per session), for SSH hosts that lack what this one has: pass it
    as a host setting, "host1 python=<it>". The SSH test hosts otherwise run
    this machine's python3, which has the test extra (joblib, scikit-learn,
    numpy)."""
    venv = tmp_path_factory.mktemp("bare-python")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    python = str(venv / "bin" / "python")
    for module in ("joblib", "sklearn", "numpy"):
        found = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, timeout=60
        )
        assert found.returncode != 0, f"the bare venv {venv} can import {module}"
    return python


@pytest.fixture(scope="session")
def slurm():
    """A real one-node Slurm (tests/slurm_cluster.py) for the session. Its
    commands need SLURM_CONF=slurm.conf in their environment."""
    if not slurm_available():
        if os.environ.get("QJAMFAB_REQUIRE_SLURM") == "1":
            pytest.fail(
                "Slurm is required (QJAMFAB_REQUIRE_SLURM=1) but not "
                "installed: apt-get install -y slurm-wlm munge"
            )
        pytest.skip(
            "Slurm is not installed: apt-get install -y slurm-wlm munge to "
            "run the Slurm tests"
        )
    with SlurmCluster() as cluster:
        yield cluster


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """The environment as it was, back after the test: a benchmark's main
    called in this process sets its BLAS variables (one_blas_thread)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def gate(tmp_path) -> Iterator[Gate]:
    """A Gate (tests/gates.py) in this test's tmp_path, opened at the end
    at the latest. Ask for it after the Master's fixture, so that it opens
    before that Master closes and no call stays held."""
    opened = Gate(str(tmp_path / "gate"))
    yield opened
    opened.open()


@pytest.fixture
def tasks(monkeypatch):
    """The number of calls in each task the futures send, in order (and
    the bytes of each task's payload, in tasks.payloads)."""
    from qjamfab.futures.stream import TaskStream

    class Sizes(list):
        payloads: list

    sizes = Sizes()
    sizes.payloads = []
    real_send = TaskStream.send

    def counting_send(self, handle, items, payload):
        sizes.append(len(items))
        sizes.payloads.append(len(payload))
        return real_send(self, handle, items, payload)

    monkeypatch.setattr(TaskStream, "send", counting_send)
    return sizes
