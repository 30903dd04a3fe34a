"""Worker handles: one connected worker as the Master sees it.

A `WorkerHandle` wraps a Transport: it checks the worker's HELLO, writes
frames, and reads frames on its own thread, posting each (except heartbeats,
which only mark it alive) to the Master's single event queue. At the end of
the stream it posts LOST. It also remembers what the worker holds (function
hashes, slice refs), so runs send only what is missing.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Sequence

from . import protocol
from .errors import ProtocolError, QjamfabError, WorkerLost
from .transport import Transport

log = logging.getLogger("qjamfab")

LOST = -1               # event kind posted by a reader thread at end of stream
_HANDSHAKE_TIMEOUT_S = 30.0


class WorkerHandle:
    """One connected worker: its transport, reader thread and what it holds."""

    def __init__(self, name: str, transport: Transport, events: queue.Queue):
        self.name = name
        self.transport = transport
        self.reader = protocol.FrameReader(transport.readinto)
        self.funcs: set[str] = set()
        self.refs: set[str] = set()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.alive = True
        self._lock = threading.Lock()
        self.hello = self._handshake()
        self.last_seen = time.monotonic()
        self._events = events
        threading.Thread(target=self._read_loop, name=f"qjamfab-{name}",
                         daemon=True).start()

    def _handshake(self) -> dict:
        timer = threading.Timer(_HANDSHAKE_TIMEOUT_S, self.transport.close)
        timer.start()
        try:
            kind, head, _ = self.reader.read()
        except (EOFError, ProtocolError, OSError) as exc:
            status, tail = self.transport.exit_report(None)
            self.transport.close()
            said = tail.splitlines()[-1] if tail else "see the output below"
            raise WorkerLost(
                f"worker {self.name} did not start (exit status {status}): "
                f"{said}\n{tail}", worker=self.name,
                exit_status=status, stderr_tail=tail) from exc
        finally:
            timer.cancel()
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
        with self._lock:
            protocol.write_all(self.transport.writev, buffers)
            self.bytes_sent += size
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> %s %s %s (%d bytes)", self.name,
                      protocol.KIND_NAMES.get(kind, kind), head, size)
        return size

    def _read_loop(self) -> None:
        try:
            while True:
                kind, head, parts = self.reader.read()
                self.last_seen = time.monotonic()
                size = sum(len(p) for p in parts)
                self.bytes_received += size
                if log.isEnabledFor(logging.DEBUG) and \
                        kind != protocol.HEARTBEAT:
                    log.debug("<- %s %s %s (%d payload bytes)", self.name,
                              protocol.KIND_NAMES.get(kind, kind), head, size)
                if kind != protocol.HEARTBEAT:
                    self._events.put((self, kind, head, parts))
        except (EOFError, OSError, ProtocolError, QjamfabError) as exc:
            self.alive = False
            self._events.put((self, LOST, {"reason": str(exc)}, []))

    def close(self) -> None:
        self.alive = False
        self.transport.close()
