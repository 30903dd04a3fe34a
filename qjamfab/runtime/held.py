"""What a host agent keeps of a run's results (TASKs with `hold`): which
held tasks still run here, their values, the notes of those done that the
master has not been told (with the held tasks moved from one of its
workers to another, host_queue.py), and what it has offered.

A held task's value stays here; the master is told it is done in a note
(several tasks' notes in one frame, within NOTES_WAIT_S). Once none of
the run's held tasks is left to run here, the values not yet offered are
combined in the run's fixed tree and sent unasked with the last notes (an
offer), when they are under the TASK's `offer` bytes. The master takes an
offer that names exactly its winners here; otherwise it asks for them
(COLLECT), so offered values stay until the next run. agent.py passes
frames in and out; this module holds no file descriptors.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .. import protocol
from .lru import JobCache
from .task import collect, load_job

# Notes of held tasks done wait this long for the host's other tasks (all
# of them go with the offer, in its frame): the master learns of a worker
# that ran dry this much later, well under the time a move must save
# (policy.MOVE_WORTH_S), and reads one frame per host on a short run.
NOTES_WAIT_S = 0.05


class HeldResults:
    """One agent's held results, for the run its last TASK named. Time is
    read from `clock` only."""

    def __init__(
        self, jobs: JobCache[bytes], clock: Callable[[], float] = time.monotonic
    ):
        self.jobs = jobs  # the agent's, by hash: each job's reduce is in it
        self.clock = clock
        self.reduce: tuple[str, Callable | None] | None = None  # the last loaded
        self.run: int | None = None  # the run tasks belong to
        self.func: str | None = None  # its job
        self.leaves = 0  # of its tree
        # Combine and offer held values of fewer bytes unasked (None: wait
        # for COLLECT).
        self.offer_below: int | None = None
        self.holding: set[int] = set()  # held tasks not yet done
        self.held: dict[int, list] = {}  # task id -> result parts
        self.unoffered: list[int] = []  # held, not offered yet, in order
        # Held tasks done, not yet told: [worker, task, run, compute_s,
        # slices, bytes] each, due by notes_due.
        self.done: list[list] = []
        self.notes_due = 0.0
        # Held tasks a worker here took from another (host_queue.py), not yet
        # told: [task, from worker, to worker] each, told at once.
        self.moved: list[list[int]] = []

    def task(self, head: dict) -> bool:
        """A TASK on its way to a worker: a new run forgets what the last
        one left here. Whether its result will stay here."""
        if head["run"] != self.run:
            # A new run: what an earlier one left held is nobody's.
            self.run = head["run"]
            self.func = head["func"]
            self.leaves = head["leaves"]
            self.offer_below = head.get("offer")
            self.held.clear()
            self.holding.clear()
            self.unoffered.clear()
            self.moved.clear()
        if head.get("hold"):
            self.holding.add(head["task"])
            return True
        return False

    def result(self, worker: int, head: dict, parts: list) -> bool:
        """A worker's RESULT: kept and noted (True) when its task is held."""
        task = head.get("task")
        if task not in self.holding:
            return False
        self.holding.discard(task)
        self.held[task] = parts
        self.unoffered.append(task)
        if not self.done:
            self.notes_due = self.clock() + NOTES_WAIT_S
        size = sum(len(p) for p in parts)
        self.done.append(
            [worker, task, head["run"], head["compute_s"], head["slices"], size]
        )
        return True

    def ended(self, task: int | None) -> None:
        """A task ended without a value (an ERROR, a cancel): not awaited
        here if it was held."""
        if task is not None:
            self.holding.discard(task)

    def move(self, task: int, source: int, to: int) -> None:
        """A held task went from worker `source` to worker `to` here: the
        master is told before anything `to` says of it."""
        self.moved.append([task, source, to])

    def untold(self) -> bool:
        """Whether notes wait to be told (before any other frame)."""
        return bool(self.done or self.moved)

    def due(self) -> bool:
        """Whether the notes (or an offer) should go now."""
        return (
            bool(self.moved)
            or self.can_offer()
            or (bool(self.done) and self.clock() >= self.notes_due)
        )

    def can_offer(self) -> bool:
        """Whether the run's held results are all in, some not offered."""
        return (
            self.offer_below is not None and not self.holding and bool(self.unoffered)
        )

    def frame(self) -> list | None:
        """The notes of the held tasks done since the last call, in one
        frame, with the combined results when they are offered; None
        when there is nothing to tell."""
        notes, self.done = self.done, []
        moved, self.moved = self.moved, []
        offer = self._offer()
        if offer is not None:
            kind, head, payload = offer
            head["notes"] = notes
            if moved:
                head["moved"] = moved
            return protocol.frame(kind, head, payload, protocol.AGENT)
        if notes or moved:
            head = {"state": "done", "tasks": notes, "moved": moved}
            return protocol.frame(protocol.STATE, head, (), protocol.AGENT)
        return None

    def _offer(self) -> tuple[int, dict, list] | None:
        """The held results not offered yet, combined as COLLECT would
        (a RESULT naming their tasks, or an ERROR), when every held task of
        the run is done here and they are small; None otherwise."""
        if not self.can_offer():
            return None
        tasks = [t for t in self.unoffered if t in self.held]  # not collected
        self.unoffered = []
        if not tasks:
            return None
        size = sum(len(p) for t in tasks for p in self.held[t])
        if self.offer_below is None or size >= self.offer_below:
            return None  # big: in the master's order, by COLLECT
        # Combined from copies: a reduce adds into what it decodes, and
        # the values stay here for a COLLECT should the master decline.
        values = {t: [bytearray(p) for p in self.held[t]] for t in tasks}
        head = {"run": self.run, "func": self.func, "leaves": self.leaves}
        return collect({**head, "tasks": tasks}, self.reduce_of, values)

    def collect(self, head: dict) -> tuple[int, dict, list]:
        """COLLECT: the named held results combined (task.collect), taken
        out; one RESULT, or an ERROR."""
        return collect(head, self.reduce_of, self.held)

    def reduce_of(self, job_hash: str) -> Callable | None:
        """The job's reduce, loaded once for the runs of one job."""
        if self.reduce is not None and self.reduce[0] == job_hash:
            return self.reduce[1]
        job = self.jobs.get(job_hash)
        if job is None:  # pinned from its run's first TASK: never
            raise LookupError(f"job {job_hash} is not held on the host")
        # Not hashed here: the daemons it passed these bytes on to do.
        _, reduce = load_job(job)
        self.reduce = (job_hash, reduce)
        return reduce
