"""The lifecycle tasks through their three fronts, run as a user runs them:
``inv`` (tasks.py), ``fab`` (fabfile.py) and ``qjamfab`` (qjamfab.cli), as
subprocesses from the repository root; on `local` hosts, and on three private
sshd servers (tests/sshd_hosts.py) on 127.0.0.2-4."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qjamfab
from qjamfab import HostKeyError, runtime
from qjamfab import cli as qjamfab_cli
from qjamfab.engines import cluster
from qjamfab.hostspec import parse_hosts

try:
    from sshd_hosts import SshdHosts, sshd_available
except ImportError:  # tests/ collected as a package
    from tests.sshd_hosts import SshdHosts, sshd_available

ROOT = Path(__file__).resolve().parent.parent
HOSTS = "host1,host2,host3"


# --- helpers -----------------------------------------------------------------


def _qjamfab_command() -> list[str]:
    script = Path(sys.executable).parent / "qjamfab"
    if script.is_file():  # the installed console script
        return [str(script)]
    return [sys.executable, "-m", "qjamfab.cli"]


def cli(
    tool: str,
    *args: str,
    env: dict | None = None,
    timeout: float = 60,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess:
    """Run `inv`, `fab` or `qjamfab` with args; its completed process."""
    command = {
        "inv": [sys.executable, "-m", "invoke"],
        "fab": [sys.executable, "-m", "fabric"],
        "qjamfab": _qjamfab_command(),
    }[tool]
    full_env = dict(os.environ)  # holds this test's own QJAMFAB_HOME
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else [])
    )
    full_env.update(env or {})
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def describe(proc) -> str:
    return (
        f"{proc.args}\nexit status {proc.returncode}\n--- stdout ---\n"
        f"{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def tables(text: str) -> list[dict[str, dict[str, str]]]:
    """Every table in text as {host: {column: cell}}, cut at the columns
    that the rule line under the header marks."""
    lines = text.splitlines()
    found = []
    for i in range(len(lines) - 1):
        if not (lines[i].startswith("host ") and lines[i + 1].startswith("-")):
            continue
        rule = lines[i + 1]
        starts = [
            k
            for k, ch in enumerate(rule)
            if ch == "-" and (k == 0 or rule[k - 1] == " ")
        ]
        bounds = list(zip(starts, starts[1:] + [None]))
        headers = [lines[i][a:b].strip() for a, b in bounds]
        rows = {}
        for line in lines[i + 2 :]:
            if not line.strip() or line.startswith("("):
                break
            cells = [line[a:b].strip() for a, b in bounds]
            rows[cells[0]] = dict(zip(headers, cells))
        found.append(rows)
    return found


def one_table(proc) -> dict[str, dict[str, str]]:
    found = tables(proc.stdout)
    assert len(found) == 1, describe(proc)
    return found[0]


# --- local hosts ---------------------------------------------------------------


def test_local_bootstrap_and_status():
    proc = cli("inv", "bootstrap", "--hosts=local")
    assert proc.returncode == 0, describe(proc)
    row = one_table(proc)["local"]
    assert row["runtime"] == "uploaded" and row["status"] == "ok", describe(proc)
    assert row["python"] == ".".join(map(str, sys.version_info[:3]))
    assert int(row["cores"]) == os.cpu_count()
    again = cli("inv", "bootstrap", "--hosts=local")
    assert again.returncode == 0, describe(again)
    assert one_table(again)["local"]["runtime"] == "present", describe(again)

    proc = cli("inv", "status", "--hosts=local")
    assert proc.returncode == 0, describe(proc)
    row = one_table(proc)["local"]
    assert (row["workers"], row["entries"], row["cache"], row["status"]) == (
        "0",
        "0",
        "0 B",
        "ok",
    ), describe(proc)
    assert row["runtime"].endswith("*"), describe(proc)
    assert row["home"] == "local", describe(proc)  # not on NFS


def test_status_says_when_pinned_slices_exceeded_the_cache_limit(qjamfab_home):
    from qjamfab.runtime.cache import RefCache
    from qjamfab.runtime.pins import pinned_over_limit, pins_dir

    cache = str(qjamfab_home / "cache")
    RefCache(cache)  # as a worker makes it
    proc = cli("inv", "status", "--hosts=local")
    assert proc.returncode == 0 and "over its limit" not in proc.stdout
    # What a worker records (test_cache.py makes it happen).
    with open(os.path.join(pins_dir(cache), "over-limit"), "w") as f:
        json.dump({"pinned": 3 << 20, "limit": 2 << 20, "time": 0}, f)
    assert pinned_over_limit(cache)["pinned"] == 3 << 20
    proc = cli("inv", "status", "--hosts=local")
    assert proc.returncode == 0, describe(proc)
    assert "cache on local: tasks pinned 3.0 MiB, over its limit of 2.0 MiB" in (
        proc.stdout
    ), describe(proc)


def test_status_fits_a_terminal_of_60_columns(tmp_path):
    """`qjamfab status` in a real terminal (a pty) 60 columns wide: every
    line fits, the columns that do not are named under the table."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    env = dict(os.environ, COLUMNS="60", LINES="24", TERM="xterm")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    try:
        proc = subprocess.Popen(
            [*_qjamfab_command(), "status", "--hosts=local"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
        )
        os.close(follower)
        chunks = []
        while True:  # until the program closes its end (EIO on Linux)
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0, b"".join(chunks)
    finally:
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", text)]
    assert max(map(len, lines)) <= 60, lines
    header = next(line for line in lines if line.startswith("host "))
    every = [
        "host",
        "workers",
        "uptime",
        "entries",
        "cache",
        "limit",
        "home",
        "runtime",
    ]
    shown = header.split()
    assert shown[-1] == "status" and shown[:2] == ["host", "workers"], lines
    hidden = [name for name in every if name not in shown]
    assert hidden and f"(left out to fit: {', '.join(hidden)})" in lines, lines


def test_local_start_status_stop_workers():
    try:
        proc = cli("inv", "start-workers", "--hosts=local", "--workers-per-host", "1")
        assert proc.returncode == 0, describe(proc)
        row = one_table(proc)["local"]
        assert (row["started"], row["running"], row["status"]) == ("1", "1", "ok"), (
            describe(proc)
        )
        proc = cli("inv", "status")  # default hosts: local
        assert one_table(proc)["local"]["workers"] == "1", describe(proc)
    finally:
        proc = cli("inv", "stop-workers", "--hosts=local")
    assert proc.returncode == 0, describe(proc)
    assert one_table(proc)["local"]["stopped"] == "1", describe(proc)


def check_sum_matrix(proc, n: int, workers: int) -> None:
    assert proc.returncode == 0, describe(proc)
    expected = n * n * (n * n + 1) // 2
    assert f"expected sum: {expected}\n" in proc.stdout, describe(proc)
    assert f"computed sum: {expected}\n" in proc.stdout, describe(proc)
    assert f"on {workers} workers" in proc.stdout, describe(proc)


def test_local_run_args_after_double_dash():
    proc = cli("inv", "run", "examples/sum_matrix.py", "--hosts=local:2", "--", "60")
    check_sum_matrix(proc, 60, 2)


def test_local_run_quoted_script_and_args():
    proc = cli("inv", "run", "examples/sum_matrix.py 40", "--hosts=local:2")
    check_sum_matrix(proc, 40, 2)


def test_run_passes_args_env_and_exit_status(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(
        textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"argv": sys.argv[1:],
                          "hosts": os.environ.get("QJAMFAB_HOSTS"),
                          "from_cli": os.environ.get("QJAMFAB_HOSTS_FROM_CLI"),
                          "ssh_config": os.environ.get("QJAMFAB_SSH_CONFIG")}))
        sys.exit(3)
    """)
    )
    config = tmp_path / "ssh_config"
    config.write_text("Host nothing\n    HostName 127.0.0.1\n")
    proc = cli(
        "inv",
        "run",
        f"{script} 'one two'",
        "--hosts=local:1,local",
        f"--ssh-config={config}",
        "--",
        "three four",
        "--five",
        "",
        "-- six",
    )
    assert proc.returncode == 3, describe(proc)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {
        "argv": ["one two", "three four", "--five", "", "-- six"],
        "hosts": "local:1,local",
        "from_cli": "1",
        "ssh_config": str(config),
    }, describe(proc)
    # the same through the installed program, hosts from the environment
    # (an outer inv run's mark does not pass on)
    proc = cli(
        "qjamfab",
        "run",
        str(script),
        env={"QJAMFAB_HOSTS": "local:3", "QJAMFAB_HOSTS_FROM_CLI": "1"},
    )
    assert proc.returncode == 3, describe(proc)
    seen = json.loads(proc.stdout.strip())
    assert (seen["hosts"], seen["from_cli"]) == ("local:3", None), describe(proc)


def test_run_prints_the_run_stats_once(tmp_path):
    """What the script prints, once: no log line repeats its RunStats."""
    script = tmp_path / "stats.py"
    script.write_text(
        textwrap.dedent("""
        from qjamfab import Master
        with Master() as m:
            m.run(lambda p, s: 1)
            print(m.last_run)
    """)
    )
    proc = cli("inv", "run", str(script), "--hosts=local:1")
    assert proc.returncode == 0, describe(proc)
    assert (proc.stdout + proc.stderr).count("RunStats(") == 1, describe(proc)


def test_run_keeps_a_hosts_files_settings(tmp_path):
    """inv run --hosts=@FILE: the script's Master() gets each entry's
    workers= and env. settings, not only the host names."""
    hosts = tmp_path / "lab.hosts"
    hosts.write_text("# lab\nlocal  workers=2  env.QJF_LAB=w{worker}  # two\n")
    script = tmp_path / "lab.py"
    script.write_text(
        textwrap.dedent("""
        import json, os
        from qjamfab import DataSet, Master
        with Master() as m:
            seen = m.run(lambda p, xs: {os.environ["QJF_LAB"]},
                         dataset=DataSet(list(range(8))), reduce=set.union)
            print(json.dumps({"hosts": os.environ["QJAMFAB_HOSTS"],
                              "workers": len(m.workers), "env": sorted(seen)}))
    """)
    )
    proc = cli("inv", "run", str(script), f"--hosts=@{hosts}")
    assert proc.returncode == 0, describe(proc)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "hosts": "local workers=2 env.QJF_LAB=w{worker}",
        "workers": 2,
        "env": ["w0", "w1"],
    }, describe(proc)


def test_a_spec_as_an_entry_reads_back_the_same():
    entries = [
        "u@gpu1:2222 workers=4 python=/opt/py/bin/python env.CUDA={worker} env.X=a=b",
        "local:3",
        "LOCAL:2 workers=5",
        "host2",
    ]
    specs = parse_hosts(entries)
    assert [s.entry for s in specs][1] == "local:3"
    assert parse_hosts(",".join(s.entry for s in specs)) == specs


def test_run_missing_script():
    proc = cli("inv", "run", "examples/no_such_script.py", "--hosts=local")
    assert proc.returncode == 2, describe(proc)
    assert "examples/no_such_script.py does not exist" in proc.stderr, describe(proc)


def test_bad_arguments_exit_2(tmp_path):
    proc = cli("inv", "bootstrap", "--hosts=local,,local")
    assert proc.returncode == 2 and "bad --hosts" in proc.stderr, describe(proc)
    proc = cli("inv", "start-workers", "--workers-per-host=0")
    assert proc.returncode == 2 and "--workers-per-host" in proc.stderr, describe(proc)
    missing = tmp_path / "missing_config"
    proc = cli("inv", "status", f"--ssh-config={missing}")
    assert proc.returncode == 2 and str(missing) in proc.stderr, describe(proc)


def test_help_and_list():
    proc = cli("qjamfab", "--help")
    assert proc.returncode == 0, describe(proc)
    assert "Usage: qjamfab" in proc.stdout, describe(proc)
    proc = cli("qjamfab", "--list")
    assert proc.returncode == 0, describe(proc)
    for name in (
        "bootstrap",
        "start-workers",
        "status",
        "run",
        "clear-cache",
        "stop-workers",
    ):
        assert f"  {name} " in proc.stdout, describe(proc)
    proc = cli("qjamfab", "--version")
    assert proc.stdout == f"qjamfab {qjamfab.__version__}\n", describe(proc)
    proc = cli("inv", "bootstrap", "--help")
    assert proc.returncode == 0, describe(proc)
    assert "--hosts=STRING" in proc.stdout, describe(proc)
    assert "-h," not in proc.stdout.split("Options:")[1], describe(proc)
    # a positional argument would swallow --help: run shows its help anyway
    proc = cli("inv", "run", "--help")
    assert proc.returncode == 0, describe(proc)
    assert "run SCRIPT" in proc.stdout and "--hosts" in proc.stdout, describe(proc)
    proc = cli("inv", "--list")
    assert proc.returncode == 0 and "stop-workers" in proc.stdout, describe(proc)


def test_qjamfab_help_speaks_for_qjamfab():
    """qjamfab --help: its tasks, the options that matter, @FILE; not
    Invoke's options for shell commands, which no task uses."""
    proc = cli("qjamfab", "--help")
    assert proc.returncode == 0, describe(proc)
    for name in ("bootstrap", "start-workers", "status", "run", "stop-workers"):
        assert f"  {name} " in proc.stdout, describe(proc)
    for option in ("--help", "--list", "--version", "@FILE", "--hosts"):
        assert option in proc.stdout, (option, describe(proc))
    for option in (
        "--prompt-for-sudo-password",
        "--pty",
        "--dry",
        "-T",
        "--warn-only",
        "--echo",
        "--write-pyc",
        "--complete",
        "Core options",
        "Subcommands",
    ):
        assert option not in proc.stdout, (option, describe(proc))
    proc = cli("qjamfab", "--pty", "status")  # gone, not silently accepted
    assert proc.returncode != 0, describe(proc)
    assert proc.stderr.startswith("no option named '--pty'"), describe(proc)


