"""The default reduce: `+`, element-wise for equal-length lists and tuples.

Standard library only, and no qjamfab imports: this file is shipped to
workers, which combine their own slices' results with it before replying.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence


class ReduceMismatch(TypeError):
    """Two results that the default reduce cannot combine."""


def default_reduce(a: Any, b: Any) -> Any:
    """a + b, except lists/tuples add element-wise (recursively).

    Element-wise needs equal lengths and returns a's type, so a job
    returning (count, total) pairs sums both fields.
    """
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            raise ReduceMismatch(
                f"cannot combine results of lengths {len(a)} and {len(b)}: return "
                f"equal-length lists/tuples, or give run() a reduce function")
        return _rebuild(a, [default_reduce(x, y) for x, y in zip(a, b)])
    try:
        return a + b
    except (TypeError, ValueError) as exc:
        # ValueError: numpy arrays whose shapes do not broadcast.
        # None is what a function without a return statement gives.
        advice = ("did mapfunc forget to return its value? (a result is None)"
                  if a is None or b is None else
                  "return results that add, or give run() a reduce function")
        raise ReduceMismatch(
            f"cannot combine results of type {type(a).__name__} and "
            f"{type(b).__name__} with +: {advice}\n"
            f"{type(exc).__name__}: {exc}") from exc


def _rebuild(like: list | tuple, items: list[Any]) -> list | tuple:
    # Named tuples take their fields positionally.
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)


def reduce_all(values: Sequence[Any], reduce: Callable[[Any, Any], Any] | None = None) -> Any:
    """Fold values left to right with reduce, or default_reduce when None."""
    if not values:
        raise ValueError("reduce_all needs at least one value")
    return functools.reduce(reduce or default_reduce, values)
