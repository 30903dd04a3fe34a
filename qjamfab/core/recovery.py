"""What a run does when workers or hosts are lost or fall silent: the
silent ones judged (liveness.py), the results they held or parked given
up, coverage kept (policy.uncovered: every group without a value keeps a
live copy), and the slices of groups left without one re-planned one by
one on the survivors (scheduler.replan). A slice to blame, or no worker
left, ends the run with losses.py's error."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from ..errors import describe_exit
from ..links.inbox import Inbox
from ..links.workers import LOST, Link, WorkerHandle
from . import liveness, policy, scheduler
from .copies import Copies, TaskCopy
from .groups import Groups
from .losses import Losses
from .results import ResultFlow
from .runstats import RunStats
from .settings import Progress, RunSettings

log = logging.getLogger("qjamfab")


class RunState(Protocol):
    """What recovery reads and changes of its run (run.py's Run)."""

    workers: list[WorkerHandle]
    refs: list[str] | None
    links: list[Link]
    inbox: Inbox
    settings: RunSettings
    clock: Callable[[], float]
    copies: Copies
    groups: Groups
    results: ResultFlow[TaskCopy]
    losses: Losses
    stats: RunStats
    progress: Progress


class Recovery:
    """A run's losses handled. `start(worker, slices)` starts a new group
    of those slices on the worker; `close(copy)` books a copy as ended
    (both the Run's)."""

    def __init__(
        self,
        run: RunState,
        start: Callable[[WorkerHandle, list[int]], None],
        close: Callable[[TaskCopy], None],
    ):
        self.run = run
        self.start = start
        self.close = close

    def check_heartbeats(self) -> None:
        """Workers and hosts that owe the run an answer and have been
        silent too long (liveness.py) are lost."""
        busy = self.run.copies.busy()
        fetching = self.run.results.fetching
        if fetching is not None:
            busy.append(fetching.worker)
        waiting = [
            x
            for x in self.run.links
            if self.run.results.collecting.get(x) or self.run.results.held.get(x)
        ]
        timeout = self.run.settings.heartbeat_timeout
        silent = liveness.judge(busy, waiting, timeout, self.run.clock, self.run.inbox)
        reason = f"no heartbeat for {timeout:g} s"
        for link in silent.hosts:
            liveness.silence(link, self.run.inbox, reason)
            self.host_lost(link)
        for handle in silent.workers:
            handle.alive = False  # its host answers; it does not
            self.lost(handle, reason)

    def host_lost(self, link: Link) -> None:
        """Held results at a host that is gone are gone with it: their
        groups run again."""
        tasks = self.run.results.host_lost(link)
        for task in tasks:
            self.run.groups.unwin(task)
        if tasks:
            self._rerun(
                [i for t in tasks for i in t.slices],
                tasks[-1].worker.name,
                "its host was lost",
            )

    def lost(
        self,
        handle: WorkerHandle,
        reason: str,
        died: bool = False,
        ran: int | None = None,
    ) -> None:
        """A worker ended: its groups without another live copy re-run,
        slice by slice, on the survivors. `died`: its process ended (not
        its host or its connection), so the slice it ran may be the cause;
        `ran`: the copy it was running, where its link knows (copies.py)."""
        handle.alive = False
        self.run.copies.idle.discard(handle)
        # A worker still on a failed run's task may die of that run's job.
        died = died and not handle.stale
        if not handle.link.alive:
            self.host_lost(handle.link)
        parked = self.run.results.unpark(handle)
        for task in parked:  # won, but the value is gone: they run again
            self.run.groups.unwin(task)
        lost_tasks = self.run.copies.on_worker(handle)
        if not lost_tasks and not parked:
            return  # nothing of this run was on it
        status, tail = handle.exit_report()
        handle.close()
        if handle.name not in self.run.stats.lost_workers:
            self.run.stats.lost_workers.append(handle.name)
        detail = describe_exit(status) if status is not None else reason
        running = self.run.copies.ran(handle, ran)
        for task in lost_tasks:
            self.close(task)
        self.run.losses.record(handle.name, detail, running, died, status, tail)
        self.cover(lost_tasks + parked, handle.name, detail, status, tail)
        self.run.results.next_big()

    def cover(
        self,
        tasks: list[TaskCopy],
        name: str,
        detail: str,
        status: int | None = None,
        tail: str = "",
    ) -> None:
        """These copies ended without a value: keep coverage (policy.py)."""
        slices = [
            i
            for t in policy.uncovered(
                tasks,
                self.run.copies.open.values(),
                self.run.groups.undelivered,
                self.run.groups.won,
            )
            for i in t.slices
        ]
        self._rerun(slices, name, detail, status, tail)

    def _handle_losses_read(self) -> None:
        """Handle now the losses of the run's workers that are read but
        still pending. One poll reads every link, so workers that ended
        together are all dead before the first of their ends is handled:
        the run's last error must count them all (two exits: the job's
        doing) and name each."""
        pending = self.run.inbox.pending
        workers = set(map(id, self.run.workers))
        while event := next(
            (e for e in pending if e.kind == LOST and id(e.source) in workers), None
        ):
            pending.remove(event)
            head = event.head
            assert isinstance(event.source, WorkerHandle)
            self.lost(
                event.source, head["reason"], head.get("died", False), head.get("task")
            )

    def _rerun(
        self,
        slices: list[int],
        name: str,
        detail: str,
        status: int | None = None,
        tail: str = "",
    ) -> None:
        survivors = [h for h in self.run.workers if h.alive]
        if slices and not survivors:
            self._handle_losses_read()  # may raise the job's own error
            raise self.run.losses.none_left(name, detail, slices, status, tail)
        if not slices:
            return
        log.warning(
            "worker %s lost (%s); re-running %s on the others",
            name,
            detail,
            self.run.losses.names(slices),
        )
        busy = {h.name: len(q) for h, q in self.run.copies.queues.items()}
        by_name = {h.name: h for h in survivors}
        # Their groups are replaced by one per slice.
        self.run.progress.advance(-self.run.groups.replace_within(slices))
        for worker, i in scheduler.replan(
            slices,
            self.run.refs,
            list(by_name),
            {h.name: h.refs for h in survivors},
            busy,
        ):
            self.run.stats.rerun_slices += 1
            self.start(by_name[worker], [i])