def test_the_hosts_help_names_hosts_files():
    proc = cli("qjamfab", "--help", "status")
    assert proc.returncode == 0, describe(proc)
    text = " ".join(proc.stdout.split())
    assert "or @FILE, a hosts file of one host a line" in text, describe(proc)


@pytest.mark.parametrize("front", ["qjamfab", "inv", "fab"])
def test_a_typo_gets_the_nearest_task_name(front):
    proc = cli(front, "statsu")
    assert proc.returncode == 1, describe(proc)
    first = proc.stderr.splitlines()[0]
    assert first.startswith("no task named 'statsu': did you mean 'status'? ("), first
    assert "--list' lists them" in first, first


def test_a_typo_in_an_option_or_help_gets_the_nearest_name():
    proc = cli("qjamfab", "status", "--hsots=local")
    assert proc.stderr.splitlines()[0] == (
        "no option named '--hsots': did you mean '--hosts'? "
        "('qjamfab --help status' lists its options)"
    ), describe(proc)
    proc = cli("qjamfab", "--help", "stauts")
    assert proc.stderr.startswith("no task named 'stauts': did you mean 'status'?"), (
        describe(proc)
    )
    proc = cli("qjamfab", "xyzzy")
    assert proc.stderr.splitlines()[0] == (
        "no task named 'xyzzy': ('qjamfab --list' lists them)"
    ), describe(proc)


