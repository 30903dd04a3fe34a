"""What the Invoke tasks print: the one-row-per-host tables and the
per-host progress of a lifecycle step.

- `hosts_table`, `render_table`, `print_table`, `print_failure`: tables drawn
  with rich: coloured in a terminal, plain text (a header, a rule of dashes,
  one line per row) anywhere else, so a pipe or a log gets something
  ``grep`` and ``cut`` can read; a failed host's full error below them.
- `HostProgress`: one line per host while a lifecycle step runs on many
  hosts at once (a spinner, then the host's outcome); nothing when output is
  not a terminal, where only the final table is printed.

Like display.py, it imports nothing of what it shows (cluster's results
arrive as a `HostOutcome`); rich is imported only by the functions that
draw with it.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

from ..text import first_line, is_terminal

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from rich.box import Box
    from rich.console import Console, RenderableType
    from rich.progress import Progress, Task, TaskID
    from rich.table import Table

__all__ = [
    "hosts_table",
    "render_table",
    "print_table",
    "print_failure",
    "HostProgress",
    "HostOutcome",
]


class HostOutcome(Protocol):
    """What the lifecycle progress shows of a host's step (cluster.py's
    HostResult): named here so rendering imports nothing above it."""

    host: str
    ok: bool
    error: str


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


def home_kind(fs: str | None) -> str:
    """How a host's base directory is set up, from its filesystem's type:
    that type ("nfs4") when other machines may mount it (a shared home: the
    slice cache is shared, sockets and pid files stay on the host), else
    "local"."""
    from ..runtime import NETWORK_FS

    return fs if fs in NETWORK_FS else "local"
