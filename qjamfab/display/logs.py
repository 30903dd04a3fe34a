"""What qjamfab writes to stderr besides tables and errors: the handler of
the "qjamfab" logger (`log_to_stderr`, `StderrHandler`, whose lines go above
a progress display, not through it), how an error that ends a script run by
``inv run`` reads (`script_excepthook`: a QjamfabError as one line), and the
warning a Master gives when ``inv run --hosts`` lost to the script's own
hosts (`warn_if_cli_hosts_ignored`).

Light on purpose: the script ``inv run`` starts imports it before the
script itself.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TextIO

from ..errors import QjamfabError

__all__ = [
    "log_to_stderr",
    "StderrHandler",
    "script_excepthook",
    "warn_if_cli_hosts_ignored",
]


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
