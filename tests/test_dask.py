"""Master.run on a Dask cluster: a real LocalCluster (worker processes, one
thread each, with nannies; tests/dask_clusters.py), and what is Dask's own:
what a Master shows, big params, a job's exit leaving the Dask workers up,
loss of a Dask worker, new Clients and Masters on the same cluster,
workers that join, and what is refused. What every engine does alike (the
original qjam cases, errors, caching) is in test_behaviour.py."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from qjamfab import (
    DataSet,
    HostUnreachable,
    Master,
    PreflightFailed,
    QjamfabError,
    WorkerLost,
    protocol,
)
from qjamfab.engines.dask import engine as dask_engine
from tests.dask_clusters import (
    cluster_of_two,
    distributed,
    need_dask,
    pids,
    start_cluster,
    stop_cluster,
)
from tests.jobs import (
    constant,
    exiting,
    printing,
)

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """This module's own cluster, not the session's: its tests kill, stop
    and add Dask workers."""
    with cluster_of_two(tmp_path_factory) as both:
        yield both


@pytest.fixture
def client(dask_cluster):
    _, client = dask_cluster
    client.wait_for_workers(2, timeout=60)
    return client


@pytest.fixture
def master(client):
    with Master(client) as m:
        yield m


def _still_usable(m: Master) -> None:
    assert m.run(constant) == 42 * m.last_run.workers > 0


def _uses(m: Master, count: int) -> None:
    """Wait until a run uses `count` Dask workers and loses none: the
    watcher has seen the scheduler's workers as they are now (a worker
    restarted under its number, or gone, shows in no property)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        used = m.run(constant) // 42
        if used == m.last_run.workers == count and not m.last_run.lost_workers:
            return
        time.sleep(0.05)
    raise AssertionError(f"no run used {count} Dask workers")


def _clients(client) -> set[str]:
    """The ids of the Clients connected to the scheduler."""
    return set(
        client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients))
    )


# --- what runs ---------------------------------------------------------------


def test_a_master_shows_the_scheduler_it_uses(master, client):
    address = client.scheduler.address
    assert repr(master).startswith(f"Master({address}: 2 workers")
    html = master._repr_html_()
    assert "dask-0, dask-1" in html and address in html


def test_big_params_go_as_task_arguments(master):
    import numpy as np

    params = np.ones(1 << 17)  # 1 MiB: shared memory elsewhere
    assert master.run(lambda p, _: float(p.sum()), params) == 2.0 * params.size


def _needs_a_module_nobody_has(params, _):
    import qjamfab_test_no_such_module  # noqa: F401

    return 0


def test_a_module_the_dask_workers_lack_says_to_install_it_there(master):
    with pytest.raises(
        PreflightFailed,
        match=r"lacks the Python module 'qjamfab_test_no_such_module', which the "
        r"job needs \(worker dask-\d\): install it in the Dask workers' "
        r"environment \(for example with distributed's PipInstall",
    ) as caught:
        master.run(_needs_a_module_nobody_has)
    assert "QJAMFAB_REMOTE_PYTHON" not in str(caught.value)
    _still_usable(master)


def test_sys_exit_is_a_lost_worker_and_the_master_stays_usable(master, client):
    before = pids(client)
    with pytest.raises(WorkerLost) as info:
        master.run(exiting)
    err = info.value
    first = str(err).splitlines()[0]
    assert err.worker in ("dask-0", "dask-1") and err.exit_status == 3
    assert "exit status 3" in first and "restarted for the next run" in first
    assert "about to exit" in err.stderr_tail
    _still_usable(master)
    assert master.last_run.workers == 2
    assert pids(client) == before  # the Dask workers themselves stay up


def test_futures_run_on_the_dask_workers(master):
    assert master.submit(pow, 2, 5).result() == 32
    assert list(master.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]


# --- where the data is ---------------------------------------------------------


