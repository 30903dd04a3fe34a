"""A run's held tasks waiting at their host: each worker there runs one
at a time, the rest wait at the agent in the master's order, and a worker
that runs dry takes the last waiting task of the sibling with the most.

Only a run's tasks whose results stay at the host (TASKs with `hold`:
the host serves several of the run's workers) wait here. Their slices
are in the host's cache, or asked for by whichever worker runs them, and
their values wait at the agent for the host's one offer or COLLECT,
whichever worker made them: so a task moves between the host's workers
at once, with no round trip to the master, which learns of the move in
the host's next note of tasks done (held.py), before anything the new
worker says of the task. A task waiting here that the master cancels
is answered here ("cancelled"), without waiting for its worker to end
the task it runs.

The agent (agent.py) passes the frames; this module keeps the queues.
Stdlib only: shipped to hosts with the runtime.
"""

from __future__ import annotations


class HostQueue:
    """One agent's waiting tasks, for the run its last held TASK named."""

    def __init__(self) -> None:
        self.run: int | None = None
        self.waiting: dict[int, list[dict]] = {}  # worker -> TASK heads, in order
        self.where: dict[int, int] = {}  # held task -> the worker it went to

    def new_task(self, head: dict) -> None:
        """A held TASK for this host: a new run forgets what the last one
        left waiting (its workers drop it too)."""
        if head["run"] != self.run:
            self.run = head["run"]
            self.waiting.clear()
            self.where.clear()

    def wait(self, worker: int, head: dict) -> None:
        """The task waits here until `worker`, or a sibling, runs dry."""
        self.waiting.setdefault(worker, []).append(head)

    def passed(self, worker: int, head: dict) -> None:
        """A held task went on to `worker`'s daemon."""
        self.where[head["task"]] = worker

    def waits(self) -> bool:
        """Whether any task waits here."""
        return any(self.waiting.values())

    def next_for(self, worker: int, live: set[int]) -> tuple[dict, int] | None:
        """For a worker that ran dry: its own next waiting task, else the
        last waiting task of the live sibling with the most; with the
        worker it waited for. None when nothing waits."""
        own = self.waiting.get(worker)
        if own:
            return own.pop(0), worker
        source = max(
            (k for k in self.waiting if k in live and self.waiting[k]),
            key=lambda k: (len(self.waiting[k]), -k),
            default=None,
        )
        if source is None:
            return None
        return self.waiting[source].pop(), source

    def cancel(self, task: int) -> int | None:
        """The master cancels `task`: when it waits here, it is taken out
        and the worker it waited for is returned (the answer is then the
        agent's); else None."""
        for worker, heads in self.waiting.items():
            for head in heads:
                if head["task"] == task:
                    heads.remove(head)
                    return worker
        return None

    def route(self, task: int, worker: int) -> int:
        """The worker the master's frame about `task`, which it knows on
        `worker`, is for: the one it went to, moved or not."""
        return self.where.get(task, worker)

    def drop(self, worker: int) -> list[int]:
        """`worker` is gone: what waited for it is lost with it (the master
        runs it again, as it does its other tasks). Their task ids."""
        return [head["task"] for head in self.waiting.pop(worker, [])]
