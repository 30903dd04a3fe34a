"""Rendering for terminals and notebooks: progress, tables, HTML reprs.

This module owns everything qjamfab shows a person, apart from the wording
of errors and logs (their modules write it, with the helpers below):

- `RunProgress`: the progress bar of one `Master.run` (slices done). It shows
  up only in a terminal (or when forced) and only once the run has lasted
  `delay_s`, and it is transient, so an iterative loop of short runs prints
  nothing and a long run leaves nothing behind. While no bar is shown it
  costs an integer add per `advance()`, and rich is not even imported.
- `master_html`, `runstats_html`: the HTML that Jupyter shows for a `Master`
  and a `RunStats` (their ``_repr_html_``). Everything is escaped.
- `hosts_table`, `render_table`, `print_table`: the one-row-per-host tables
  of the Invoke tasks, drawn with rich: coloured in a terminal, plain text
  (a header, a rule of dashes, one line per row) anywhere else, so a pipe or
  a log gets something ``grep`` and ``cut`` can read.
- `HostProgress`: one line per host while a lifecycle step runs on many
  hosts at once (a spinner, then the host's outcome); nothing when output is
  not a terminal, where only the final table is printed.
- The text helpers every module formats with, so a size or a duration reads
  the same in a table, a repr and a log line: `format_bytes`,
  `format_duration`, `plural`, `first_line` (an error's summary),
  `stderr_tail` (the section an error ends with), and `log_to_stderr` (the
  one handler setup for the "qjamfab" logger).
- `script_excepthook`: how an error that ends a script run by ``inv run``
  reads (a QjamfabError as one line); `warn_if_cli_hosts_ignored`: the
  warning a Master gives when ``inv run --hosts`` lost to the script's own.

rich is imported only by the functions that draw with it.
"""

from __future__ import annotations

import dataclasses
import html
import io
import linecache
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

from .errors import QjamfabError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from rich.box import Box
    from rich.console import Console, RenderableType
    from rich.progress import Progress, Task, TaskID
    from rich.table import Table
    from rich.text import Text


__all__ = [
    "RunProgress",
    "master_html",
    "runstats_html",
    "format_bytes",
    "format_duration",
    "plural",
    "first_line",
    "stderr_tail",
    "log_to_stderr",
    "script_excepthook",
    "warn_if_cli_hosts_ignored",
    "hosts_table",
    "render_table",
    "print_table",
    "print_failure",
    "HostProgress",
    "StderrHandler",
    "is_terminal",
]


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: sys.stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a file
        return False


def format_bytes(n: float | None, compact: bool = False) -> str:
    """1536 -> "1.5 KiB", 100 -> "100 B"; None -> "-". `compact` for a
    narrow column: "1.5K", "63G", "100B"."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if compact:
                return f"{value:.3g}{unit[0]}"
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """Three significant digits under a minute, then two units, compact so a
    table column stays narrow: "12.3ms", "1.23s", "42.0s", "2m05s", "3h02m",
    "2d03h"; None -> "-"."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    whole = int(s)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def home_kind(fs: str | None) -> str:
    """How a host's base directory is set up, from its filesystem's type:
    that type ("nfs4") when other machines may mount it (a shared home: the
    slice cache is shared, sockets and pid files stay on the host), else
    "local"."""
    from .runtime import NETWORK_FS

    return fs if fs in NETWORK_FS else "local"


