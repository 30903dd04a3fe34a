"""One `Master.run`: groups of slices out, results in, failures absorbed.

`Run` plans slices onto workers (scheduler.py), sends tasks, and works
through what they send back, on the caller's thread: it supplies what a
blocked worker lacks, collects results, re-plans the groups of a lost
worker, moves queued groups to workers that ran dry, starts backup copies of
stragglers, and reduces. `RunStats` records what it did.
"""

from __future__ import annotations

import bisect
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from . import display, protocol, scheduler, serialize
from .dataset import BaseDataSet
from .errors import (
    BadJob,
    PreflightFailed,
    ProtocolError,
    QjamfabError,
    ReduceError,
    RemoteError,
    WorkerLost,
    describe_exit,
)
from .hostspec import env_setting
from .reduce import ReduceMismatch, ReduceTree, reduce_in_place
from .spill import SpilledNodes
from .workers import LOST, Event, Inbox, Link, WorkerHandle

log = logging.getLogger("qjamfab")

# A result this big waits at its worker until the master fetches it (one
# at a time, in the order the tree combines them), so that results that
# finish together do not all land in the master's memory at once.
PARK_BYTES = 8 << 20
# Tree nodes held on the master (waiting for their sibling) past this many
# bytes wait in temporary files instead (spill.py).
HELD_BYTES = 256 << 20


@dataclass
class RunStats:
    """What one `Master.run` did."""

    elapsed_s: float = 0.0
    workers: int = 0
    slices: int = 0
    slices_sent: int = 0
    slices_cached: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dataset_bytes_sent: int = 0
    worker_compute_s: dict[str, float] = field(default_factory=dict)
    lost_workers: list[str] = field(default_factory=list)
    rerun_slices: int = 0
    backup_tasks: int = 0
    replica_bytes_sent: int = 0
    damaged_slices: int = 0
    spilled_results: int = 0  # held nodes the master wrote to disk
    tasks: int = 0  # tasks sent: copies and re-runs included
    moved_tasks: int = 0  # queued tasks a worker that ran dry took

    def __repr__(self) -> str:
        compute = ", ".join(
            f"{name} {secs:.3f}s" for name, secs in self.worker_compute_s.items()
        )
        plural = display.plural
        lost = (
            f"; lost {', '.join(self.lost_workers)}, re-ran "
            f"{plural(self.rerun_slices, 'slice')}"
            if self.lost_workers
            else ""
        )
        if self.backup_tasks:
            lost += f"; {plural(self.backup_tasks, 'backup task')}"
        size = display.format_bytes
        return (
            f"RunStats({display.format_duration(self.elapsed_s)} on "
            f"{plural(self.workers, 'worker')}: "
            f"{plural(self.slices, 'slice')}, {self.slices_cached} cached, "
            f"{self.slices_sent} sent ({size(self.dataset_bytes_sent)}); "
            f"{size(self.bytes_sent)} sent, "
            f"{size(self.bytes_received)} received; compute: "
            f"{compute or '-'}{lost})"
        )

    def _repr_html_(self) -> str:
        return display.runstats_html(self)


class _Task:
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
    ):
        self.id = task_id
        self.worker = worker
        self.group = group
        self.slices = slices
        self.started = time.monotonic()
        self.held = held  # its result waits at the host's agent
        self.size = 0  # its result's bytes, once "done" or "parked" says
        # Moved away: open until its worker confirms the cancel (it may have
        # started it already), but no longer counted on to run.
        self.cancelling = False


@dataclass
class RunSettings:
    """What a run takes from its Master's settings."""

    heartbeat_timeout: float
    straggler_factor: float
    replicas: int
    split: bool


