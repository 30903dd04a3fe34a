"""A run's decisions, as pure functions of its state and the time now:
which idle worker takes which queued or straggling copy, which groups
must run again for every slice to keep a live copy, and whether the next
run splits each worker's slices. No I/O and no clock of their own: run.py
passes `now`, so tests drive them with any time they like.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

# A copy shorter than this is not worth moving to another worker unless
# that worker holds its data already (moving costs the data).
MOVE_WORTH_S = 0.2
# No backup copies in a run's first half second: too little is known.
BACKUP_AFTER_S = 0.5


class Copy(Protocol):
    """What the policy reads of a task copy (copies.TaskCopy)."""

    @property
    def id(self) -> int: ...
    @property
    def group(self) -> int: ...
    @property
    def slices(self) -> list[int]: ...
    @property
    def started(self) -> float: ...
    @property
    def cancelling(self) -> bool: ...


W = TypeVar("W")
C = TypeVar("C", bound=Copy)


@dataclass
class SliceTimes:
    """Compute time per slice of the copies finished so far, sorted."""

    seconds: list[float] = field(default_factory=list)

    def add(self, compute_s: float, slices: int) -> None:
        bisect.insort(self.seconds, compute_s / max(1, slices))

    def expected(self, copy: Copy) -> float:
        """A copy's likely compute time: the median slice's, per slice."""
        if not self.seconds:
            return 0.0
        return self.seconds[len(self.seconds) // 2] * len(copy.slices)


@dataclass
class Decision(Generic[W, C]):
    """Give `worker` a copy of `copy`'s group: a backup (the original runs
    on) or a move (the original, only queued, is cancelled)."""

    worker: W
    copy: C
    backup: bool


def stragglers(
    running: Iterable[C],
    copies: dict[int, int],
    won: Container[int],
    times: SliceTimes,
    factor: float,
    now: float,
) -> list[C]:
    """Running copies far slower than expected: alone in their group, not
    won, running longer than `factor` times the median slice's time (and
    at least half a second)."""
    return [
        c
        for c in running
        if copies[c.group] == 1
        and c.group not in won
        and now - c.started > max(BACKUP_AFTER_S, factor * times.expected(c))
    ]


def balance(
    idle: Sequence[W],
    queued: list[C],
    late: list[C],
    held: Callable[[W, C], int],
    times: SliceTimes,
) -> list[Decision[W, C]]:
    """Workers that ran dry take a copy: a queued group worth moving (its
    data is there, or it is long enough), else a straggler's backup. Each
    copy goes to one worker; the worker that holds most of it wins."""
    queued, late = list(queued), list(late)
    decisions: list[Decision[W, C]] = []
    for worker in idle:
        candidates = [
            c
            for c in queued
            if held(worker, c) == len(c.slices) or times.expected(c) > MOVE_WORTH_S
        ] or late
        if not candidates:
            break
        copy = max(candidates, key=lambda c: (held(worker, c), len(c.slices), -c.id))
        backup = copy in late
        (late if backup else queued).remove(copy)
        decisions.append(Decision(worker, copy, backup))
    return decisions


def uncovered(
    ended: Iterable[C],
    still_open: Iterable[C],
    undelivered: set[int],
    won: Container[int],
) -> list[C]:
    """Coverage, the run's invariant: every group without a value has a
    live copy counted on to run (a moved copy awaiting its cancel is not).
    Of these copies, which ended without a value, those whose group has no
    such copy left: their slices must run again."""
    counted = {c.group for c in still_open if not c.cancelling}
    return [
        c
        for c in ended
        if c.group in undelivered and c.group not in won and c.group not in counted
    ]


def split_next(
    elapsed_s: float,
    uneven: bool,
    split: bool,
    compute_s: Sequence[float],
) -> bool:
    """Whether the next run should send each worker's slices as two tasks,
    so that one that runs dry can take some. Worth it only for runs over
    50 ms whose workers are uneven: this one moved work, started backups
    or lost workers (`uneven`), or, not split, had a worker compute 25 %
    longer than another. (Two tasks cost a result more per worker.)"""
    if elapsed_s <= 0.05:
        return False
    if uneven:
        return True
    if split:
        return False
    compute = [s for s in compute_s if s > 0]
    return len(compute) > 1 and max(compute) > 1.25 * min(compute)
