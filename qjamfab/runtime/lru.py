"""The jobs a worker daemon or a host agent keeps, bounded in bytes.

Each new job (a FUNC frame: mapfunc and reduce, pickled, named by their
hash) used to stay in a daemon's and an agent's memory for good, and
daemons serve session after session: a notebook redefining a closure over
a fresh array all day grew every one of them without end. `JobCache`
keeps the most recently used jobs within a budget of their pickled bytes
(a loaded job holds about what its pickle does: the arrays it closes over)
and drops the least recently used beyond it, never one its owner pins (the
job of a task queued or running) nor the one just added. A dropped job
that a task needs again is asked for as any missing one is: the worker
says it is blocked with `func`, and the master sends it again.

The budget: `$QJAMFAB_JOB_CACHE` (bytes, or a size such as `64M`), else
64 MiB.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Collection
from typing import Generic, TypeVar

from .pins import parse_size

DEFAULT_BUDGET = 64 << 20
V = TypeVar("V")


def job_budget() -> int:
    """Bytes of jobs a process keeps: $QJAMFAB_JOB_CACHE, else 64 MiB.
    Raises CacheLimitError (its first line names the variable) for a value
    that is not a size."""
    value = os.environ.get("QJAMFAB_JOB_CACHE", "").strip()
    return parse_size(value, "QJAMFAB_JOB_CACHE") if value else DEFAULT_BUDGET


class JobCache(Generic[V]):
    """hash -> job, least recently used out first past `budget` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0  # the sizes given for what it holds
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        """The job of key, now the most recently used; None when not here."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: V, size: int, pinned: Collection[str] = ()) -> None:
        """Keep value (of `size` bytes) under key, the most recently used;
        then drop the least recently used until the budget holds, sparing
        key itself and the `pinned` keys (so it may stay over budget)."""
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[key] = (value, size)
        self.bytes += size
        for name in list(self._items):
            if self.bytes <= self.budget:
                break
            if name != key and name not in pinned:
                self.bytes -= self._items.pop(name)[1]

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
