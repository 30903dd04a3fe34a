"""qjamfab.display, tables, text and logs: the run progress bar, the HTML reprs,
the task tables and the per-host progress, rendered to consoles the tests
capture; the text helpers and the log handler."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from qjamfab import text
from qjamfab.core.runstats import RunStats
from qjamfab.display import (
    RunProgress,
    StatusLine,
    logs,
    master_html,
    runstats_html,
    tables,
)
from qjamfab.display.tables import (
    HostProgress,
    print_failure,
    print_table,
    render_table,
)
from qjamfab.engines.cluster import HostResult
from qjamfab.hostspec import HostSpec

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

pytestmark = pytest.mark.timeout(60)


def terminal(width: int = 100) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(
        file=out, force_terminal=True, width=width, color_system="standard"
    ), out


def plain(text: str) -> str:
    return ANSI.sub("", text)


def progress_threads() -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name == "qjamfab-progress" and t.is_alive()
    ]


# --- StatusLine ----------------------------------------------------------------


def test_a_status_line_shows_updates_and_clears_its_text():
    console, out = terminal()
    line = StatusLine(True, console=console)
    for reason in ("Priority", "Resources"):
        assert line.show(f"Slurm job 7 pending: {reason}") and line.shown
        deadline = time.monotonic() + 10  # drawn by rich's refresh thread
        while f"pending: {reason}" not in plain(out.getvalue()):
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.02)
    line.close()
    assert not line.shown
    assert out.getvalue().rstrip().endswith("\x1b[2K")  # the line erased
    assert not line.show("again")  # closed: the caller logs instead


def test_no_status_line_off_a_terminal_or_when_off():
    console = Console(file=io.StringIO(), force_terminal=False)
    assert not StatusLine(console=console).show("waiting")
    assert not StatusLine(False).show("waiting")
    assert not StatusLine().show("waiting")  # pytest's stdout: no terminal


# --- RunProgress ---------------------------------------------------------------


def test_no_bar_costs_no_rich_import_and_prints_nothing():
    """Disabled, not a terminal (auto) or shorter than the delay: nothing
    shown, and rich is never imported (checked in a fresh interpreter)."""
    code = textwrap.dedent("""
        import sys, time
        from qjamfab.display import RunProgress
        for enabled in (None, False):       # stdout is a pipe here
            p = RunProgress(100, enabled=enabled, delay_s=0)
            for _ in range(100):
                p.advance()
            time.sleep(0.05)
            assert not p.shown
            p.close()
        p = RunProgress(10, enabled=True, delay_s=30)   # a short run
        p.advance(3)
        p.close()
        assert not p.shown
        rich = sorted(m for m in sys.modules if m.split(".")[0] == "rich")
        assert not rich, rich
        print("ok")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n" and proc.stderr == "", (proc.stdout, proc.stderr)


def test_auto_follows_the_console_being_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=False)
    p = RunProgress(4, delay_s=0, console=console)
    p.advance(4)
    p.close()
    assert not p.shown and console.file.getvalue() == ""

    console, out = terminal()
    p = RunProgress(4, delay_s=0, console=console)
    assert p.shown
    p.close()
    assert "0/4 slices" in plain(out.getvalue())


def test_forced_bar_renders_progress_and_is_transient():
    console, out = terminal()
    with RunProgress(4, enabled=True, delay_s=0, console=console) as p:
        assert p.shown
        for _ in range(4):
            p.advance()
    assert not p.shown
    text = plain(out.getvalue())
    assert "qjamfab run" in text and "4/4 slices" in text, text
    # transient: the last thing written erases the bar's line(s)
    assert out.getvalue().rstrip("\n").endswith("\x1b[2K"), repr(out.getvalue()[-40:])
    p.advance()  # after close: counts, draws nothing
    p.close()  # twice is fine
    assert p.done == 5


