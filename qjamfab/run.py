"""One `Master.run`: groups of slices out, results in, failures absorbed.

`Run` plans slices onto workers (scheduler.py), sends tasks, and works
through what they send back, on the caller's thread: it supplies what a
blocked worker lacks, collects results, re-plans the groups of a lost
worker, moves queued groups to workers that ran dry, starts backup copies of
stragglers, and reduces. `RunStats` records what it did.
"""
from __future__ import annotations

import linecache
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from . import display, protocol, scheduler, serialize
from .dataset import BaseDataSet
from .errors import (BadJob, ProtocolError, QjamfabError, ReduceError,
                     RemoteError, WorkerLost)
from .reduce import ReduceMismatch, reduce_all
from .workers import LOST, WorkerHandle

if TYPE_CHECKING:
    from .master import Master

log = logging.getLogger("qjamfab")


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
    worker_compute_s: dict = field(default_factory=dict)
    lost_workers: list = field(default_factory=list)
    rerun_slices: int = 0
    backup_tasks: int = 0
    replica_bytes_sent: int = 0

    def __repr__(self) -> str:
        compute = ", ".join(f"{name} {secs:.3f}s"
                            for name, secs in self.worker_compute_s.items())
        lost = (f"; lost {', '.join(self.lost_workers)}, "
                f"re-ran {self.rerun_slices} slices" if self.lost_workers else "")
        if self.backup_tasks:
            lost += f"; {self.backup_tasks} backup tasks"
        return (f"RunStats({self.elapsed_s * 1e3:.1f} ms on {self.workers} "
                f"workers: {self.slices} slices, {self.slices_cached} cached, "
                f"{self.slices_sent} sent ({_size(self.dataset_bytes_sent)}); "
                f"{_size(self.bytes_sent)} sent, "
                f"{_size(self.bytes_received)} received; compute: "
                f"{compute or '-'}{lost})")

    def _repr_html_(self) -> str:
        return display.runstats_html(self)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _Task:
    """One copy of a group of slices sent to one worker."""
    __slots__ = ("id", "worker", "group", "slices", "started")

    def __init__(self, task_id: int, worker: WorkerHandle, group: int,
                 slices: list[int]):
        self.id = task_id
        self.worker = worker
        self.group = group
        self.slices = slices
        self.started = time.monotonic()


