"""The text helpers every module formats with, so a size, a duration or an
error reads the same in a table, a repr, a log line and an error message:
`format_bytes`, `format_duration`, `plural`, `first_line` (an error's
summary), `stderr_tail` (the section an error about a lost worker ends
with), `with_source_lines` (a remote traceback with the master's source
lines), and `is_terminal` (whether a stream gets colour and live displays).

The bottom of the master side's layering: it imports nothing of qjamfab.
"""

from __future__ import annotations

import linecache
import re
import sys
from typing import TextIO

__all__ = [
    "format_bytes",
    "format_duration",
    "plural",
    "first_line",
    "stderr_tail",
    "with_source_lines",
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


def plural(n: int, word: str, words: str | None = None) -> str:
    """plural(1, "worker") -> "1 worker", plural(2, "worker") -> "2 workers";
    `words` for an irregular plural: plural(3, "entry", "entries")."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def a_or_an(noun: str) -> str:
    """a_or_an("int") -> "an int"; a_or_an("list") -> "a list"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


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