def test_new_master_and_client_find_the_slices(client):
    data = np.arange(50000, dtype=np.int64).reshape(500, 100)
    with Master(client) as m:
        m.run(lambda p, x: int(x.sum()), dataset=DataSet(data))
        assert m.last_run.slices_sent > 0
    address = client.scheduler.address
    before = _clients(client)
    with Master(address) as m:  # a Client of its own
        own = _clients(client) - before
        assert len(own) == 1
        assert m.run(lambda p, x: int(x.sum()), dataset=DataSet(data)) == int(
            data.sum()
        )
        assert m.last_run.slices_sent == 0
        assert m.last_run.dataset_bytes_sent == 0
    deadline = time.monotonic() + 10  # the scheduler hears of it soon after
    while own & _clients(client):
        assert time.monotonic() < deadline, "the Master's own Client stayed"
        time.sleep(0.05)
    assert client.status == "running"


def test_a_broadcast_crosses_once_and_a_new_master_finds_it(client):
    from qjamfab import Broadcast

    table = np.arange(100_000, dtype=np.float64)
    shared = Broadcast(table)
    expected = 2 * float(table.sum())
    with Master(client) as m:
        assert m.run(lambda p, _: float(p["t"].sum()), {"t": shared}) == expected
        # At most one per Dask worker (one may find the other's on the
        # disk they share).
        assert m.last_run.broadcasts_sent in (1, 2)
        assert m.last_run.broadcast_bytes_sent >= table.nbytes
        assert m.run(lambda p, _: float(p["t"].sum()), {"t": shared}) == expected
        assert m.last_run.broadcast_bytes_sent == 0
    with Master(client) as m:
        assert m.run(lambda p, _: float(p["t"].sum()), {"t": shared}) == expected
        assert m.last_run.broadcast_bytes_sent == 0


def test_replicas_go_to_the_other_worker(client):
    data = DataSet(
        np.arange(8000, dtype=np.float64).reshape(80, 100) + 0.5, slice_size=10
    )
    with Master(client, replicas=2) as m:
        m.clear_cache()  # every slice is sent, then sent once more
        assert m.run(lambda p, x: float(x.sum()), dataset=data) == float(
            (np.arange(8000) + 0.5).sum()
        )
        stats = m.last_run
        assert stats.replica_bytes_sent == stats.dataset_bytes_sent > 0


# --- losing and gaining Dask workers ------------------------------------------------


def _slow_sum(params, xs):
    time.sleep(0.15)
    return sum(xs)


def test_a_dask_worker_killed_mid_run(master, client):
    data = DataSet(list(range(160)), slice_size=10)
    assert master.run(_slow_sum, dataset=data) == sum(range(160))
    pid = pids(client)["0"]
    killer = threading.Timer(0.4, os.kill, (pid, signal.SIGKILL))
    killer.start()
    try:
        assert master.run(_slow_sum, dataset=data) == sum(range(160))
    finally:
        killer.join()
    stats = master.last_run
    assert stats.lost_workers == ["dask-0"] and stats.rerun_slices >= 1
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it
    _uses(master, 2)
    assert pids(client)["0"] != pid
    assert master.run(_slow_sum, dataset=data) == sum(range(160))
    assert master.last_run.workers == 2 and not master.last_run.lost_workers
    assert master.last_run.dataset_bytes_sent == 0  # on this machine's disk


def test_a_frozen_dask_worker_is_lost_to_its_heartbeat(client):
    pid = pids(client)["1"]
    # No backup copies: the frozen worker's group waits for its heartbeat.
    with Master(client, heartbeat_timeout=2.0, straggler_factor=100) as m:
        data = DataSet(list(range(40)), slice_size=2)
        killer = threading.Timer(0.3, os.kill, (pid, signal.SIGSTOP))
        killer.start()
        try:
            assert m.run(_slow_sum, dataset=data) == sum(range(40))
        finally:
            killer.join()
            os.kill(pid, signal.SIGCONT)
        assert m.last_run.lost_workers == ["dask-1"]
        time.sleep(0.5)
        _still_usable(m)
        assert m.last_run.workers == 2


def test_workers_that_join_are_used_from_the_next_run(dask_cluster, master):
    cluster, client = dask_cluster
    assert master.run(constant) == 84
    cluster.scale(3)
    try:
        client.wait_for_workers(3, timeout=60)
        # Used from the first run after the watcher sees it running.
        _uses(master, 3)
        assert master.run(constant) == 126
        assert master.workers == ["dask-0", "dask-1", "dask-2"]
        assert master.last_run.workers == 3
    finally:
        cluster.scale(2)
        _uses(master, 2)
    assert master.run(constant) == 84  # dask-2 is gone, the rest go on
    assert master.workers == ["dask-0", "dask-1", "dask-2"]
    assert repr(master).endswith("3 workers, 2 workers up)")