class Run:
    """The state of one `Master.run`: tasks out, results in.

    Slices travel in groups; a group may have several copies (tasks) on
    different workers: a worker that runs dry takes a copy of a group still
    queued elsewhere, and a group running far longer than its peers gets a
    backup copy. The first result of a group counts, the other copies are
    cancelled or discarded, so every slice counts exactly once.
    """

    def __init__(self, master: Master, workers: list[WorkerHandle],
                 func_hash: str, func_bytes: bytes, params_parts: list,
                 dataset: BaseDataSet | None, reduce: Callable | None,
                 progress: bool | None = None):
        self.master = master
        self.progress_enabled = progress
        self.progress: display.RunProgress | None = None
        self.run_id = next(master._task_ids)
        self.workers = workers
        self.func_hash = func_hash
        self.func_bytes = func_bytes
        self.params_parts = params_parts
        self.dataset = dataset
        self.refs = dataset.refs() if dataset is not None else None
        self.ref_index: dict[str, int] | None = None  # built when data moves
        self.reduce = reduce
        self.open: dict[int, _Task] = {}          # task id -> live copy
        self.groups: dict[int, list[int]] = {}    # group id -> its slices
        self.results: dict[int, object] = {}      # group id -> its value
        self.slice_seconds: list[float] = []      # compute time per slice
        self.kills: dict[int, list[str]] = {}
        self.silent: set[str] = set()             # lost to the heartbeat deadline
        self.sent_refs: set[str] = set()
        self.params_sent: set[WorkerHandle] = set()  # have this run's params
        self.split = master._split
        self.moved = 0                            # queued groups moved
        self.counters = {h: (h.bytes_sent, h.bytes_received) for h in workers}
        self.stats = RunStats(workers=len(workers))

    def execute(self) -> object:
        if self.refs is None:
            # No dataset: every worker runs mapfunc(params, None) once.
            plan = {h.name: [i] for i, h in enumerate(self.workers)}
        else:
            plan = scheduler.plan(self.refs, [h.name for h in self.workers],
                                  {h.name: h.refs for h in self.workers})
            self.stats.slices = len(self.refs)
        self.progress = display.RunProgress(
            len(self.refs) if self.refs is not None else len(plan),
            enabled=self.progress_enabled,
            unit="slices" if self.refs is not None else "tasks")
        try:
            by_name = {h.name: h for h in self.workers}
            queues = [(by_name[name], scheduler.batches(slices, self.split))
                      for name, slices in plan.items()]
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
        if self.refs is not None and self.master.replicas > 1:
            self._replicate()
        values = [self.results[g] for g in
                  sorted(self.results, key=lambda g: self.groups[g][0])]
        try:
            return reduce_all(values, self.reduce)
        except ReduceMismatch as exc:
            raise ReduceError(f"{exc}") from exc
        except Exception as exc:
            raise ReduceError(
                f"reduce failed on the master ({type(exc).__name__}: {exc}): "
                "fix reduce(a, b) so it combines two results") from exc

    def split_next(self) -> bool:
        """Whether the next run should send each worker's slices as two
        tasks, so that one that runs dry can take some. Worth it only for
        runs over 50 ms whose workers are uneven: this one moved work or
        started backups, or, not split, had a worker compute 25 % longer
        than another. (Two tasks cost a result more per worker.)"""
        stats = self.stats
        if stats.elapsed_s <= 0.05:
            return False
        if self.moved or stats.backup_tasks or stats.lost_workers:
            return True
        if self.split:
            return False
        compute = [s for s in stats.worker_compute_s.values() if s > 0]
        return len(compute) > 1 and max(compute) > 1.25 * min(compute)

    def _new_group(self, slices: list[int]) -> int:
        group = next(self.master._task_ids)
        self.groups[group] = slices
        return group

    def _send_task(self, handle: WorkerHandle, group: int) -> None:
        slices = self.groups[group]
        task = _Task(next(self.master._task_ids), handle, group, slices)
        self.open[task.id] = task
        refs = None if self.refs is None else [self.refs[i] for i in slices]
        try:
            if self.func_hash not in handle.funcs:
                handle.send(protocol.FUNC, {"hash": self.func_hash},
                            [self.func_bytes])
                handle.funcs.add(self.func_hash)
            with_params = handle not in self.params_sent
            handle.send(protocol.TASK, {
                "task": task.id, "run": self.run_id, "func": self.func_hash,
                "refs": refs, "params": with_params},
                self.params_parts if with_params else ())
            self.params_sent.add(handle)
        except WorkerLost as exc:
            self._send_failed(handle, exc)

    def _send_failed(self, handle: WorkerHandle, exc: WorkerLost) -> None:
        """A send to the worker failed: it is lost, handled as if its
        stream had ended (the event comes next in the run's loop)."""
        if handle.alive:
            handle.alive = False
            self.master._pending.appendleft(
                (handle, LOST, {"reason": str(exc)}, []))

    def _collect(self) -> None:
        tick = min(0.25, self.master.heartbeat_timeout / 4)
        while self.open:
            event = self.master._next_event(tick)
            if event is None:
                self._check_heartbeats()
                self._balance()
                continue
            handle, kind, head, parts = event
            if kind == LOST:
                self._lost(handle, head["reason"])
                continue
            if kind == protocol.LOG:
                print_log(handle.name, head["text"])
                continue
            task = self.open.get(head.get("task"))
            if task is None or task.worker is not handle:
                continue  # a discarded copy, or left from an interrupted run
            if kind == protocol.STATE:
                if head["state"] == "cancelled":
                    del self.open[task.id]
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
                    f"{protocol.KIND_NAMES.get(kind, kind)} frame: restart it")
            if self.open:
                self._check_heartbeats()
                self._balance()

    def _supply(self, handle: WorkerHandle, head: dict) -> None:
        """The worker is blocked: send the function and slices it lacks."""
        if head.get("func"):
            handle.send(protocol.FUNC, {"hash": self.func_hash},
                        [self.func_bytes])
        for ref in head.get("refs") or ():
            self._supply_slice(handle, ref)
        task = self.open.get(head["task"])
        if task is not None:
            task.started = time.monotonic()  # transfer time is not slowness

    def _send_slice(self, handle: WorkerHandle, ref: str) -> int:
        if self.ref_index is None:
            self.ref_index = {r: i for i, r in enumerate(self.refs)}
        i = self.ref_index[ref]
        payload = serialize.encode_slice(self.dataset.slice(i), i)
        size = handle.send(protocol.REFS, {"ref": ref}, payload)
        del payload
        self.dataset.release(i)
        handle.refs.add(ref)
        return size

    def _supply_slice(self, handle: WorkerHandle, ref: str) -> None:
        self.stats.dataset_bytes_sent += self._send_slice(handle, ref)
        self.sent_refs.add(ref)
        self.stats.slices_sent += 1

    def _result(self, task: _Task, head: dict, parts: list) -> None:
        del self.open[task.id]
        handle = task.worker
        if self.refs is not None:
            handle.refs.update(self.refs[i] for i in task.slices)
        compute = self.stats.worker_compute_s
        compute[handle.name] = compute.get(handle.name, 0.0) + head["compute_s"]
        self.slice_seconds.append(head["compute_s"] / max(1, len(task.slices)))
        self._next_started(handle)
        if task.group in self.results:
            return  # another copy won
        self.results[task.group] = protocol.decode(parts)
        self.progress.advance(len(task.slices) if self.refs is not None else 1)
        if self.refs is not None:
            self.stats.slices_cached += sum(
                self.refs[i] not in self.sent_refs for i in task.slices)
        for other in [t for t in self.open.values() if t.group == task.group]:
            self._cancel(other)

    def _next_started(self, handle: WorkerHandle) -> None:
        """The worker's next queued task starts now, as far as we can tell."""
        queued = [t for t in self.open.values() if t.worker is handle]
        if queued:
            min(queued, key=lambda t: t.id).started = time.monotonic()

    def _cancel(self, task: _Task) -> None:
        del self.open[task.id]
        try:
            task.worker.send(protocol.CANCEL, {"task": task.id})
        except WorkerLost as exc:
            self._send_failed(task.worker, exc)

    def _balance(self) -> None:
        """Give workers that ran dry a copy of queued or straggling groups."""
        busy = {t.worker for t in self.open.values()}
        idle = [h for h in self.workers if h.alive and h not in busy]
        if not idle or not self.open:
            return
        copies: dict[int, int] = {}
        for task in self.open.values():
            copies[task.group] = copies.get(task.group, 0) + 1
        first = {}  # the task each busy worker is running now
        for task in sorted(self.open.values(), key=lambda t: t.id):
            first.setdefault(task.worker, task)
        queued = [t for t in self.open.values() if first[t.worker] is not t
                  and copies[t.group] == 1]
        stragglers = [] if queued else self._stragglers(first.values(), copies)
        for handle in idle:
            # Moving a queued group costs its data unless the worker holds
            # it, so only groups long enough to be worth it move.
            candidates = [t for t in queued if self._held(handle, t) == len(
                t.slices) or self._expected_s(t) > 0.2] or stragglers
            if not candidates:
                return
            task = max(candidates, key=lambda t: (self._held(handle, t),
                                                   len(t.slices), -t.id))
            backup = task in stragglers
            (stragglers if backup else queued).remove(task)
            if backup:
                log.info("backup copy of %s on %s: %s is slow",
                         self._slice_names(task.slices), handle.name,
                         task.worker.name)
                self.stats.backup_tasks += 1
            else:
                self._cancel(task)  # it was only queued: move it
                self.open[task.id] = task  # until the worker confirms
                self.moved += 1
            self._send_task(handle, task.group)

    def _expected_s(self, task: _Task) -> float:
        """The task's likely compute time: the median slice's, per slice."""
        if not self.slice_seconds:
            return 0.0
        median = sorted(self.slice_seconds)[len(self.slice_seconds) // 2]
        return median * len(task.slices)

    def _stragglers(self, running, copies: dict[int, int]) -> list[_Task]:
        if not self.slice_seconds:
            return []
        now = time.monotonic()
        limit = self.master.straggler_factor
        return [t for t in running if copies[t.group] == 1 and now - t.started
                > max(0.5, limit * self._expected_s(t))]

    def _held(self, handle: WorkerHandle, task: _Task) -> int:
        if self.refs is None:
            return 0
        return sum(self.refs[i] in handle.refs for i in task.slices)

    def _replicate(self) -> None:
        """Place a second copy of each slice on a worker of another host."""
        live = [h for h in self.workers if h.alive]
        for i, ref in enumerate(self.refs):
            holders = [h for h in live if ref in h.refs]
            if not holders or len(holders) >= self.master.replicas:
                continue
            others = [h for h in live if h not in holders]
            elsewhere = [h for h in others if h.name.rsplit("-", 1)[0] not in
                         {x.name.rsplit("-", 1)[0] for x in holders}]
            choices = elsewhere or others
            if choices:
                target = choices[i % len(choices)]
                try:
                    self.stats.replica_bytes_sent += \
                        self._send_slice(target, ref)
                except WorkerLost as exc:
                    self._send_failed(target, exc)

    def _remote_error(self, handle: WorkerHandle, task: _Task,
                      head: dict) -> QjamfabError:
        where = self._slice_names(task.slices)
        trace = _with_source_lines(head["traceback"].rstrip())
        if head["type"] == "ReduceMismatch":
            return ReduceError(f"{head['message']}\n(on worker {handle.name}, "
                               f"{where})\n{trace}")
        if head["phase"] == "loading the job":
            return BadJob(
                f"worker {handle.name} cannot load the job ({head['type']}: "
                f"{head['message']}): make what it uses importable there, "
                f"or define it in your script\n{trace}")
        return RemoteError(
            f"{head['phase']} raised {head['type']}: {head['message']} "
            f"(worker {handle.name}, {where}); fix the job and run again\n"
            f"--- remote traceback ---\n{trace}",
            worker=handle.name, remote_type=head["type"],
            remote_traceback=head["traceback"])

    def _slice_names(self, slices: list[int]) -> str:
        if self.refs is None:
            return "mapfunc(params, None)"
        return f"dataset slice{'s' if len(slices) > 1 else ''} " + \
            ", ".join(map(str, slices))

    def _check_heartbeats(self) -> None:
        deadline = time.monotonic() - self.master.heartbeat_timeout
        busy = {t.worker for t in self.open.values()}
        if any(h.alive and h.last_seen < deadline for h in busy):
            # Heartbeats may wait unread while we were sending: read them.
            self.master._read_available()
        for handle in busy:
            if handle.alive and handle.last_seen < deadline:
                self.silent.add(handle.name)
                handle.close()
                self._lost(handle, f"no heartbeat for "
                           f"{self.master.heartbeat_timeout:g} s")

    def _lost(self, handle: WorkerHandle, reason: str) -> None:
        """A worker ended: its groups without another live copy re-run,
        slice by slice, on the survivors."""
        handle.alive = False
        lost_tasks = sorted((t for t in self.open.values()
                             if t.worker is handle), key=lambda t: t.id)
        if not lost_tasks:
            return  # nothing of this run was on it
        status, tail = handle.transport.exit_report(handle.hello.get("log"))
        handle.transport.close()
        if handle.name not in self.stats.lost_workers:
            self.stats.lost_workers.append(handle.name)
        detail = f"exit status {status}" if status is not None else reason
        for task in lost_tasks:
            del self.open[task.id]
        # Only the task it was running can have killed it.
        for i in lost_tasks[0].slices:
            self.kills.setdefault(i, []).append(handle.name)
            if len(self.kills[i]) >= 2:
                raise WorkerLost(
                    f"{self._slice_names([i])} killed workers "
                    f"{' and '.join(self.kills[i])} (last: {detail}): fix "
                    f"mapfunc for this input; the workers are restarted for "
                    f"the next run\n--- stderr tail of {handle.name} ---\n{tail}",
                    worker=handle.name, exit_status=status, stderr_tail=tail)
        covered = {t.group for t in self.open.values()} | set(self.results)
        slices = [i for t in lost_tasks if t.group not in covered
                  for i in t.slices]
        survivors = [h for h in self.workers if h.alive]
        if slices and not survivors:
            raise WorkerLost(
                f"worker {handle.name} was lost ({detail}) running "
                f"{self._slice_names(slices)}, and no worker is left: they are "
                f"restarted for the next run; check the job and the hosts\n"
                f"--- stderr tail of {handle.name} ---\n{tail}",
                worker=handle.name, exit_status=status, stderr_tail=tail)
        log.warning("worker %s lost (%s); re-running %s on the others",
                    handle.name, detail, self._slice_names(slices))
        busy: dict[str, int] = {}
        for task in self.open.values():
            busy[task.worker.name] = busy.get(task.worker.name, 0) + 1
        by_name = {h.name: h for h in survivors}
        for name, i in scheduler.replan(
                slices, self.refs, list(by_name),
                {h.name: h.refs for h in survivors}, busy):
            self.stats.rerun_slices += 1
            self._send_task(by_name[name], self._new_group([i]))

    def _count_bytes(self) -> None:
        for handle, (sent, received) in self.counters.items():
            self.stats.bytes_sent += handle.bytes_sent - sent
            self.stats.bytes_received += handle.bytes_received - received


_FRAME = re.compile(r'^  File "(.+)", line (\d+), in ')


def _with_source_lines(trace: str) -> str:
    """Add the master's copy of a source line where the worker had none."""
    lines = trace.splitlines()
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        frame = _FRAME.match(line)
        has_source = i + 1 < len(lines) and lines[i + 1].startswith("    ")
        if frame and not has_source:
            source = linecache.getline(frame[1], int(frame[2])).strip()
            if source:
                out.append(f"    {source}")
    return "\n".join(out)


def print_log(worker: str, text: str) -> None:
    prefix = f"[{worker}] "
    sys.stdout.write("".join(prefix + line + "\n"
                             for line in text.rstrip("\n").split("\n")))
    sys.stdout.flush()
