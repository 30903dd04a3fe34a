"""A real worker daemon, started as runtime/manage.py starts one, and a
client that speaks to its socket as the host agent does (agent.py
`_connect`): read the "ready" line, say "serve", read HELLO, then frames.
Also whatever a well-behaved client must not send."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from qjamfab import protocol, runtime
from qjamfab.data import serialize


class Client:
    def __init__(self, path: str, claim: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.reader = protocol.FrameReader(self.sock.recv_into)
        self.info = json.loads(self.reader.read_line(4096))
        self.logs: list[str] = []
        self.hello = None
        if claim:
            self.sock.sendall(b"serve\n")
            kind, _, self.hello, _ = self.reader.read()
            assert kind == protocol.HELLO, kind

    def send(self, kind: int, head: dict, payload=()) -> None:
        protocol.write_all(self.sock.sendmsg, protocol.frame(kind, head, payload))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self) -> tuple[int, dict, list]:
        """The next frame that is not a heartbeat; LOG text is kept."""
        while True:
            kind, _, head, parts = self.reader.read()
            if kind == protocol.LOG:
                self.logs.append(head["text"])
            elif kind != protocol.HEARTBEAT:
                return kind, head, parts

    def closed_by_peer(self, within: float) -> bool:
        """Whether the daemon ends this connection within `within` s
        (heartbeats sent before that are read and dropped)."""
        self.sock.settimeout(within)
        try:
            while self.sock.recv(1 << 16):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def job(mapfunc, reduce=None) -> tuple[str, bytes]:
    """(hash, bytes) of a job as the master ships it in a FUNC frame (by
    value: the daemon cannot import these tests)."""
    return serialize.encode_job(mapfunc, reduce)


def task_head(task: int, func: str, refs=None, params: bool = True) -> dict:
    slices = list(range(len(refs))) if refs else [0]
    return {
        "task": task,
        "run": "run-1",
        "func": func,
        "refs": refs,
        "slices": slices,
        "leaves": len(slices),
        "params": params,
        "hold": False,
    }


def result_value(parts: list) -> object:
    """The value a task's RESULT carries: its slices' one tree node (the
    task covers every leaf of its run, as task_head makes it)."""
    ((lo, size, value),) = protocol.decode(parts)
    assert lo == 0
    return value


class Daemon:
    """worker-0 of `base`, its stderr in worker-0.daemon in the host's
    directory for it (or `stderr_path`), as manage.start_slots starts it."""

    def __init__(
        self, base: str, env: dict | None = None, stderr_path: str | None = None
    ):
        self.base = base
        runtime.ensure_local_bundle(base)
        self.dir = runtime.secure_host_dir(base)
        self.socket = os.path.join(self.dir, "worker-0.sock")
        self.log_path = stderr_path or os.path.join(self.dir, "worker-0.daemon")
        with open(self.log_path, "ab") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    runtime.boot_code("worker"),
                    "--socket",
                    self.socket,
                    "--name",
                    "worker-0",
                    "--base",
                    base,
                    "--idle-timeout",
                    "300",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        pid_file = os.path.join(self.dir, "worker-0.pid")
        deadline = time.monotonic() + 15
        while not (os.path.exists(pid_file) and os.path.exists(self.socket)):
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        """The daemon's (its keeper is the process started here)."""
        with open(os.path.join(self.dir, "worker-0.pid")) as f:
            return int(f.read().split()[0])  # then its start time

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, OSError, ValueError):
            return False
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"

    def connect(self, claim: bool = True) -> Client:
        return Client(self.socket, claim)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def capture(self) -> str:
        """What the daemon's job output capture file holds."""
        path = os.path.join(self.dir, f"worker-0-{self.pid}.out")
        with open(path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(10)  # the keeper ends with the daemon


def serves(daemon: Daemon) -> None:
    """A well-behaved client gets HELLO and its task's answer."""
    client = daemon.connect()
    try:
        assert client.hello["pid"] == daemon.pid
        func, data = job(lambda params, _: params + 1)
        client.send(protocol.FUNC, {"hash": func}, [data])
        client.send(protocol.TASK, task_head(1, func), protocol.encode(41))
        kind, head, parts = client.next()
        assert (kind, head["task"]) == (protocol.RESULT, 1), head
        assert result_value(parts) == 42
    finally:
        client.close()