def test_fab_without_hosts_flag():
    proc = cli("fab", "bootstrap", "--hosts=local")
    assert proc.returncode == 0, describe(proc)
    row = one_table(proc)["local"]
    assert (row["runtime"], row["status"]) == ("uploaded", "ok"), describe(proc)


def table_lines(text: str) -> list[str]:
    """The lines of the table in text: its header to its last row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("host "))
    end = next(
        (
            i
            for i in range(start, len(lines))
            if not lines[i].strip() or lines[i].startswith("(")
        ),
        len(lines),
    )
    return lines[start:end]


def test_every_task_table_fits_80_columns(tmp_path, qjamfab_home):
    """Each lifecycle table, with a host whose long error fills the status
    column, fits 80 columns when piped; the full error follows the table."""
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.9", 0))
        port = s.getsockname()[1]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host downhost\n    HostName 127.0.0.9\n    Port {port}\n")
    args = ("--hosts=local,downhost", f"--ssh-config={config}")
    try:
        for task in (
            ["bootstrap"],
            ["start-workers", "--workers-per-host=1"],
            ["status"],
            ["clear-cache"],
            ["stop-workers"],
        ):
            if task == ["status"]:  # an old runtime beside this one
                (qjamfab_home / "runtime" / "0123456789abcdef").mkdir()
            proc = cli("inv", *task, *args)
            assert proc.returncode == 1, describe(proc)
            lines = table_lines(proc.stdout)
            assert len(lines) == 4 and max(map(len, lines)) <= 80, describe(proc)
            status = one_table(proc)["downhost"]["status"]
            assert status.startswith("conn") and status.endswith("..."), describe(proc)
            assert (
                f"    downhost: connection refused by 127.0.0.9:{port}" in proc.stdout
            ), describe(proc)
            if task == ["status"]:
                assert (
                    one_table(proc)["local"]["runtime"]
                    == runtime.bundle_hash()[:8] + "* +1"
                ), describe(proc)
    finally:
        cli("inv", "stop-workers", "--hosts=local")


# --- errors read as one line ---------------------------------------------------

QJAMFAB_ERROR_SCRIPT = """
from qjamfab import HostUnreachable

