"""How a worker is reached: its channel, the frames it takes, the daemon's socket.

A `Channel` is one framed connection to the master (a pipe's fds, a Unix
socket, or the master's stream handed over by the host agent), written
from several threads. `check_head` refuses a frame a worker cannot act
on. `serve_socket` is daemon mode: a Unix socket (0600) serving one
client at a time, claimed by saying "serve" (a client that says nothing
within _CLAIM_WAIT_S is dropped, others are served meanwhile), a
connection that breaks the protocol closed and logged. `DaemonLog` is
the worker's own log. What a worker does with the frames is worker.py's.
"""

from __future__ import annotations

import io
import json
import os
import select
import socket
import stat
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from .. import protocol
from ..errors import ProtocolError
from . import listen_unix, process_start, stream_lock, this_runtime, write_locked
from .cache import is_ref
from .shared_params import is_shared_params_path

if TYPE_CHECKING:
    from types import TracebackType

    from .capture import Capture

# Frame limits: a TASK head lists its refs (100,000 slices take 7 MB); a
# part (params, a job, a slice kept in memory) must also fit in memory.
_MAX_HEAD = 64 << 20
_MAX_PART = 64 << 30


class Channel:
    """One framed connection to the master; writes are thread-safe."""

    def __init__(
        self,
        readinto: Callable[[memoryview], int],
        writev: Callable[[list], int],
        read_fd: int,
        write_lock: int | None = None,
        atomic: int = 0,
    ):
        """`write_lock`: a lock file held while writing a frame to a stream
        another process writes too; `atomic`: frames of one buffer up to
        this size need no lock (a pipe's PIPE_BUF: such a write is never
        interleaved with another's)."""
        self.reader = protocol.FrameReader(
            readinto, max_head=_MAX_HEAD, max_part=_MAX_PART
        )
        self._writev = writev
        self.read_fd = read_fd
        self.write_lock = write_lock
        self.atomic = atomic
        self._lock = threading.Lock()
        self.open = True

    def input_waiting(self) -> bool:
        """Whether a frame has (started to) arrive, without blocking."""
        return self.reader.buffered() or bool(
            select.select([self.read_fd], [], [], 0)[0]
        )

    def send(self, kind: int, head: dict, payload: Sequence = ()) -> None:
        buffers = protocol.frame(kind, head, payload)
        with self._lock:
            if not self.open:
                return
            if self.write_lock is None or (
                len(buffers) == 1 and len(buffers[0]) <= self.atomic
            ):
                # Two syscalls fewer per small frame (a task's RESULT).
                protocol.write_all(self._writev, buffers)
            else:
                write_locked(self.write_lock, self._writev, buffers)

    def close(self) -> None:
        """Send nothing more: the heartbeat thread may outlive the
        connection, and its descriptor may be the next client's."""
        with self._lock:
            self.open = False


