"""Foreign exceptions become qjamfab's here: one table, used at the link
boundary (transport.py's streams, the SSH engine's channels, the
in-process and Dask engines) through `mapped`.

As httpx's `HTTPCORE_EXC_MAP` and mitogen's `io_op`: a link's code wraps
its reads, writes and waits in `with mapped("sending to worker x",
worker="x"):`, and whatever the OS, paramiko or Dask raised there comes out
as a `WorkerLost` (a worker's stream) or a `HostError` (a host, while
connecting or running a command on it), its first line saying what was
being done, what went wrong and what to do, `from` the original.
An exception the table does not name passes through unchanged.

Connecting over SSH keeps its own mapping (hosts.py's `_map_error`): its
messages depend on how far the handshake got, which no table can say.

Only the standard library is imported: paramiko's and Dask's types are
looked up by name among the modules already imported (one not imported
cannot have raised).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import (
    AuthenticationFailed,
    HostError,
    HostKeyError,
    HostUnreachable,
    QjamfabError,
    WorkerLost,
)


@dataclass(frozen=True)
class Entry:
    """One foreign exception type and what it becomes."""

    foreign: str  # "module.Name" of the type (subclasses match too)
    happened: str  # what it means, as the first line says it
    advice: str  # what to do
    host: type[HostError] = HostUnreachable  # when mapped for a host
    errnos: frozenset[int] = frozenset()  # an OSError: only these (none: any)

    def foreign_type(self) -> type[BaseException] | None:
        """The type, if its module is imported (else nothing raised it)."""
        module, _, name = self.foreign.rpartition(".")
        found = getattr(sys.modules.get(module), name, None)
        return found if isinstance(found, type) else None

    def matches(self, exc: BaseException) -> bool:
        kind = self.foreign_type()
        if kind is None or not isinstance(exc, kind):
            return False
        return not self.errnos or getattr(exc, "errno", None) in self.errnos


_GONE = "the far end is gone: its log or stderr tail says why"
_RETRY = "check that the host is up and retry"

# Most specific first: the first entry that matches maps.
TABLE: tuple[Entry, ...] = (
    Entry("builtins.BrokenPipeError", "the far end closed the stream", _GONE),
    Entry("builtins.ConnectionResetError", "the connection was reset", _GONE),
    Entry("builtins.ConnectionAbortedError", "the connection was aborted", _GONE),
    Entry(
        "distributed.comm.core.CommClosedError",
        "its Dask connection closed",
        "check that the Dask scheduler and workers still run",
    ),
    Entry("builtins.EOFError", "the stream ended", _GONE),
    Entry(
        "builtins.TimeoutError",  # socket.timeout, asyncio's and Dask's too
        "it stopped answering",
        "check the host's load and network",
    ),
    Entry(
        "builtins.OSError",
        "the stream failed",
        _GONE,
        errnos=frozenset(
            {errno.EIO, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF}
        ),
    ),
    Entry(
        "paramiko.ssh_exception.BadHostKeyException",
        "the host's key does not match known_hosts",
        "check the host's key (a man-in-the-middle attack is possible)",
        host=HostKeyError,
    ),
    Entry(
        "paramiko.ssh_exception.AuthenticationException",
        "SSH authentication failed",
        "check the user and the key (install yours with ssh-copy-id)",
        host=AuthenticationFailed,
    ),
    Entry(
        "paramiko.ssh_exception.ChannelException",
        "the SSH server refused a channel",
        "check the host's sshd (MaxSessions) and retry",
    ),
    Entry("paramiko.ssh_exception.SSHException", "the SSH connection failed", _RETRY),
    Entry(
        "builtins.OSError",
        "the disk is full",
        "free disk space there and retry",
        errnos=frozenset({errno.ENOSPC, errno.EDQUOT}),
    ),
    Entry("builtins.OSError", "the operating system refused", _RETRY),
)


def entry_for(exc: BaseException) -> Entry | None:
    """The table's entry for exc; None if it names none."""
    return next((e for e in TABLE if e.matches(exc)), None)


def translate(
    exc: BaseException,
    what: str,
    worker: str | None = None,
    host: str | None = None,
    advice: str | None = None,
) -> QjamfabError | None:
    """Ours for exc, raised while doing `what` (e.g. "sending to worker
    x"): a WorkerLost if `worker` is given, else the entry's HostError for
    `host`; None if the table names no such exception. `advice`, if
    given, replaces the entry's (a site that knows better)."""
    entry = entry_for(exc)
    if entry is None:
        return None
    said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    message = f"{what} failed: {entry.happened} ({said}); {advice or entry.advice}"
    if worker is not None:
        return WorkerLost(message, worker=worker)
    return entry.host(message, host=host)


@contextmanager
def mapped(
    what: str,
    worker: str | None = None,
    host: str | None = None,
    advice: str | None = None,
) -> Iterator[None]:
    """Re-raise a foreign exception of the table as ours (see translate),
    from the original; ours and those the table does not name pass."""
    try:
        yield
    except QjamfabError:
        raise
    except Exception as exc:
        ours = translate(exc, what, worker, host, advice)
        if ours is None:
            raise
        raise ours from exc
