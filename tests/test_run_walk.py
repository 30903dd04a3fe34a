"""A Run driven through seeded random walks over a scripted engine: no
processes, threads or sleeps, and a clock of the test's own.

Each walk interleaves, at random, workers reading their frames (tasks,
cancels), finishing their first task, dying or going silent, while the
clock moves on, so moves to workers that ran dry, backup copies, cancels
confirmed late and losses mix in every order. Whatever the order, the run
must end (within a bound of steps) with every slice counted exactly once,
or with one of the errors that say the workers are gone.
"""

from __future__ import annotations

import itertools
import random
from collections import deque

import pytest

from qjamfab import ListDataSet, WorkerLost, protocol
from qjamfab.core import policy
from qjamfab.core.copies import Copies, TaskCopy
from qjamfab.core.run import Run
from qjamfab.core.settings import RunSettings
from qjamfab.links.workers import LOST, Event, WorkerHandle
from qjamfab.reduce import ReduceTree

STEPS = 20_000  # a walk that takes more has not ended: the run hangs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Ended:
    def exit_report(self, log: object) -> tuple[None, str]:
        return None, ""


class ScriptedLink:
    """One worker's stream, as a Run sees it: frames out are kept for the
    walk's worker to read; nothing is ever really sent."""

    agent = False
    remote = False
    python = ""
    transport = _Ended()  # what WorkerHandle.exit_report asks of a link

    def __init__(self, label: str, clock: Clock):
        self.label = label
        self.alive = True
        self.handles: dict[int, WorkerHandle] = {}
        self.last_seen = clock()
        self.bytes_sent = self.bytes_received = 0
        self.inbound: deque[tuple[int, dict]] = deque()

    def send(
        self, kind: int, head: dict, payload=(), worker=0, to="", queued=False
    ) -> int:
        if not self.alive:
            raise WorkerLost(f"worker {to}: its stream is closed", worker=to)
        self.inbound.append((kind, dict(head)))
        return 0

    def computing(self) -> bool:
        return False  # silent means gone

    def hold(self) -> None:
        pass  # frames are kept in order anyway

    def release(self) -> None:
        pass

    def install_advice(self, ship: str | None) -> str:
        return "install it"

    def lost(self, reason: str, died: bool | None = None) -> list[Event]:
        self.alive = False
        events = [
            Event(h, LOST, {"reason": reason, "died": bool(died)}, [])
            for h in self.handles.values()
            if h.alive
        ]
        for handle in self.handles.values():
            handle.alive = False
        return events

    def close(self) -> None:
        self.alive = False


class Walk:
    """The scripted workers and the inbox a Run reads: each call for an
    event takes one random step of the world."""

    def __init__(self, seed: int, workers: int, kills: int, clock: Clock):
        self.rng = random.Random(seed)
        self.clock = clock
        self.ids = itertools.count(1)
        self.pending: deque[Event] = deque()
        self.kills_left = kills
        self.steps = 0
        self.handles = []
        self.queue: dict[WorkerHandle, list[dict]] = {}
        for k in range(workers):
            link = ScriptedLink(f"w{k}", clock)
            handle = link.handles[0] = WorkerHandle(link, 0, f"w-{k}", {})
            self.handles.append(handle)
            self.queue[handle] = []
        self.leaves = 0

    # --- the inbox a Run reads --------------------------------------------

    def push_front(self, event: Event) -> None:
        self.pending.appendleft(event)

    def read_available(self) -> None:
        pass

    def next_event(self, timeout: float) -> Event | None:
        self.steps += 1
        if self.steps > STEPS:
            raise AssertionError(f"the run did not end in {STEPS} steps")
        if self.pending:
            return self.pending.popleft()
        self.clock.now += self.rng.choice((0.0, 0.01, 0.05, 0.2, timeout))
        live = [h for h in self.handles if h.alive]
        for h in live:  # heartbeats, but for a frozen worker
            if not getattr(h, "frozen", False):
                h.last_seen = self.clock()
        if not live:
            return None
        handle = self.rng.choice(live)
        roll = self.rng.random()
        if roll < 0.08 and self.kills_left:
            self.kills_left -= 1
            died = self.rng.random() < 0.5
            events = handle.link.lost("killed", died=died)
            self.pending.extend(events)
            return self.pending.popleft() if self.pending else None
        if roll < 0.12 and self.kills_left:
            self.kills_left -= 1
            handle.frozen = True  # silent from now on: the deadline applies
            return None
        if getattr(handle, "frozen", False):
            return None
        if handle.link.inbound:
            return self._read(handle)
        if self.queue[handle]:
            return self._finish(handle)
        return None

    # --- a scripted worker ------------------------------------------------

    def _read(self, handle: WorkerHandle) -> Event | None:
        """The worker reads every frame that came: tasks queue, a cancel
        of one not started is confirmed."""
        out = None
        while handle.link.inbound:
            kind, head = handle.link.inbound.popleft()
            if kind == protocol.TASK:
                self.leaves = head["leaves"]
                self.queue[handle].append(head)
            elif kind == protocol.CANCEL:
                queued = [
                    t for t in self.queue[handle][1:] if t["task"] == head["task"]
                ]
                for task in queued:
                    self.queue[handle].remove(task)
                    self.pending.append(
                        Event(
                            handle,
                            protocol.STATE,
                            {
                                "task": task["task"],
                                "run": task["run"],
                                "state": "cancelled",
                            },
                            [],
                        )
                    )
        if self.pending:
            out = self.pending.popleft()
        return out

    def _finish(self, handle: WorkerHandle) -> Event:
        task = self.queue[handle].pop(0)
        tree = ReduceTree(task["leaves"], None)
        for i in task["slices"]:
            tree.add(i, 1, i + 1)  # slice i's value
        head = {
            "task": task["task"],
            "run": task["run"],
            "compute_s": self.rng.choice((0.01, 0.1, 1.0)),
            "slices": len(task["slices"]),
        }
        return Event(handle, protocol.RESULT, head, protocol.encode(tree.items()))