def test_shorter_than_the_delay_shows_nothing():
    console, out = terminal()
    p = RunProgress(10, enabled=True, delay_s=5, console=console)
    p.advance(10)
    p.close()
    time.sleep(0.1)
    assert not p.shown and out.getvalue() == ""
    assert not progress_threads()


def test_bar_appears_after_the_delay_without_any_slice_done():
    console, out = terminal()
    p = RunProgress(3, enabled=True, delay_s=0.2, console=console)
    assert not p.shown
    deadline = time.monotonic() + 5
    while not p.shown and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.shown
    p.advance(3)
    p.close()
    assert "3/3 slices" in plain(out.getvalue())
    assert not progress_threads()


def test_the_line_shows_its_description_and_a_new_one():
    console, out = terminal()
    p = RunProgress(
        0,
        enabled=True,
        delay_s=0,
        console=console,
        unit="iterations",
        description="minimize",
    )
    assert p.shown
    p.describe("minimize: loss 0.125")
    p.advance(3)
    p.close()
    text = plain(out.getvalue())
    assert "minimize: loss 0.125" in text and "3/? iterations" in text, text


def test_unknown_total_counts():
    console, out = terminal()
    p = RunProgress(0, enabled=True, delay_s=0, console=console, unit="tasks")
    p.advance(2)
    p.close()
    assert "2/? tasks" in plain(out.getvalue()), plain(out.getvalue())


# --- HTML ----------------------------------------------------------------------


def stats(**kw) -> RunStats:
    values = dict(
        elapsed_s=0.0123,
        workers=2,
        slices=8,
        slices_sent=3,
        slices_cached=5,
        bytes_sent=2048,
        bytes_received=1536,
        dataset_bytes_sent=3 * 1024 * 1024,
        worker_compute_s={"local-0": 0.25, "local-1": 0.5},
    )
    values.update(kw)
    return RunStats(**values)


def test_runstats_html_values():
    text = runstats_html(stats())
    assert text.startswith("<div") and text.endswith("</div>")
    for part in (
        "RunStats",
        "12.3ms",
        ">2<",
        "8 (5 cached on the workers, 3 sent)",
        "3.0 MiB",
        "2.0 KiB",
        "1.5 KiB",
        "local-0: 0.250 s",
        "local-1: 0.500 s",
    ):
        assert part in text, (part, text)
    assert "lost" not in text  # only when a worker was lost
    text = runstats_html(stats(lost_workers=["local-1"], rerun_slices=2, slices=0))
    assert "lost workers" in text and "local-1" in text
    assert 're-run slices</th><td style="text-align:left">2<' in text
    assert "none (no dataset" in text
    text = runstats_html(stats(backup_tasks=3, replica_bytes_sent=4096))
    assert 'backup tasks</th><td style="text-align:left">3<' in text
    assert "4.0 KiB" in text


def test_html_is_escaped():
    evil = "<script>alert('x')</script>"
    text = runstats_html(stats(worker_compute_s={evil: 1.0}, lost_workers=[evil]))
    assert "<script>" not in text and "&lt;script&gt;" in text
    master = SimpleNamespace(
        hosts=[HostSpec("a&b<c>", "ssh")], workers=[evil], last_run=None
    )
    text = master_html(master)
    assert "<script>" not in text and "a&amp;b&lt;c&gt;" in text


class FakeMaster:
    def __init__(self, last_run=None):
        self.hosts = [
            HostSpec("local:2", "local", 2),
            HostSpec("user@host1:2222", "ssh"),
        ]
        self.workers = ["local-0", "local-1", "user@host1:2222-0"]
        self.last_run = last_run

    def worker_stats(self):  # the repr must not talk to the workers
        raise AssertionError("master_html called worker_stats()")


