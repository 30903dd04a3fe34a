"""A byte stream to one worker, and nothing else.

`Transport` is the seam between the Master and how a worker or a host is
reached: `readinto` and `writev` move bytes, `close` ends the stream,
`exit_report` says how the far end ended. `PipesTransport` speaks over
a pair of pipes; `ProcessTransport` is one that starts any command on
this machine and speaks over its stdin and stdout;
`LocalPipeTransport` is one that starts a worker process. The SSH
engine's streams build on these (engines/ssh/: the OpenSSH client's
pipes, or a paramiko channel). OS errors on a stream become qjamfab
errors here, by foreign.py's table.
"""

from __future__ import annotations

import fcntl
import io
import os
import select
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from .. import runtime
from ..errors import PreflightFailed, WorkerLost
from .foreign import mapped

if TYPE_CHECKING:
    pass

_TAIL_LINES = 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
_PIPE_SIZE = 1 << 20
STDERR_TAIL = 1 << 16  # how much of a stream's stderr is kept for its exit report


def tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Transport(ABC):
    """A byte stream to one worker."""

    name: str
    # Who printed what came before an agent's first words, and what to do
    # about it (handshake.py says so): over SSH, a login shell.
    preamble = (
        "the host's shell",
        "make the login shell print nothing for non-interactive sessions "
        "(e.g. in .bashrc)",
    )

    @abstractmethod
    def readinto(self, view: memoryview) -> int:
        """Read up to len(view) bytes; 0 at end of stream."""

    @abstractmethod
    def writev(self, views: list) -> int:
        """Write some of views; the number of bytes written."""

    @abstractmethod
    def close(self) -> None:
        """End the stream and anything started for it. Idempotent."""

    @abstractmethod
    def fileno(self) -> int:
        """A descriptor that poll() reports readable when input waits."""

    def write_fileno(self) -> int | None:
        """A descriptor that poll() reports writable when writev can take
        bytes; None when there is none (then a frame is written whole)."""
        return None

    def has_input(self) -> bool:
        """After fileno() polled readable: whether readinto has bytes (or
        the end of the stream) to give now."""
        return True

    @abstractmethod
    def set_read_timeout(self, seconds: float) -> None:
        """From now on readinto raises TimeoutError after this long
        without a byte, and writev raises WorkerLost after this long
        without the far end taking one."""

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        """After the stream ended: (exit status if known, stderr tail)."""
        return None, ""

    def computing(self) -> bool:
        """Whether the far end, silent, is seen from outside to be alive
        and running (not stopped): busy, not gone. False: cannot tell."""
        return False

    def wait_writable(self) -> bool:
        """After writev wrote nothing: wait until the far end takes bytes
        or sends some (so that it is read meanwhile: both ends writing a
        full stream at once would wait forever); whether input waits.
        WorkerLost after the read timeout with neither."""
        return False

    def _took_nothing(self) -> WorkerLost:
        return WorkerLost(
            f"{self.name} took nothing of what was sent to it "
            "for the heartbeat timeout: it is lost",
            worker=self.name,
        )