@pytest.mark.parametrize("seed", range(150))
def test_every_walk_ends_with_every_slice_counted_once(seed):
    clock = Clock()
    rng = random.Random(seed)
    workers = rng.choice((2, 3, 4))
    kills = rng.choice((0, 1, 2, workers))
    walk = Walk(seed, workers, kills, clock)
    n = rng.choice((4, 8, 13))
    data = ListDataSet(list(range(n)), slice_size=1)
    for handle in walk.handles:
        handle.refs.update(data.refs())  # every worker holds the data
    run = Run(
        walk,  # type: ignore[arg-type]  # the inbox a Run reads
        walk.handles,
        "f" * 64,
        b"job",
        protocol.encode(None),
        data,
        None,
        RunSettings(
            heartbeat_timeout=3.0,
            straggler_factor=rng.choice((1.0, 4.0)),
            replicas=1,
            split=rng.random() < 0.7,
            clock=clock,
        ),
    )
    try:
        value = run.execute()
    except WorkerLost as exc:
        # Only when the workers are gone, or one slice killed two.
        assert kills >= 2, exc
        assert "no worker is left" in str(exc) or "killed workers" in str(exc)
        return
    assert value == sum(range(1, n + 1))  # each slice's value, once


def test_the_move_then_kill_sequence_reruns_the_group():
    """The policy's own words for the sequence: a moved copy awaiting its
    cancel does not cover its group once the new copy is lost."""

    class C:
        def __init__(self, id, group, cancelling=False):
            self.id, self.group, self.slices = id, group, [group]
            self.started, self.cancelling = 0.0, cancelling

    placeholder = C(1, group=7, cancelling=True)
    new_copy = C(2, group=7)
    assert policy.uncovered([new_copy], [placeholder], {7}, {}) == [new_copy]
    # While the new copy lives, the group is covered.
    assert policy.uncovered([placeholder], [new_copy], {7}, {}) == []
    # A group won or delivered needs nothing.
    assert policy.uncovered([new_copy], [], {7}, {7: new_copy}) == []
    assert policy.uncovered([new_copy], [], set(), {}) == []


def test_stragglers_are_judged_against_the_clock_given():
    class C:
        def __init__(self, group, started, slices=1):
            self.id, self.group, self.slices = group, group, list(range(slices))
            self.started, self.cancelling = started, False

    times = policy.SliceTimes()
    times.add(0.1, 1)
    slow, fine = C(1, started=0.0), C(2, started=0.9)
    copies = {1: 1, 2: 1}
    assert policy.stragglers([slow, fine], copies, {}, times, 4.0, now=1.0) == [slow]
    assert policy.stragglers([slow, fine], copies, {}, times, 4.0, now=0.4) == []
    # A group with a second copy already, or won, gets no more.
    assert policy.stragglers([slow], {1: 2}, {}, times, 4.0, now=1.0) == []
    assert policy.stragglers([slow], copies, {1}, times, 4.0, now=1.0) == []


def test_a_lost_worker_is_blamed_for_the_copy_its_link_names():
    """The slices a lost worker was running: the copy its link names
    (Dask's, whose workers run copies in an order of their own), else the
    head of its queue; none for a copy not open on it."""
    clock = Clock()
    a, b = (
        WorkerHandle(ScriptedLink(f"w{k}", clock), 0, f"w-{k}", {}) for k in range(2)
    )
    copies = Copies([a, b])
    for task_id, worker, slices in ((1, a, [0, 1]), (2, a, [2]), (3, b, [3])):
        copies.add(TaskCopy(task_id, worker, task_id, slices, False, clock()))
    assert copies.ran(a, None) == [0, 1]
    assert copies.ran(a, 2) == [2]
    assert copies.ran(a, 3) == []  # w-1's copy
    assert copies.ran(a, 99) == []  # no open copy: an earlier run's
    assert copies.ran(b, None) == [3]
