"""What a run sends its workers to start a task copy: the job once per
worker, the params where params_place.py puts them, the TASK head; and a
run's first tasks to a host whose agent serves several of its workers as
one TASKS frame, which the agent passes on as each worker's TASK. Where
an agent serves the worker, the job goes once to the agent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .. import protocol
from ..links.workers import Link, WorkerHandle
from . import results as result_flow
from .copies import TaskCopy
from .params_place import ParamsPlacement


class Dispatch:
    """One run's way out to its workers."""

    def __init__(
        self,
        run_id: int,
        workers: Sequence[WorkerHandle],
        func: tuple[str, bytes],
        params_parts: list[Any],
        refs: list[str] | None,
        broadcasts: dict[str, list] | None,
    ):
        self.run_id = run_id
        self.func_hash, self.func_bytes = func
        self.refs = refs
        # How many leaves the run's tree has: a slice each, or without a
        # dataset a task per worker.
        self.leaves = len(refs) if refs is not None else len(workers)
        links = [h.link for h in workers]
        self.links = list(dict.fromkeys(links))
        self.params = ParamsPlacement(run_id, params_parts, links)
        self.params_sent: set[WorkerHandle] = set()  # have this run's params
        # Results are held at the agent only where there is something to
        # combine them with: a host with several workers in the run.
        self.holds = {x for x in self.links if x.agent and links.count(x) > 1}
        # Broadcasts travel as slices do: each TASK names them.
        self.broadcast_head = {"broadcasts": list(broadcasts)} if broadcasts else {}

    def held(self, handle: WorkerHandle) -> bool:
        """Whether the worker's results wait at its host's agent."""
        return handle.link in self.holds

    def send(self, task: TaskCopy, first: list | None = None) -> None:
        """Start the copy on its worker: its TASK, or an entry in `first`,
        its host's first tasks (`send_first`). Raises WorkerLost."""
        handle = task.worker
        slices = task.slices
        refs = None if self.refs is None else [self.refs[i] for i in slices]
        if self.func_hash not in handle.funcs:
            self._send_job(handle)
        with_params = handle not in self.params_sent
        if with_params:
            with_params = self.params.before_first_task(handle)
        self.params_sent.add(handle)
        if first is not None:
            first.append([handle.index, task.id, slices, refs, with_params])
            return
        handle.send(
            protocol.TASK,
            {
                "task": task.id,
                "refs": refs,
                "slices": slices,
                "params": with_params,
                **self._task_head(task.held),
            },
            self.params.parts if with_params else (),
        )

    def first_wave(
        self,
        queues: list[tuple[WorkerHandle, list[list[int]]]],
        start: Callable[[WorkerHandle, list[int], list | None], None],
    ) -> None:
        """Start a run's planned batches, each worker's in order, through
        `start(worker, batch, first)`. Every worker's first task before
        anyone's second: on a busy machine the last worker to get one
        would start late. One write per host for them all, and where an
        agent combines, one TASKS frame for that host's tasks (`first`,
        the list its entries go in; None elsewhere)."""
        first: dict[Link, list] = {link: [] for link in self.holds}
        for link in self.links:
            link.hold()
        try:
            for k in range(max((len(b) for _, b in queues), default=0)):
                for handle, batches in queues:
                    if k < len(batches):
                        start(handle, batches[k], first.get(handle.link))
            for link, entries in first.items():
                self.send_first(link, entries)
        finally:
            for link in self.links:
                link.release()

    def send_first(self, link: Link, entries: list) -> None:
        """A host's first tasks of the run, in one frame to its agent
        (protocol.TASKS). The link is held: a failed write is its loss,
        at `release`."""
        if entries:
            link.send(
                protocol.TASKS,
                {**self._task_head(True), "tasks": entries},
                self.params.parts if any(entry[4] for entry in entries) else (),
                worker=protocol.AGENT,
            )

    def close(self) -> None:
        self.params.close()

    def _send_job(self, handle: WorkerHandle) -> None:
        """The job, to a worker that has not had it: once per host where an
        agent serves the worker (it hands the job to each of its workers
        with their first TASK of it), else to the worker. A worker that
        lost it after all asks again (supply.py)."""
        link = handle.link
        if not link.agent:
            handle.send(protocol.FUNC, {"hash": self.func_hash}, [self.func_bytes])
        elif self.func_hash not in link.jobs:
            link.send(
                protocol.FUNC,
                {"hash": self.func_hash},
                [self.func_bytes],
                worker=protocol.AGENT,
            )
            link.jobs.add(self.func_hash)
        handle.funcs.add(self.func_hash)

    def _task_head(self, held: bool) -> dict:
        """What every TASK of the run says (`held`: to a host that keeps
        its results for COLLECT, and offers them combined unasked while
        they are small: results.py)."""
        return {
            "run": self.run_id,
            "func": self.func_hash,
            "leaves": self.leaves,
            "hold": held,
            "park": None if held else result_flow.PARK_BYTES,
            **({"offer": result_flow.PARK_BYTES} if held else {}),
            **self.broadcast_head,
        }