def connect():
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except OSError:
        raise HostUnreachable("a: connection refused by 10.0.0.1:22: start "
                              "sshd on a, or check its address", "a")

connect()
"""

FIRST = (
    "HostUnreachable: a: connection refused by 10.0.0.1:22: start sshd "
    "on a, or check its address"
)


def test_run_script_qjamfab_error_is_its_message_alone(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(QJAMFAB_ERROR_SCRIPT)
    proc = cli("inv", "run", str(script))
    assert proc.returncode == 1, describe(proc)
    assert proc.stderr.splitlines() == [FIRST], describe(proc)
    # --verbose: Python's traceback, as `python fails.py` prints it
    proc = cli("inv", "run", str(script), "--verbose")
    assert proc.returncode == 1, describe(proc)
    lines = proc.stderr.splitlines()
    assert "Traceback (most recent call last):" in lines, describe(proc)
    assert "ConnectionRefusedError: [Errno 111] Connection refused" in lines
    assert lines[-1] == "qjamfab.errors." + FIRST, describe(proc)
    assert f'  File "{script}", line 11, in <module>' in lines, describe(proc)
    assert '"<string>"' not in proc.stderr and "runpy" not in proc.stderr, describe(
        proc
    )


def test_run_script_other_errors_keep_their_traceback(tmp_path):
    script = tmp_path / "bug.py"
    script.write_text("import sys\nprint(sys.argv[1:])\nraise ValueError('a bug')\n")
    proc = cli("inv", "run", str(script), "--", "x")
    assert proc.returncode == 1, describe(proc)
    assert proc.stdout == "['x']\n", describe(proc)
    assert proc.stderr.splitlines() == [
        "Traceback (most recent call last):",
        f'  File "{script}", line 3, in <module>',
        "    raise ValueError('a bug')",
        "ValueError: a bug",
    ], describe(proc)


def test_run_script_sees_what_python_script_sees(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 42\n")
    script = tmp_path / "main.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        import helper                     # beside the script: sys.path[0]
        class Point:
            pass
        import pickle
        assert pickle.loads(pickle.dumps(Point())).__class__ is Point
        print(__name__, os.path.realpath(__file__) ==
              os.path.realpath(sys.argv[0]), helper.VALUE,
              sys.path[0] == os.path.dirname(os.path.realpath(__file__)))
    """)
    )
    proc = cli("inv", "run", str(script), cwd=ROOT)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout == "__main__ True 42 True\n", describe(proc)


