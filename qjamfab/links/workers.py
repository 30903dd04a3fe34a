"""Workers as the Master sees them: streams and handles.

A `Link` is one byte stream (transport.py) and the workers it reaches:
to an SSH host it is the host's one stream to its agent
(runtime/agent.py), carrying every worker's frames, each naming its worker;
to a local worker it is that worker's pipe. A `WorkerHandle` is one worker:
its identity as data (host label, index), what it holds (function hashes,
slice refs), whether it is alive. A link turns each frame it reads into
events for the Master's inbox (inbox.py). A stream's end, or one that
stalls inside a frame, is a LOST event for each of its workers. How a
link starts (the handshake, attaching a host's workers) is handshake.py's.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import time
from collections.abc import Sequence
from typing import NamedTuple

from .. import protocol
from ..errors import ProtocolError, QjamfabError, WorkerLost
from ..hostspec import env_setting
from ..runtime import spool
from .outbox import Outbox
from .transport import Transport

_READ_ERRORS = (EOFError, OSError, ProtocolError, QjamfabError)
_FAR_END_GONE = (BrokenPipeError, ConnectionResetError)  # as a write says

log = logging.getLogger("qjamfab")

# Event kind: the worker's stream or daemon ended, head {"reason", "died"}
# and, from a link that knows it, "task": the copy it was running.
LOST = -1
# Event kind, from a Link: held tasks done at its host (its agent's
# note), head {"tasks": [(handle, task, run, compute_s, bytes), ...]}
DONE = -2


class Event(NamedTuple):
    """Something a worker (or a host's agent: `source` is its Link) sent."""

    source: WorkerHandle | Link
    kind: int
    head: dict
    parts: list


class WorkerHandle:
    """One worker: where it is, what it holds, whether it is alive."""

    def __init__(self, link: Link, index: int, name: str, hello: dict):
        self.link = link
        self.index = index  # its number on its host
        self.name = name  # "<host label>-<index>"
        self.host = link.label
        self.hello = hello
        self.funcs: set[str] = set()
        self.refs: set[str] = set()
        self.alive = True
        self.last_seen = time.monotonic()
        # It may still be running a task of a run that failed: until it
        # answers for the current run, its death is not that run's doing.
        self.stale = False
        self.gone_tail = ""  # what the agent said when it ended
        self.gone_status: int | None = None

    def send(
        self, kind: int, head: dict, payload: Sequence = (), queued: bool = False
    ) -> int:
        """Send a frame to this worker; `queued`: see Link.send."""
        worker = self.index if self.link.agent else 0
        try:
            return self.link.send(kind, head, payload, worker, self.name, queued=queued)
        except WorkerLost as exc:
            if not self.link.remote:
                raise
            raise WorkerLost(
                f"worker {self.name} is unreachable ({exc})", worker=self.name
            ) from exc

    def exit_report(self) -> tuple[int | None, str]:
        """After it ended: (exit status if known, its output's tail)."""
        if self.gone_status is not None or (self.link.agent and self.link.alive):
            return self.gone_status, self.gone_tail
        return self.link.transport.exit_report(self.hello.get("log"))

    def close(self) -> None:
        self.alive = False
        if not self.link.agent:
            self.link.close()

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.name}{'' if self.alive else ' lost'}>"


