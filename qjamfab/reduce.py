"""The default reduce (`+`, leaf by leaf through lists, tuples, dicts and
dataclasses), and the fixed tree every run combines its results in.

Standard library only, and no qjamfab imports: this file is shipped to
workers and host agents, which combine results with it before replying.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import sys
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any


class ReduceMismatch(TypeError):
    """Two results that the default reduce cannot combine."""


def default_reduce(
    a: Any, b: Any, add: Callable[[Any, Any], Any] = operator.add
) -> Any:
    """a + b, except for pytrees, which add leaf by leaf (recursively).

    A pytree is a list or tuple (equal lengths; a named tuple too), a dict
    (the same keys) or a dataclass instance (the same class), whose type
    has no `+` of its own: so a job returning (count, total) pairs, or a
    gradient as {"W1": ..., "b1": ...}, sums every field, and the result
    has a's type and key order. Anything else (numbers, arrays, tensors,
    Counters, dict subclasses or dataclasses that define `+`) adds with
    `+`. `add` adds two leaves (add_in_place, for values nobody else holds).
    """
    return _combine(a, b, add, "result")


def leaves(value: Any) -> Iterator[Any]:
    """The leaves of a pytree, in the order default_reduce adds them."""
    kind = _kind(value)
    if kind is None:
        yield value
        return
    for _, child in _children(value, kind):
        yield from leaves(child)


def _kind(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        return "sequence"
    if hasattr(type(value), "__add__"):
        return None  # its own + (a Counter, a dataclass that defines one)
    if isinstance(value, dict):
        return "dict"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dataclass"
    return None


def _children(value: Any, kind: str) -> list[tuple[str, Any]]:
    """(path step, child) for each child of a pytree node."""
    if kind == "sequence":
        names = getattr(value, "_fields", None)  # a named tuple's
        return [
            (f".{names[i]}" if names else f"[{i}]", item)
            for i, item in enumerate(value)
        ]
    if kind == "dict":
        return [(_key_step(key), item) for key, item in value.items()]
    return [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]


def _key_step(key: Any) -> str:
    if isinstance(key, str) and key.isprintable() and not set(key) & set('"\\'):
        return f'["{key}"]'
    return f"[{key!r}]"


def _combine(a: Any, b: Any, add: Callable[[Any, Any], Any], path: str) -> Any:
    kind = _kind(a)
    if kind is not None and kind == _kind(b):
        if kind == "sequence":
            if len(a) != len(b):
                raise ReduceMismatch(
                    f"cannot combine {_noun(path)} of lengths {len(a)} and "
                    f"{len(b)}: return equal-length lists/tuples, or give run() "
                    f"a reduce function"
                )
            return _rebuild(
                a,
                [
                    _combine(x, y, add, path + step)
                    for (step, x), y in zip(_children(a, kind), b)
                ],
            )
        if kind == "dict":
            if a.keys() != b.keys():
                raise ReduceMismatch(
                    f"cannot combine {_noun(path)} of different keys "
                    f"({_key_difference(a, b)}): return dicts with the same "
                    f"keys, or give run() a reduce function"
                )
            out = copy.copy(a)  # a's type (an OrderedDict's, a defaultdict's)
            for key, x in a.items():
                out[key] = _combine(x, b[key], add, path + _key_step(key))
            return out
        if type(a) is type(b):  # dataclasses of one class
            out = copy.copy(a)
            for field in dataclasses.fields(a):
                name = field.name
                value = _combine(
                    getattr(a, name), getattr(b, name), add, f"{path}.{name}"
                )
                object.__setattr__(out, name, value)  # frozen ones too
            return out
    try:
        return add(a, b)
    except (TypeError, ValueError) as exc:
        # ValueError: numpy arrays whose shapes do not broadcast.
        # None is what a function without a return statement gives.
        what = f"type {type(a).__name__} and {type(b).__name__} with +"
        if (a is None or b is None) and path == "result":
            advice = "did mapfunc forget to return its value? (a result is None)"
        elif a is None or b is None:
            advice = (
                "a result holds None there: return a value that adds, or give "
                "run() a reduce function"
            )
        elif (
            _shape(a) is not None and _shape(b) is not None and (_shape(a) != _shape(b))
        ):
            what = f"shapes {_shape(a)} and {_shape(b)} with +"
            advice = "return arrays of one shape, or give run() a reduce function"
        else:
            advice = "return results that add, or give run() a reduce function"
        raise ReduceMismatch(
            f"cannot combine {_noun(path)} of {what}: {advice}\n"
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _noun(path: str) -> str:
    # The whole results, or the part of them at path (result["W1"]).
    return "results" if path == "result" else path


def _shape(value: Any) -> tuple | None:
    shape = getattr(value, "shape", None)
    return tuple(shape) if isinstance(shape, tuple) else None


def _key_difference(a: dict, b: dict) -> str:
    def listed(keys: list) -> str:
        shown = ", ".join(repr(k) for k in keys[:5])
        return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    first = [k for k in a if k not in b]
    second = [k for k in b if k not in a]
    parts = [f"{listed(first)} only in one"] if first else []
    parts += [f"{listed(second)} only in the other"] if second else []
    return ", ".join(parts)


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
    """default_reduce, adding arrays into a's leaves (add_in_place), except
    a leaf that a holds twice (one array as two fields, as unpickling
    gives when a job returned it twice): adding into it would add twice."""
    seen: set[int] = set()
    shared: set[int] = set()
    for leaf in leaves(a):
        (shared if id(leaf) in seen else seen).add(id(leaf))
    if not shared:
        return default_reduce(a, b, add_in_place)
    return default_reduce(
        a, b, lambda x, y: x + y if id(x) in shared else add_in_place(x, y)
    )


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
