"""A run's task copies on its workers: which are open, each worker's
queue in order, which workers ran dry, open copies per host.

A copy (`TaskCopy`) is one group of slices sent to one worker; a group may
have several (moves, backups). `Copies` books them as they open and close,
in constant work per copy, so that `Run` (run.py) asks it what is queued,
running, idle or open on a host instead of keeping that state itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..links.workers import Link, WorkerHandle


class TaskCopy:
    """One copy of a group of slices sent to one worker."""

    __slots__ = (
        "id",
        "worker",
        "group",
        "slices",
        "started",
        "held",
        "size",
        "cancelling",
    )

    def __init__(
        self,
        task_id: int,
        worker: WorkerHandle,
        group: int,
        slices: list[int],
        held: bool,
        now: float,
    ):
        self.id = task_id
        self.worker = worker
        self.group = group
        self.slices = slices
        self.started = now
        self.held = held  # its result waits at the host's agent
        self.size = 0  # its result's bytes, once "done" or "parked" says
        # Moved away: open until its worker confirms the cancel (it may have
        # started it already), but no longer counted on to run.
        self.cancelling = False


class Copies:
    """The open copies of one run, by id, by worker (in the order they
    run) and by host."""

    def __init__(self, workers: Sequence[WorkerHandle]):
        self.open: dict[int, TaskCopy] = {}  # task id -> live copy
        self.queues: dict[WorkerHandle, list[TaskCopy]] = {h: [] for h in workers}
        self.idle: set[WorkerHandle] = set(workers)
        self.queued = 0  # open copies not yet running
        self._on_host: dict[Link, int] = {}

    def add(self, task: TaskCopy) -> None:
        self.open[task.id] = task
        self._enqueue(task)
        link = task.worker.link
        self._on_host[link] = self._on_host.get(link, 0) + 1

    def remove(self, task: TaskCopy, now: float) -> bool:
        """The copy is no longer open (finished, cancelled or lost); the
        next in its worker's queue starts `now`. Whether it was the last
        open copy on its host."""
        del self.open[task.id]
        self._dequeue(task, now)
        link = task.worker.link
        self._on_host[link] -= 1
        return not self._on_host[link]

    def move(self, task: TaskCopy, worker: WorkerHandle, now: float) -> None:
        """The open copy's host gave it to another of its workers (the
        host's agent, runtime/host_queue.py): it runs there, and starts
        `now` if that worker had nothing else."""
        self._dequeue(task, now)
        task.worker = worker
        if not self.queues[worker]:
            task.started = now
        self._enqueue(task)

    def _enqueue(self, task: TaskCopy) -> None:
        queue = self.queues[task.worker]
        self.queued += bool(queue)
        queue.append(task)
        self.idle.discard(task.worker)

    def _dequeue(self, task: TaskCopy, now: float) -> None:
        queue = self.queues[task.worker]
        first = queue[0] is task
        queue.remove(task)
        self.queued -= bool(queue) if first else 1
        if first and queue:
            queue[0].started = now
        if not queue and task.worker.alive:
            self.idle.add(task.worker)

    def on_host(self, link: Link) -> bool:
        """Whether any copy is open on the host."""
        return bool(self._on_host.get(link))

    def of_group(self, group: int) -> list[TaskCopy]:
        return [t for t in self.open.values() if t.group == group]

    def per_group(self) -> dict[int, int]:
        """How many open copies each group has."""
        copies: dict[int, int] = {}
        for task in self.open.values():
            copies[task.group] = copies.get(task.group, 0) + 1
        return copies

    def waiting(self, won: Iterable[int] | set[int]) -> list[TaskCopy]:
        """Queued copies (not yet running) of groups not won."""
        if not self.queued:
            return []
        return [t for q in self.queues.values() for t in q[1:] if t.group not in won]

    def running(self) -> list[TaskCopy]:
        """Each busy worker's copy at the head of its queue."""
        return [q[0] for q in self.queues.values() if q]

    def busy(self) -> list[WorkerHandle]:
        return [h for h, q in self.queues.items() if q]

    def ran(self, handle: WorkerHandle, named: int | None) -> list[int]:
        """The slices the worker was running when it ended: the head of
        its queue, or the copy its link `named` (Dask, whose worker runs
        copies in its own order); none when that copy is not the
        worker's open one (an earlier run's)."""
        if named is None:
            queue = self.queues.get(handle)
            return queue[0].slices if queue else []
        task = self.open.get(named)
        return task.slices if task is not None and task.worker is handle else []

    def on_worker(self, handle: WorkerHandle) -> list[TaskCopy]:
        return list(self.queues.get(handle, ()))