class Link:
    """One stream: to a host's agent (`agent` true) or to one worker."""

    def __init__(
        self, label: str, transport: Transport, agent: bool, stall_timeout: float
    ):
        self.label = label
        self.transport = transport
        self.agent = agent  # frames pass through a host's agent
        self.remote = agent  # a host's stream (even when direct)
        self.local = False  # to a worker process on this machine
        self.held: list | None = None  # frames sent while held (hold)
        self.outbox = Outbox(lambda views: self.transport.writev(views))
        self.reader = protocol.FrameReader(transport.readinto)
        self.handles: dict[int, WorkerHandle] = {}
        self.jobs: set[str] = set()  # job hashes sent to its agent (FUNC)
        self.info: dict = {}  # the agent's HELLO
        self.alive = True
        self.last_seen = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.stall_timeout = stall_timeout  # after the handshake
        self.python = ""  # what runs the agent, for messages
        # The events its inbox (inbox.py) has yet to hand out, once in one.
        self.pending: collections.deque[Event] | None = None
        self.count = 0  # workers the agent attached at most
        # Big frames through a directory both ends see, where the stream
        # holds them back (srun; runtime/spool.py): set once both agree.
        self.spool: spool.Spool | None = None

    def install_advice(self, ship: str | None) -> str:
        """How to give this host's workers a module they lack; `ship`:
        the `packages=` argument that would ship it from here, if any."""
        return (
            f"install it for {self.python or 'its python'} there, "
            + (f"ship it from here with Master(..., {ship}), " if ship else "")
            + f"or set {env_setting('REMOTE_PYTHON')[1]} to a Python that has it"
        )

    def computing(self) -> bool:
        """Whether the far end still computes (a process running, not
        stopped) when its heartbeats are late."""
        return self.transport.computing()

    def fileno(self) -> int:
        return self.transport.fileno()

    def write(self, buffers: list) -> int:
        """Write these buffers (whole frames, or the runtime's bundle as
        the agent starts) after what the outbox holds, waiting for the
        stream to take them all; their size."""
        size = protocol.frame_size(buffers)
        queued = self.outbox.take()  # first: frames keep their order
        try:
            protocol.write_all(self.transport.writev, queued + buffers, self._blocked)
        except WorkerLost as exc:
            self._cut(exc)
            raise
        if queued:
            self.outbox.written()
        self.bytes_sent += size
        return size

    def _cut(self, exc: WorkerLost) -> None:
        # A frame cut short leaves the stream unusable: every worker on
        # it is lost, and the events say so (once: lost() names only the
        # workers still alive). Where the far end is gone, what it wrote
        # before it ended comes first: a result it sent as it died counts.
        if self.pending is not None:
            if self.alive and isinstance(exc.__cause__, _FAR_END_GONE):
                self.pending.extend(self._written_before_its_end())
            self.pending.extend(self.lost(str(exc)))
        self.close()

    def flush(self) -> None:
        """Write what the outbox holds, as far as the stream takes it now.
        WorkerLost if the stream is lost (its workers' LOST events queued)."""
        try:
            self.outbox.flush()
        except WorkerLost as exc:
            self._cut(exc)
            raise

    def _blocked(self) -> None:
        """The stream is full: while waiting for room, take in what the
        far end sends (it may be waiting for us to read)."""
        if self.transport.wait_writable():
            if self.pending is None:  # starting: nothing to read it for yet
                time.sleep(0.001)
            else:
                self.pending.extend(self.read_events())

    def send(
        self,
        kind: int,
        head: dict,
        payload: Sequence = (),
        worker: int = 0,
        to: str | None = None,
        queued: bool = False,
    ) -> int:
        """Send a frame (to `worker` of a host's agent; `to` names it in
        the log); its size. `queued`, for a big frame (a slice): without
        waiting for the stream to take it, the rest waiting in the outbox
        (outbox.py), written as the stream drains while the Master reads
        and sends to others; where the stream cannot be polled for room,
        as any other."""
        if not self.alive:  # its loss is known: say so, write nothing
            name = to or self.label
            raise WorkerLost(f"worker {name} is gone: its stream ended", worker=name)
        buffers = protocol.frame(kind, head, payload, worker)
        if self.spool is not None:
            whole = protocol.frame_size(buffers)
            buffers = self.spool.out(buffers)
            self.bytes_sent += whole - protocol.frame_size(buffers)
        if self.held is not None:
            self.held.extend(buffers)
            size = protocol.frame_size(buffers)
        elif queued and self.transport.write_fileno() is not None:
            self.outbox.add(buffers)
            size = protocol.frame_size(buffers)
            self.bytes_sent += size
            self.flush()
        else:
            size = self.write(buffers)
        self._logged(kind, head, size, to)
        return size

    def _logged(self, kind: int, head: dict, size: int, to: str | None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "-> %s %s %s (%d bytes)",
                to or self.label,
                protocol.KIND_NAMES.get(kind, kind),
                head,
                size,
            )

    def hold(self) -> None:
        """Keep what is sent from now on, to write it at `release`: a
        run's first tasks to a host's workers cost one write, not one
        each."""
        self.held = []

    def release(self) -> None:
        """Write what `hold` kept. A failure is the link's loss, already
        queued as its workers' events (as `write` does)."""
        buffers, self.held = self.held, None
        if buffers and self.alive:
            try:
                self.write(buffers)
            except WorkerLost:
                pass

    def read_events(self) -> list[Event]:
        """Read the next frame: what it means, as events (none for a
        heartbeat)."""
        try:
            frame = self.read_frame()
        except _READ_ERRORS as exc:
            # A stream that stalls inside a frame is lost, not dead.
            return self.lost(
                str(exc) or type(exc).__name__,
                False if isinstance(exc, TimeoutError) else None,
            )
        return self._events(*frame)

    def read_frame(self) -> tuple[int, int, dict, list]:
        """The next frame, from its spool file where the stream says so."""
        frame = self.reader.read()
        if frame[0] != protocol.SPOOL or self.spool is None:
            return frame
        fd = self.spool.take(frame[2])
        try:
            return spool.read_frame(fd)
        finally:
            os.close(fd)

    def _written_before_its_end(self) -> list[Event]:
        """The far end is gone (a write to it failed): the frames it wrote
        before it ended, all there to read without waiting, as events, up
        to the stream's end (whose loss the write says)."""
        waiting = select.poll()
        waiting.register(self.fileno(), select.POLLIN)
        events: list[Event] = []
        while self.reader.buffered() or (
            waiting.poll(0) and self.transport.has_input()
        ):
            try:
                frame = self.read_frame()
            except _READ_ERRORS:
                break
            events.extend(self._events(*frame))
        return events

    def _events(self, kind: int, worker: int, head: dict, parts: list) -> list[Event]:
        now = self.last_seen = time.monotonic()
        self.bytes_received += sum(len(p) for p in parts)
        if self.agent and worker == protocol.AGENT:
            if kind == protocol.HEARTBEAT:
                stale = set(head.get("stale", ()))
                for k, h in self.handles.items():
                    if k not in stale:
                        h.last_seen = now
                return []
            if kind == protocol.STATE and head.get("state") == "done":
                return self._done(head["tasks"], head.get("moved"), now, offer=None)
            if kind == protocol.RESULT and "notes" in head:
                # Offered unasked: the notes of its last tasks come first.
                notes, moved = head["notes"], head.get("moved")
                done = self._done(notes, moved, now, offer=head.get("run"))
                return done + [Event(self, kind, head, parts)] if self.alive else done
            return [Event(self, kind, head, parts)]
        handle = self.handles.get(worker if self.agent else 0)
        if handle is None or not handle.alive:
            return []
        handle.last_seen = now
        if kind == protocol.HEARTBEAT:
            return []
        if kind == protocol.GONE:
            handle.alive = False
            handle.gone_tail = head.get("tail", "")
            handle.gone_status = head.get("status")
            if not self.agent:  # a direct stream ends with its worker
                self.close()
            return [
                Event(
                    handle,
                    LOST,
                    {
                        "reason": head["reason"],
                        "died": handle.gone_status is not None,
                        "task": head.get("task"),  # what it ran, where known
                    },
                    [],
                )
            ]
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "<- %s %s %s (%d payload bytes)",
                handle.name,
                protocol.KIND_NAMES.get(kind, kind),
                head,
                sum(len(p) for p in parts),
            )
        return [Event(handle, kind, head, parts)]

    def _done(
        self, notes: list, moved: list | None, now: float, offer: object
    ) -> list[Event]:
        """The agent's note of held tasks done: one DONE event for the
        host, naming each live worker's, and the tasks it moved from one
        of its workers to another (task, from, to); `offer`: the run whose
        combined results come right after it (not to be asked for), else
        None."""
        done, moves = [], []
        try:
            for task, source, to in moved or ():
                moves.append((task, self.handles[source], self.handles[to]))
            for k, task, run, compute_s, _, size in notes:
                handle = self.handles.get(k)
                if handle is not None and handle.alive:
                    handle.last_seen = now
                    done.append((handle, task, run, float(compute_s), size))
        except (KeyError, TypeError, ValueError) as exc:
            return self.lost(
                f"the agent's note of tasks done is not one ({exc}): restart "
                "the Master (its agent runs another qjamfab runtime)"
            )
        if not done and not moves and offer is None:
            return []
        head = {"tasks": done, "moved": moves, "offer": offer}
        return [Event(self, DONE, head, [])]

    def lost(self, reason: str, died: bool | None = None) -> list[Event]:
        """The stream ended: every live worker on it is lost. A local
        worker's stream ends when its process does (`died`); a host's when
        its connection or agent does, which says nothing of its workers."""
        self.alive = False
        died = (not self.remote) if died is None else died
        events = [
            Event(h, LOST, {"reason": reason, "died": died}, [])
            for h in self.handles.values()
            if h.alive
        ]
        for handle in self.handles.values():
            handle.alive = False
        return events

    def close(self) -> None:
        self.alive = False
        for handle in self.handles.values():
            handle.alive = False
        self.outbox.drop()
        self.transport.close()
