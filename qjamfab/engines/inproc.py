"""In-process workers: `Master("inproc:N")` runs N workers as threads of
this process, each the real worker runtime (runtime/worker.py) at the far
end of a socketpair, so the Master's and Run's logic (placement, balancing,
stealing, loss and re-planning, backups, the split rule) is tested through
public behaviour without processes or hosts, in the spirit of Dask's
`inproc://` comm and httpx's `MockTransport`.

What differs from a worker process: what a job prints goes straight to
this process's stdout and stderr (no capture, no `[worker]` prefix), and a
job acts out failures with these calls, made from inside mapfunc:

- `die(status)`: its worker ends as if its process exited with `status`
  (its stream closes; the Master sees the worker lost, with that status);
- `freeze(seconds)`: its worker stops its heartbeats and answers nothing
  for that long, as if its process were stopped (SIGSTOP); seen from
  outside it is not running, so the heartbeat deadline applies.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from ..links.foreign import mapped
from ..links.transport import Transport
from ..runtime import secure_dir
from ..runtime.cache import RefCache
from ..runtime.capture import Capture
from ..runtime.serving import Channel
from ..runtime.worker import Worker


class _Died(BaseException):
    """Raised by die(): not an Exception, so no job error catches it."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


_workers = threading.local()  # the in-process worker a thread runs


def die(status: int = 1) -> None:
    """End the calling job's worker, as if its process exited."""
    raise _Died(status)


def freeze(seconds: float) -> None:
    """Stop the calling job's worker for `seconds`, as if stopped."""
    transport: InProcessTransport = _workers.transport
    transport.worker.heartbeats = False
    transport.frozen = True
    try:
        time.sleep(seconds)
    finally:
        transport.frozen = False
        transport.worker.heartbeats = True


class _NoCapture(Capture):
    """A worker's output capture where there is none to make: the
    thread's output is the process's. What Worker uses of a Capture
    (path, channel, begin, end) is all it has: Capture's own __init__,
    which redirects this process's stdout and stderr, does not run."""

    path = ""
    channel = None

    def __init__(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


class InProcessTransport(Transport):
    """A worker thread at the far end of a socketpair."""

    def __init__(self, name: str, base: str):
        self.name = name
        self.frozen = False
        self.status: int | None = None
        self._read_timeout: float | None = None
        self._sock, far = socket.socketpair()
        self._sock.setblocking(False)
        secure_dir(base)
        self.worker = Worker(
            name, base, RefCache(os.path.join(base, "cache")), _NoCapture()
        )
        self.worker.exit_on_hangup = False  # it would end this process
        self._thread = threading.Thread(
            target=self._serve, args=(far,), name=f"qjamfab-inproc-{name}", daemon=True
        )
        self._thread.start()

    def _serve(self, far: socket.socket) -> None:
        _workers.transport = self
        fd = far.fileno()
        try:
            self.worker.serve(Channel(far.recv_into, far.sendmsg, fd))
            self.status = 0
        except _Died as died:
            self.status = died.status
        except OSError:  # the master closed the stream meanwhile
            self.status = 0
        finally:
            far.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_read_timeout(self, seconds: float) -> None:
        self._read_timeout = seconds

    def readinto(self, view: memoryview) -> int:
        while True:
            try:
                return self._sock.recv_into(view)
            except BlockingIOError:
                pass
            except OSError:
                return 0
            wait = self._read_timeout
            if not select.select([self._sock], [], [], wait)[0]:
                raise TimeoutError(f"worker {self.name} sent nothing for {wait:g} s")

    def writev(self, views: list) -> int:
        with mapped(f"sending to worker {self.name} on its socket", worker=self.name):
            try:
                return self._sock.sendmsg(views)
            except BlockingIOError:
                return 0  # full: see wait_writable

    def wait_writable(self) -> bool:
        readable, writable, _ = select.select(
            [self._sock], [self._sock], [], self._read_timeout
        )
        if not readable and not writable:
            raise self._took_nothing()
        return bool(readable)

    def computing(self) -> bool:
        return self._thread.is_alive() and not self.frozen

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
        if not self.frozen:
            self._thread.join(2.0)

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        self._thread.join(2.0)
        return self.status, ""