def test_master_html_shows_hosts_workers_and_last_run():
    text = master_html(FakeMaster())
    for part in (
        "qjamfab Master",
        "2 hosts, 3 workers",
        "local:2",
        "user@host1:2222",
        "local-0, local-1, user@host1:2222-0",
        "none yet",
    ):
        assert part in text, (part, text)
    text = master_html(FakeMaster(stats()))
    assert "none yet" not in text
    assert "12.3ms" in text and "8 (5 cached on the workers" in text
    closed = FakeMaster()
    closed.closed = True
    assert "(closed)" in master_html(closed)


# --- tables --------------------------------------------------------------------


def test_render_table_plain_layout():
    text = render_table(
        ["host", "n", "status"], [["a", 1, "ok"], ["[red]b[/red]", 22, "x" * 40]], "lrl"
    )
    assert text.splitlines() == [
        "host           n  status",
        "------------  --  --------------------",
        "a              1  ok",
        "[red]b[/red]  22  " + "x" * 40,  # text, never markup
    ]


def test_print_table_plain_when_not_a_terminal():
    out = io.StringIO()
    print_table(
        ["host", "status"], [["a", "ok"], ["b", "down"]], failed=[1], stream=out
    )
    assert out.getvalue() == "host  status\n----  ------\na     ok\nb     down\n"
    out = io.StringIO()
    print_failure("b", "b: down: start it\ndetail\n", stream=out)
    assert out.getvalue() == "\nb failed:\n    b: down: start it\n    detail\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ERROR = (
    "connection refused by 127.0.0.9:22: is sshd running there, and is the port right?"
)
STATUS_ROWS = [
    ["local", 2, "2h03m", 94, "164.0 MiB", "d9bfff6e* +1", "ok"],
    ["host2", None, None, None, None, None, ERROR],
]
STATUS_HEADERS = ["host", "workers", "uptime", "entries", "cache", "runtime", "status"]


def test_print_table_fits_80_columns_cutting_the_status(monkeypatch):
    out = io.StringIO()
    print_table(STATUS_HEADERS, STATUS_ROWS, "lrrrrll", failed=[1], stream=out)
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) == 80, lines
    assert lines[3].endswith("  -             connection refused ...")
    # in a terminal of 80 columns: the same cut, in colour
    monkeypatch.setenv("COLUMNS", "80")
    out = Terminal()
    print_table(STATUS_HEADERS, STATUS_ROWS, "lrrrrll", failed=[1], stream=out)
    assert "\x1b[31mconnection refused" in out.getvalue()
    lines = plain(out.getvalue()).splitlines()
    assert len(lines) == 4 and max(map(len, lines)) == 80, lines
    assert lines[3].endswith("  -             connection refused ...")
    # a wider terminal shows more of it
    monkeypatch.setenv("COLUMNS", "160")
    out = Terminal()
    print_table(STATUS_HEADERS, STATUS_ROWS, "lrrrrll", stream=out)
    assert plain(out.getvalue()).splitlines()[3].endswith(ERROR)


def test_print_table_never_cuts_the_other_columns():
    host = "user@a-very-long-host-name.example.org:2222"
    out = io.StringIO()
    print_table(
        ["host", "python", "status"], [[host, "3.11.7", ERROR]], stream=out, width=60
    )
    row = out.getvalue().splitlines()[2]
    assert row == f"{host}  3.11.7  connect...", row  # 10 at least


STATUS8_HEADERS = [
    "host", "workers", "uptime", "entries", "cache", "limit", "runtime", "status"
]  # fmt: skip
STATUS8_ROWS = [
    ["local", 2, "2h03m", 94, "164.0 MiB", "20G", "d9bfff6e* +1", "ok"],
    ["host2", None, None, None, None, None, None, ERROR],
]
STATUS8_OPTIONAL = ("uptime", "entries", "runtime", "limit")


