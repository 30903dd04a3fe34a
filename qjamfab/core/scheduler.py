"""Which worker runs which slices: pure logic, no I/O.

Placement is deterministic, so the same dataset on the same workers lands
the same way on every run (and on a new Master), and the workers' caches
hit. A slice goes to its place in the contiguous layout (blocks in worker
order) when that worker holds it, else to another worker known to hold it
while that worker has room; the rest fill the contiguous blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set


def plan(
    refs: Sequence[str], workers: Sequence[str], held: Mapping[str, Set[str]]
) -> dict[str, list[int]]:
    """Slice indices for each worker, balanced to within one slice."""
    if not workers:
        raise ValueError("no workers to plan onto")
    n, count = len(refs), len(workers)
    base, extra = divmod(n, count)
    load: dict[str, list[int]] = {w: [] for w in workers}
    full = 0  # workers holding base + 1 slices; only `extra` may

    def has_room(w: str) -> bool:
        return len(load[w]) < base or (len(load[w]) == base and full < extra)

    def place(w: str, i: int) -> None:
        nonlocal full
        load[w].append(i)
        full += len(load[w]) == base + 1

    unplaced: list[int] = []
    for i, ref in enumerate(refs):
        home = workers[i * count // n]
        if ref in held.get(home, ()) and has_room(home):
            # Where the contiguous layout puts it: ranges of slices stay
            # together, so their results combine early (reduce.ReduceTree).
            # Asked first: on cached data every slice is at home, and the
            # other workers need not be looked at (per run, per slice).
            place(home, i)
            continue
        holders = [w for w in workers if ref in held.get(w, ()) and has_room(w)]
        if holders:
            place(min(holders, key=lambda w: len(load[w])), i)
        else:
            unplaced.append(i)
    for i in unplaced:
        home = workers[i * count // n]
        if not has_room(home):
            home = min((w for w in workers if has_room(w)), key=lambda w: len(load[w]))
        place(home, i)
    return {w: sorted(slices) for w, slices in load.items() if slices}


def replan(
    slices: Sequence[int],
    refs: Sequence[str] | None,
    survivors: Sequence[str],
    held: Mapping[str, Set[str]],
    busy: Mapping[str, int],
) -> list[tuple[str, int]]:
    """Place a lost worker's slices one by one onto survivors.

    Each slice becomes its own task, so a slice that kills its worker again
    is known exactly. A survivor holding the slice is preferred, then the
    least busy one.
    """
    if not survivors:
        raise ValueError("no surviving workers")
    busy = {w: busy.get(w, 0) for w in survivors}
    placed: list[tuple[str, int]] = []
    for i in slices:
        ref = refs[i] if refs else None
        holders = [w for w in survivors if ref is not None and ref in held.get(w, ())]
        worker = min(holders or survivors, key=lambda w: busy[w])
        busy[worker] += 1
        placed.append((worker, i))
    return placed


def batches(slices: list[int], split: bool) -> list[list[int]]:
    """A worker's slices as one task, or two (so another can take one)."""
    if not split or len(slices) < 2:
        return [slices]
    half = (len(slices) + 1) // 2
    return [slices[:half], slices[half:]]
