"""The default reduce (`+`, element-wise for equal-length lists and
tuples), and the fixed tree every run combines its results in.

Standard library only, and no qjamfab imports: this file is shipped to
workers and host agents, which combine results with it before replying.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any


class ReduceMismatch(TypeError):
    """Two results that the default reduce cannot combine."""


def default_reduce(
    a: Any, b: Any, add: Callable[[Any, Any], Any] = operator.add
) -> Any:
    """a + b, except lists/tuples add element-wise (recursively).

    Element-wise needs equal lengths and returns a's type, so a job
    returning (count, total) pairs sums both fields. `add` adds two
    leaves (add_in_place, for values nobody else holds).
    """
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            raise ReduceMismatch(
                f"cannot combine results of lengths {len(a)} and {len(b)}: return "
                f"equal-length lists/tuples, or give run() a reduce function"
            )
        return _rebuild(a, [default_reduce(x, y, add) for x, y in zip(a, b)])
    try:
        return add(a, b)
    except (TypeError, ValueError) as exc:
        # ValueError: numpy arrays whose shapes do not broadcast.
        # None is what a function without a return statement gives.
        advice = (
            "did mapfunc forget to return its value? (a result is None)"
            if a is None or b is None
            else "return results that add, or give run() a reduce function"
        )
        raise ReduceMismatch(
            f"cannot combine results of type {type(a).__name__} and "
            f"{type(b).__name__} with +: {advice}\n"
            f"{type(exc).__name__}: {exc}"
        ) from exc


def add_in_place(a: Any, b: Any) -> Any:
    """a + b, written into a where that gives the same bits and needs no
    new memory: numpy arrays of one shape and numeric dtype, a writable and
    not overlapping b. Only for an `a` that nobody else holds: the
    master's tree, whose values it decoded itself."""
    if (
        type(a) is type(b)
        and type(a).__name__ == "ndarray"
        and type(a).__module__ == "numpy"
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.dtype.kind in "biufc"
        and a.flags.writeable
    ):
        numpy = sys.modules["numpy"]  # loaded: a is one of its arrays
        if not numpy.may_share_memory(a, b):
            a += b
            return a
    return a + b


def reduce_in_place(a: Any, b: Any) -> Any:
    """default_reduce, adding arrays into the left one (add_in_place)."""
    return default_reduce(a, b, add_in_place)


def _rebuild(like: list | tuple, items: list[Any]) -> list | tuple:
    # Named tuples take their fields positionally.
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)


_ABSENT = object()


class ReduceTree:
    """A run's partial results as the nodes of one fixed binary tree over
    its leaves (slice indices, or workers for a run without a dataset).

    Node (lo, size) covers leaves lo .. lo+size-1; size is a power of two
    and lo a multiple of it. A node's value is reduce(left child, right
    child); a node whose right half lies past the last leaf is its left
    child. Adding nodes combines siblings as soon as both are here, so
    whoever adds what, in whatever order (a worker its slices, an agent
    its workers' nodes, the master everyone's), the root is the same value
    to the bit, for the same leaves: the result does not depend on how
    slices were grouped into tasks, nor on stealing, backups, lost
    workers or arrival order. Only what has no sibling yet is held.
    """

    def __init__(self, leaves: int, reduce: Callable[[Any, Any], Any] | None = None):
        if leaves < 1:
            raise ValueError("a ReduceTree needs at least one leaf")
        self.leaves = leaves
        self.reduce = reduce or default_reduce
        self.top = 1 << (leaves - 1).bit_length()
        self.nodes: MutableMapping[tuple[int, int], Any] = {}

    def add(self, lo: int, size: int, value: Any) -> None:
        """Add node (lo, size), combining it upwards while it can."""
        self._add_last([(lo, size, value)])

    def add_all(self, nodes: list[tuple[int, int, Any]]) -> None:
        """Add the nodes, emptying the list as it goes: a value combined
        into another is freed at once, not when the whole list is done."""
        nodes.reverse()
        while nodes:
            self._add_last(nodes)

    def _add_last(self, nodes: list[tuple[int, int, Any]]) -> None:
        # Popped here, not by the caller: no frame but this one holds the
        # value once it has combined.
        lo, size, value = nodes.pop()
        while size < self.top:
            if (lo // size) % 2 == 0:
                if lo + size < self.leaves:
                    right = self.nodes.pop((lo + size, size), _ABSENT)
                    if right is _ABSENT:
                        break
                    value = self.reduce(value, right)
                    del right  # combined: only value holds what it was
            else:
                left = self.nodes.pop((lo - size, size), _ABSENT)
                if left is _ABSENT:
                    break
                value = self.reduce(left, value)
                del left
                lo -= size
            size *= 2
        self.nodes[(lo, size)] = value

    def items(self) -> list[tuple[int, int, Any]]:
        """The nodes held, to send on: [(lo, size, value)]."""
        return [(lo, size, value) for (lo, size), value in self.nodes.items()]

    @property
    def complete(self) -> bool:
        return (0, self.top) in self.nodes

    def result(self) -> Any:
        """The root's value, once every leaf has been added."""
        return self.nodes[(0, self.top)]


def reduce_all(
    values: Sequence[Any], reduce: Callable[[Any, Any], Any] | None = None
) -> Any:
    """Fold values left to right with reduce, or default_reduce when None."""
    if not values:
        raise ValueError("reduce_all needs at least one value")
    return functools.reduce(reduce or default_reduce, values)
