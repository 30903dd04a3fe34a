"""A worker's output capture: what user code prints, from Python or C,
goes to a file, never into the protocol stream, and on to the master.

Before any user code runs, the worker moves the protocol off fds 0 and 1,
and `Capture` points fds 1 and 2 at an append-only capture file. What lands
there is forwarded to the master as LOG frames (polled while a task runs,
flushed when it ends, C stdio included); being a file, its tail survives a
crash for the master to show. What a full disk has no room for is dropped,
and the master told how much. Past 1 MiB forwarded, the file starts over
between tasks.

Shipped to hosts with the runtime: stdlib only.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from .. import protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_LOG_POLL_S = 0.05
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Sink(Protocol):
    """Where the capture sends LOG frames: the worker's channel."""

    def send(self, kind: int, head: dict, payload: Sequence = ()) -> None: ...


class _CaptureStream(io.RawIOBase):
    """fd 1 or 2 as Python code writes it: what a full disk has no room for
    is dropped and counted, never an error in the job that printed it."""

    def __init__(self, fd: int, capture: Capture):
        super().__init__()
        self._fd = fd
        self._capture = capture

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            self._capture.dropped += len(view)
        return total


class Capture:
    """fds 1 and 2 -> an append-only file, forwarded as LOG frames. Past
    1 MiB forwarded, the file starts over between tasks: fds 1 and 2 move
    to a fresh file under the same name, and what reached the old one is
    read to its end first, so no line is lost."""

    def __init__(self, path: str):
        self.path = path
        self.dropped = 0  # bytes Python code printed that found no room
        sys.stdout = io.TextIOWrapper(
            _CaptureStream(1, self), line_buffering=True, errors="replace"
        )
        sys.stderr = io.TextIOWrapper(
            _CaptureStream(2, self), line_buffering=True, errors="replace"
        )
        self._fd = self._fresh_file()
        self._forwarded = 0  # bytes of the file sent on so far
        self._lock = threading.Lock()
        self.channel: Sink | None = None
        self._busy = False
        threading.Thread(target=self._poll, daemon=True).start()

    def _fresh_file(self) -> int:
        """Point fds 1 and 2 at a new empty file named self.path; a
        descriptor to read it."""
        tmp = f"{self.path}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.replace(tmp, self.path)
        return os.open(self.path, os.O_RDONLY)

    def _forward(self) -> None:
        with self._lock:
            # One fstat when nothing was printed: this runs after every task.
            size = os.fstat(self._fd).st_size
            data = b""
            if size > self._forwarded:
                data = os.pread(self._fd, size - self._forwarded, self._forwarded)
                self._forwarded += len(data)
            if self._forwarded > (1 << 20) and not self._busy:
                data += self._start_over()
            dropped, self.dropped = self.dropped, 0
            if dropped:
                data += (
                    f"qjamfab: {dropped} bytes of output were dropped: "
                    f"the disk of {os.path.dirname(self.path)} is full; "
                    "free space there\n"
                ).encode()
            if data and self.channel is not None:
                try:
                    self.channel.send(
                        protocol.LOG, {"text": data.decode("utf-8", "replace")}
                    )
                except OSError:
                    pass  # the master is gone

    def _start_over(self) -> bytes:
        """Move fds 1 and 2 to a fresh file; what reached the old one since
        it was last read."""
        try:
            old, self._fd = self._fd, self._fresh_file()
        except OSError:  # no room for a new file: keep this one
            return b""
        data = b""
        while rest := os.pread(old, 1 << 20, self._forwarded):
            data += rest
            self._forwarded += len(rest)
        os.close(old)
        self._forwarded = 0
        return data

    def _poll(self) -> None:
        # A timer rather than an event set by begin(): waking this thread
        # at the start of every task would cost each short task a switch.
        while True:
            time.sleep(_LOG_POLL_S)
            if self._busy:
                self._forward()

    def begin(self) -> None:
        self._busy = True

    def end(self) -> None:
        """Flush everything user code printed, before its result is sent."""
        self._busy = False
        c_stdio_flush()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self._forward()


@functools.lru_cache(maxsize=1)
def _libc_fflush() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        return None


def c_stdio_flush() -> None:
    """Flush C stdio buffers too: a C extension's printf sits in them."""
    fflush = _libc_fflush()
    if fflush is not None:
        fflush(None)