@pytest.mark.parametrize("width", [60, 64, 70, 76])
def test_a_status_table_fits_any_terminal_of_60_columns_or_more(monkeypatch, width):
    """Too narrow for every column: the optional ones go, in their order,
    and a line says which; the status is cut to what is left."""
    monkeypatch.setenv("COLUMNS", str(width))
    out = Terminal()
    print_table(
        STATUS8_HEADERS,
        STATUS8_ROWS,
        "lrrrrrll",
        failed=[1],
        stream=out,
        optional=STATUS8_OPTIONAL,
    )
    lines = plain(out.getvalue()).splitlines()
    assert max(map(len, lines)) <= width, lines
    assert lines[0].startswith("host") and "status" in lines[0], lines
    assert lines[2].split()[:2] == ["local", "2"], lines
    assert lines[3].startswith("host2") and "connecti" in lines[3], lines
    hidden = [h for h in STATUS8_OPTIONAL if h not in lines[0].split()]
    assert hidden == list(STATUS8_OPTIONAL[: len(hidden)]), lines
    if hidden:
        assert lines[4] == f"(left out to fit: {', '.join(hidden)})", lines
    else:
        assert len(lines) == 4, lines


def test_a_table_that_fits_keeps_every_column():
    out = io.StringIO()
    print_table(
        STATUS8_HEADERS, STATUS8_ROWS[:1], stream=out, optional=STATUS8_OPTIONAL
    )
    assert out.getvalue().splitlines()[0].split() == STATUS8_HEADERS


def test_colour_table_in_a_terminal():
    console, out = terminal()
    console.print(
        tables.hosts_table(
            ["host", "status"], [["a", "ok"], ["b", "down"]], color=True, failed=[1]
        )
    )
    raw = out.getvalue()
    assert "\x1b[32mok" in raw and "\x1b[31mdown" in raw, repr(raw)
    assert plain(raw).splitlines()[1].startswith("────")


# --- per-host progress ---------------------------------------------------------


def test_host_progress_shows_each_host_then_goes():
    console, out = terminal(120)
    with HostProgress("bootstrap", ["h1", "h2"], console=console) as shown:
        shown.done(HostResult("h1", True, 0.1, {}))
        shown.done(
            HostResult(
                "h2",
                False,
                0.2,
                error="h2: connection refused: start sshd\nmore detail",
            )
        )
        shown.done(HostResult("h3", True, 0.1, {}))  # unknown: ignored
        time.sleep(0.3)  # a refresh or two
    text = plain(out.getvalue())
    assert "h1" in text and "done" in text
    # the first line of the error, without the host the line names already
    assert "h2: connection refused" not in text
    assert "connection refused: start sshd" in text
    assert "more detail" not in text
    assert out.getvalue().rstrip("\n").endswith("\x1b[2K")  # transient


def test_host_progress_is_a_no_op_off_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with HostProgress("stop-workers", ["h1"], console=console) as shown:
        assert not shown.enabled
        shown.done(HostResult("h1", True, 0.1, {}))
    assert out.getvalue() == ""


# --- the text helpers -------------------------------------------------------------


def test_format_bytes():
    assert [
        text.format_bytes(n)
        for n in (None, 0, 100, 1023, 1536, 3 * 1024**2, 1024**5 * 2)
    ] == ["-", "0 B", "100 B", "1023 B", "1.5 KiB", "3.0 MiB", "2048.0 TiB"]


def test_format_duration():
    assert [
        text.format_duration(s)
        for s in (
            None,
            0.0123,
            0.9994,
            1.234,
            42.04,
            125,
            3 * 3600 + 150,
            2 * 86400 + 3 * 3600 + 59,
        )
    ] == ["-", "12.3ms", "999.4ms", "1.23s", "42.0s", "2m05s", "3h02m", "2d03h"]


def test_plural():
    assert text.plural(1, "worker") == "1 worker"
    assert text.plural(0, "host") == "0 hosts"
    assert text.plural(2, "slice") == "2 slices"
    assert text.plural(1, "entry", "entries") == "1 entry"
    assert text.plural(3, "entry", "entries") == "3 entries"