class DaemonLog:
    """The stderr this process was started with: a daemon's
    `log/worker-N.daemon`, a local worker's stderr as its master reads it.
    (fd 2 itself is the capture of job output.)"""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, text: str) -> None:
        data = (
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {text.rstrip()}\n"
        ).encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            pass  # a full disk: there is nowhere left to say it

    def exception(
        self,
        exc_type: type[BaseException],
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.write("".join(traceback.format_exception(exc_type, value, tb)))

    def thread_exception(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            self.exception(args.exc_type, args.exc_value, args.exc_traceback)


# The head keys a worker needs, by the kinds it takes.
_NEEDS = {
    protocol.FUNC: ("hash",),
    protocol.TASK: ("task", "run", "func", "refs", "slices", "leaves", "params"),
    protocol.REFS: ("ref",),
    protocol.CANCEL: ("task",),
    protocol.FETCH: ("task",),
    protocol.PARAMS: ("run",),
    protocol.CLEAR: (),
    protocol.STATS: (),
    protocol.ATTACH: (),
    protocol.PACKAGES: ("paths",),
}


def check_head(kind: int, head: dict, parts: list) -> None:
    """Refuse a frame a worker cannot act on: ProtocolError naming it."""
    name = protocol.KIND_NAMES.get(kind, kind)
    need = _NEEDS.get(kind)
    if need is None:
        raise ProtocolError(
            f"a frame of kind {name} is not one a worker takes: the peer is "
            f"not a qjamfab master of protocol version {protocol.VERSION}"
        )
    lacking = [key for key in need if key not in head]
    bad = None
    if lacking:
        bad = f"it lacks {', '.join(lacking)}"
    elif kind == protocol.FUNC and not (isinstance(head["hash"], str) and parts):
        bad = "it needs a hash and the job's bytes"
    elif kind == protocol.TASK and not isinstance(head["func"], str):
        bad = "its func is not a hash"
    elif kind == protocol.TASK and not (
        head["refs"] is None
        or isinstance(head["refs"], (list, tuple))
        and all(is_ref(r) for r in head["refs"])
    ):
        bad = "its refs are not a list of refs"
    elif (
        kind == protocol.PARAMS
        and "path" in head
        and not is_shared_params_path(head["path"])
    ):
        bad = f"{head['path']!r:.80} is not where a host shares params"
    elif kind == protocol.TASK and not (
        isinstance(head.get("broadcasts", []), list)
        and all(is_ref(r) for r in head.get("broadcasts", []))
    ):
        bad = "its broadcasts are not a list of refs"
    elif kind == protocol.REFS and not is_ref(head["ref"]):
        bad = f"{head['ref']!r:.80} is not a ref"
    if bad:
        raise ProtocolError(
            f"a {name} frame a worker cannot act on ({bad}): the peer is not "
            f"a qjamfab master of protocol version {protocol.VERSION}"
        )


class Served(Protocol):
    """What serve_socket serves: a Worker (worker.py)."""

    name: str
    heartbeats: bool
    capture: Capture

    def serve(self, channel: Channel) -> None: ...


def fd_channel(read_fd: int, write_fd: int, write_lock: int | None = None) -> Channel:
    reader = io.FileIO(read_fd, "r", closefd=False)
    return Channel(
        reader.readinto,
        lambda views: os.writev(write_fd, views),
        read_fd,
        write_lock,
        select.PIPE_BUF if stat.S_ISFIFO(os.fstat(write_fd).st_mode) else 0,
    )


_CLAIM_WAIT_S = 5.0  # for a client that connected to say "serve"
_CLAIM = b"serve\n"


def _socket_channel(conn: socket.socket) -> Channel:
    conn.setblocking(True)
    fd = conn.fileno()
    return Channel(conn.recv_into, lambda views: os.writev(fd, views), fd)


def _claim(
    listener: socket.socket, ready_line: bytes, idle_timeout: float
) -> socket.socket | None:
    """The next client to say "serve": each that connects is sent the
    ready line and has _CLAIM_WAIT_S to answer while others connect, so one
    that says nothing delays no one. None after idle_timeout (when > 0)
    without a claim."""
    idle_until = time.monotonic() + idle_timeout if idle_timeout > 0 else None
    waiting: dict[socket.socket, tuple[float, bytearray]] = {}
    try:
        while True:
            now = time.monotonic()
            for conn in [c for c, (t, _) in waiting.items() if t <= now]:
                del waiting[conn]
                conn.close()
            if idle_until is not None and now >= idle_until:
                return None
            deadlines = [t for t, _ in waiting.values()]
            if idle_until is not None:
                deadlines.append(idle_until)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            readable, _, _ = select.select([listener, *waiting], [], [], timeout)
            for sock in readable:
                if sock is listener:
                    try:
                        conn, _ = listener.accept()
                        conn.setblocking(False)
                        conn.sendall(ready_line)
                    except OSError:  # gone already
                        continue
                    waiting[conn] = (time.monotonic() + _CLAIM_WAIT_S, bytearray())
                    continue
                said = waiting[sock][1]
                try:
                    line = _first_line(sock, said)
                except OSError:
                    line = b""
                if line is None:
                    continue  # not a whole line yet
                del waiting[sock]
                if line == _CLAIM:
                    return sock
                sock.close()
    finally:
        for conn in waiting:
            conn.close()


class HandOver(Exception):
    """The agent gives this daemon the master's stream (a host of one
    worker): serving the agent's connection ends, the stream's begins."""


def _first_line(conn: socket.socket, said: bytearray) -> bytes | None:
    """Add what the client says to `said`, never a byte past its first
    newline (frames may follow it); the line once whole or 64 bytes long,
    b"" when the client hung up first, else None."""
    data = conn.recv(64, socket.MSG_PEEK)
    if not data:
        return b""
    end = data.find(b"\n")
    said += conn.recv(end + 1 if end >= 0 else len(data))
    return bytes(said) if end >= 0 or len(said) >= 64 else None


def serve_socket(
    worker: Served, path: str, idle_timeout: float, log: DaemonLog
) -> None:
    """Daemon mode: each connection is the host agent of one Master
    session; it says "serve" after reading our "ready" line, and frames
    then flow over the connection until it ends. A connection that breaks
    the protocol is closed and logged, and the next one served."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    listener, bound_inode = listen_unix(path, 8)
    pid_path = path[: -len(".sock")] + ".pid"
    with open(pid_path, "w") as f:
        # Its start time too: a daemon forked by the template (forkserver.py)
        # has the template's command line, not one naming this socket.
        f.write(f"{os.getpid()} {process_start(os.getpid())}\n")
    listener.setblocking(False)
    ready_line = (
        json.dumps(
            {"pid": os.getpid(), "log": worker.capture.path, "runtime": this_runtime()}
        ).encode()
        + b"\n"
    )
    try:
        while True:
            conn = _claim(listener, ready_line, idle_timeout)
            if conn is None:
                return
            with conn:
                try:
                    try:
                        worker.serve(_socket_channel(conn))
                    except HandOver:
                        # The master's stream itself, from the agent: it
                        # keeps this connection to learn when we end.
                        _, fds, _, _ = socket.recv_fds(conn, 1, 2)
                        lock = stream_lock(path)
                        # The agent beats for us from outside: a C call
                        # holding our GIL would stop our own beats.
                        worker.heartbeats = False
                        try:
                            worker.serve(fd_channel(fds[0], fds[1], lock))
                        finally:
                            worker.heartbeats = True
                            for fd in [*fds, lock]:
                                os.close(fd)
                except ConnectionError:
                    pass  # that client hung up as we wrote to it
                except ProtocolError as exc:
                    log.write(
                        f"{worker.name}: closed a connection that broke "
                        f"the protocol, serving the next: {exc}"
                    )
                except Exception:
                    log.write(
                        f"{worker.name}: closed a connection after an "
                        "error in the daemon, serving the next:\n"
                        + traceback.format_exc()
                    )
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == bound_inode:  # not a successor's
                os.unlink(path)
                os.unlink(pid_path)
        except FileNotFoundError:
            pass