@pytest.mark.timeout(60)
def test_run_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    script = tmp_path / "waits.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(30)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    # its own session: Ctrl-C reaches inv and the script, as in a terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "run", str(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (proc.returncode, out, err) == (130, "", "interrupted\n")


@pytest.fixture
def in_process(monkeypatch):
    """qjamfab.cli.main in this process: (exit status, stderr lines) of a
    command line; the tasks' log handler is removed afterwards."""
    logger = logging.getLogger("qjamfab")
    handlers, level = list(logger.handlers), logger.level

    def call(capsys, *argv: str) -> tuple[int, list[str]]:
        with pytest.raises(SystemExit) as exit_:
            qjamfab_cli.main(["qjamfab", *argv])
        return exit_.value.code, capsys.readouterr().err.splitlines()

    yield call
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_task_qjamfab_error_is_its_message_alone(in_process, monkeypatch, capsys):
    def status(*args, **kwargs):
        try:
            raise OSError("known_hosts is not readable")
        except OSError:  # the chained traceback --verbose must show
            raise HostKeyError(  # noqa: B904
                "host1: its key is not in known_hosts: run "
                "ssh host1 once to check and add it",
                "host1",
            )

    monkeypatch.setattr(cluster, "status", status)
    code, err = in_process(capsys, "status", "--hosts=local")
    assert code == 1
    assert err == [
        "status failed: host1: its key is not in known_hosts: "
        "run ssh host1 once to check and add it"
    ]
    code, err = in_process(capsys, "status", "--hosts=local", "--verbose")
    assert code == 1
    assert "Traceback (most recent call last):" in err
    assert "OSError: known_hosts is not readable" in err
    assert err[-1].startswith("status failed: host1: its key is not in")