def plural(n: int, word: str, words: str | None = None) -> str:
    """plural(1, "worker") -> "1 worker", plural(2, "worker") -> "2 workers";
    `words` for an irregular plural: plural(3, "entry", "entries")."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def first_line(
    text: str | BaseException, host: str = "", limit: int | None = None
) -> str:
    """The line that sums up an error: its first non-blank line, stripped,
    without a leading "HOST: " when `host` is given (where the host is named
    already), cut to `limit` characters with "..."; "failed" when empty."""
    lines = [line for line in str(text or "").splitlines() if line.strip()]
    line = lines[0].strip() if lines else "failed"
    if host and line.startswith(host + ": "):
        line = line[len(host) + 2 :]
    if limit is not None and len(line) > limit:
        line = line[: max(limit - 3, 0)] + "..."
    return line


def stderr_tail(worker: str, tail: str) -> str:
    """The section an error about a lost worker ends with, "" when the worker
    wrote nothing (an empty section only makes the reader look for it)."""
    tail = (tail or "").strip("\n")
    if not tail.strip():
        return ""
    return f"\n--- stderr tail of {worker} ---\n{tail}"


def log_to_stderr(level: int | str, marker: str = "qjamfab") -> None:
    """Print the "qjamfab" logger's records of `level` and up to stderr.

    `level` is a number or a name ("INFO", "debug"); an unknown name means
    INFO, with a warning naming it. The handler is tagged with `marker`: a
    second call with the same marker replaces that handler (and sets the
    level again) instead of printing every line twice, while handlers with
    other markers (the tasks' and $QJAMFAB_LOG_LEVEL's) are left alone.
    """
    logger = logging.getLogger("qjamfab")
    bad = None
    if isinstance(level, str):
        name = level.strip().upper()
        number = logging.getLevelName(name)  # a number for known names
        if not isinstance(number, int):
            bad, number = level, logging.INFO
        level = number
    for handler in list(logger.handlers):
        if getattr(handler, "_qjamfab_marker", None) == marker:
            logger.removeHandler(handler)
    handler = StderrHandler()
    handler._qjamfab_marker = marker  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    if bad is not None:
        logger.warning(
            "log level %r is not a level name: using INFO (give "
            "DEBUG, INFO, WARNING or ERROR)",
            bad,
        )


ExceptHook = Callable[[type, BaseException, "TracebackType | None"], None]


def script_excepthook(verbose: bool = False) -> ExceptHook:
    """A sys.excepthook for the script that ``inv run`` runs (through runpy,
    in a ``python -c`` that installs this hook first).

    A QjamfabError that ends the script prints "TYPE: MESSAGE", and
    KeyboardInterrupt nothing (the task says "interrupted"); anything else,
    and everything with `verbose`, its traceback as Python prints it,
    without the frames of the runner and runpy, so it reads as if the script
    had been run directly.
    """

    def hook(kind: type, exc: BaseException, tb: TracebackType | None) -> None:
        if not verbose and issubclass(kind, QjamfabError):
            sys.stderr.write(f"{kind.__name__}: {exc}\n")
        elif verbose or not issubclass(kind, KeyboardInterrupt):
            while tb is not None and (
                tb.tb_frame.f_code.co_filename == "<string>"
                or tb.tb_frame.f_globals.get("__name__") == "runpy"
            ):
                tb = tb.tb_next
            # Python prints the traceback the exception holds, not `tb`.
            sys.__excepthook__(kind, exc.with_traceback(tb), tb)

    return hook


def warn_if_cli_hosts_ignored(hosts: None | str | Sequence[str]) -> None:
    """Called by the Master with the hosts it was given: warn when they
    override hosts given on the command line.

    ``inv run --hosts=a,b`` (or fab's -H) hands its hosts to the script as
    $QJAMFAB_HOSTS, with $QJAMFAB_HOSTS_FROM_CLI=1; only ``Master()`` reads
    them, so a script that names its own (``Master("local:2")``) would
    silently run elsewhere than the user asked.
    """
    if hosts is None or os.environ.get("QJAMFAB_HOSTS_FROM_CLI") != "1":
        return
    named = [
        str(h).strip() for h in (hosts.split(",") if isinstance(hosts, str) else hosts)
    ]
    given = [h.strip() for h in os.environ.get("QJAMFAB_HOSTS", "").split(",")]
    if named != given:
        logging.getLogger("qjamfab").warning(
            "run --hosts=%s is ignored: the script names its own hosts (%s); "
            "remove them from the script (Master() then uses --hosts)",
            ",".join(given),
            ",".join(named),
        )


# --- the progress bar of a run ------------------------------------------------


class HostOutcome(Protocol):
    """What the lifecycle progress shows of a host's step (cluster.py's
    HostResult): named here so rendering imports nothing above it."""

    host: str
    ok: bool
    error: str


class _Bar(Protocol):
    """What RunProgress uses of its bar: a rich Progress or a _JupyterBar.
    (`task_id` is what Progress.add_task gave, None for a _JupyterBar.)"""

    def update(
        self, task_id: Any, /, *, completed: int, description: str | None = None
    ) -> None: ...

    def stop(self) -> None: ...


class RunProgress:
    """A transient progress bar of the slices (or tasks) a run has done.

    ``enabled=None`` shows a bar only when sys.stdout is a terminal;
    ``True`` always (to `console` if given; in a Jupyter kernel as an HTML
    <progress> updated in place; else rich on sys.stdout); ``False`` never. A
    bar appears once the run has lasted `delay_s` (a timer thread starts it,
    so it appears even while no slice completes) and disappears on
    `close()`. `total` 0 means unknown: the bar then only counts.
    ``advance(0)`` is allowed and does nothing visible. `description`
    heads the line; `describe()` changes it (minimize shows its loss).

    Use it as a context manager, or call `close()` in a ``finally``.
    """

    __slots__ = (
        "total",
        "done",
        "unit",
        "_bar",
        "_task",
        "_timer",
        "_lock",
        "_closed",
        "_console",
        "_started",
        "description",
    )

    def __init__(
        self,
        total: int,
        enabled: bool | None = None,
        delay_s: float = 1.0,
        *,
        console: Console | None = None,
        unit: str = "slices",
        description: str = "qjamfab run",
    ):
        self.total = max(0, int(total or 0))
        self.done = 0
        self.unit = unit
        self.description = description
        self._bar: _Bar | None = None  # the rich Progress, once shown
        self._task: TaskID | None = None
        self._timer: threading.Timer | None = None
        self._lock: threading.Lock | None = None
        self._closed = False
        self._console = console
        if enabled is None:
            enabled = console.is_terminal if console is not None else is_terminal()
        if not enabled:
            return
        self._started = time.monotonic()
        self._lock = threading.Lock()
        if delay_s <= 0:
            self._show()
        else:
            self._timer = threading.Timer(delay_s, self._show)
            self._timer.daemon = True
            self._timer.name = "qjamfab-progress"
            self._timer.start()

    @property
    def shown(self) -> bool:
        """Whether a bar is on screen now."""
        return self._bar is not None

    def advance(self, n: int = 1) -> None:
        """Count n more done (the hot path: an add and a read when hidden)."""
        self.done += n
        bar = self._bar
        if bar is not None:
            bar.update(self._task, completed=self._completed())

    def describe(self, text: str) -> None:
        """Head the line with `text` from now on."""
        self.description = text
        bar = self._bar
        if bar is not None:
            bar.update(self._task, completed=self._completed(), description=text)

    def _completed(self) -> int:
        return min(self.done, self.total) if self.total else self.done

    def _show(self) -> None:
        if self._lock is None:  # disabled: never shown
            return
        with self._lock:
            if self._closed or self._bar is not None:
                return
            bar: _Bar
            try:
                if self._console is None and _in_jupyter():
                    bar = _JupyterBar(
                        self.total,
                        self._completed(),
                        self.unit,
                        self._started,
                        self.description,
                    )
                else:
                    progress = _new_progress_bar(self._console, self.unit)
                    self._task = progress.add_task(
                        self.description,
                        total=self.total or None,
                        completed=self._completed(),
                        run_started=self._started,
                    )
                    progress.start()
                    bar = progress
            except Exception:  # a display problem never fails a run
                return
            self._bar = bar

    def close(self) -> None:
        """Remove the bar (if shown); later calls do nothing."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._lock is None:
            self._closed = True
            return
        with self._lock:
            self._closed = True
            bar, self._bar = self._bar, None
        if bar is not None:
            try:
                bar.update(self._task, completed=self._completed())
                bar.stop()
            except Exception:  # pragma: no cover - a broken terminal
                pass

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_jupyter() -> bool:
    """Whether this is a Jupyter kernel (IPython with a kernel attached)."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # pragma: no cover - an odd IPython
        return False
    return getattr(shell, "kernel", None) is not None


class _JupyterBar:
    """A progress bar as an HTML <progress> element in the cell's output,
    updated in place (a display id) at most five times a second and blanked
    on stop; needs no ipywidgets. Quacks like the rich Progress that
    RunProgress uses: update(task, completed=...), stop()."""

    def __init__(
        self,
        total: int,
        completed: int,
        unit: str,
        started: float,
        description: str = "qjamfab run",
    ):
        from IPython.display import HTML, display

        self._html, self._time = HTML, time.monotonic
        self.total, self.unit, self.description = total, unit, description
        self._started, self._last = started, self._time()
        self._handle = display(self._html(self._render(completed)), display_id=True)

    def _render(self, done: int) -> str:
        secs = self._time() - self._started
        if self.total:
            bar = (
                f'<progress value="{done}" max="{self.total}" '
                f'style="width:40%"></progress> {done}/{self.total}'
            )
        else:
            bar = f'<progress style="width:40%"></progress> {done}'
        head = html.escape(self.description)
        return f"<div>{head} {bar} {html.escape(self.unit)} ({secs:.0f} s)</div>"

    def update(  # one bar: no task
        self, task: object, completed: int, description: str | None = None
    ) -> None:
        if description is not None:
            self.description = description
        now = self._time()
        if now - self._last >= 0.2:
            self._last = now
            self._handle.update(self._html(self._render(completed)))

    def stop(self) -> None:
        self._handle.update(self._html(""))


def _new_progress_bar(console: Console | None, unit: str) -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
    )
    from rich.text import Text

    class _RunElapsed(ProgressColumn):
        """Seconds since the run started (the bar starts later)."""

        def render(self, task: Task) -> Text:
            secs = time.monotonic() - task.fields.get("run_started", time.monotonic())
            return Text(format_duration(secs), style="progress.elapsed")

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit, markup=False),
        _RunElapsed(),
        console=console,
        transient=True,
    )


# --- HTML for Jupyter -----------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    """Table rows from (label, already-escaped html) pairs."""
    return "".join(
        f'<tr><th style="text-align:left">{_e(label)}</th>'
        f'<td style="text-align:left">{cell}</td></tr>'
        for label, cell in pairs
    )


def _runstats_rows(stats: object) -> list[tuple[str, str]]:
    get = lambda name, default=0: getattr(stats, name, default)  # noqa: E731
    compute = get("worker_compute_s", {}) or {}
    lost = list(get("lost_workers", []) or [])
    slices = get("slices")
    rows = [
        ("elapsed", _e(format_duration(get("elapsed_s", 0.0)))),
        ("workers", _e(get("workers"))),
        (
            "slices",
            _e(
                f"{slices} ({get('slices_cached')} cached on the "
                f"workers, {get('slices_sent')} sent)"
            )
            if slices
            else _e("none (no dataset: one call per worker)"),
        ),
        ("dataset sent", _e(format_bytes(get("dataset_bytes_sent")))),
        ("bytes sent", _e(format_bytes(get("bytes_sent")))),
        ("bytes received", _e(format_bytes(get("bytes_received")))),
        (
            "compute per worker",
            "<br>".join(
                f"{_e(name)}: {_e(f'{float(secs):.3f} s')}"
                for name, secs in compute.items()
            )
            or "-",
        ),
    ]
    if lost or get("rerun_slices"):
        rows.append(("lost workers", _e(", ".join(map(str, lost)) or "-")))
        rows.append(("re-run slices", _e(get("rerun_slices"))))
    if get("backup_tasks"):
        rows.append(("backup tasks", _e(get("backup_tasks"))))
    if get("replica_bytes_sent"):
        rows.append(("replicas sent", _e(format_bytes(get("replica_bytes_sent")))))
    # fields added to RunStats later: shown when set
    for f in dataclasses.fields(stats) if dataclasses.is_dataclass(stats) else ():
        value = getattr(stats, f.name, None)
        if f.name in _SHOWN or not value:
            continue
        text = (
            format_bytes(value)
            if "bytes" in f.name and isinstance(value, (int, float))
            else value
        )
        rows.append((f.name.replace("_", " "), _e(text)))
    return rows


_SHOWN = {
    "elapsed_s",
    "workers",
    "slices",
    "slices_cached",
    "slices_sent",
    "dataset_bytes_sent",
    "bytes_sent",
    "bytes_received",
    "worker_compute_s",
    "lost_workers",
    "rerun_slices",
    "backup_tasks",
    "replica_bytes_sent",
}


def runstats_html(stats: object) -> str:
    """A RunStats as a small HTML table (its ``_repr_html_``)."""
    return (
        f'<div class="qjamfab-repr"><b>RunStats</b>'
        f"<table>{_rows(_runstats_rows(stats))}</table></div>"
    )


def master_html(master: Any) -> str:
    """A Master as HTML (its ``_repr_html_``): hosts, workers, last run.

    Reads only public attributes (``hosts``, ``workers``, ``last_run`` and,
    when the Master has one, ``closed``): it never talks to the workers.
    """
    hosts = [getattr(h, "raw", h) for h in (getattr(master, "hosts", None) or [])]
    try:
        workers = list(master.workers)
    except Exception:  # a repr must never raise
        workers = []
    closed = getattr(master, "closed", None)
    state = " (closed)" if closed is True else ""
    last = getattr(master, "last_run", None)
    rows = [
        ("hosts", _e(", ".join(map(str, hosts)) or "-")),
        (f"workers ({len(workers)})", _e(", ".join(workers) or "-")),
    ]
    if last is None:
        rows.append(("last run", "none yet"))
    else:
        rows.append(("last run", runstats_html(last)))
    return (
        f'<div class="qjamfab-repr"><b>qjamfab Master</b>{_e(state)}: '
        f"{_e(plural(len(hosts), 'host'))}, "
        f"{_e(plural(len(workers), 'worker'))}"
        f"<table>{_rows(rows)}</table></div>"
    )


# --- tables for the tasks --------------------------------------------------------


def _header_rule_box(char: str, last_header: int = 0) -> Box:
    """A rich Box that draws only a rule under the header, one run of `char`
    per column with gaps between them (so the columns can be told apart).
    Under the last column the rule is as long as its header, or as its
    cells up to 20 characters, so a long status does not draw a long rule.

    Meant for tables with padding (0, 1, 0, 0) and pad_edge=False: each
    column but the last is one wider than its cells, and the rule leaves
    that padding blank.
    """
    from rich.box import Box

    class _HeaderRule(Box):
        def get_row(
            self,
            widths: Iterable[int],
            level: Literal["head", "row", "foot", "mid"] = "row",
            edge: bool = True,
        ) -> str:
            if level != "head":
                return super().get_row(widths, level, edge)
            widths = list(widths)
            parts = [char * max(w - 1, 1) + " " for w in widths[:-1]]
            last = max(last_header, min(widths[-1], 20))
            return " ".join(parts + [char * last])

    return _HeaderRule(
        "    \n    \n    \n    \n    \n    \n    \n    \n", ascii=char.isascii()
    )


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def hosts_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    align: str = "",
    *,
    color: bool = False,
    failed: Iterable[int] = (),
) -> Table:
    """A rich Table: a header, a rule, one line per row.

    `align` holds one letter per column, ``l`` or ``r`` (missing: ``l``).
    Empty cells show ``-``. With `color`, the header is bold, the rule dim,
    and the last (status) column green for ``ok`` and red for the rows
    whose index is in `failed`. Cells are text, never rich markup.
    """
    from rich.table import Table
    from rich.text import Text

    failed = set(failed)
    last_header = len(str(headers[-1])) if headers else 0
    table = Table(
        box=_header_rule_box("─" if color else "-", last_header),
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="bold" if color else None,
        border_style="dim" if color else None,
        collapse_padding=False,
        expand=False,
    )
    for i, header in enumerate(headers):
        last = i == len(headers) - 1
        table.add_column(
            Text(str(header)),
            justify="right" if align[i : i + 1] == "r" else "left",
            no_wrap=not last,
            overflow="fold",
        )
    for index, row in enumerate(rows):
        cells = [Text(_cell(v)) for v in row]
        if color and cells:
            status = cells[-1]
            if index in failed:
                status.stylize("red")
            elif status.plain == "ok":
                status.stylize("green")
        table.add_row(*cells)
    return table


def _plain(renderable: RenderableType) -> str:
    """A renderable as plain text, lines without trailing blanks."""
    out = io.StringIO()
    from rich.console import Console

    Console(
        file=out,
        width=10_000,
        color_system=None,
        force_terminal=False,
        force_jupyter=False,
        soft_wrap=False,
        emoji=False,
        highlight=False,
    ).print(renderable)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = ""
) -> str:
    """Rows as a plain-text table: a header, a rule, one line per row.

    `align` holds one letter per column, ``l`` or ``r`` (missing: ``l``).
    Columns are two spaces apart; the rule under the header has a run of
    dashes per column; lines carry no trailing blanks.
    """
    return _plain(hosts_table(headers, rows, align))


def _console(stream: TextIO | None = None, width: int | None = None) -> Console:
    from rich.console import Console

    return Console(
        file=stream if stream is not None else sys.stdout,
        width=width,
        highlight=False,
        emoji=False,
        soft_wrap=False,
    )


def _natural_widths(
    headers: Sequence[str], rows: Sequence[Sequence[object]]
) -> list[int]:
    return [
        max([len(str(h))] + [len(_cell(r[i])) for r in rows if i < len(r)])
        for i, h in enumerate(headers)
    ]


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    align: str = "",
    *,
    failed: Iterable[int] = (),
    stream: TextIO | None = None,
    width: int | None = None,
    optional: Sequence[str] = (),
) -> None:
    """Print a table: coloured through rich in a terminal, else plain.

    Lines fit `width` columns (default: the terminal's width; 80 when not a
    terminal): the columns named in `optional` are left out, in that order,
    while the table is too wide (a line under it names them); then the last
    column, a status whose full text the caller prints below the table, is
    cut with "..." to the room the other columns leave it, 10 characters at
    least. The other columns are never cut, so a row of very long host
    names can still be wider.
    """
    stream = sys.stdout if stream is None else stream
    terminal = is_terminal(stream)
    if width is None:
        width = _console(stream).width if terminal else 80
    kept = _columns_that_fit(headers, rows, width, optional)
    hidden = [str(h) for i, h in enumerate(headers) if i not in kept]
    headers = [headers[i] for i in kept]
    rows = [[r[i] for i in kept if i < len(r)] for r in rows]
    align = "".join(align[i : i + 1] or "l" for i in kept)
    rows = _fit_last_column(headers, rows, width)
    if terminal:
        widths = _natural_widths(headers, rows)
        # Room for every cell whole: rich would fold them otherwise.
        console = _console(
            stream, width=max(width, sum(w + 2 for w in widths[:-1]) + widths[-1])
        )
        console.print(hosts_table(headers, rows, align, color=True, failed=failed))
    else:
        stream.write(render_table(headers, rows, align) + "\n")
    if hidden:
        stream.write(f"(left out to fit: {', '.join(hidden)})\n")
    stream.flush()


_STATUS_MIN = 10  # the least of a status the table shows: "connect..."


def _columns_that_fit(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    width: int,
    optional: Sequence[str],
) -> list[int]:
    """The indexes of the columns to show: all, less the `optional` ones
    (in their order) while the table would be wider than `width`."""
    kept = list(range(len(headers)))
    natural = _natural_widths(headers, rows)
    droppable = [list(headers).index(name) for name in optional]
    for index in droppable:
        *others, last = kept
        status = max(len(str(headers[last])), min(natural[last], _STATUS_MIN))
        if sum(natural[i] + 2 for i in others) + status <= width:
            break
        kept.remove(index)
    return kept


def _fit_last_column(
    headers: Sequence[str], rows: Sequence[Sequence[object]], width: int
) -> list[list[object]]:
    if not headers:
        return [list(r) for r in rows]
    widths = _natural_widths(headers[:-1], rows)
    room = max(width - sum(w + 2 for w in widths), len(str(headers[-1])), _STATUS_MIN)
    return [[*r[:-1], first_line(_cell(r[-1]), limit=room)] for r in rows]


def print_failure(host: str, error: str, *, stream: TextIO | None = None) -> None:
    """A host's full error under the table: a blank line, "HOST failed:",
    then the error indented by four spaces."""
    stream = sys.stdout if stream is None else stream
    body = "\n".join("    " + line for line in error.rstrip().splitlines())
    if is_terminal(stream):
        from rich.text import Text

        text = Text("\n")
        text.append(f"{host} failed:", style="bold red")
        text.append("\n" + body)
        _console(stream).print(text, soft_wrap=True)
    else:
        stream.write(f"\n{host} failed:\n{body}\n")
    stream.flush()


class StderrHandler(logging.StreamHandler):
    """A logging handler to whatever sys.stderr is when a record comes, so
    log lines go above a progress display (rich redirects sys.stderr while
    one is shown) instead of through it."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.setStream; ignored
        pass