class Run:
    """The state of one `Master.run`: tasks out, results in.

    Slices travel in groups; a group may have several copies (tasks) on
    different workers: a worker that runs dry takes a copy of a group still
    queued elsewhere, and a group running far longer than its peers gets a
    backup copy. The first copy to finish wins its group, the others are
    cancelled or discarded, so every slice counts exactly once.

    Results combine in one fixed tree over the slices (reduce.ReduceTree),
    as they arrive: the value depends on the slices, not on how they were
    grouped or where they ran. On a host with several workers in the run,
    results wait at the host's agent ("held"): the master hears "done", and
    once the host has no open task left it asks the agent to combine the
    winners (COLLECT), so what crosses the network is a few tree nodes per
    host. If the host is lost first, its held groups run again elsewhere.

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
        progress: bool | None = None,
    ):
        self.inbox = inbox
        self.settings = settings
        self.progress_enabled = progress
        self.progress: display.RunProgress  # set by execute, as is self.tree
        self.run_id = next(inbox.ids)
        self.workers = workers
        self.func_hash = func_hash
        self.func_bytes = func_bytes
        self.params_parts = params_parts
        self.dataset = dataset
        self.refs = dataset.refs() if dataset is not None else None
        self.ref_index: dict[str, int] | None = None  # built when data moves
        self.reduce = reduce
        self.open: dict[int, _Task] = {}  # task id -> live copy
        self.queues: dict[WorkerHandle, list[_Task]] = {h: [] for h in workers}
        self.idle: set[WorkerHandle] = set(workers)
        self.groups: dict[int, list[int]] = {}  # group id -> its slices
        self.won: dict[int, _Task] = {}  # group -> winning copy
        self.replaced: set[int] = set()  # groups re-run slice by slice
        self.undelivered: set[int] = set()  # groups without a value
        self.tree: ReduceTree  # results, as they arrive
        self.shown: dict[int, int] = {}  # group -> slices on the bar
        self.held: dict[Link, list[_Task]] = {}  # done, at the agent
        self.open_on: dict[Link, int] = {}  # open tasks per link
        self.to_collect: set[Link] = set()  # links done with tasks
        self.collecting: dict[Link, list[_Task]] = {}
        self.parked: list[_Task] = []  # won, waiting at their worker
        self.fetching: _Task | None = None  # a parked result on its way
        self.big_collect: Link | None = None  # a big COLLECT answer on its way
        self.waiting_collect: set[Link] = set()  # big, for their turn
        self.slice_seconds: list[float] = []  # sorted, per slice
        self.kills: dict[int, list[str]] = {}
        self.silent: set[Link] = set()  # lost to the heartbeat deadline
        self.sent_refs: set[str] = set()
        self.params_sent: set[WorkerHandle] = set()  # have this run's params
        self.split = settings.split
        self.queued = 0  # open tasks not yet running
        links = [h.link for h in workers]
        self.links = list(dict.fromkeys(links))
        # Results are held at the agent only where there is something to
        # combine them with: a host with several workers in the run.
        self.holds = {x for x in self.links if x.agent and links.count(x) > 1}
        self.counters = {x: (x.bytes_sent, x.bytes_received) for x in self.links}
        self.started = time.monotonic()
        self.stats = RunStats(workers=len(workers))

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
        self.leaves = len(self.refs) if self.refs is not None else len(plan)
        # Values in the master's tree are its own (decoded here), so the
        # default reduce may add arrays into them.
        self.tree = ReduceTree(self.leaves, self.reduce or reduce_in_place)
        self.tree.nodes = self.held_nodes = SpilledNodes(HELD_BYTES)
        self.progress = display.RunProgress(
            len(self.refs) if self.refs is not None else len(plan),
            enabled=self.progress_enabled,
            unit="slices" if self.refs is not None else "tasks",
        )
        try:
            by_name = {h.name: h for h in self.workers}
            queues = [
                (by_name[name], scheduler.batches(slices, self.split))
                for name, slices in plan.items()
            ]
            # Every worker's first task before anyone's second: on a busy
            # machine the last worker to get one would start late.
            for k in range(max((len(b) for _, b in queues), default=0)):
                for handle, batches in queues:
                    if k < len(batches):
                        self._send_task(handle, self._new_group(batches[k]))
            self._collect()
        finally:
            self.progress.close()
            self._count_bytes()
            self.stats.spilled_results = self.held_nodes.spilled
            if not self.tree.complete:
                self.held_nodes.close()  # an interrupted run: free its files
        if self.refs is not None and self.settings.replicas > 1:
            self._replicate(self.refs)
        return self.tree.result()

    def split_next(self) -> bool:
        """Whether the next run should send each worker's slices as two
        tasks, so that one that runs dry can take some. Worth it only for
        runs over 50 ms whose workers are uneven: this one moved work or
        started backups, or, not split, had a worker compute 25 % longer
        than another. (Two tasks cost a result more per worker.)"""
        stats = self.stats
        if stats.elapsed_s <= 0.05:
            return False
        if stats.moved_tasks or stats.backup_tasks or stats.lost_workers:
            return True
        if self.split:
            return False
        compute = [s for s in stats.worker_compute_s.values() if s > 0]
        return len(compute) > 1 and max(compute) > 1.25 * min(compute)

    def _new_group(self, slices: list[int]) -> int:
        group = next(self.inbox.ids)
        self.groups[group] = slices
        self.undelivered.add(group)
        return group

    # --- tasks out ------------------------------------------------------

    def _send_task(self, handle: WorkerHandle, group: int) -> None:
        slices = self.groups[group]
        held = handle.link in self.holds
        task = _Task(next(self.inbox.ids), handle, group, slices, held)
        self.stats.tasks += 1
        self._open(task)
        refs = None if self.refs is None else [self.refs[i] for i in slices]
        try:
            if self.func_hash not in handle.funcs:
                handle.send(protocol.FUNC, {"hash": self.func_hash}, [self.func_bytes])
                handle.funcs.add(self.func_hash)
            with_params = handle not in self.params_sent
            handle.send(
                protocol.TASK,
                {
                    "task": task.id,
                    "run": self.run_id,
                    "func": self.func_hash,
                    "refs": refs,
                    "slices": slices,
                    "leaves": self.leaves,
                    "params": with_params,
                    "hold": held,
                    "park": None if held else PARK_BYTES,
                },
                self.params_parts if with_params else (),
            )
            self.params_sent.add(handle)
        except WorkerLost as exc:
            self._send_failed(handle, exc)

    def _open(self, task: _Task) -> None:
        self.open[task.id] = task
        queue = self.queues[task.worker]
        self.queued += bool(queue)
        queue.append(task)
        self.idle.discard(task.worker)
        link = task.worker.link
        self.open_on[link] = self.open_on.get(link, 0) + 1

    def _close(self, task: _Task) -> None:
        """The task is no longer open (finished, cancelled or lost)."""
        del self.open[task.id]
        queue = self.queues[task.worker]
        first = queue[0] is task
        queue.remove(task)
        self.queued -= bool(queue) if first else 1
        if first and queue:
            queue[0].started = time.monotonic()  # the next starts now
        if not queue and task.worker.alive:
            self.idle.add(task.worker)
        link = task.worker.link
        self.open_on[link] -= 1
        if not self.open_on[link] and self.held.get(link):
            # Its last open task ended (done, cancelled, moved or lost):
            # what it holds can be combined now.
            self.to_collect.add(link)

    def _send_failed(self, handle: WorkerHandle, exc: WorkerLost) -> None:
        """A send to the worker failed: it is lost, handled as if its
        stream had ended (the event comes next in the run's loop)."""
        if handle.alive:
            handle.alive = False
            self.inbox.push_front(Event(handle, LOST, {"reason": str(exc)}, []))

    # --- events in ------------------------------------------------------

    def _collect(self) -> None:
        tick = min(0.25, self.settings.heartbeat_timeout / 4)
        next_check = time.monotonic() + tick
        while self.undelivered:
            event = self.inbox.next_event(tick)
            if event is not None:
                self._event(event)
            while self.to_collect:
                link = self.to_collect.pop()
                if link.alive and self.held.get(link) and not self.open_on[link]:
                    self._collect_host(link)
            if self.waiting_collect or self.parked:
                self._next_big()  # whatever ended the last big transfer
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + tick
                self._check_heartbeats()
                self._balance(stragglers=True)
            elif self.idle and self.queued:
                self._balance(stragglers=False)

    def _event(self, event: Event) -> None:
        source, kind, head, parts = event
        if kind == protocol.LOG:
            print_event_log(event)
            return
        if head.get("run", self.run_id) != self.run_id:
            return  # an answer to an earlier run, which ended without it
        if isinstance(source, Link):  # the agent: COLLECT's answer
            if kind == protocol.RESULT:
                self._collected(source, head, parts)
            elif kind == protocol.ERROR:
                raise ReduceError(
                    f"{head['phase']} on {source.label} raised {head['type']}"
                    f": {head['message']}: fix reduce(a, b) so it combines "
                    f"two results\n{head['traceback'].rstrip()}"
                )
            return
        handle = source
        if kind == LOST:
            self._lost(handle, head["reason"], head.get("died", False))
            return
        fetched = self.fetching
        if (
            kind == protocol.RESULT
            and fetched is not None
            and fetched.worker is handle
            and head.get("task") == fetched.id
        ):
            self.fetching = None
            self._deliver([fetched], _take_nodes(parts))
            self._next_big()
            return
        task_id = head.get("task")
        task = self.open.get(task_id) if task_id is not None else None
        if task is None or task.worker is not handle:
            return  # a discarded copy, or left from an interrupted run
        if kind == protocol.STATE:
            if head["state"] == "cancelled":
                self._close(task)
                self._cover([task], handle.name, "its copy was cancelled")
            elif head["state"] == "progress":
                self._progressed(task.group, head["done"])
            elif head["state"] == "done":
                self._done(task, head)
            elif head["state"] == "parked":
                self._parked(task, head)
            else:
                try:
                    self._supply(handle, head)
                except WorkerLost as exc:
                    self._send_failed(handle, exc)
        elif kind == protocol.RESULT:
            self._result(task, head, parts)
        elif kind == protocol.ERROR:
            raise self._remote_error(handle, task, head)
        else:
            raise ProtocolError(
                f"worker {handle.name} sent an unexpected "
                f"{protocol.KIND_NAMES.get(kind, kind)} frame: restart it"
            )

    def _supply(self, handle: WorkerHandle, head: dict) -> None:
        """The worker is blocked: send the function and slices it lacks
        (a slice once per host: its agent stores it for all its workers)."""
        if head.get("func"):
            handle.send(protocol.FUNC, {"hash": self.func_hash}, [self.func_bytes])
        if head.get("damaged"):
            self.stats.damaged_slices += len(head["damaged"])
            log.warning(
                "worker %s found %s damaged in its cache: sent again",
                handle.name,
                display.plural(len(head["damaged"]), "slice"),
            )
        link = handle.link
        for ref in head.get("refs") or ():
            if (
                link.agent
                and ref in self.sent_refs
                and all(ref in h.refs for h in link.handles.values())
            ):
                continue  # on its way to the host already
            self._supply_slice(handle, ref)
        task = self.open.get(head["task"])
        if task is not None:
            task.started = time.monotonic()  # transfer time is not slowness

    def _send_slice(self, handle: WorkerHandle, ref: str) -> int:
        # Only a run over a dataset has slices to send.
        assert self.dataset is not None and self.refs is not None
        if self.ref_index is None:
            self.ref_index = {r: i for i, r in enumerate(self.refs)}
        i = self.ref_index[ref]
        payload = serialize.encode_slice(self.dataset.slice(i), i)
        size = handle.send(protocol.REFS, {"ref": ref}, payload)
        del payload
        self.dataset.release(i)
        for other in handle.link.handles.values() if handle.link.agent else (handle,):
            other.refs.add(ref)  # on the host's disk: any worker there
        return size

    def _supply_slice(self, handle: WorkerHandle, ref: str) -> None:
        self.stats.dataset_bytes_sent += self._send_slice(handle, ref)
        self.sent_refs.add(ref)
        self.stats.slices_sent += 1

    def _finished(self, task: _Task, head: dict) -> bool:
        """Book a finished copy; whether it wins its group."""
        self._close(task)
        handle = task.worker
        if self.refs is not None:
            handle.refs.update(self.refs[i] for i in task.slices)
        compute = self.stats.worker_compute_s
        compute[handle.name] = compute.get(handle.name, 0.0) + head["compute_s"]
        bisect.insort(self.slice_seconds, head["compute_s"] / max(1, len(task.slices)))
        if task.group in self.won or task.group in self.replaced:
            return False  # another copy won, or its slices run apart now
        self.won[task.group] = task
        for other in self._other_copies(task.group):
            self._cancel(other)
        return True

    def _other_copies(self, group: int) -> list[_Task]:
        """The group's other open copies: only backups and moves make
        them, so without those there is nothing to look for."""
        if not (self.stats.backup_tasks or self.stats.moved_tasks):
            return []
        return [t for t in self.open.values() if t.group == group]

    def _result(self, task: _Task, head: dict, parts: list) -> None:
        if self._finished(task, head):
            self._deliver([task], _take_nodes(parts))

    def _done(self, task: _Task, head: dict) -> None:
        """A held copy finished: its value waits at its host's agent."""
        link = task.worker.link
        if not self._finished(task, head):
            return  # another copy won: no COLLECT names this one
        task.size = head.get("bytes", 0)
        self.held.setdefault(link, []).append(task)
        if not self.open_on[link]:
            self.to_collect.add(link)

    def _parked(self, task: _Task, head: dict) -> None:
        """A big result waits at its worker: fetch it in its turn."""
        if not self._finished(task, head):
            self._drop(task)  # another copy won
            return
        task.size = head["bytes"]
        self.parked.append(task)
        self._next_big()

    def _collect_host(self, link: Link) -> None:
        """Ask for what the host holds now, or, when it is big and another
        big result is on its way, in its turn."""
        if sum(t.size for t in self.held[link]) < PARK_BYTES:
            self._ask_collect(link)
        elif self.fetching is None and self.big_collect is None:
            self.big_collect = link
            self._ask_collect(link)
        else:
            self.waiting_collect.add(link)

    def _next_big(self) -> None:
        """Unless a big result is on its way: ask for the next, a host's
        held results or a parked one, the first in the tree first. So the
        master holds one big result incoming at a time."""
        if self.fetching is not None or self.big_collect is not None:
            return
        hosts = [
            x
            for x in self.waiting_collect
            if x.alive and self.held.get(x) and not self.open_on[x]
        ]
        # Those not ready (new tasks since) come back when their last ends.
        self.waiting_collect = set(hosts)
        first = {x: min(t.slices[0] for t in self.held[x]) for x in hosts}
        if hosts and (
            not self.parked
            or min(first.values()) < min(t.slices[0] for t in self.parked)
        ):
            link = min(hosts, key=first.__getitem__)
            self.waiting_collect.discard(link)
            self.big_collect = link
            self._ask_collect(link)
            return
        while self.fetching is None and self.parked:
            task = min(self.parked, key=lambda t: t.slices[0])
            self.parked.remove(task)
            self.fetching = task
            try:
                task.worker.send(protocol.FETCH, {"task": task.id, "run": self.run_id})
            except WorkerLost as exc:
                self._send_failed(task.worker, exc)  # _lost re-runs it
                return

    def _drop(self, task: _Task) -> None:
        try:
            task.worker.send(protocol.CANCEL, {"task": task.id, "run": self.run_id})
        except WorkerLost as exc:
            self._send_failed(task.worker, exc)

    def _unpark(self, handle: WorkerHandle) -> list[_Task]:
        """The won results parked at a worker that is lost: their groups
        are not won any more (they run again)."""
        tasks = [t for t in self.parked if t.worker is handle]
        if self.fetching is not None and self.fetching.worker is handle:
            tasks.append(self.fetching)
            self.fetching = None
        for task in tasks:
            if task in self.parked:
                self.parked.remove(task)
            del self.won[task.group]
        return tasks

    def _ask_collect(self, link: Link) -> None:
        """Have the agent combine the winners it holds into their nodes."""
        tasks = self.held.pop(link)
        self.collecting.setdefault(link, []).extend(tasks)
        try:
            link.send(
                protocol.COLLECT,
                {
                    "run": self.run_id,
                    "func": self.func_hash,
                    "leaves": self.leaves,
                    "tasks": [t.id for t in tasks],
                },
                worker=protocol.AGENT,
            )
        except WorkerLost:
            if self.big_collect is link:
                self.big_collect = None  # its re-runs come back as results
            for handle in link.handles.values():
                if handle.alive:
                    self._send_failed(handle, WorkerLost("its host is gone"))

    def _collected(self, link: Link, head: dict, parts: list) -> None:
        by_id = {t.id: t for t in self.collecting.get(link, ())}
        self._deliver([by_id.pop(t) for t in head["tasks"]], _take_nodes(parts))
        self.collecting[link] = list(by_id.values())
        if self.big_collect is link and not self.collecting[link]:
            self.big_collect = None
            self._next_big()

    def _progressed(self, group: int, done: int) -> None:
        """The progress bar moves per slice, not per task: a long task
        reports its slices done as it goes (the first copy's count)."""
        shown = self.shown.get(group, 0)
        if group in self.undelivered and done > shown:
            self.shown[group] = done
            self.progress.advance(done - shown)

    def _deliver(self, tasks: list[_Task], nodes: list[_Node]) -> None:
        """Results in: their nodes join the run's tree at once."""
        slices = [i for t in tasks for i in t.slices]
        try:
            self.tree.add_all(nodes)
        except ReduceMismatch as exc:
            raise ReduceError(f"{exc}") from exc
        except Exception as exc:
            raise ReduceError(
                f"reduce failed on the master ({type(exc).__name__}: {exc}): "
                "fix reduce(a, b) so it combines two results"
            ) from exc
        for task in tasks:
            self.undelivered.discard(task.group)
        self.progress.advance(
            (len(slices) if self.refs is not None else len(tasks))
            - sum(self.shown.pop(t.group, 0) for t in tasks)
        )
        if self.refs is not None:
            self.stats.slices_cached += sum(
                self.refs[i] not in self.sent_refs for i in slices
            )

    def _cancel(self, task: _Task) -> None:
        self._close(task)
        self._drop(task)

    # --- balance --------------------------------------------------------

    def _balance(self, stragglers: bool) -> None:
        """Give workers that ran dry a copy of queued or straggling groups."""
        idle = [h for h in self.idle if h.alive]
        if not idle or not self.open:
            return
        queued = (
            [t for q in self.queues.values() for t in q[1:] if t.group not in self.won]
            if self.queued
            else []
        )
        late: list[_Task] = []
        if (
            not queued
            and stragglers
            and self.slice_seconds
            and time.monotonic() - self.started > 0.5
        ):
            late = self._stragglers()
        for handle in sorted(idle, key=lambda h: h.name):
            # Moving a queued group costs its data unless the worker holds
            # it, so only groups long enough to be worth it move.
            candidates = [
                t
                for t in queued
                if self._held(handle, t) == len(t.slices) or self._expected_s(t) > 0.2
            ] or late
            if not candidates:
                return
            task = max(
                candidates, key=lambda t: (self._held(handle, t), len(t.slices), -t.id)
            )
            backup = task in late
            (late if backup else queued).remove(task)
            if backup:
                log.info(
                    "backup copy of %s on %s: %s is slow",
                    self._slice_names(task.slices),
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

    def _expected_s(self, task: _Task) -> float:
        """The task's likely compute time: the median slice's, per slice."""
        if not self.slice_seconds:
            return 0.0
        return self.slice_seconds[len(self.slice_seconds) // 2] * len(task.slices)

    def _stragglers(self) -> list[_Task]:
        now = time.monotonic()
        limit = self.settings.straggler_factor
        copies: dict[int, int] = {}
        for task in self.open.values():
            copies[task.group] = copies.get(task.group, 0) + 1
        return [
            q[0]
            for q in self.queues.values()
            if q
            and copies[q[0].group] == 1
            and q[0].group not in self.won
            and now - q[0].started > max(0.5, limit * self._expected_s(q[0]))
        ]

    def _held(self, handle: WorkerHandle, task: _Task) -> int:
        if self.refs is None:
            return 0
        return sum(self.refs[i] in handle.refs for i in task.slices)

    def _replicate(self, refs: list[str]) -> None:
        """Place a second copy of each slice on a worker of another host."""
        live = [h for h in self.workers if h.alive]
        for i, ref in enumerate(refs):
            holders = [h for h in live if ref in h.refs]
            if not holders or len(holders) >= self.settings.replicas:
                continue
            hosts = {h.host for h in holders}
            others = [h for h in live if h not in holders]
            elsewhere = [h for h in others if h.host not in hosts]
            choices = elsewhere or others
            if choices:
                target = choices[i % len(choices)]
                try:
                    self.stats.replica_bytes_sent += self._send_slice(target, ref)
                except WorkerLost as exc:
                    self._send_failed(target, exc)

    def _remote_error(
        self, handle: WorkerHandle, task: _Task, head: dict
    ) -> QjamfabError:
        where = self._slice_names(task.slices)
        trace = display.with_source_lines(head["traceback"].rstrip())
        if head["type"] == "ReduceMismatch":
            return ReduceError(
                f"{head['message']}\n(on worker {handle.name}, {where})\n{trace}"
            )
        if head["type"] == "ModuleNotFoundError":
            module = re.search(r"No module named '([^']+)'", head["message"])
            python = handle.link.python or "its python"
            from .packages import suggestion

            ship = module and suggestion(module[1])
            fix = (
                "install it in the Dask workers' environment (for example with "
                "distributed's PipInstall worker plugin)"
                if handle.link.on_dask
                else f"install it for {python} there, "
                + (f"ship it from here with Master(..., {ship}), " if ship else "")
                + f"or set {env_setting('REMOTE_PYTHON')[1]} to a Python that has it"
            )
            return PreflightFailed(
                f"{handle.host} lacks the Python module "
                f"{module[1] if module else head['message']!r}, which "
                f"{_NEEDED_BY.get(head['phase'], 'the job')} needs (worker "
                f"{handle.name}): {fix}\n{trace}",
                host=handle.host,
            )
        if head["phase"] == "loading the job":
            return BadJob(
                f"worker {handle.name} cannot load the job ({head['type']}: "
                f"{head['message']}): make what it uses importable there, "
                f"or define it in your script\n{trace}"
            )
        return RemoteError(
            f"{head['phase']} raised {head['type']}: {head['message']} "
            f"(worker {handle.name}, {where}); fix the job and run again\n"
            f"--- remote traceback ---\n{trace}",
            worker=handle.name,
            remote_type=head["type"],
            remote_traceback=head["traceback"],
        )

    def _slice_names(self, slices: list[int]) -> str:
        if self.refs is None:
            return "mapfunc(params, None)"
        return f"dataset slice{'s' if len(slices) > 1 else ''} " + ", ".join(
            map(str, slices)
        )

    # --- loss -----------------------------------------------------------

    def _check_heartbeats(self) -> None:
        deadline = time.monotonic() - self.settings.heartbeat_timeout
        waiting = [
            x
            for x in self.links
            if x.alive
            and (
                x in self.collecting
                and self.collecting[x]
                or x in self.held
                and self.held[x]
            )
        ]
        busy = [h for h, q in self.queues.items() if q and h.alive]
        if self.fetching is not None and self.fetching.worker.alive:
            busy.append(self.fetching.worker)
        if any(h.last_seen < deadline for h in busy) or any(
            x.last_seen < deadline for x in waiting
        ):
            # Heartbeats may wait unread while we were sending: read them.
            self.inbox.read_available()
        for link in waiting:
            if link.alive and link.last_seen < deadline:
                self._host_silent(link)
        for handle in busy:
            if handle.alive and handle.last_seen < deadline:
                if handle.link.transport.computing():
                    handle.last_seen = time.monotonic()  # busy, not gone
                    continue
                if handle.link.agent and handle.link.last_seen >= deadline:
                    handle.alive = False  # its host answers; it does not
                else:
                    self._host_silent(handle.link)
                    continue
                self._lost(
                    handle, f"no heartbeat for {self.settings.heartbeat_timeout:g} s"
                )

    def _host_silent(self, link: Link) -> None:
        """The whole stream went silent: it is closed, its workers lost."""
        self.silent.add(link)
        for event in link.lost(
            f"no heartbeat for {self.settings.heartbeat_timeout:g} s", died=False
        ):
            self.inbox.push_front(event)
        link.close()
        self._host_lost(link)

    def _host_lost(self, link: Link) -> None:
        """Held results at a host that is gone are gone with it: their
        groups run again."""
        tasks = self.held.pop(link, []) + self.collecting.pop(link, [])
        self.waiting_collect.discard(link)
        if self.big_collect is link:
            self.big_collect = None
            self._next_big()
        for task in tasks:
            if self.won.get(task.group) is task:
                del self.won[task.group]
        if tasks:
            self._rerun(
                [i for t in tasks for i in t.slices],
                task.worker.name,
                "its host was lost",
            )

    def _lost(self, handle: WorkerHandle, reason: str, died: bool = False) -> None:
        """A worker ended: its groups without another live copy re-run,
        slice by slice, on the survivors. `died`: its process ended (not
        its host or its connection), so the slice it ran may be the cause."""
        handle.alive = False
        self.idle.discard(handle)
        if not handle.link.alive:
            self._host_lost(handle.link)
        parked = self._unpark(handle)
        lost_tasks = list(self.queues.get(handle, ()))
        if not lost_tasks and not parked:
            return  # nothing of this run was on it
        status, tail = handle.exit_report()
        handle.close()
        if handle.name not in self.stats.lost_workers:
            self.stats.lost_workers.append(handle.name)
        detail = describe_exit(status) if status is not None else reason
        for task in lost_tasks:
            self._close(task)
        # Only the task it was running can have killed it, and only if it
        # died: a host that went silent says nothing about the slice.
        for i in lost_tasks[0].slices if died and lost_tasks else ():
            self.kills.setdefault(i, []).append(handle.name)
            if len(self.kills[i]) >= 2:
                raise WorkerLost(
                    f"{self._slice_names([i])} killed workers "
                    f"{' and '.join(self.kills[i])} (last: {detail}): fix "
                    f"mapfunc for this input; the workers are restarted for "
                    f"the next run{display.stderr_tail(handle.name, tail)}",
                    worker=handle.name,
                    exit_status=status,
                    stderr_tail=tail,
                )
        self._cover(lost_tasks + parked, handle.name, detail, status, tail)
        self._next_big()

    def _cover(
        self,
        tasks: list[_Task],
        name: str,
        detail: str,
        status: int | None = None,
        tail: str = "",
    ) -> None:
        """Coverage, the run's invariant: every group without a value has
        a live copy counted on to run. These copies ended without a
        value: their groups that have no other such copy run again."""
        counted = {t.group for t in self.open.values() if not t.cancelling}
        slices = [
            i
            for t in tasks
            if t.group in self.undelivered
            and t.group not in self.won
            and t.group not in counted
            for i in t.slices
        ]
        self._rerun(slices, name, detail, status, tail)

    def _rerun(
        self,
        slices: list[int],
        name: str,
        detail: str,
        status: int | None = None,
        tail: str = "",
    ) -> None:
        survivors = [h for h in self.workers if h.alive]
        if slices and not survivors:
            raise WorkerLost(
                f"worker {name} was lost ({detail}) running "
                f"{self._slice_names(slices)}, and no worker is left: they are "
                f"restarted for the next run; check the job and the hosts"
                f"{display.stderr_tail(name, tail)}",
                worker=name,
                exit_status=status,
                stderr_tail=tail,
            )
        if not slices:
            return
        log.warning(
            "worker %s lost (%s); re-running %s on the others",
            name,
            detail,
            self._slice_names(slices),
        )
        busy = {h.name: len(q) for h, q in self.queues.items()}
        by_name = {h.name: h for h in survivors}
        for group in [
            g
            for g in self.groups
            if g in self.undelivered
            and g not in self.won
            and set(self.groups[g]) <= set(slices)
        ]:
            self.undelivered.discard(group)  # replaced by one per slice
            self.replaced.add(group)
            self.progress.advance(-self.shown.pop(group, 0))
        for worker, i in scheduler.replan(
            slices, self.refs, list(by_name), {h.name: h.refs for h in survivors}, busy
        ):
            self.stats.rerun_slices += 1
            self._send_task(by_name[worker], self._new_group([i]))

    def _count_bytes(self) -> None:
        for link, (sent, received) in self.counters.items():
            self.stats.bytes_sent += link.bytes_sent - sent
            self.stats.bytes_received += link.bytes_received - received


_Node = tuple[int, int, Any]  # (lo, size, value): a reduce.ReduceTree node


def _take_nodes(parts: list[Any]) -> list[_Node]:
    """A RESULT's payload: the ReduceTree nodes it carries. The received
    buffers then stay only as long as the values made from them (the
    master's memory bound relies on it)."""
    nodes = cast(list[_Node], protocol.decode(parts))  # unpickled: unchecked
    parts.clear()
    return nodes


_NEEDED_BY = {
    "loading the job": "the job",
    "loading params": "the params",
    "loading a slice": "a dataset slice",
}


def print_event_log(event: Event) -> None:
    """Print a LOG event's text, prefixed by its worker (or host agent)."""
    source = event.source
    print_log(
        source.name if isinstance(source, WorkerHandle) else source.label,
        event.head["text"],
    )


def print_log(worker: str, text: str) -> None:
    prefix = f"[{worker}] "
    sys.stdout.write(
        "".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n"))
    )
    sys.stdout.flush()
