"""A run's results on their way in: the fixed tree they combine in, and
the big ones brought in one at a time.

Results join the run's `reduce.ReduceTree` as they arrive (its held nodes
under a memory budget: spill.py). Where a host's agent holds its workers'
results (a host with several workers in the run), it combines them, so a
few tree nodes per host cross the network: small ones unasked once its
tasks are done (an offer, taken when it holds exactly the winners), else
when the master asks for the winners once the host has no open task left
(COLLECT). A big result waits at its
worker ("parked") until fetched (FETCH). Of big transfers, one is on its
way at a time, the first in the tree first: the master's memory holds one
big result incoming, whatever finishes together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, cast

from .. import protocol
from ..errors import ReduceError, WorkerLost
from ..links.workers import Link, WorkerHandle
from ..reduce import ReduceMismatch, ReduceTree, reduce_in_place
from .spill import SpilledNodes

# A result this big waits at its worker until the master fetches it (one
# at a time, in the order the tree combines them), so that results that
# finish together do not all land in the master's memory at once.
PARK_BYTES = 8 << 20
# Tree nodes held on the master (waiting for their sibling) past this many
# bytes wait in temporary files instead (spill.py).
HELD_BYTES = 256 << 20

Node = tuple[int, int, Any]  # (lo, size, value): a reduce.ReduceTree node


class Copy(Protocol):
    """What the flow needs of a task copy (copies.TaskCopy)."""

    id: int
    worker: WorkerHandle
    group: int
    slices: list[int]
    size: int  # its result's bytes


T = TypeVar("T", bound=Copy)


class ResultFlow(Generic[T]):
    """The run's tree and the results held at hosts or parked at workers.

    `send_failed(handle, exc)` is the run's: a send to that worker failed
    (it is lost; the run re-runs what it had). `host_busy(link)`: whether
    the host still has open tasks (its held results wait for them).
    """

    def __init__(
        self,
        run_id: str | int,
        func_hash: str,
        leaves: int,
        reduce: Callable[[Any, Any], Any] | None,
        send_failed: Callable[[WorkerHandle, WorkerLost], None],
        host_busy: Callable[[Link], bool],
    ):
        self.run_id = run_id
        self.func_hash = func_hash
        self.leaves = leaves
        # Values in the master's tree are its own (decoded here), so the
        # default reduce may add arrays into them.
        self.tree = ReduceTree(leaves, reduce or reduce_in_place)
        self.tree.nodes = self.nodes = SpilledNodes(HELD_BYTES)
        self._send_failed = send_failed
        self._host_busy = host_busy
        self.held: dict[Link, list[T]] = {}  # done, at the agent
        self.to_collect: set[Link] = set()  # hosts done with tasks
        self.collecting: dict[Link, list[T]] = {}
        self.parked: list[T] = []  # won, waiting at their worker
        self.fetching: T | None = None  # a parked result on its way
        self.big_collect: Link | None = None  # a big COLLECT answer on its way
        self.waiting_collect: set[Link] = set()  # big, for their turn
        self.offers: set[Link] = set()  # hosts whose combined results come unasked

    # --- results in -----------------------------------------------------

    def add(self, nodes: list[Node]) -> None:
        """Results in: their nodes join the tree at once."""
        try:
            self.tree.add_all(nodes)
        except ReduceMismatch as exc:
            raise ReduceError(f"{exc}") from exc
        except Exception as exc:
            raise ReduceError(
                f"reduce failed on the master ({type(exc).__name__}: {exc}): "
                "fix reduce(a, b) so it combines two results"
            ) from exc

    def hold(self, task: T, size: int) -> None:
        """A winning copy's value waits at its host's agent."""
        task.size = size
        link = task.worker.link
        self.held.setdefault(link, []).append(task)
        if not self._host_busy(link):
            self.to_collect.add(link)

    def host_idle(self, link: Link) -> None:
        """The host's last open task ended: what it holds can be combined."""
        if self.held.get(link):
            self.to_collect.add(link)

    def park(self, task: T, size: int) -> None:
        """A winning copy's big value waits at its worker: fetched in turn."""
        task.size = size
        self.parked.append(task)
        self.next_big()

    def fetched(self, handle: WorkerHandle, head: dict) -> T | None:
        """The parked result this RESULT brings, if it is the one asked for."""
        task = self.fetching
        if task is None or task.worker is not handle or head.get("task") != task.id:
            return None
        self.fetching = None
        return task

    def offer_coming(self, link: Link) -> None:
        """The host's agent sends what it holds combined, unasked: not to
        be asked for it meanwhile."""
        self.offers.add(link)

    def offered(self, link: Link, head: dict) -> list[T]:
        """The copies whose values an offer brings, when it brings exactly
        the winners held there; else none, and the winners are asked for
        (the agent kept their values)."""
        self.offers.discard(link)
        held = self.held.get(link, [])
        if sorted(t.id for t in held) != sorted(head["tasks"]):
            if held and not self._host_busy(link):
                self.to_collect.add(link)
            return []
        del self.held[link]
        self.to_collect.discard(link)
        return held

    def collected(self, link: Link, head: dict) -> list[T]:
        """The copies whose values a COLLECT answer brings."""
        by_id = {t.id: t for t in self.collecting.get(link, ())}
        tasks = [by_id.pop(t) for t in head["tasks"] if t in by_id]
        self.collecting[link] = list(by_id.values())
        if self.big_collect is link and not self.collecting[link]:
            self.big_collect = None
        return tasks

    # --- asking -----------------------------------------------------------

    def ask(self) -> None:
        """Ask the hosts that are ready to combine what they hold, and for
        the next big result if none is on its way."""
        while self.to_collect:
            link = self.to_collect.pop()
            if link in self.offers:
                continue  # its offer decides
            if link.alive and self.held.get(link) and not self._host_busy(link):
                self._collect_host(link)
        if self.waiting_collect or self.parked:
            self.next_big()

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

    def next_big(self) -> None:
        """Unless a big result is on its way: ask for the next, a host's
        held results or a parked one, the first in the tree first."""
        if self.fetching is not None or self.big_collect is not None:
            return
        hosts = [
            x
            for x in self.waiting_collect
            if x.alive and self.held.get(x) and not self._host_busy(x)
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
                self._send_failed(task.worker, exc)  # its loss re-runs it
                return

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

    # --- losses -----------------------------------------------------------

    def unpark(self, handle: WorkerHandle) -> list[T]:
        """The results parked at a worker that is lost: gone with it."""
        tasks = [t for t in self.parked if t.worker is handle]
        if self.fetching is not None and self.fetching.worker is handle:
            tasks.append(self.fetching)
            self.fetching = None
        for task in tasks:
            if task in self.parked:
                self.parked.remove(task)
        return tasks

    def host_lost(self, link: Link) -> list[T]:
        """The results held at a host that is gone: gone with it."""
        tasks = self.held.pop(link, []) + self.collecting.pop(link, [])
        self.waiting_collect.discard(link)
        self.offers.discard(link)
        if self.big_collect is link:
            self.big_collect = None
            self.next_big()
        return tasks


def take_nodes(parts: list[Any]) -> list[Node]:
    """A RESULT's payload: the ReduceTree nodes it carries. The received
    buffers then stay only as long as the values made from them (the
    master's memory bound relies on it)."""
    nodes = cast(list[Node], protocol.decode(parts))  # unpickled: unchecked
    parts.clear()
    return nodes
