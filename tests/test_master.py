"""Master.run end to end on local worker processes: what is theirs (process
names, their output file, a worker found dead by a send, what crosses to
each worker once), datasets, the bad arguments to Master, closing, the
cache limit, same bits whatever the grouping. What every engine does alike
(the original qjam cases, errors, losses, caching) is in test_behaviour.py.
"""

import gc
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from qjamfab import BadHostSpec, BaseDataSet, ConfigError, DataSet, Master, QjamfabError
from qjamfab.runtime import host_dir
from tests.conftest import processes_mentioning
from tests.jobs import (
    constant,
    multiply_sum,
)

pytestmark = pytest.mark.timeout(60)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def master2():
    with Master("local:2") as m:
        yield m


def test_local_workers_have_readable_names(master2, qjamfab_home):
    """ps -e shows qjamfab-local-0, not "python3"; the command line still
    names the base directory (the leftover check looks for it)."""
    found = processes_mentioning(str(qjamfab_home))
    for worker, stats in master2.worker_stats().items():
        with open(f"/proc/{stats['pid']}/comm") as f:
            assert f.read().strip() == f"qjamfab-{worker}"
        assert any(line.startswith(f"{stats['pid']}: ") for line in found), found


# --- output ----------------------------------------------------------------


def _print_lines(tag, count):
    for i in range(count):
        print(f"{tag} {i:06d} " + "x" * 90)
    time.sleep(0.2)  # the worker forwards output meanwhile
    return os.path.getsize("/proc/self/fd/1")


def test_long_output_all_arrives_and_the_log_file_starts_over(capfd):
    """A worker's output file starts over once more than 1 MiB of it was
    forwarded, but only between tasks (a task could be writing); every
    line reaches the master, in order."""
    with Master("local:1") as m:
        sizes = [
            m.run(lambda p, x: _print_lines("first", 12_000)),
            m.run(lambda p, x: _print_lines("second", 10)),
        ]
    lines = [line.split()[:3] for line in capfd.readouterr().out.splitlines()]
    assert lines == [["[local-0]", "first", f"{i:06d}"] for i in range(12_000)] + [
        ["[local-0]", "second", f"{i:06d}"] for i in range(10)
    ]
    assert sizes[0] > 1 << 20 and sizes[1] < 2000


# --- functions by value ----------------------------------------------------


