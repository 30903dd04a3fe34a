"""The daemons a host agent attaches, and the ends it reads and writes.

`attach` claims a daemon for each of the session's workers (a lock file
per daemon slot, held while attached, so two sessions never share one),
starts the missing ones (manage.py) and connects to each over its Unix
socket; `exit_status` says how one ended, as its keeper recorded it.
`Peer` is one end the agent passes frames between (the master's stream,
a daemon's socket), written without blocking; `Daemon` is a claimed one.
The relaying itself is agent.py's.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

from .. import protocol
from . import host_dir, manage, pid_alive, process_running, procs, read_tail

_CONNECT_WAIT_S = 15.0  # for a daemon to say "ready"


class Peer:
    """One end the agent reads frames from and queues writes to."""

    def __init__(
        self, read_fd: int, write_fd: int, readinto: Callable[[memoryview], int]
    ):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.reader = protocol.FrameReader(readinto)
        self.out: deque[memoryview] = deque()  # waiting to be written
        self.closed = False

    def queue(self, buffers: list) -> None:
        self.out.extend(
            memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes
        )

    def flush(self) -> None:
        """Write what the far end takes now, without blocking."""
        while self.out:
            try:
                n = os.writev(self.write_fd, list(self.out)[:512])
            except BlockingIOError:
                return
            while n:
                if n >= len(self.out[0]):
                    n -= len(self.out.popleft())
                else:
                    self.out[0] = self.out[0][n:]
                    n = 0


class Daemon(Peer):
    """A daemon this session claimed: its socket and what it said."""

    def __init__(
        self, index: int, slot: int, sock: socket.socket, info: dict, lock_fd: int
    ):
        # Writes are queued (non-blocking); a read takes a whole frame,
        # waiting inside it: the daemon writes frames whole.
        sock.setblocking(False)
        super().__init__(sock.fileno(), sock.fileno(), _blocking_recv(sock))
        self.index = index  # the worker's number in the master's view
        self.slot = slot  # worker-<slot> on this host
        self.sock = sock
        self.info = info
        self.lock_fd = lock_fd
        self.last_seen = time.monotonic()
        self.jobs: set[str] = set()  # job hashes passed on to it (FUNC)
        self.broken: str | None = None  # why writing to it failed
        # Tasks of `run` passed on to it and not answered, in order: it
        # runs them in order, so the first is the one it was running if it
        # dies.
        self.run: int | None = None
        self.tasks: list[int] = []

    def send_queued(self) -> None:
        """Flush, unless writing to it failed: then it is `broken`, and
        nothing more goes to it. It ended with frames on their way to it:
        what it wrote before it ended (a result) is still read, then its
        end, which the agent reports."""
        if self.broken is not None:
            return
        try:
            self.flush()
        except OSError as exc:
            self.broken = f"its connection broke ({exc.strerror})"
            self.out.clear()

    def running(self) -> bool:
        """Seen from outside: its process exists and is not stopped."""
        return process_running(self.info["pid"])

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        os.close(self.lock_fd)

    def ended(self, base: str) -> tuple[int | None, str]:
        """Its connection ended: its exit status (None while it runs, or
        unknown) and, once it is gone, the tail of its log."""
        pid = self.info.get("pid")
        if not pid:
            return None, ""
        status = exit_status(base, self.slot, pid)
        if status is None and pid_alive(pid):
            return None, ""
        return status, read_tail(self.info.get("log", ""), 4096)


def attach(
    base: str,
    indices: list[int],
    avoid: set[int],
    idle: float,
    template: dict,
    conflicts: Callable[[dict], bool],
    session: str | None = None,
) -> tuple[list[tuple[Daemon, dict]], dict[int, str]]:
    """Claim a daemon for each worker index (a lock file per slot, held
    while attached; never a slot in `avoid`), start those missing, and
    connect: the daemons with their HELLOs, in order, and why the others
    failed. `template`: the env. settings of the session's workers;
    `conflicts`: whether a live daemon holds other shipped packages;
    `session`: the Master's, whose daemons (and no other's) a reconnect
    may attach again."""
    run = host_dir(base)  # claims are this host's own
    claimed: list[tuple[int, int, int]] = []  # (index, slot, lock fd)
    slot = 0
    for index in indices:
        while True:
            fd = (
                None
                if slot in avoid
                else _try_lock(os.path.join(run, f"worker-{slot}.lock"))
            )
            slot += 1
            if fd is not None:
                claimed.append((index, slot - 1, fd))
                break
    manage.stop_other_runtimes(base)
    manage.retire_served(base, session)  # of ended sessions, in other slots
    envs = {s: manage.worker_env(template, i) for i, s, _ in claimed}
    # A claimed daemon that served another session, or run by another
    # Python (QJAMFAB_REMOTE_PYTHON changed) or with other env. settings,
    # is replaced: each session's jobs run in daemons fresh for it.
    procs.stop_daemons(
        base,
        [
            w
            for w in manage.live_workers(base)
            if w["slot"] in envs
            and (
                (w["served"] is not None and w["served"] != session)
                or procs.cmdline(w["pid"]).split(" ", 1)[0] != sys.executable
                or manage.env_differs(w, envs[w["slot"]])
                or conflicts(w)
            )
        ],
    )
    alive = {w["name"] for w in manage.live_workers(base)}
    missing = [s for _, s, _ in claimed if f"worker-{s}" not in alive]
    attached: list[tuple[Daemon, dict]] = []
    failed: dict[int, str] = {}
    not_started = set(manage.start_slots(base, missing, idle, envs))
    for index, slot, fd in claimed:
        if slot in not_started:
            os.close(fd)
            failed[index] = (
                f"worker-{slot} did not start in "
                f"{procs.START_WAIT_S:g} s: " + _daemon_log(base, slot)
            )
            continue
        try:
            try:
                attached.append(_connect(base, index, slot, fd, session))
            except OSError:
                # It ended as we came (a task its last session left
                # ended it): start a fresh one.
                if manage.start_slots(base, [slot], idle, envs):
                    raise
                attached.append(_connect(base, index, slot, fd, session))
        except OSError as exc:
            os.close(fd)
            failed[index] = f"worker-{slot}: {exc}"
    return attached, failed


def _connect(
    base: str, index: int, slot: int, lock_fd: int, session: str | None
) -> tuple[Daemon, dict]:
    """Connect to daemon worker-<slot>, claim it ("serve") for `session`
    and forward its HELLO (which it answers "serve" with), to forward as
    worker `index`."""
    path = manage.socket_path(base, slot)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(_CONNECT_WAIT_S)
        sock.connect(path)
        reader = protocol.FrameReader(sock.recv_into)
        info = json.loads(reader.read_line(4096))
        sock.sendall(b"serve\n")
        kind, _, hello, _ = reader.read()
        if kind != protocol.HELLO or reader.buffered():
            raise OSError("the daemon did not say HELLO")
        manage.mark_served(path, info["pid"], session)
    except (OSError, ValueError, EOFError, protocol.ProtocolError) as exc:
        sock.close()
        raise OSError(f"cannot attach to {path}: {exc}") from exc
    return Daemon(index, slot, sock, info, lock_fd), hello


def _blocking_recv(sock: socket.socket) -> Callable[[memoryview], int]:
    """recv_into that waits for data on a non-blocking socket."""

    def readinto(view: memoryview) -> int:
        while True:
            try:
                return sock.recv_into(view)
            except BlockingIOError:
                select.select([sock], [], [])

    return readinto


def _try_lock(path: str) -> int | None:
    """An exclusive lock on path, or None when another session holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def exit_status(base: str, slot: int, pid: int) -> int | None:
    """The exit status daemon `pid` in `slot` ended with, as its keeper
    recorded it; None when it is still running (waits 1 s for the record)."""
    path = os.path.join(host_dir(base), f"worker-{slot}.exit")
    deadline = time.monotonic() + 1.0
    while True:
        try:
            with open(path) as f:
                record = json.load(f)
            if record.get("pid") == pid:
                return int(record["status"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline or (
            pid_alive(pid) and time.monotonic() > deadline - 0.8
        ):
            return None
        time.sleep(0.02)


def _daemon_log(base: str, slot: int) -> str:
    text = read_tail(os.path.join(host_dir(base), f"worker-{slot}.daemon"), 2048)
    return text.strip().splitlines()[-1] if text.strip() else "no output"
