"""Rendering for terminals and notebooks: a run's progress and HTML reprs.

- `RunProgress`: the progress bar of one `Master.run` (slices done). It shows
  up only in a terminal (or when forced) and only once the run has lasted
  `delay_s`, and it is transient, so an iterative loop of short runs prints
  nothing and a long run leaves nothing behind. While no bar is shown it
  costs an integer add per `advance()`, and rich is not even imported.
- `StatusLine`: a transient line that says what start-up waits for (a Slurm
  job pending, and why), shown and updated in a terminal, cleared when
  done; where none is shown the caller logs instead.
- `master_html`, `runstats_html`: the HTML that Jupyter shows for a `Master`
  and a `RunStats` (their ``_repr_html_``). Everything is escaped.

The Invoke tasks' tables are tables.py's, the text helpers text.py's, the
log handler logs.py's. This module imports nothing of what it renders (an
import-linter contract), and rich only in the functions that draw with it.
"""

from __future__ import annotations

import dataclasses
import html
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ..text import format_bytes, format_duration, is_terminal, plural

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from rich.console import Console
    from rich.progress import Progress, Task, TaskID
    from rich.text import Text


__all__ = ["RunProgress", "StatusLine", "master_html", "runstats_html"]

# --- the progress bar of a run ------------------------------------------------


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


# --- a status line while starting up -----------------------------------------


class StatusLine:
    """One transient line saying what the Master waits for.

    ``enabled=None`` shows it only when sys.stdout is a terminal (never in
    a Jupyter kernel); ``True`` always (to `console` if given, else to
    sys.stdout as a terminal); ``False`` never. `show(text)` draws or
    updates the line and says whether it is on screen (when not, the
    caller logs `text` instead); `close()` clears it.
    """

    def __init__(self, enabled: bool | None = None, *, console: Console | None = None):
        if enabled is None:
            enabled = (
                console.is_terminal if console is not None else is_terminal()
            ) and not _in_jupyter()
        self._enabled = enabled
        self._console = console
        self._status: Any = None  # the rich Status, once shown

    @property
    def shown(self) -> bool:
        """Whether the line is on screen now."""
        return self._status is not None

    def show(self, text: str) -> bool:
        """Draw the line (or change its text); False when none is shown."""
        if not self._enabled:
            return False
        try:
            if self._status is None:
                from rich.console import Console
                from rich.status import Status
                from rich.text import Text

                console = self._console or Console(force_terminal=True)
                self._status = Status(Text(text), console=console)
                self._status.start()
            else:
                from rich.text import Text

                self._status.update(Text(text))
        except Exception:  # a display problem never fails a start
            self._enabled = False
            self._status = None
            return False
        return True

    def close(self) -> None:
        """Clear the line (if shown); later calls do nothing."""
        status, self._status = self._status, None
        self._enabled = False
        if status is not None:
            try:
                status.stop()
            except Exception:  # pragma: no cover - a broken terminal
                pass

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