def test_several_threads_per_dask_worker(tmp_path_factory, capfd):
    cluster, before = start_cluster(tmp_path_factory, n_workers=1, threads_per_worker=2)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        with Master(client) as m:
            assert m.workers == ["dask-0", "dask-1"]
            assert m.run(lambda p, xs: sum(xs), dataset=list(range(50))) == 1225
            assert m.run(printing) == 84
        out = capfd.readouterr().out
        for worker in ("dask-0", "dask-1"):  # Python's own streams
            assert f"[{worker}] hello from python print" in out
            assert f"[{worker}] hello from python stderr" in out
    finally:
        stop_cluster(cluster, client, before)


# --- what is refused, and why ---------------------------------------------------------


def test_a_cluster_without_workers(tmp_path_factory):
    cluster, before = start_cluster(tmp_path_factory, n_workers=0)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        with pytest.raises(
            WorkerLost,
            match=r"^the Dask cluster at tcp://\S+ "
            r"has no running workers: start some ",
        ):
            Master(client)
    finally:
        stop_cluster(cluster, client, before)


def test_a_cache_directory_others_can_write_is_refused(tmp_path_factory):
    cluster, before = start_cluster(tmp_path_factory, n_workers=1, threads_per_worker=1)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        [local] = client.run(lambda dask_worker: dask_worker.local_directory).values()
        cache = os.path.join(os.path.dirname(local), "qjamfab-cache")
        os.mkdir(cache)
        os.chmod(cache, 0o770)
        with pytest.raises(
            PreflightFailed,
            match=r"^Dask worker tcp://\S+: "
            r"its slice cache \S+/qjamfab-cache cannot be used "
            r"\(\S+ \(owner .*\) has mode 0770: its group can "
            r"plant code or data in it\): give the Dask "
            "workers a local directory of your own",
        ):
            Master(client)
    finally:
        stop_cluster(cluster, client, before)


def test_a_bad_cache_limit_on_the_workers_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    need_dask()

    from qjamfab.engines.dask import worker as dask_worker

    monkeypatch.setenv("QJAMFAB_CACHE_LIMIT", "lots")  # the worker's env
    worker = SimpleNamespace(
        name="w",
        address="tcp://w:1",
        state=SimpleNamespace(nthreads=1),
        local_directory=str(tmp_path / "dask-scratch-space" / "worker-1"),
    )
    plugin = dask_worker.QjamfabPlugin()
    plugin.setup(worker)
    worker.plugins = {dask_worker.PLUGIN_NAME: plugin}
    problem = dask_engine.check_hello(worker.address, dask_worker.hello(worker))
    assert str(problem).startswith(
        "Dask worker tcp://w:1: QJAMFAB_CACHE_LIMIT='lots' is not a size: "
        "write bytes, or a number with K, M, G or T"
    )
    assert str(problem).endswith("(in the Dask workers' environment)")


def test_ssh_options_do_not_apply(client):
    with pytest.raises(
        ValueError,
        match=r"^workers_per_host does not apply "
        r"to a Dask cluster \(Dask decides",
    ):
        Master(client, workers_per_host=2)
    with pytest.raises(ValueError, match="^ssh_config does not apply"):
        Master(client.scheduler.address, ssh_config="/dev/null")
    with pytest.raises(
        ValueError,
        match=r"^packages does not apply to a Dask cluster \(install them in the "
        r"Dask workers' environment",
    ):
        Master(client, packages=["numpy"])


def test_a_closed_client_is_refused(client):
    other = distributed.Client(client.scheduler.address, set_as_default=False)
    other.close()
    with pytest.raises(
        ValueError, match="^this Client is closed, not running: pass a connected Client"
    ):
        Master(other)


