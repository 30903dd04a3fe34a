"""Calls as a stream of tasks: sent to idle workers, answered one by one.

A `TaskStream` is what the futures dispatcher (executor.py) holds while
futures are in flight, under the Master's run lock: the Master's inbox and
live workers, one task at a time per worker. A task is a TASK of inline
calls (runtime/calls.py: the calls' pickle travels in the frame, never
through the slice cache) and comes back as one RESULT; `step()` reads the
next event and says what it meant: a task `Finished` (its RESULT's payload)
or `Failed` (an ERROR: its calls cannot be loaded there), or a worker
`Lost` with its task (the caller runs its calls again elsewhere). Workers
are restarted (`restart`, the Master's) once nothing is in flight.

`BatchSizer` is the adaptive batching: how many calls the next task takes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import protocol
from ..core import liveness
from ..core.remote_errors import remote_error
from ..core.runstats import print_event_log
from ..errors import QjamfabError, WorkerLost, describe_exit
from ..links.inbox import Inbox
from ..links.workers import LOST, Event, Link, WorkerHandle


class StreamTask:
    """One task of the stream: its calls (opaque here) on one worker."""

    __slots__ = ("id", "worker", "items")

    def __init__(self, task_id: int, worker: WorkerHandle, items: list[Any]):
        self.id = task_id
        self.worker = worker
        self.items = items


@dataclass
class Finished:
    task: StreamTask
    payload: Any  # the RESULT's one part: runtime/calls.py's pack()
    compute_s: float


@dataclass
class Failed:
    task: StreamTask
    error: QjamfabError


@dataclass
class Lost:
    """A worker ended with a task: `died` means its process did (so the
    task may be the cause), not its host or connection."""

    task: StreamTask
    died: bool
    detail: str
    status: int | None
    tail: str


Outcome = Finished | Failed | Lost


class TaskStream:
    """The workers of a Master as a stream of tasks (see the module doc)."""

    def __init__(
        self,
        inbox: Inbox,
        restart: Callable[[], list[WorkerHandle]],
        heartbeat_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`restart`: start the workers that are down; the live ones (it
        raises WorkerLost when none is)."""
        self.inbox = inbox
        self.restart = restart
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self.run_id = next(inbox.ids)
        self.workers = restart()
        self.busy: dict[WorkerHandle, StreamTask] = {}
        self.lost_some = False
        self.next_check = clock() + self._tick

    @property
    def _tick(self) -> float:
        return min(0.25, self.heartbeat_timeout / 4)

    @property
    def idle(self) -> list[WorkerHandle]:
        return [h for h in self.workers if h.alive and h not in self.busy]

    @property
    def in_flight(self) -> int:
        return len(self.busy)

    def refill(self) -> None:
        """Once nothing is in flight, restart the workers that were lost
        (their host's stream carries no task then)."""
        if self.lost_some and not self.busy:
            self.lost_some = False
            self.workers = self.restart()

    def send(self, handle: WorkerHandle, items: list[Any], payload: bytes) -> None:
        """A task of len(items) calls, their pickle `payload`, to `handle`."""
        task = StreamTask(next(self.inbox.ids), handle, items)
        self.busy[handle] = task
        try:
            handle.send(
                protocol.TASK,
                {
                    "task": task.id,
                    "run": self.run_id,
                    "func": "",
                    "refs": None,
                    "slices": [],
                    "leaves": 0,
                    "params": False,
                    "calls": len(items),
                },
                [payload],
            )
        except WorkerLost as exc:
            self._unreachable(handle, str(exc))

    def _unreachable(self, handle: WorkerHandle, reason: str) -> None:
        if handle.alive:
            handle.alive = False
            self.inbox.push_front(Event(handle, LOST, {"reason": reason}, []))

    def step(self, timeout: float) -> list[Outcome]:
        """Wait up to `timeout` s for the next event: what it meant."""
        event = self.inbox.next_event(timeout)
        out = [] if event is None else self._event(event)
        if self.clock() >= self.next_check:
            self.next_check = self.clock() + self._tick
            self._check_heartbeats()
        return out

    def _event(self, event: Event) -> list[Outcome]:
        source, kind, head, parts = event
        if kind == protocol.LOG:
            print_event_log(event)
            return []
        if isinstance(source, Link) or head.get("run", self.run_id) != self.run_id:
            return []  # the agent's, or left from an earlier run
        handle = source
        task = self.busy.get(handle)
        if kind == LOST:
            self.lost_some = True
            handle.alive = False
            if task is None:
                return []
            del self.busy[handle]
            status, tail = handle.exit_report()
            handle.close()
            return [
                Lost(
                    task,
                    bool(head.get("died")),
                    head["reason"] if status is None else describe_exit(status),
                    status,
                    tail,
                )
            ]
        if task is None or head.get("task") != task.id:
            return []
        if kind == protocol.RESULT:
            del self.busy[handle]
            return [Finished(task, parts[0], head["compute_s"])]
        if kind == protocol.ERROR:
            del self.busy[handle]
            return [Failed(task, remote_error(handle, "a task of calls", head))]
        return []  # a worker has nothing to ask for inline calls

    def _check_heartbeats(self) -> None:
        """A busy worker silent for heartbeat_timeout s is lost (unless its
        process still computes); a silent host, with all its workers."""
        silent = liveness.judge(
            self.busy, (), self.heartbeat_timeout, self.clock, self.inbox
        )
        reason = f"no heartbeat for {self.heartbeat_timeout:g} s"
        for handle in silent.workers:
            self._unreachable(handle, reason)  # its host answers
        for link in silent.hosts:
            liveness.silence(link, self.inbox, reason)


class BatchSizer:
    """How many calls the next task takes, as joblib's auto-batching: one
    at first; then enough for about `target_s` of work by the calls'
    mean time so far (each task's time on its worker, over its calls),
    growing at most `grow`-fold per task, and never more than a
    1/(2 x workers) share of what waits, so every worker gets some (unless
    that share is less than a tenth of `target_s` of work: then up to
    1/workers of it)."""

    def __init__(self, target_s: float = 0.05, grow: int = 8):
        self.target_s = target_s
        self.grow = grow
        self.size = 1
        self.per_call_s: float | None = None

    def add(self, calls: int, compute_s: float) -> None:
        """A task of `calls` calls took `compute_s` s on its worker."""
        mean = compute_s / max(1, calls)
        # Recent tasks count most: a sweep's calls may grow longer.
        self.per_call_s = (
            mean if self.per_call_s is None else (self.per_call_s + mean) / 2
        )
        self.per_call_s = max(self.per_call_s, 1e-7)
        ideal = self.target_s / self.per_call_s
        self.size = max(1, min(math.floor(ideal), self.size * self.grow))

    def next(self, waiting: int, workers: int) -> int:
        """Calls for the next task, when `waiting` wait for `workers`."""
        workers = max(1, workers)
        share = waiting // (2 * workers)
        if self.per_call_s is not None:
            # Work of a few ms is not worth a round trip of its own; but
            # what waits for several workers never goes to one: the
            # estimate may be wrong about the next call (a slow one).
            least = math.floor(self.target_s / 10 / self.per_call_s)
            share = max(share, min(least, waiting // workers))
        return max(1, min(self.size, share, waiting))
