"""A byte stream to one worker, and nothing else.

`Transport` is the seam between the Master and how a worker is reached:
`readinto` and `writev` move bytes, `close` ends the stream, `exit_report`
says how the far end ended. `LocalPipeTransport` starts a worker process on
this machine and speaks over its stdin and stdout; the SSH transport runs the
runtime's relay over an exec channel. OS and paramiko errors become qjamfab
errors here and nowhere else.
"""
from __future__ import annotations

import os
import subprocess
import sys
from abc import ABC, abstractmethod

from . import runtime
from .errors import WorkerLost

_TAIL_LINES = 20


def tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Transport(ABC):
    """A byte stream to one worker."""

    name: str

    @abstractmethod
    def readinto(self, view: memoryview) -> int:
        """Read up to len(view) bytes; 0 at end of stream."""

    @abstractmethod
    def writev(self, views: list) -> int:
        """Write some of views; the number of bytes written."""

    @abstractmethod
    def close(self) -> None:
        """End the stream and anything started for it. Idempotent."""

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        """After the stream ended: (exit status if known, stderr tail)."""
        return None, ""


class LocalPipeTransport(Transport):
    """A worker process on this machine, spoken to over its stdin/stdout."""

    def __init__(self, name: str, base: str, python: str = sys.executable):
        self.name = name
        bundle = runtime.ensure_local_bundle(base)
        try:
            self.process = subprocess.Popen(
                [python, "-c", runtime.boot_code(bundle, "worker"),
                 "--pipe", "--name", name, "--base", base],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, bufsize=0,
                # Ctrl-C at the terminal is the Master's to handle.
                start_new_session=True)
        except OSError as exc:
            raise WorkerLost(
                f"cannot start local worker {name} with {python}: {exc}; "
                "check that the Python executable exists",
                worker=name) from exc
        self._in = self.process.stdin.fileno()
        self._out = self.process.stdout

    def readinto(self, view: memoryview) -> int:
        try:
            return self._out.readinto(view)
        except (OSError, ValueError):
            return 0

    def writev(self, views: list) -> int:
        try:
            return os.writev(self._in, views)
        except (OSError, ValueError) as exc:
            raise WorkerLost(f"worker {self.name}: its pipe is closed ({exc})",
                             worker=self.name) from exc

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # the worker exits at end of input
            except OSError:
                pass
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout,
                       self.process.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        try:
            status = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        text = ""
        if log_path:
            try:
                with open(log_path, "rb") as f:
                    f.seek(max(0, os.path.getsize(log_path) - 8192))
                    text = f.read().decode("utf-8", "replace")
                os.unlink(log_path)
            except OSError:
                pass
        try:
            text += self.process.stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            pass
        return status, tail(text)