def test_task_ctrl_c_prints_one_line_and_exits_130(in_process, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster, "stop_workers", interrupted)
    assert in_process(capsys, "stop-workers", "--hosts=local") == (130, ["interrupted"])


@pytest.mark.parametrize(
    "args, hint",
    [
        (
            ["run", "examples/sum_matrix.py", "--", "20"],
            "fab run 'examples/sum_matrix.py 20'",
        ),
        (
            [
                "-H",
                "h1,h2",
                "run",
                "--hosts",
                "local",
                "examples/sum_matrix.py",
                "--verbose",
                "--",
                "20",
                "a b",
            ],
            "fab -H h1,h2 run --hosts local 'examples/sum_matrix.py 20 '\"'\"'a "
            "b'\"'\"'' --verbose",
        ),
    ],
)
def test_fab_double_dash_gives_the_quoted_form(args, hint):
    proc = cli("fab", *args)
    assert proc.returncode == 1, describe(proc)
    assert proc.stderr.splitlines() == [
        "fab cannot pass the words after '--' to a task (Fabric runs them as "
        "a shell command): give them with the script in one quoted string: " + hint
    ], describe(proc)
    assert proc.stdout == "", describe(proc)


# --- three SSH hosts -----------------------------------------------------------


@pytest.fixture(scope="module")
def sshd():
    required = os.environ.get("QJAMFAB_REQUIRE_SSHD") == "1"
    if sshd_available() is None:
        reason = (
            "sshd (openssh-server) or ssh-keygen is not installed: the "
            "SSH tests of the tasks need it"
        )
        if required:
            pytest.fail(reason + " (QJAMFAB_REQUIRE_SSHD=1)")
        pytest.skip(reason)
    try:
        hosts = SshdHosts(3)
    except Exception as exc:
        if required:
            raise
        pytest.skip(f"cannot start private sshd servers: {exc}")
    try:
        yield hosts
    finally:
        try:
            cluster.stop_workers(
                parse_hosts(hosts.aliases),
                ssh_config=hosts.ssh_config,
                connect_timeout=5,
            )
        finally:
            hosts.stop()


def ssh_env(sshd) -> dict:
    return {"QJAMFAB_SSH_CONFIG": sshd.ssh_config}


def all_ok(table: dict, column: str, value: str) -> bool:
    return sorted(table) == ["host1", "host2", "host3"] and all(
        row[column] == value and row["status"] == "ok" for row in table.values()
    )


@pytest.mark.timeout(120)
def test_ssh_bootstrap_uploads_once(sshd):
    for home in sshd.homes.values():
        shutil.rmtree(os.path.join(home, "runtime"), ignore_errors=True)
    proc = cli(
        "inv", "bootstrap", f"--hosts={HOSTS}", f"--ssh-config={sshd.ssh_config}"
    )
    assert proc.returncode == 0, describe(proc)
    table = one_table(proc)
    assert all_ok(table, "runtime", "uploaded"), describe(proc)
    assert all(row["numpy"] != "-" for row in table.values()), describe(proc)
    proc = cli("inv", "bootstrap", f"--hosts={HOSTS}", env=ssh_env(sshd))
    assert proc.returncode == 0, describe(proc)
    assert all_ok(one_table(proc), "runtime", "present"), describe(proc)