def test_first_line():
    error = "\n  h2: connection refused by 127.0.0.9:22: start sshd  \ndetail"
    assert (
        text.first_line(error) == "h2: connection refused by 127.0.0.9:22: start sshd"
    )
    assert (
        text.first_line(error, "h2") == "connection refused by 127.0.0.9:22: start sshd"
    )
    assert text.first_line(error, "h2", 20) == "connection refuse..."
    assert len(text.first_line(error, "h2", 20)) == 20
    assert text.first_line(ValueError("bad\nworse")) == "bad"
    assert text.first_line("") == text.first_line("\n \n") == "failed"


def test_stderr_tail_section_only_when_there_is_one():
    assert text.stderr_tail("a-0", "") == ""
    assert text.stderr_tail("a-0", " \n\n") == ""
    assert (
        text.stderr_tail("a-0", "boom\nKilled\n")
        == "\n--- stderr tail of a-0 ---\nboom\nKilled"
    )


@pytest.fixture
def qjamfab_logger():
    logger = logging.getLogger("qjamfab")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_log_to_stderr_once_per_marker(qjamfab_logger, capsys):
    logs.log_to_stderr("info", "env")
    logs.log_to_stderr(logging.DEBUG, "env")  # replaces, not adds
    qjamfab_logger.debug("one line")
    assert capsys.readouterr().err == "qjamfab: DEBUG: one line\n"
    logs.log_to_stderr("INFO", "cli")  # another marker: added
    qjamfab_logger.info("twice")
    assert capsys.readouterr().err == "qjamfab: INFO: twice\n" * 2
    qjamfab_logger.debug("not at INFO")
    assert capsys.readouterr().err == ""


def test_log_to_stderr_unknown_level_says_so(qjamfab_logger, capsys):
    logs.log_to_stderr("LOUD", "env")
    assert qjamfab_logger.level == logging.INFO
    assert capsys.readouterr().err.splitlines() == [
        "qjamfab: WARNING: log level 'LOUD' is not a level name: using INFO "
        "(give DEBUG, INFO, WARNING or ERROR)"
    ]


# --- hosts from the command line that a script overrides ----------------------------


@pytest.mark.parametrize(
    "from_cli, given, hosts, warned",
    [
        ("1", "a,b", "local:2", "a,b"),
        ("1", "a, b", ["local:2", "c"], "a,b"),
        ("1", "a,b", None, None),  # Master(): it uses them
        ("1", "a,b", " a,b", None),  # the same hosts
        ("1", "a,b", ["a", "b"], None),
        ("", "a,b", "local:2", None),  # not from inv run --hosts
    ],
)
def test_warn_if_cli_hosts_ignored(monkeypatch, caplog, from_cli, given, hosts, warned):
    monkeypatch.setenv("QJAMFAB_HOSTS_FROM_CLI", from_cli)
    monkeypatch.setenv("QJAMFAB_HOSTS", given)
    with caplog.at_level(logging.WARNING, logger="qjamfab"):
        logs.warn_if_cli_hosts_ignored(hosts)
    named = hosts if isinstance(hosts, str) else ",".join(hosts or [])
    expected = (
        []
        if warned is None
        else [
            f"run --hosts={warned} is ignored: the script names its own hosts "
            f"({named}); remove them from the script (Master() then uses "
            f"--hosts)"
        ]
    )
    assert [r.getMessage() for r in caplog.records] == expected


def test_compact_bytes_for_narrow_columns():
    from qjamfab.text import format_bytes

    assert [
        format_bytes(n, compact=True) for n in (100, 1536, 500 << 20, 63 << 30)
    ] == ["100B", "1.5K", "500M", "63G"]


@pytest.mark.parametrize(
    "fs, shown",
    [
        ("nfs4", "nfs4"),
        ("fuse.sshfs", "fuse.sshfs"),
        ("ext4", "local"),
        (None, "local"),  # no mount table
    ],
)
def test_status_says_whether_a_hosts_home_is_shared(fs, shown):
    assert tables.home_kind(fs) == shown
