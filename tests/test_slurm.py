"""Slurm: the host agents as srun steps, inside an allocation and in one the
Master asks for, on a real one-node Slurm (the `slurm` fixture)."""

import json
import logging
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qjamfab import BadHostSpec, DataSet, HostUnreachable, Master, PreflightFailed
from qjamfab.engines import cluster as tasks
from qjamfab.engines import slurm as slurm_engine
from qjamfab.engines.slurm import cpus_per_node
from qjamfab.hostspec import parse_hosts
from tests.conftest import processes_mentioning
from tests.jobs import constant, inner_product, multiply_sum, sum_params
from tests.sshd_hosts import sshd_available

pytestmark = pytest.mark.timeout(120)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = min(2, os.cpu_count() or 1)


@pytest.fixture
def cluster(slurm, qjamfab_home, monkeypatch):
    """The Slurm cluster, its SLURM_CONF in our environment; afterwards no
    job is left in its queue and no process of ours on its node."""
    monkeypatch.setenv("SLURM_CONF", slurm.conf)
    for name in [k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        monkeypatch.delenv(name)
    yield slurm
    _wait_until(lambda: not slurm.jobs(), 20, f"jobs left: {slurm.jobs()}")
    # A node's daemons end a few seconds after their agent (slurm.py).
    _wait_until(
        lambda: not processes_mentioning(str(qjamfab_home)),
        20,
        f"processes left: {processes_mentioning(str(qjamfab_home))}",
    )


@pytest.fixture
def short_idle(monkeypatch):
    """The node's daemons end 1 s after their agent instead of 5
    (slurm.IDLE_TIMEOUT_S), for a test whose Master runs in this process and
    that is not about daemons a next session claims: `cluster` waits at the
    end for them to be gone, and need not wait out the 5 s."""
    monkeypatch.setattr(slurm_engine.SlurmHost, "idle_timeout_s", 1.0)


def _wait_until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _original_cases(m: Master) -> list:
    return [
        m.run(constant),
        m.run(sum_params, params=[1, 2, 3, 6, 7, 9]),
        m.run(multiply_sum, params=3, dataset=DataSet(list(range(100)))),
        m.run(
            inner_product,
            params=[2, 4],
            dataset=DataSet([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]),
        ),
    ]


def _expected(workers: int) -> list:
    return [42 * workers, 28 * workers, 14850, 170]


_SCRIPT = """
import json, sys
from qjamfab import Master
from tests.test_slurm import _original_cases
with Master("slurm") as m:
    print(json.dumps({"workers": m.workers, "results": _original_cases(m)}))
"""


@pytest.mark.parametrize("how", ["salloc", "sbatch"])
def test_inside_an_allocation_the_master_runs_on_its_nodes(cluster, tmp_path, how):
    """Master("slurm") in an allocation, under salloc or in a batch script:
    a worker per allocated CPU of the node, the original qjam cases right."""
    script = tmp_path / "inside.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "out.txt"
    ask = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={CPUS}"]
    command = [sys.executable, str(script)]
    if how == "salloc":
        argv = ["salloc", *ask, "--", *command]
    else:
        argv = ["sbatch", "--wait", f"--output={out}", *ask]
        argv += ["--wrap", shlex.join(command)]
    done = subprocess.run(
        argv,
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    said = done.stdout if how == "salloc" else out.read_text()
    assert done.returncode == 0, done.stderr + said
    said = json.loads(said.strip().splitlines()[-1])
    assert said["workers"] == [f"{cluster.node}-{k}" for k in range(CPUS)]
    assert said["results"] == _expected(CPUS)


def _read_exactly(transport, n: int) -> bytes:
    got = bytearray()
    buffer = memoryview(bytearray(1 << 16))
    while len(got) < n:
        k = transport.readinto(buffer)
        assert k, f"the stream ended after {len(got)} of {n} bytes"
        got += buffer[:k]
    return bytes(got)


def _write_all(transport, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = transport.writev([view])
        if not sent:
            transport.wait_writable()
        view = view[sent:]


def test_an_srun_step_is_a_byte_stream(cluster):
    """Bytes through a step's stdin and stdout come back as sent, a short
    write without a newline at once (srun holds output for a newline
    unless --unbuffered)."""
    allocation = slurm_engine.request({"nodes": "1", "cpus-per-node": "1", "time": "5"})
    try:
        (node,) = allocation.node_list()
        transport = node.transport("echo", ["cat"])
        try:
            transport.set_read_timeout(10)
            _write_all(transport, b"\x00\xff\r frame")
            assert _read_exactly(transport, 9) == b"\x00\xff\r frame"
            data = os.urandom(1 << 20)
            sender = threading.Thread(target=_write_all, args=(transport, data))
            sender.start()
            assert _read_exactly(transport, len(data)) == data
            sender.join()
        finally:
            transport.close()
    finally:
        allocation.release()


def test_a_master_outside_asks_for_an_allocation_and_releases_it(cluster, short_idle):
    with Master(f"slurm:nodes=1,cpus-per-node={CPUS},time=5") as m:
        assert m.workers == [f"{cluster.node}-{k}" for k in range(CPUS)]
        assert len(cluster.jobs()) == 1
        assert _original_cases(m) == _expected(CPUS)
    _wait_until(lambda: not cluster.jobs(), 20, "the allocation was not released")


def test_big_frames_cross_srun_through_the_shared_spool(cluster, monkeypatch):
    """srun holds back a frame of more than 1024 bytes about 44 ms each
    way: params and results that big go through the spool directory (the
    node sees this machine's), both ways, and the runs' values are right."""
    import numpy as np

    from tests.test_spool import PARAMS, _Counted, scale

    counted = _Counted(monkeypatch)
    data = DataSet(list(range(8)), slice_size=1)
    with Master(f"slurm:nodes=1,cpus-per-node={CPUS},time=5") as m:
        for run in range(3):
            total = m.run(scale, params=PARAMS + run, dataset=data)
            assert np.array_equal(total, (PARAMS + run) * 28.0)
    assert counted.out >= 3 and counted.read >= 3


def test_the_allocation_is_released_when_the_master_is_killed(cluster, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent("""
        import time
        from qjamfab import Master
        m = Master("slurm:nodes=1,cpus-per-node=1,time=5")
        print(m.run(lambda p, x: 1), flush=True)
        time.sleep(300)
        """)
    )
    child = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "1"
        assert len(cluster.jobs()) == 1
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    _wait_until(lambda: not cluster.jobs(), 20, "the allocation outlived its master")


def slow_sum(delay, xs):
    time.sleep(delay)
    return sum(xs)


def test_a_step_cancelled_mid_run_is_a_lost_worker(cluster, caplog):
    """scancel of a node's step: its workers are lost, the run ends right on
    the others, and the next run starts a new step there."""
    data = DataSet(list(range(60)), slice_size=5)
    with Master("local:1,slurm:nodes=1,cpus-per-node=1,time=5") as m:
        node = f"{cluster.node}-0"
        assert m.workers == ["local-0", node]
        (step,) = cluster.run(
            "squeue", "--steps", "--noheader", "--format=%i"
        ).stdout.split()
        timer = threading.Timer(0.6, lambda: cluster.run("scancel", step))
        timer.start()
        try:
            with caplog.at_level(logging.WARNING, logger="qjamfab"):
                assert m.run(slow_sum, params=0.4, dataset=data) == sum(range(60))
        finally:
            timer.join()
        assert m.last_run.lost_workers == [node]
        assert any(f"worker {node} lost" in r.getMessage() for r in caplog.records)
        assert m.run(slow_sum, params=0, dataset=data) == sum(range(60))
        assert m.last_run.workers == 2 and not m.last_run.lost_workers


def test_a_cancelled_allocation_loses_its_nodes_and_says_so(cluster, caplog):
    """scancel of the whole job mid-run: its node's workers are lost, the
    run ends right on the others, and the next one says the job is over."""
    data = DataSet(list(range(60)), slice_size=5)
    with Master("local:1,slurm:nodes=1,cpus-per-node=1,time=5") as m:
        (job,) = cluster.jobs()
        timer = threading.Timer(0.6, lambda: cluster.run("scancel", job))
        timer.start()
        try:
            assert m.run(slow_sum, params=0.4, dataset=data) == sum(range(60))
        finally:
            timer.join()
        assert m.last_run.lost_workers == [f"{cluster.node}-0"]
        with caplog.at_level(logging.WARNING, logger="qjamfab"):
            assert m.run(slow_sum, params=0, dataset=data) == sum(range(60))
        assert m.last_run.workers == 1
        said = [r.getMessage() for r in caplog.records if "unavailable" in r.message]
        assert said and said[0].endswith(
            f"Slurm job {job} is over (its time limit, scancel or a failed node): "
            "create a new Master for a new allocation"
        )


def _hold_the_node(cluster) -> str:
    """A job holding the whole node until cancelled: the next one pends."""
    sbatch = ["sbatch", "--parsable", "--exclusive", "--output=/dev/null"]
    blocker = cluster.run(*sbatch, "--wrap", "sleep 300").stdout.strip()
    _wait_until(
        lambda: (
            cluster.run("squeue", "-h", "-j", blocker, "-o", "%T").stdout.strip()
            == "RUNNING"
        ),
        20,
        "the blocking job did not start",
    )
    return blocker


def test_a_pending_allocation_says_why(cluster, short_idle, caplog):
    """While Slurm has no room, the Master says that it waits, and why:
    through logging where no line can show it (not a terminal)."""
    blocker = _hold_the_node(cluster)
    masters: list[Master] = []
    thread = threading.Thread(
        target=lambda: masters.append(Master("slurm:nodes=1,cpus-per-node=1,time=5"))
    )
    try:
        with caplog.at_level(logging.WARNING, logger="qjamfab"):
            thread.start()
            _wait_until(
                lambda: any(
                    "pending: Resources" in r.getMessage() for r in caplog.records
                ),
                30,
                "the Master did not say that its job is pending",
            )
        (record,) = [r for r in caplog.records if "pending" in r.getMessage()]
        assert record.getMessage().startswith("Slurm job ")
    finally:
        cluster.run("scancel", blocker)
        thread.join(60)
    (m,) = masters
    with m:
        assert m.run(constant) == 42


_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_pending_allocation_shows_on_the_terminal_line(cluster, tmp_path):
    """In a terminal the wait is on the start-up line ("Slurm job N pending:
    Resources"), not in the log; once granted the line is cleared and the
    Master runs."""
    blocker = _hold_the_node(cluster)
    script = tmp_path / "pending.py"
    script.write_text(
        textwrap.dedent("""
        from qjamfab import Master
        from tests.jobs import constant
        with Master("slurm:nodes=1,cpus-per-node=1,time=5") as m:
            print("READY", m.run(constant), flush=True)
        """)
    )
    main, terminal = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": REPO, "QJAMFAB_LOG_LEVEL": "WARNING"},
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    seen = bytearray()

    def read_until(pattern: bytes, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while (found := re.search(pattern, _ANSI.sub(b"", seen))) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in {bytes(seen)!r}"
            if select.select([main], [], [], 0.2)[0]:
                try:
                    seen.extend(os.read(main, 1 << 16))
                except OSError:  # the child is gone: its terminal closed
                    pass
        return found

    try:
        pending = read_until(rb"Slurm job (\d+) pending: Resources", 40)
        assert pending.group(1).decode() != blocker
        assert pending.group(1).decode() in cluster.jobs()
        cluster.run("scancel", blocker)
        read_until(rb"READY 42", 60)
        assert child.wait(timeout=30) == 0
    finally:
        cluster.run("scancel", blocker)
        child.kill()
        child.wait()
        os.close(main)
    # Shown on the line, so not logged as well; and the line was cleared
    # (rich's transient status erases it) before the Master's output.
    text = _ANSI.sub(b"", seen).decode(errors="replace")
    assert "WARNING" not in text and "pending" not in text.split("READY")[1]
    assert b"\x1b[2K" in seen  # erase line: cleared


def test_a_refused_allocation_says_why_in_one_line(cluster):
    with pytest.raises(HostUnreachable) as info:
        Master("slurm:nodes=1,partition=nosuchpartition,time=5")
    first = str(info.value).splitlines()[0]
    assert first.startswith("Slurm did not grant the allocation: ")
    assert "invalid partition" in first.lower()


def test_slurm_outside_an_allocation_says_how_to_get_one(cluster):
    with pytest.raises(BadHostSpec, match=r"^'slurm' outside a Slurm allocation: run"):
        Master("slurm")


def test_without_srun_the_error_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    with pytest.raises(
        PreflightFailed, match=r"^Slurm's srun is not installed on this machine"
    ):
        Master("slurm")


def test_slurm_specs_parse_with_their_options():
    (spec,) = parse_hosts("slurm:nodes=2,cpus-per-node=8,time=1:00:00,partition=gpu")
    assert spec.kind == "slurm"
    assert dict(spec.options) == {
        "nodes": "2",
        "cpus-per-node": "8",
        "time": "1:00:00",
        "partition": "gpu",
    }
    (plain,) = parse_hosts(["slurm workers=3"])
    assert (plain.kind, plain.options, plain.workers) == ("slurm", (), 3)
    local, slurm = parse_hosts("local:1,slurm:nodes=1")
    assert (local.kind, slurm.kind, dict(slurm.options)) == (
        "local",
        "slurm",
        {"nodes": "1"},
    )


@pytest.mark.parametrize(
    "spec,says",
    [
        ("slurm:nodes=0", r"nodes='0' is not a positive number: write e.g. nodes=2"),
        ("slurm:gpus=2", r"'gpus=2' is not a Slurm option: write slurm:KEY=VALUE"),
        ("slurm:nodes=1,gpus=2", r"'gpus=2' is not a Slurm option"),
        ("slurm:nodes", r"nodes needs a value: write e.g. nodes=2"),
    ],
)
def test_bad_slurm_options_are_refused(spec, says):
    with pytest.raises(BadHostSpec, match=rf"^host spec '{spec}': {says}"):
        parse_hosts(spec)


def test_cpus_per_node_reads_slurms_counts():
    assert cpus_per_node("72(x2),36") == [72, 72, 36]
    assert cpus_per_node("4") == [4]
    with pytest.raises(PreflightFailed, match=r"^cannot read Slurm's CPUs per node"):
        cpus_per_node("a lot")


_TASKS = """
import json, subprocess, sys
steps = [
    ["bootstrap"],
    ["start-workers"],
    ["status"],
    ["clear-cache"],
    ["stop-workers"],
    ["status"],
]
said = []
for step in steps:
    done = subprocess.run(
        [sys.executable, "-m", "invoke", *step, "--hosts=slurm"],
        capture_output=True, text=True, timeout=60,
    )
    said.append([step[0], done.returncode, done.stdout, done.stderr])
print(json.dumps(said))
"""


def _row(table: str, host: str) -> list[str]:
    """The cells of `host`'s row in a task's plain-text table."""
    (row,) = [line.split() for line in table.splitlines() if line.startswith(host)]
    return row


def test_the_host_tasks_act_on_the_nodes_of_the_allocation(
    cluster, tmp_path, qjamfab_home
):
    """Inside salloc, every lifecycle task with --hosts=slurm runs on the
    allocation's node through srun, named by the node: the runtime sent
    over srun's stdin, a daemon per allocated CPU (one, on a machine of
    more) started and seen, stopped, none left."""
    script = tmp_path / "tasks.py"
    script.write_text(_TASKS)
    done = subprocess.run(
        ["salloc", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--"]
        + [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    for name, status, out, err in steps:
        assert status == 0, f"{name}: {out}{err}"
    node = cluster.node
    assert _row(steps[0][2], node)[-3] == "uploaded"  # bootstrap's runtime
    assert _row(steps[1][2], node)[1:3] == ["1", "1"]  # started, running
    assert _row(steps[2][2], node)[1] == "1"  # status: workers
    assert _row(steps[4][2], node)[1::2] == ["1", "ok"]  # stop-workers: stopped
    assert _row(steps[5][2], node)[1] == "0"  # status: none left
    assert not processes_mentioning(str(qjamfab_home))


@pytest.mark.parametrize("hosts", ["slurm", "slurm:nodes=1,time=5"])
@pytest.mark.timeout(60)
def test_the_host_tasks_outside_an_allocation_say_to_run_inside_one(hosts):
    """Outside an allocation, or asked for a new one, the tasks refuse in
    one line (asking Slurm for nodes just to look at them would be wrong)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_JOB")}
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "status", f"--hosts={hosts}"],
        env={**env, "PYTHONPATH": REPO},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[0] == (
        f"status failed: {hosts}: the host tasks reach the nodes of the Slurm "
        "allocation they run in: run them inside it (salloc, sbatch), e.g. "
        "salloc --nodes=2 inv status --hosts=slurm; they never ask Slurm for one"
    )


def test_cluster_functions_given_slurm_say_how_its_nodes_are_reached():
    (result,) = tasks.status(parse_hosts("slurm"))
    assert not result.ok
    assert result.error.startswith(
        "slurm: the nodes of a Slurm allocation are reached by the tasks "
        "(inv status --hosts=slurm) run inside it"
    )


def test_slurm_benchmark_smoke(slurm, tmp_path, restored_environ):
    """benchmarks/slurm.py at its smallest: every contender measured."""
    if not sshd_available():
        pytest.skip("the benchmark compares with SSH: sshd is not installed")
    from benchmarks import slurm as bench

    assert bench.main(["--scale", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "slurm.json").read_text())
    assert set(result["rows"]) == {
        "slurm cluster start",
        "slurm (inside salloc)",
        "salloc: granted, released",
        "slurm: (asks salloc)",
        "ssh (OpenSSH)",
    }
    assert all(row["ready_s"] for row in result["rows"].values())
    sae = result["sae"]["rows"]
    assert set(sae) == {"slurm: (srun streams)", "ssh (OpenSSH)"}
    assert all(row["evals"] == 2 for row in sae.values())
    first = result["first_run"]["rows"]
    assert set(first) == set(sae) and all(r["mb_s"] > 0 for r in first.values())
    assert set(result["echo"]) == {"pipes", "srun"}
    assert all(len(row) == len(bench.ECHO_SIZES) for row in result["echo"].values())


def test_a_dask_slurm_cluster_whose_workers_lack_qjamfab(cluster, tmp_path):
    """dask-jobqueue's SLURMCluster: two Dask workers as two Slurm jobs,
    running a Python that cannot import qjamfab (no `site`, so no editable
    install; a directory of their own, so no checkout on the path)."""
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    distributed = pytest.importorskip("distributed")
    import importlib.util
    import sysconfig

    paths = sysconfig.get_paths()
    bare = tmp_path / "bare-python"
    bare.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(paths['purelib'])}:{shlex.quote(paths['platlib'])}"
        f' exec {shlex.quote(sys.executable)} -S "$@"\n'
    )
    bare.chmod(0o755)
    slurm_cluster = dask_jobqueue.SLURMCluster(
        cores=1,
        processes=1,
        memory="1GB",
        walltime="00:10:00",
        python=str(bare),
        local_directory=str(tmp_path / "dask"),
        log_directory=str(tmp_path / "logs"),
        job_extra_directives=[f"--chdir={tmp_path}"],
        scheduler_options={"host": "127.0.0.1", "dashboard_address": None},
    )
    try:
        slurm_cluster.scale(2)
        with distributed.Client(slurm_cluster, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=90)
            found = client.run(importlib.util.find_spec, "qjamfab")
            assert set(found.values()) == {None}  # nothing of ours there
            data = DataSet(list(range(100)), slice_size=10)
            with Master(client) as m:
                assert m.run(lambda p, xs: sum(xs), dataset=data) == sum(range(100))
                assert m.run(lambda p, xs: sum(xs), dataset=data) == sum(range(100))
                assert m.last_run.dataset_bytes_sent == 0
    finally:
        slurm_cluster.close()