def test_function_defined_in_main_script(tmp_path):
    script = tmp_path / "job_script.py"
    script.write_text(
        textwrap.dedent("""
        from qjamfab import Master, DataSet
        def mapfunc(params, rows):
            return params * sum(rows)
        with Master("local:2") as m:
            print("result", m.run(mapfunc, params=2, dataset=DataSet(list(range(10)))))
    """)
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert "result 90" in out.stdout, out.stderr


def test_function_sent_once_per_worker_params_every_call(master2):
    big = list(range(20000))

    def job(params, xs):
        return params + len(big) * 0 + sum(xs)

    data = DataSet(list(range(8)))
    assert master2.run(job, params=1, dataset=data) == 28 + master2.last_run.slices
    first = master2.last_run.bytes_sent
    assert master2.run(job, params=2, dataset=data) == 28 + 2 * master2.last_run.slices
    second = master2.last_run.bytes_sent
    assert first > 50000 > second  # the closure's list went once


def test_a_balanced_run_is_followed_by_unsplit_ones(master2):
    data = DataSet(list(range(8)))
    assert master2.run(lambda p, xs: time.sleep(0.02) or sum(xs), dataset=data) == 28
    assert master2.last_run.backup_tasks == 0
    assert master2.run(lambda p, xs: sum(xs), dataset=data) == 28
    assert master2.last_run.tasks == 2  # balanced before: one task each


@pytest.mark.timeout(40)  # shorter than the heartbeat deadline
def test_a_worker_found_dead_when_its_task_is_sent():
    """A send that fails (the worker died since the last read) loses the
    worker like the end of its stream: its slices run elsewhere.

    The worker leaves behind a forked child that keeps its output stream
    open but not its input, so once the worker is killed the Master reads
    no end of stream (nor anything else) from it: its first news is the
    failed send, long before the heartbeat deadline."""
    import fcntl
    import signal
    import stat

    def leave_child_holding_output(target_pid, _):
        if os.getpid() != target_pid:
            return 0
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:  # keep the write ends, close the read ends
            for name in os.listdir("/proc/self/fd"):
                try:
                    fd = int(name)
                    if stat.S_ISFIFO(os.fstat(fd).st_mode) and (
                        fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                    ):
                        os.close(fd)
                except OSError:
                    pass
            os.write(ready_w, b"x")  # the worker's input has no reader here
            os.close(ready_w)
            time.sleep(60)
            os._exit(0)
        # Returned once the child closed them: on a busy machine it may
        # not have run yet, and the worker's input would keep a reader.
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        return child

    # A heartbeat deadline longer than the test may take: the worker is
    # found dead by its exit, not by its silence.
    with Master("local:2", heartbeat_timeout=60.0) as m:
        pid = m.worker_stats()["local-1"]["pid"]
        child = m.run(leave_child_holding_output, params=pid)
        try:
            os.kill(pid, signal.SIGKILL)
            # Dead and unreaped, and its threads gone too: the leader of a
            # thread group is a zombie before its other threads have
            # exited, and until the last one has, its input has a reader.
            deadline = time.monotonic() + 10
            while not (
                open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
                and os.listdir(f"/proc/{pid}/task") == [str(pid)]
            ):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert "2 workers up" in repr(m)  # nothing told the Master yet
            data = DataSet(list(range(10)))
            assert m.run(multiply_sum, params=1, dataset=data) == 45
            assert m.last_run.lost_workers == ["local-1"]
        finally:
            os.kill(child, signal.SIGKILL)  # the worker's, not ours to wait for


def test_params_go_once_per_worker_per_run(master2, monkeypatch):
    """A run split into several tasks per worker (so idle workers can take
    some) still sends its params to each worker once, when they go by
    worker (QJAMFAB_SHARE_PARAMS=0; shared, they cross once per host:
    tests/test_params_shared.py)."""
    monkeypatch.setenv("QJAMFAB_SHARE_PARAMS", "0")
    params = np.arange(100_000, dtype=np.float64)  # 800 kB
    data = DataSet(list(range(8)))
    total = master2.run(
        lambda p, xs: float(p[:2].sum()) + sum(xs), params=params, dataset=data
    )
    assert total == 28 + master2.last_run.slices
    stats = master2.last_run
    # A first run splits: two tasks per worker (and on a loaded machine a
    # worker that runs dry may take a queued one, or a backup start: those
    # copies go to workers that have the params already).
    assert stats.tasks - stats.moved_tasks - stats.backup_tasks == 4
    assert (
        stats.slices == 8 and 2 * params.nbytes < stats.bytes_sent < 2.5 * params.nbytes
    )


# --- caching ------------------------------------------------------------


def test_cache_directories_are_private(master2, qjamfab_home):
    master2.run(multiply_sum, params=1, dataset=list(range(10)))
    for sub in ("", "cache", "runtime"):
        assert (qjamfab_home / sub).stat().st_mode & 0o077 == 0
    assert os.stat(host_dir(str(qjamfab_home))).st_mode & 0o077 == 0


# --- datasets -----------------------------------------------------------


def test_all_dataset_types(master2, tmp_path):
    matrix = np.arange(60, dtype=np.float64).reshape(12, 5)
    rowsum = lambda p, x: float(np.asarray(x).sum())  # noqa: E731
    np.save(tmp_path / "m.npy", matrix)
    np.savetxt(tmp_path / "m.txt", matrix)
    total = float(matrix.sum())
    assert master2.run(rowsum, dataset=DataSet(matrix.tolist())) == total
    assert master2.run(rowsum, dataset=DataSet(tuple(range(10)))) == 45
    assert master2.run(rowsum, dataset=DataSet(matrix)) == total
    assert master2.run(rowsum, dataset=DataSet(matrix, row_major=False)) == total
    assert master2.run(rowsum, dataset=DataSet(str(tmp_path / "m.npy"))) == total
    assert master2.run(rowsum, dataset=DataSet(str(tmp_path / "m.txt"))) == total
    columns = master2.run(
        lambda p, x: [x.shape[0]], dataset=DataSet(matrix, row_major=False)
    )
    assert columns == [12 * master2.last_run.slices]


def test_custom_dataset_subclass(master2):
    class Squares(BaseDataSet):
        def chunks(self):
            return 5

        def slice(self, i):
            return [i * i]

    assert master2.run(lambda p, xs: sum(xs), dataset=Squares()) == 30


def test_explicit_slice_size_is_kept(master2):
    master2.run(lambda p, xs: len(xs), dataset=DataSet(list(range(120)), slice_size=5))
    assert master2.last_run.slices == 24


# --- bad arguments: each error says what happened ---------------------------


@pytest.mark.parametrize("hosts", ["local:0", "local:x", "", "a b", ["local", ""]])
def test_malformed_host_string(hosts):
    with pytest.raises(BadHostSpec):
        Master(hosts)


@pytest.mark.parametrize("timeout", [0.5, 1.9, float("nan")])
def test_a_heartbeat_timeout_the_heartbeats_cannot_meet_is_refused(timeout):
    with pytest.raises(
        ConfigError,
        match=r"^heartbeat_timeout must be at "
        r"least 2 s \(twice the heartbeat interval\), not ",
    ):
        Master("local:1", heartbeat_timeout=timeout)


def test_workers_per_host_must_be_positive():
    with pytest.raises(ConfigError, match="^workers_per_host must be a positive"):
        Master("local", workers_per_host=0)


@pytest.mark.parametrize(
    "options,message",
    [
        (
            {"heartbeat_timeout": 1},
            "heartbeat_timeout must be at least 2 s (twice the heartbeat "
            "interval), not 1: a shorter one would lose workers that are fine",
        ),
        (
            {"workers_per_host": 0},
            "workers_per_host must be a positive int, not 0: give e.g. 2, or "
            "None for one per core",
        ),
        ({"workers_per_host": True}, "workers_per_host must be a positive int"),
        (
            {"replicas": 3},
            "replicas must be 1 or 2, not 3: 2 runs every slice on two "
            "workers at once, 1 (the default) on one",
        ),
        (
            {"straggler_factor": 0.5},
            "straggler_factor must be a number of at least 1, not 0.5: a task "
            "this many times slower than the median gets a backup copy",
        ),
        (
            {"cache_limit": "lots"},
            "cache limit 'lots' is not a size: write bytes, or a number with "
            "K, M, G or T (powers of 1024), e.g. 20G, 500M or 1.5G",
        ),
        (
            {"ssh_client": "putty"},
            "ssh_client='putty' is not an SSH client qjamfab can use: give "
            "'openssh', 'paramiko' or 'auto' (openssh when installed)",
        ),
        (
            {"require_all": "yes"},
            "require_all must be True or False, not 'yes'",
        ),
        (
            {"ssh_config": "/nonexistent/ssh_config"},
            "ssh_config file '/nonexistent/ssh_config' does not exist: fix the "
            "path, or leave ssh_config out for ~/.ssh/config",
        ),
    ],
)
def test_every_bad_argument_is_a_config_error_whatever_the_hosts(options, message):
    """Checked before anything starts, with local hosts too; a ConfigError
    is a QjamfabError and, as before, a ValueError."""
    with pytest.raises(ConfigError) as info:
        Master("local:1", **options)
    assert isinstance(info.value, QjamfabError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith(message)


def test_a_bad_ssh_client_from_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("QJAMFAB_SSH_CLIENT", "putty")
    with pytest.raises(ConfigError, match="^QJAMFAB_SSH_CLIENT='putty' is not an"):
        Master("local:1")


# --- no process left behind -------------------------------------------------


def test_close_stops_workers(qjamfab_home):
    m = Master("local:2")
    assert len(processes_mentioning(str(qjamfab_home))) == 2
    m.close()
    assert processes_mentioning(str(qjamfab_home)) == []
    with pytest.raises(QjamfabError, match="^this Master is closed"):
        m.run(constant)


def test_garbage_collected_master_stops_workers(qjamfab_home):
    m = Master("local:2")
    m.run(constant)
    del m
    gc.collect()
    assert processes_mentioning(str(qjamfab_home)) == []


@pytest.mark.parametrize("ending", ["exit", "ctrl-c"])
def test_interpreter_exit_and_ctrl_c_stop_workers(tmp_path, qjamfab_home, ending):
    script = tmp_path / "leaves.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, time
        from qjamfab import Master
        m = Master("local:2")
        print(m.run(lambda p, x: 1), flush=True)
        if {ending == "ctrl-c"!r}:
            def slow(p, x):
                time.sleep(30)
            os.kill(os.getpid(), signal.SIGINT) if False else None
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            signal.signal(signal.SIGALRM,
                          lambda *a: os.kill(os.getpid(), signal.SIGINT))
            m.run(slow)
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.stdout.startswith("2")
    if ending == "ctrl-c":
        assert "KeyboardInterrupt" in proc.stderr
    assert processes_mentioning(str(qjamfab_home)) == []


def test_default_hosts_from_environment(monkeypatch):
    monkeypatch.setenv("QJAMFAB_HOSTS", "local:3")
    with Master() as m:
        assert m.workers == ["local-0", "local-1", "local-2"]
        assert m.run(constant) == 126
    monkeypatch.delenv("QJAMFAB_HOSTS")
    with Master() as m:
        assert len(m.workers) == os.cpu_count()


def test_logging_info_summary_and_debug_messages(master2, caplog):
    with caplog.at_level("INFO", logger="qjamfab"):
        master2.run(constant)
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(infos) == 1 and infos[0].startswith("run: RunStats(")
    caplog.clear()
    with caplog.at_level("DEBUG", logger="qjamfab"):
        master2.run(constant, params=7)
    debug = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"]
    assert any(m.startswith("-> local-0 TASK") and "bytes)" in m for m in debug)
    assert any(m.startswith("<- local-1 RESULT") for m in debug)


# --- same inputs, same bits ----------------------------------------------


def test_results_are_the_same_bits_whatever_the_grouping_and_faults(tmp_path):
    """Float results depend only on the job, params and slices: not on how
    slices were grouped into tasks (split or not), stolen, or re-run after
    a worker was lost."""
    rng = np.random.default_rng(7)
    X = rng.random((4000, 7)) * 10.0 ** rng.integers(-8, 8, (4000, 7))
    data = DataSet(X, slice_size=250)  # 16 slices

    def column_sums(params, rows):
        return rows.sum(axis=0)

    def dies_on_first_slice_once(params, rows):
        flag = os.path.join(params, "died")
        try:  # one worker only: the file's creation is the claim
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os._exit(9)
        return rows.sum(axis=0)

    with Master("local:3") as m:
        first = m.run(column_sums, dataset=data)
        seen = {first.tobytes()}
        for _ in range(3):  # unsplit and split runs
            seen.add(m.run(column_sums, dataset=data).tobytes())
        with Master("local:2") as other:  # other groups, same slices
            seen.add(other.run(column_sums, dataset=data).tobytes())
        lost = m.run(dies_on_first_slice_once, params=str(tmp_path), dataset=data)
        assert m.last_run.lost_workers and m.last_run.rerun_slices
        seen.add(lost.tobytes())
    assert seen == {first.tobytes()}
    # A plain left-to-right sum would differ in the last bits here: the
    # tree is a choice, and the test can tell.
    slices = [X[i : i + 250].sum(axis=0) for i in range(0, 4000, 250)]
    import functools

    folded = functools.reduce(lambda a, b: a + b, slices)
    assert np.allclose(folded, first) and folded.tobytes() != first.tobytes()


def test_a_cache_limit_is_checked_and_reaches_the_workers():
    with pytest.raises(
        ConfigError,
        match=r"^cache limit '20 gigs' is not a "
        "size: write bytes, or a number with K, M, G or T",
    ):
        Master("local:1", cache_limit="20 gigs")
    with Master("local:1", cache_limit="100K") as m:
        assert m.worker_stats()["local-0"]["limit_bytes"] == 100 * 1024


def _cache_bytes(home) -> int:
    return sum(f.stat().st_size for f in (home / "cache").iterdir())


def test_the_cache_limit_holds_over_datasets_run_back_to_back(
    monkeypatch, qjamfab_home
):
    """Six datasets of 1.6 MiB (4 slices each) under a 6 MiB limit: after
    each run the cache is within it, and the newest dataset is whole."""
    monkeypatch.setenv("QJAMFAB_CACHE_LIMIT", "6M")
    with Master("local:2") as m:
        for k in range(6):
            X = np.arange(200 * 1024, dtype=np.float64).reshape(200, 1024) + k
            got = m.run(lambda p, x: x.sum(), dataset=DataSet(X, slice_size=50))
            assert got == X.sum()
            held = sorted(
                (home_file.name, home_file.stat().st_size)
                for home_file in (qjamfab_home / "cache").iterdir()
            )
            assert _cache_bytes(qjamfab_home) <= 6 << 20, (k, held)
        got = m.run(lambda p, x: x.sum(), dataset=DataSet(X, slice_size=50))
        assert got == X.sum() and m.last_run.slices_sent == 0


def test_slices_pinned_over_the_cache_limit_are_said_once(capsys, qjamfab_home):
    """Tasks of two 400 KiB slices under a 700 KiB limit: the cache holds
    what they need, says once that it is over, and results are right."""
    X = np.arange(400 * 1024, dtype=np.float64).reshape(400, 1024)
    with Master("local:2", cache_limit="700K") as m:
        for _ in range(2):
            got = m.run(lambda p, x: x.sum(), dataset=DataSet(X, slice_size=50))
            assert got == X.sum()
    said = capsys.readouterr().out
    assert said.count("exceed the cache limit (716800 bytes)") == 1, said
