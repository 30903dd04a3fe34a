"""Worker handles: one connected worker as the Master sees it.

A `WorkerHandle` wraps a Transport: it checks the worker's HELLO, writes
frames, and reads them when the Master asks. `read_events` waits on every
handle's stream at once (poll) and reads on the caller's thread: no reader
threads, so a result reaches the caller without a thread switch (35 us
each, measured). A stream's end, or one that stalls inside a frame, is a
LOST event. A handle also remembers what its worker holds (function hashes,
slice refs), so runs send only what is missing.
"""
from __future__ import annotations

import logging
import select
import time
from typing import Iterable, Sequence

from . import protocol
from .errors import ProtocolError, QjamfabError, WorkerLost
from .transport import Transport

log = logging.getLogger("qjamfab")

LOST = -1               # event kind: the worker's stream ended
_HANDSHAKE_TIMEOUT_S = 30.0

Event = tuple   # (handle, kind, head, payload parts)


class WorkerHandle:
    """One connected worker: its transport, frame reader and what it holds.
    Used from one thread at a time (the Master's caller)."""

    def __init__(self, name: str, transport: Transport,
                 stall_timeout: float):
        self.name = name
        self.transport = transport
        self.reader = protocol.FrameReader(transport.readinto)
        self.funcs: set[str] = set()
        self.refs: set[str] = set()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.alive = True
        transport.set_read_timeout(_HANDSHAKE_TIMEOUT_S)
        self.hello = self._handshake()
        # Within a frame, silence this long means the worker is gone.
        transport.set_read_timeout(stall_timeout)
        self.last_seen = time.monotonic()

    def fileno(self) -> int:
        return self.transport.fileno()

    def _handshake(self) -> dict:
        try:
            kind, head, _ = self.reader.read()
        except TimeoutError as exc:
            self.transport.close()
            raise WorkerLost(
                f"worker {self.name} did not start: no answer in "
                f"{_HANDSHAKE_TIMEOUT_S:g} s; check the host's load and its "
                "python", worker=self.name) from exc
        except (EOFError, ProtocolError, OSError) as exc:
            status, tail = self.transport.exit_report(None)
            self.transport.close()
            said = tail.splitlines()[-1] if tail else "see the output below"
            raise WorkerLost(
                f"worker {self.name} did not start (exit status {status}): "
                f"{said}\n{tail}", worker=self.name,
                exit_status=status, stderr_tail=tail) from exc
        if kind != protocol.HELLO or head.get("version") != protocol.VERSION:
            self.transport.close()
            raise ProtocolError(
                f"worker {self.name} speaks protocol {head.get('version')}, "
                f"not {protocol.VERSION}: restart it with this qjamfab's "
                "runtime (stop-workers, then start-workers)")
        return head

    def send(self, kind: int, head: dict, payload: Sequence = ()) -> int:
        buffers = protocol.frame(kind, head, payload)
        size = protocol.frame_size(buffers)
        protocol.write_all(self.transport.writev, buffers)
        self.bytes_sent += size
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> %s %s %s (%d bytes)", self.name,
                      protocol.KIND_NAMES.get(kind, kind), head, size)
        return size

    def read_event(self) -> Event:
        """The next frame as an event; LOST at the end of the stream."""
        try:
            kind, head, parts = self.reader.read()
        except (EOFError, OSError, ProtocolError, QjamfabError) as exc:
            self.alive = False
            return (self, LOST, {"reason": str(exc) or type(exc).__name__}, [])
        self.last_seen = time.monotonic()
        size = sum(len(p) for p in parts)
        self.bytes_received += size
        if log.isEnabledFor(logging.DEBUG) and kind != protocol.HEARTBEAT:
            log.debug("<- %s %s %s (%d payload bytes)", self.name,
                      protocol.KIND_NAMES.get(kind, kind), head, size)
        return (self, kind, head, parts)

    def close(self) -> None:
        self.alive = False
        self.transport.close()


def read_events(handles: Iterable[WorkerHandle], timeout: float
                ) -> list[Event]:
    """Wait up to `timeout` s until some of the live handles have input,
    then read one frame from each that has (heartbeats included); [] when
    none had any."""
    live = [h for h in handles if h.alive]
    ready = [h for h in live if h.reader.buffered()]
    if not ready and live:
        by_fd = {h.fileno(): h for h in live}
        poller = select.poll()   # unlike select(), any number of fds
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        ready = [by_fd[fd] for fd, _ in poller.poll(
            max(0.0, timeout) * 1000) if by_fd[fd].transport.has_input()]
    elif not live and timeout > 0:
        time.sleep(timeout)
    return [h.read_event() for h in ready]