class PipesTransport(Transport):
    """A stream over two pipes, both non-blocking: frames are read from
    `read_fd` and written to `write_fd` (a process's stdout and stdin, or
    an in-process agent's pair). Closing them is the subclass's."""

    def __init__(self, name: str, read_fd: int, write_fd: int):
        self.name = name
        self._read_fd = read_fd
        self._write_fd = write_fd
        # A raw file: its readinto gives None while the pipe is empty, and
        # costs less than os.readv.
        self._reader = io.FileIO(read_fd, "rb", closefd=False)
        self._read_timeout: float | None = None
        for fd in (read_fd, write_fd):
            try:  # fewer wake-ups per slice streamed
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass
            os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def write_fileno(self) -> int | None:
        return self._write_fd

    def set_read_timeout(self, seconds: float) -> None:
        self._read_timeout = seconds

    def readinto(self, view: memoryview) -> int:
        while True:
            try:
                n = self._reader.readinto(view)
            except (OSError, ValueError):
                return 0
            if n is not None:
                return n
            # Nothing yet: wait, within limits.
            poller = select.poll()
            poller.register(self._read_fd, select.POLLIN)
            wait = self._read_timeout
            if not poller.poll(None if wait is None else wait * 1000):
                raise TimeoutError(
                    f"worker {self.name} sent nothing for {self._read_timeout:g} s"
                )

    def writev(self, views: list) -> int:
        try:
            return os.writev(self._write_fd, views)
        except BlockingIOError:
            return 0  # full: see wait_writable
        except Exception:
            # Mapped when it fails only: a context manager around every
            # write costs a trivial run more than the write's own Python.
            with mapped(f"sending to worker {self.name} on its pipe", worker=self.name):
                raise

    def _closed_fds(self, read: bool) -> None:
        """The write end (and the read end) closed: no read or write may
        reach a descriptor that now has the number of another's."""
        self._write_fd = -1
        if read:
            self._read_fd = -1
            self._reader.close()  # not its descriptor: reads give 0 now

    def wait_writable(self) -> bool:
        poller = select.poll()
        poller.register(self._write_fd, select.POLLOUT)
        poller.register(self._read_fd, select.POLLIN)
        wait = self._read_timeout
        ready = dict(poller.poll(None if wait is None else wait * 1000))
        if not ready:
            raise self._took_nothing()
        return self._read_fd in ready


class ProcessTransport(PipesTransport):
    """A process started here from `argv` (with `env`, else this one's
    environment), spoken to over its stdin and stdout: whatever speaks the
    protocol there (a worker: `LocalPipeTransport`; an agent under the
    OpenSSH client: `OpenSSHTransport`; a scripted peer in the tests). Its
    stderr goes to an unlinked temporary file: nobody reads it until the
    process ends, and a pipe left unread would stall the process once
    full (the OpenSSH client passes on a remote login shell's warnings)."""

    _what = "process"
    _close_wait_s = 2.0  # for the process to end once its input ends

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self._stderr = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                bufsize=0,
                env=env,
                # Ctrl-C at the terminal is the Master's to handle.
                start_new_session=True,
            )
        except OSError as exc:
            self._stderr.close()
            raise WorkerLost(
                f"cannot start {self._what} for worker {name} ({argv[0]}): "
                f"{exc}; check that the executable exists",
                worker=name,
            ) from exc
        stdin, stdout = self.process.stdin, self.process.stdout
        # Pipes both (PIPE above), closed as files (stdin: the far end's
        # end of input).
        assert stdin is not None and isinstance(stdout, io.FileIO)
        self._stdin = stdin
        self._out = stdout
        super().__init__(name, stdout.fileno(), stdin.fileno())

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._stdin.close()  # the far end ends at end of input
            except OSError:
                pass
            try:
                self.process.wait(timeout=self._close_wait_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self._stdin, self._out, self._stderr):
            try:
                stream.close()
            except OSError:
                pass
        self._closed_fds(read=True)

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        try:
            # A far end still reading its input (one that failed to start
            # and waits for more) ends at end of input, not 5 s later.
            self._stdin.close()
        except OSError:
            pass
        self._closed_fds(read=False)
        try:
            status = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        text = ""
        if log_path:
            text = runtime.read_tail(log_path)
            try:
                os.unlink(log_path)
            except OSError:
                pass
        try:
            self._stderr.seek(max(0, self._stderr.seek(0, os.SEEK_END) - STDERR_TAIL))
            text += self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            pass
        return status, tail(text)


class LocalPipeTransport(ProcessTransport):
    """A worker process on this machine, spoken to over its stdin/stdout."""

    _what = "a local worker"

    def computing(self) -> bool:
        # A long C call holding the worker's GIL stops its heartbeats, not
        # its process.
        return runtime.process_running(self.process.pid)

    def __init__(
        self,
        name: str,
        base: str,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ):
        try:
            runtime.ensure_local_bundle(base)
        except OSError as exc:  # InsecureDirectory first: its line says why
            raise PreflightFailed(f"{exc}", host="local") from exc
        super().__init__(
            name,
            [
                python,
                "-c",
                runtime.boot_code("worker"),
                "--pipe",
                "--name",
                name,
                "--base",
                base,
            ],
            env={**os.environ, **(env or {}), "QJAMFAB_HOME": base},
        )