@pytest.mark.timeout(120)
def test_ssh_start_workers_is_idempotent(sshd):
    args = ("start-workers", f"--hosts={HOSTS}", "--workers-per-host", "2")
    proc = cli("inv", *args, env=ssh_env(sshd))
    assert proc.returncode == 0, describe(proc)
    table = one_table(proc)
    assert all_ok(table, "running", "2"), describe(proc)
    assert all(row["started"] in ("0", "2") for row in table.values())
    proc = cli("inv", *args, env=ssh_env(sshd))
    assert proc.returncode == 0, describe(proc)
    table = one_table(proc)
    assert all_ok(table, "started", "0") and all_ok(table, "running", "2"), describe(
        proc
    )
    proc = cli("inv", "status", f"--hosts={HOSTS}", env=ssh_env(sshd))
    assert proc.returncode == 0, describe(proc)
    assert all_ok(one_table(proc), "workers", "2"), describe(proc)


DETERMINISTIC_JOB = """
import numpy as np
from qjamfab import DataSet, Master

def mapfunc(params, rows):
    return int(rows.sum())

matrix = np.arange(120 * 40).reshape(120, 40)
with Master(workers_per_host=2) as master:
    total = master.run(mapfunc, dataset=DataSet(matrix))
    assert total == int(matrix.sum()), (total, int(matrix.sum()))
    print("workers:", master.last_run.workers)
    print("dataset_bytes_sent:", master.last_run.dataset_bytes_sent)
"""


def bytes_sent(proc) -> int:
    for line in proc.stdout.splitlines():
        if line.startswith("dataset_bytes_sent: "):
            return int(line.split(": ")[1])
    raise AssertionError(describe(proc))