# --- per-host progress for the lifecycle tasks ------------------------------------


class HostProgress:
    """One line per host while a step runs on them all, in a terminal.

        with HostProgress("bootstrap", ["a", "b"]) as progress:
            results = cluster.bootstrap(specs, on_result=progress.done)

    Each line shows a spinner and the seconds so far, then the host's
    outcome (``ok``, or the first line of its error) when `done(result)` is
    called with its `HostResult` (from any thread). The lines are transient:
    they are gone when the block ends, for the final table to take their
    place. ``enabled=None`` means only when sys.stdout is a terminal (pass a
    `console` to draw elsewhere); when disabled everything is a no-op.
    """

    def __init__(
        self,
        title: str,
        hosts: Sequence[str],
        *,
        enabled: bool | None = None,
        console: Console | None = None,
    ):
        self.title = title
        self.hosts = list(hosts)
        if enabled is None:
            enabled = console.is_terminal if console is not None else is_terminal()
        self.enabled = bool(enabled) and bool(self.hosts)
        self._console = console
        self._progress: Progress | None = None
        self._tasks: dict[str, list[TaskID]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> HostProgress:
        if not self.enabled:
            return self
        try:
            self._progress = _host_progress(self._console)
            for host in self.hosts:
                task = self._progress.add_task(
                    host, total=1, mark=None, outcome="running"
                )
                self._tasks.setdefault(host, []).append(task)
            self._progress.start()
        except Exception:  # pragma: no cover - never fail a task on this
            self._progress = None
        return self

    def done(self, result: HostOutcome, problem: str = "") -> None:
        """Mark the host of `result` (a HostResult) finished; `problem`
        says what is wrong with a host that answered (shown as a failure)."""
        progress = self._progress
        if progress is None:
            return
        with self._lock:
            waiting = self._tasks.get(result.host) or []
            if not waiting:
                return
            task = waiting.pop(0)  # the same host twice: first come first
        if result.ok and not problem:
            mark, outcome = "✓", "done"
        else:
            mark = "✗"
            outcome = first_line(problem or result.error, result.host)
        progress.update(task, completed=1, mark=mark, outcome=outcome)

    def __exit__(self, *exc: object) -> None:
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()


def _host_progress(console: Console | None) -> Progress:
    from rich.progress import (
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class _Mark(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self._spinner = SpinnerColumn()

        def render(self, task: Task) -> RenderableType:
            mark = task.fields.get("mark")
            if mark is None:
                return self._spinner.render(task)
            return Text(mark, style="green" if mark == "✓" else "red")

    class _Outcome(ProgressColumn):
        def render(self, task: Task) -> Text:
            outcome = task.fields.get("outcome", "")
            style = {"running": "dim", "done": "green"}.get(outcome, "red")
            return Text(outcome, style=style, no_wrap=True, overflow="ellipsis")

    return Progress(
        _Mark(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        _Outcome(),
        console=console,
        transient=True,
    )


_FRAME = re.compile(r'^  File "(.+)", line (\d+), in ')


def with_source_lines(trace: str) -> str:
    """A remote traceback with the master's copy of each source line the
    worker had none for (functions that travelled by value)."""
    lines = trace.splitlines()
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        frame = _FRAME.match(line)
        has_source = i + 1 < len(lines) and lines[i + 1].startswith("    ")
        if frame and not has_source:
            source = linecache.getline(frame[1], int(frame[2])).strip()
            if source:
                out.append(f"    {source}")
    return "\n".join(out)