def test_an_asynchronous_client_is_refused(client):
    async def refused():  # an asynchronous Client needs a running loop
        other = await distributed.Client(
            client.scheduler.address, asynchronous=True, set_as_default=False
        )
        try:
            with pytest.raises(
                ValueError,
                match="^Master needs a synchronous "
                r"Client: create it with Client\(\.\.\., "
                r"asynchronous=False\)",
            ):
                Master(other)
        finally:
            await other.close()

    asyncio.run(refused())


def test_workers_that_cannot_load_qjamfab_are_refused(client, monkeypatch):
    import importlib

    from qjamfab.engines.dask import worker as dask_worker

    # What a Dask worker without qjamfab meets when the plugin arrives.
    monkeypatch.setattr(dask_worker.QjamfabPlugin, "name", "qjamfab-broken")
    monkeypatch.setattr(
        dask_worker.QjamfabPlugin,
        "__reduce__",
        lambda self: (importlib.import_module, ("qjamfab_is_not_here",)),
        raising=False,
    )
    with pytest.raises(
        PreflightFailed,
        match=r"^the Dask workers cannot take "
        r"qjamfab's worker plugin \(ModuleNotFoundError\(\"No "
        r"module named 'qjamfab_is_not_here'\"\)\): install this "
        r"qjamfab \(\S+\) in the Dask workers' environment",
    ):
        Master(client)
    plugins = client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.worker_plugins)
    )
    assert "qjamfab-broken" not in plugins and "qjamfab" in plugins


def test_unreachable_scheduler(monkeypatch):
    need_dask()
    monkeypatch.setattr(dask_engine, "CONNECT_TIMEOUT_S", 0.5)
    with pytest.raises(
        HostUnreachable,
        match=r"^cannot reach the Dask "
        r"scheduler at tcp://127\.0\.0\.1:9 in 0\.5 s: check "
        "the address",
    ):
        Master("tcp://127.0.0.1:9")


def test_workers_of_another_protocol_are_refused(client, monkeypatch):
    monkeypatch.setattr(protocol, "VERSION", protocol.VERSION + 1)
    with pytest.raises(
        PreflightFailed,
        match=r"^Dask worker tcp://\S+ speaks "
        r"qjamfab protocol \d+, this Master \d+: install this "
        r"qjamfab \(\S+\) in the Dask workers' environment",
    ):
        Master(client)


def test_workers_of_another_python_are_refused():
    hello = {"version": protocol.VERSION, "python": [3, 1, 4], "error": None}
    problem = dask_engine.check_hello("tcp://w:1", hello)
    assert isinstance(problem, PreflightFailed)
    assert str(problem).startswith(
        "Dask worker tcp://w:1 runs Python 3.1.4, the master "
        f"{sys.version_info[0]}.{sys.version_info[1]}: cloudpickle needs the "
        "same minor version"
    )
    broken = dict(
        hello,
        python=list(sys.version_info[:3]),
        error="its slice cache cannot be opened: /x is writable",
    )
    assert (
        str(dask_engine.check_hello("tcp://w:1", broken))
        == "Dask worker tcp://w:1: its slice cache cannot be opened: /x is writable"
    )


def test_without_distributed_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(QjamfabError) as info:
        Master("tcp://127.0.0.1:8786")
    assert str(info.value).splitlines()[0] == (
        "Master('tcp://127.0.0.1:8786') needs Dask's distributed package: "
        "pip install 'qjamfab[dask]'"
    )


def test_a_script_that_never_closes_its_master_exits_at_once(tmp_path):
    need_dask()
    script = tmp_path / "unclosed.py"
    script.write_text(
        textwrap.dedent("""
        import distributed
        from qjamfab import Master
        if __name__ == "__main__":
            cluster = distributed.LocalCluster(
                n_workers=1, threads_per_worker=1, dashboard_address=":0")
            m = Master(cluster.scheduler_address)   # a Client of its own
            print("result", m.run(lambda p, x: 42))
    """)
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        # Dask's own reconnect attempts last 30 s: a script that waits for
        # them would not end within this.
        timeout=25,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert "result 42" in out.stdout, out.stderr
    assert "Failed to reconnect" not in out.stderr


def test_importing_qjamfab_does_not_import_dask():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, qjamfab; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'distributed')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert out.stdout.strip() == "[]", out.stderr