@pytest.mark.timeout(120)
def test_ssh_run_sends_the_dataset_once(sshd, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(DETERMINISTIC_JOB)
    args = ("run", str(script), f"--hosts={HOSTS}", f"--ssh-config={sshd.ssh_config}")
    first = cli("inv", *args)
    assert first.returncode == 0, describe(first)
    assert "workers: 6" in first.stdout, describe(first)
    second = cli("inv", *args)
    assert second.returncode == 0, describe(second)
    assert bytes_sent(second) == 0, describe(second)
    assert bytes_sent(first) > 0, describe(first)
    proc = cli("inv", "status", f"--hosts={HOSTS}", env=ssh_env(sshd))
    assert proc.returncode == 0, describe(proc)
    table = one_table(proc)
    assert all(int(row["entries"]) > 0 for row in table.values()), describe(proc)
    proc = cli(
        "inv",
        "run",
        "examples/sum_matrix.py",
        f"--hosts={HOSTS}",
        "--",
        "50",
        env=ssh_env(sshd),
    )
    check_sum_matrix(proc, 50, 6)


@pytest.mark.timeout(120)
def test_ssh_clear_cache_and_stop_workers(sshd):
    env = ssh_env(sshd)
    cli("inv", "start-workers", f"--hosts={HOSTS}", "--workers-per-host=2", env=env)
    script = ROOT / "examples" / "sum_matrix.py"
    proc = cli("inv", "run", f"{script} 30", f"--hosts={HOSTS}", env=env)
    assert proc.returncode == 0, describe(proc)

    proc = cli("inv", "clear-cache", f"--hosts={HOSTS}", env=env)
    assert proc.returncode == 0, describe(proc)
    table = one_table(proc)
    assert all(
        int(row["entries removed"]) > 0 and row["status"] == "ok"
        for row in table.values()
    ), describe(proc)
    proc = cli("inv", "status", f"--hosts={HOSTS}", env=env)
    assert all_ok(one_table(proc), "entries", "0"), describe(proc)

    running = {host: row["workers"] for host, row in one_table(proc).items()}
    assert all(int(n) >= 2 for n in running.values()), describe(proc)
    proc = cli("inv", "stop-workers", f"--hosts={HOSTS}", env=env)
    assert proc.returncode == 0, describe(proc)
    table = one_table(proc)
    assert {host: row["stopped"] for host, row in table.items()} == running, describe(
        proc
    )
    proc = cli("inv", "status", f"--hosts={HOSTS}", env=env)
    assert proc.returncode == 0, describe(proc)
    assert all_ok(one_table(proc), "workers", "0"), describe(proc)


@pytest.mark.timeout(120)
def test_fab_acts_on_all_hosts_once(sshd):
    proc = cli("fab", "-H", HOSTS, "-S", sshd.ssh_config, "bootstrap")
    assert proc.returncode == 0, describe(proc)
    assert all_ok(one_table(proc), "runtime", "present"), describe(proc)
    proc = cli(
        "fab", "-H", HOSTS, "--ssh-config", sshd.ssh_config, "status", "bootstrap"
    )
    assert proc.returncode == 0, describe(proc)
    status, bootstrap = tables(proc.stdout)  # one table per task
    assert sorted(status) == sorted(bootstrap) == ["host1", "host2", "host3"]
    proc = cli(
        "fab", "-H", "host2", "-S", sshd.ssh_config, "run", "examples/sum_matrix.py 20"
    )
    check_sum_matrix(proc, 20, 2)


@pytest.mark.timeout(120)
def test_qjamfab_program_over_ssh(sshd):
    proc = cli("qjamfab", "status", f"--hosts={HOSTS}", "--ssh-config", sshd.ssh_config)
    assert proc.returncode == 0, describe(proc)
    table = one_table(proc)
    assert sorted(table) == ["host1", "host2", "host3"], describe(proc)
    assert all(row["status"] == "ok" for row in table.values())


@pytest.mark.timeout(120)
def test_down_host_fails_bootstrap_alone(sshd, tmp_path):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.9", 0))
        port = s.getsockname()[1]
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host downhost\n    HostName 127.0.0.9\n    Port {port}\n"
        f"\n{Path(sshd.ssh_config).read_text()}"
    )
    proc = cli(
        "inv", "bootstrap", "--hosts=host1,downhost,host3", f"--ssh-config={config}"
    )
    assert proc.returncode == 1, describe(proc)
    table = one_table(proc)
    assert table["host1"]["status"] == table["host3"]["status"] == "ok", describe(proc)
    # the first line, cut to fit 80 columns
    status = table["downhost"]["status"]
    assert status.endswith("...") and len(status) > 10, describe(proc)
    assert f"connection refused by 127.0.0.9:{port}: is sshd running".startswith(
        status[:-3]
    ), describe(proc)
    # the full reason below the table; the summary on stderr
    assert "\ndownhost failed:\n    downhost: connection refused" in proc.stdout, (
        describe(proc)
    )
    assert "bootstrap: 1 of 3 hosts failed: downhost" in proc.stderr, describe(proc)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("front", ["fab", "qjamfab"])
def test_every_lifecycle_task_through_fab_and_qjamfab(sshd, front):
    """bootstrap, start-workers, status, clear-cache, stop-workers on 3 hosts
    through `fab -H` and through the installed `qjamfab` program."""

    def task(*args):
        if front == "fab":
            proc = cli("fab", "-H", HOSTS, "-S", sshd.ssh_config, *args)
        else:
            proc = cli(
                "qjamfab", *args, f"--hosts={HOSTS}", "--ssh-config", sshd.ssh_config
            )
        assert proc.returncode == 0, describe(proc)
        table = one_table(proc)
        assert sorted(table) == ["host1", "host2", "host3"], describe(proc)
        assert all(row["status"] == "ok" for row in table.values()), describe(proc)
        return table

    task("stop-workers")
    assert all_ok(task("bootstrap"), "runtime", "present")
    assert all_ok(task("start-workers", "--workers-per-host=1"), "running", "1")
    assert all_ok(task("status"), "workers", "1")
    task("clear-cache")
    assert all_ok(task("status"), "entries", "0")
    assert all_ok(task("stop-workers"), "stopped", "1")
    assert all_ok(task("status"), "workers", "0")
