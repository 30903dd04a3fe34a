"""The table of foreign exceptions (foreign.py): each entry maps, in order."""

from __future__ import annotations

import errno
import subprocess
import sys

import paramiko
import pytest
from distributed.comm.core import CommClosedError

from qjamfab.errors import (
    AuthenticationFailed,
    HostKeyError,
    HostUnreachable,
    QjamfabError,
    WorkerLost,
)
from qjamfab.links import foreign


class _BadHostKey(paramiko.BadHostKeyException):
    def __init__(self) -> None:  # paramiko's wants two keys
        Exception.__init__(self, "key mismatch")

    def __str__(self) -> str:
        return "key mismatch"


# One instance per entry, in the table's order: (exception, host type).
CASES: list[tuple[BaseException, type[QjamfabError]]] = [
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), HostUnreachable),
    (ConnectionResetError(errno.ECONNRESET, "reset"), HostUnreachable),
    (ConnectionAbortedError(errno.ECONNABORTED, "aborted"), HostUnreachable),
    (CommClosedError("in <TCP>: Stream is closed"), HostUnreachable),
    (EOFError(), HostUnreachable),
    (TimeoutError("timed out"), HostUnreachable),
    (OSError(errno.EIO, "Input/output error"), HostUnreachable),
    (_BadHostKey(), HostKeyError),
    (paramiko.AuthenticationException("denied"), AuthenticationFailed),
    (paramiko.ChannelException(1, "prohibited"), HostUnreachable),
    (paramiko.SSHException("Channel closed."), HostUnreachable),
    (OSError(errno.ENOSPC, "No space left on device"), HostUnreachable),
    (OSError(errno.EACCES, "Permission denied"), HostUnreachable),
]


def test_the_cases_cover_the_table_in_order() -> None:
    assert [foreign.entry_for(exc) for exc, _ in CASES] == list(foreign.TABLE)


@pytest.mark.parametrize(
    "exc", [exc for exc, _ in CASES], ids=[e.foreign for e in foreign.TABLE]
)
def test_each_entry_maps_for_a_worker(exc: BaseException) -> None:
    entry = foreign.entry_for(exc)
    assert entry is not None
    with pytest.raises(WorkerLost) as info:
        with foreign.mapped("sending to worker w", worker="w"):
            raise exc
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"sending to worker w failed: {entry.happened} (")
    assert first.endswith(f"); {entry.advice}")
    assert type(exc).__name__ in first
    assert info.value.worker == "w"
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(("exc", "ours"), CASES, ids=[e.foreign for e in foreign.TABLE])
def test_each_entry_maps_for_a_host(
    exc: BaseException, ours: type[QjamfabError]
) -> None:
    with pytest.raises(ours) as info:
        with foreign.mapped("running a command on h", host="h"):
            raise exc
    assert str(info.value).startswith("running a command on h failed: ")
    assert info.value.host == "h"  # type: ignore[attr-defined]
    assert info.value.__cause__ is exc


def test_more_specific_errnos_come_first() -> None:
    entry = foreign.entry_for(OSError(errno.ENOTCONN, "not connected"))
    assert entry is not None and entry.happened == "the stream failed"


def test_a_site_that_knows_better_gives_its_own_advice() -> None:
    with pytest.raises(HostUnreachable) as info:
        with foreign.mapped("uploading to h", host="h", advice="free space there"):
            raise OSError("Failure")
    assert str(info.value) == (
        "uploading to h failed: the operating system refused "
        "(OSError: Failure); free space there"
    )


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad"), KeyError("k"), RuntimeError("loop closed")],
)
def test_an_exception_the_table_does_not_name_passes_unchanged(
    exc: BaseException,
) -> None:
    with pytest.raises(type(exc)) as info:
        with foreign.mapped("reading from worker w", worker="w"):
            raise exc
    assert info.value is exc


def test_ours_passes_unchanged() -> None:
    lost = WorkerLost("worker w took nothing", worker="w")
    with pytest.raises(WorkerLost) as info:
        with foreign.mapped("sending to worker w", worker="w"):
            raise lost
    assert info.value is lost


def test_importing_it_imports_neither_paramiko_nor_dask() -> None:
    # The package's __init__ imports the Master (and paramiko): an empty
    # package object in its place, so that only foreign.py's imports run.
    code = (
        "import importlib.util, sys, types\n"
        "pkg = types.ModuleType('qjamfab')\n"
        "spec = importlib.util.find_spec('qjamfab')\n"
        "pkg.__path__ = spec.submodule_search_locations\n"
        "sys.modules['qjamfab'] = pkg\n"
        "import qjamfab.links.foreign\n"
        "print(sorted(m for m in ('paramiko', 'distributed') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_pipe_whose_far_end_ended_says_so() -> None:
    """A link's send maps through the table (transport.py)."""
    from qjamfab.links.transport import ProcessTransport

    transport = ProcessTransport("w", [sys.executable, "-c", "pass"])
    try:
        transport.process.wait(timeout=30)
        with pytest.raises(WorkerLost) as info:
            transport.writev([b"x"])
        assert str(info.value).startswith(
            "sending to worker w on its pipe failed: the far end closed the "
            "stream (BrokenPipeError: "
        )
        assert isinstance(info.value.__cause__, BrokenPipeError)
        assert info.value.worker == "w"
    finally:
        transport.close()
