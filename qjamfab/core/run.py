"""One `Master.run`: groups of slices out, results in, failures absorbed.

`Run` plans slices onto workers (scheduler.py), sends tasks (dispatch.py)
and works through what they send back, on the caller's thread: it
supplies what a blocked worker lacks, books finished copies, and acts on
the policy's decisions (policy.py: moves to workers that ran dry, backups
of stragglers). Losses go to recovery.py (coverage kept, slices re-planned
on the survivors). Results flow in through results.py, data goes out
through supply.py, losses.py keeps what was lost and when the job is to
blame; runstats.py says what
the run did; copies.py books the task copies on workers, groups.py the
groups they are copies of. Time is read from `RunSettings.clock` only,
so tests drive a run with a clock of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import protocol
from ..data.dataset import BaseDataSet
from ..errors import ProtocolError, WorkerLost
from ..links.inbox import Inbox
from ..links.workers import DONE, LOST, Event, Link, WorkerHandle
from . import policy, scheduler
from .copies import Copies, TaskCopy
from .dispatch import Dispatch
from .groups import Groups
from .losses import Losses
from .recovery import Recovery
from .remote_errors import collect_error, remote_error
from .results import Node, ResultFlow, take_nodes
from .runstats import RunStats, print_event_log
from .settings import NoProgress, Progress, ProgressFactory, RunSettings
from .supply import Supply

log = logging.getLogger("qjamfab")


class Run:
    """The state of one `Master.run`: tasks out, results in.

    Slices travel in groups; a group may have several copies (tasks) on
    different workers: a worker that runs dry takes a copy of a group still
    queued elsewhere, and a group running far longer than its peers gets a
    backup copy. The first copy to finish wins its group, the others are
    cancelled or discarded, so every slice counts exactly once. Every
    group without a value keeps a live copy counted on to run (coverage,
    policy.uncovered): whatever moves, cancels, backups and losses
    interleave, the run ends.

    Work per event is constant, besides what the event itself changes:
    each worker's open tasks are kept in order, idle workers in a set, and
    slice times sorted as they arrive.
    """

    def __init__(
        self,
        inbox: Inbox,
        workers: list[WorkerHandle],
        func_hash: str,
        func_bytes: bytes,
        params_parts: list[Any],
        dataset: BaseDataSet | None,
        reduce: Callable[[Any, Any], Any] | None,
        settings: RunSettings,
        progress: ProgressFactory | None = None,
        broadcasts: dict[str, list] | None = None,
    ):
        """`progress` makes the run's progress bar (total, unit): the
        display layer's, from the Master; none without. `broadcasts`: the
        payload of each Broadcast in params, by ref (broadcast.py's
        encode_params)."""
        self.inbox = inbox
        self.settings = settings
        self.clock = settings.clock
        self.new_progress: ProgressFactory = progress or NoProgress
        self.progress: Progress  # set by execute
        self.results: ResultFlow[TaskCopy]  # set by execute
        self.run_id = next(inbox.ids)
        self.workers = workers
        self.func_hash = func_hash
        self.dataset = dataset
        self.refs = dataset.refs() if dataset is not None else None
        self.reduce = reduce
        self.copies = Copies(workers)
        self.groups = Groups()
        self.times = policy.SliceTimes()
        self.losses = Losses(over_dataset=self.refs is not None)
        self.split = settings.split
        self.dispatch = Dispatch(
            self.run_id,
            workers,
            (func_hash, func_bytes),
            params_parts,
            self.refs,
            broadcasts,
        )
        self.links = self.dispatch.links
        self.counters = {x: (x.bytes_sent, x.bytes_received) for x in self.links}
        self.started = self.clock()
        self.stats = RunStats(workers=len(workers))
        self.supply = Supply(
            dataset, self.refs, func_hash, func_bytes, self.stats, broadcasts
        )
        self.recovery = Recovery(
            self,
            lambda handle, slices: self._send_task(handle, self._new_group(slices)),
            self._close,
        )

    def execute(self) -> object:
        if self.refs is None:
            # No dataset: every worker runs mapfunc(params, None) once.
            plan = {h.name: [i] for i, h in enumerate(self.workers)}
        else:
            plan = scheduler.plan(
                self.refs,
                [h.name for h in self.workers],
                {h.name: h.refs for h in self.workers},
            )
            self.stats.slices = len(self.refs)
        self.leaves = self.dispatch.leaves
        self.results = ResultFlow[TaskCopy](
            self.run_id,
            self.func_hash,
            self.leaves,
            self.reduce,
            self._send_failed,
            self.copies.on_host,
        )
        self.progress = self.new_progress(
            len(self.refs) if self.refs is not None else len(plan),
            "slices" if self.refs is not None else "tasks",
        )
        tree = self.results.tree
        try:
            by_name = {h.name: h for h in self.workers}
            self.dispatch.first_wave(
                [
                    (by_name[name], scheduler.batches(slices, self.split))
                    for name, slices in plan.items()
                ],
                lambda handle, batch, first: self._send_task(
                    handle, self._new_group(batch), first
                ),
            )
            self._collect()
        except BaseException:
            for handle, queue in self.copies.queues.items():
                if queue and handle.alive:
                    handle.stale = True  # this run's job may run on there
            raise
        finally:
            self.supply.close()
            self.progress.close()
            self.dispatch.close()
            self._count_bytes()
            self.stats.spilled_results = self.results.nodes.spilled
            if not tree.complete:
                self.results.nodes.close()  # an interrupted run: free its files
        if self.refs is not None and self.settings.replicas > 1:
            self.supply.replicate(
                self.workers, self.settings.replicas, self._send_failed
            )
        return tree.result()

    def split_next(self) -> bool:
        """Whether the next run splits each worker's slices (policy.py)."""
        stats = self.stats
        return policy.split_next(
            stats.elapsed_s,
            bool(stats.moved_tasks or stats.backup_tasks or stats.lost_workers),
            self.split,
            list(stats.worker_compute_s.values()),
        )

    def _new_group(self, slices: list[int]) -> int:
        group = next(self.inbox.ids)
        self.groups.add(group, slices)
        return group

    # --- tasks out ------------------------------------------------------

    def _send_task(
        self, handle: WorkerHandle, group: int, first: list | None = None
    ) -> None:
        """A copy of the group for the worker, sent (dispatch.py), or an
        entry in `first`, its host's first tasks."""
        held = self.dispatch.held(handle)
        slices = self.groups.slices[group]
        task = TaskCopy(next(self.inbox.ids), handle, group, slices, held, self.clock())
        self.stats.tasks += 1
        self._open(task)
        try:
            self.dispatch.send(task, first)
        except WorkerLost as exc:
            self._send_failed(handle, exc)

    def _open(self, task: TaskCopy) -> None:
        self.copies.add(task)

    def _close(self, task: TaskCopy) -> None:
        """The task is no longer open (finished, cancelled or lost)."""
        if self.copies.remove(task, self.clock()):
            # Its host's last open task ended (done, cancelled, moved or
            # lost): what it holds can be combined now.
            self.results.host_idle(task.worker.link)

    def _send_failed(self, handle: WorkerHandle, exc: WorkerLost) -> None:
        """A send to the worker failed: it is lost, handled as if its
        stream had ended (the event comes next in the run's loop)."""
        if handle.alive:
            handle.alive = False
            self.inbox.push_front(Event(handle, LOST, {"reason": str(exc)}, []))

    def _cancel(self, task: TaskCopy) -> None:
        self._close(task)
        self._drop(task)

    def _drop(self, task: TaskCopy) -> None:
        """Tell the worker to drop the copy: not run it if queued, forget
        its parked value if it won too late."""
        try:
            task.worker.send(protocol.CANCEL, {"task": task.id, "run": self.run_id})
        except WorkerLost as exc:
            self._send_failed(task.worker, exc)

    # --- events in ------------------------------------------------------

    def _collect(self) -> None:
        tick = min(0.25, self.settings.heartbeat_timeout / 4)
        next_check = self.clock() + tick
        while self.groups.undelivered:
            event = self.inbox.next_event(tick)
            if event is not None:
                self._event(event)
            self.results.ask()  # whatever ended the last big transfer
            if self.clock() >= next_check:
                next_check = self.clock() + tick
                self.recovery.check_heartbeats()
                self._balance(stragglers=True)
            elif self.copies.idle and self.copies.queued:
                self._balance(stragglers=False)

    def _event(self, event: Event) -> None:
        source, kind, head, parts = event
        if kind == protocol.LOG:
            print_event_log(event)
            return
        if kind == DONE:  # held tasks done (or moved) at a host
            for task_id, source, to in head["moved"]:
                self._moved_at_host(task_id, source, to)
            for handle, task_id, run, compute_s, size in head["tasks"]:
                if run == self.run_id:
                    self._held_done(handle, task_id, compute_s, size)
            if head["offer"] == self.run_id and isinstance(source, Link):
                self.results.offer_coming(source)  # their values come next
            return
        if head.get("run", self.run_id) != self.run_id:
            return  # an answer to an earlier run, which ended without it
        if isinstance(source, Link):  # the agent: COLLECT's answer, or an offer
            if kind == protocol.RESULT and "notes" in head:
                tasks = self.results.offered(source, head)
                if tasks:
                    self._deliver(tasks, take_nodes(parts))
            elif kind == protocol.RESULT:
                self._deliver(self.results.collected(source, head), take_nodes(parts))
            elif kind == protocol.ERROR:
                raise collect_error(source.label, head)
            return
        handle = source
        if kind == LOST:
            self.recovery.lost(
                handle, head["reason"], head.get("died", False), head.get("task")
            )
            return
        if kind == protocol.RESULT:
            fetched = self.results.fetched(handle, head)
            if fetched is not None:
                self._deliver([fetched], take_nodes(parts))
                return
        task_id = head.get("task")
        task = self.copies.open.get(task_id) if task_id is not None else None
        if task is None or task.worker is not handle:
            return  # a discarded copy, or left from an interrupted run
        handle.stale = False  # it works on this run now
        if kind == protocol.STATE:
            state = head["state"]
            if state == "cancelled":
                self._close(task)
                self.recovery.cover([task], handle.name, "its copy was cancelled")
            elif state == "progress":
                self._progressed(task.group, head["done"])
            elif state == "parked":  # its big value waits at its worker
                if self._finished(task, head["compute_s"]):
                    self.results.park(task, head["bytes"])
                else:
                    self._drop(task)  # another copy won
            else:
                try:
                    self._supply(handle, head)
                except WorkerLost as exc:
                    self._send_failed(handle, exc)
        elif kind == protocol.RESULT:
            if self._finished(task, head["compute_s"]):
                self._deliver([task], take_nodes(parts))
        elif kind == protocol.ERROR:
            raise remote_error(handle, self.losses.names(task.slices), head)
        else:
            raise ProtocolError(
                f"worker {handle.name} sent an unexpected "
                f"{protocol.KIND_NAMES.get(kind, kind)} frame: restart it"
            )

    def _supply(self, handle: WorkerHandle, head: dict) -> None:
        """The worker is blocked: send what it lacks (supply.py)."""
        task = self.copies.open.get(head["task"])

        def sent() -> None:
            if task is not None:
                task.started = self.clock()  # transfer time is not slowness

        self.supply.blocked(handle, head, sent)

    def _moved_at_host(
        self, task_id: int, source: WorkerHandle, to: WorkerHandle
    ) -> None:
        """The host's agent gave a task that waited there for `source` to
        `to`, another of its workers that ran dry: it runs there now. One
        given to a worker not in the run, or seen lost already, runs again
        elsewhere, as that worker's other tasks do."""
        task = self.copies.open.get(task_id)
        if task is None or task.worker is not source:
            return  # a discarded copy
        if to in self.copies.queues and to.alive:
            self.copies.move(task, to, self.clock())
            self.stats.moved_at_hosts += 1
            return
        self._close(task)
        detail = "its host gave it a waiting task as it ended"
        self.recovery.cover([task], to.name, detail)

    def _held_done(
        self, handle: WorkerHandle, task_id: int, compute_s: float, size: int
    ) -> None:
        """A task done whose value waits at the host's agent."""
        task = self.copies.open.get(task_id)
        if task is None or task.worker is not handle:
            return  # a discarded copy
        handle.stale = False
        if self._finished(task, compute_s):
            self.results.hold(task, size)

    def _finished(self, task: TaskCopy, compute_s: float) -> bool:
        """Book a finished copy; whether it wins its group."""
        self._close(task)
        handle = task.worker
        if self.refs is not None:
            handle.refs.update(self.refs[i] for i in task.slices)
        compute = self.stats.worker_compute_s
        compute[handle.name] = compute.get(handle.name, 0.0) + compute_s
        self.times.add(compute_s, len(task.slices))
        if not self.groups.win(task):
            return False  # another copy won, or its slices run apart now
        for other in self._other_copies(task.group):
            self._cancel(other)
        return True

    def _other_copies(self, group: int) -> list[TaskCopy]:
        """The group's other open copies: only backups and moves make
        them, so without those there is nothing to look for."""
        if not (self.stats.backup_tasks or self.stats.moved_tasks):
            return []
        return self.copies.of_group(group)

    def _progressed(self, group: int, done: int) -> None:
        """The progress bar moves per slice, not per task: a long task
        reports its slices done as it goes (the first copy's count)."""
        more = self.groups.progressed(group, done)
        if more:
            self.progress.advance(more)

    def _deliver(self, tasks: list[TaskCopy], nodes: list[Node]) -> None:
        """Results in: their nodes join the run's tree at once."""
        slices = [i for t in tasks for i in t.slices]
        self.results.add(nodes)
        shown = self.groups.delivered(tasks)
        self.progress.advance(
            (len(slices) if self.refs is not None else len(tasks)) - shown
        )
        if self.refs is not None:
            self.stats.slices_cached += sum(
                self.refs[i] not in self.supply.sent_refs for i in slices
            )

    # --- balance --------------------------------------------------------

    def _balance(self, stragglers: bool) -> None:
        """Give workers that ran dry a copy of queued or straggling groups."""
        idle = sorted((h for h in self.copies.idle if h.alive), key=lambda h: h.name)
        if not idle or not self.copies.open:
            return
        queued = self.copies.waiting(self.groups.won)
        now = self.clock()
        late: list[TaskCopy] = []
        if (
            not queued
            and stragglers
            and self.times.seconds
            and now - self.started > policy.BACKUP_AFTER_S
        ):
            late = policy.stragglers(
                self.copies.running(),
                self.copies.per_group(),
                self.groups.won,
                self.times,
                self.settings.straggler_factor,
                now,
            )
        for decision in policy.balance(idle, queued, late, self._held, self.times):
            handle, task = decision.worker, decision.copy
            if decision.backup:
                log.info(
                    "backup copy of %s on %s: %s is slow",
                    self.losses.names(task.slices),
                    handle.name,
                    task.worker.name,
                )
                self.stats.backup_tasks += 1
            else:
                self._cancel(task)  # it was only queued: move it
                self._open(task)  # until the worker confirms
                task.cancelling = True
                self.stats.moved_tasks += 1
            self._send_task(handle, task.group)

    def _held(self, handle: WorkerHandle, task: TaskCopy) -> int:
        if self.refs is None:
            return 0
        return sum(self.refs[i] in handle.refs for i in task.slices)

    def _count_bytes(self) -> None:
        for link, (sent, received) in self.counters.items():
            self.stats.bytes_sent += link.bytes_sent - sent
            self.stats.bytes_received += link.bytes_received - received
