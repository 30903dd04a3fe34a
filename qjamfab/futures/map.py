"""`Master.map`'s side of the Executor: its calls and its result iterator.

`map_calls` turns the items of `map`'s iterables into calls, one per item
or one per chunk of items (a chunk runs as one call, each item in its own
`try`: runtime/calls.py's `apply_chunk`); `MapResults` yields their
results in order, each as soon as it is in, keeping none once yielded,
and cancels the items not started when closed. executor.py queues the
calls.
"""

from __future__ import annotations

import collections.abc
import numbers
import pickle
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from .. import text
from ..runtime.calls import apply_chunk
from .calls import Call, rebuild

# A map with chunksize=1 makes one call per item up to this many per
# worker, chunks of items beyond: a future costs some µs, a pool's chunk
# next to nothing (10,000 trivial items: 0.26 s as 10,000 calls).
_CALLS_PER_WORKER = 64


def map_calls(
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    chunksize: int,
    workers: int,
) -> tuple[list[Call], bool]:
    """The calls of map(fn, *iterables), and whether each is a chunk."""
    for k, it in enumerate(iterables):
        if not isinstance(it, collections.abc.Iterable):
            raise TypeError(
                f"map() argument {k + 2} is {text.a_or_an(type(it).__name__)}, "
                "which is not iterable: pass the function, then one "
                "iterable per parameter, e.g. m.map(f, range(10))"
            )
    items = list(zip(*iterables))
    if chunksize == 1:  # qjamfab chooses: one item a call, but in big maps
        most = _CALLS_PER_WORKER * max(1, workers)
        chunksize = max(1, len(items) // most)
    if chunksize == 1:
        return [Call(fn, args, None, "map()") for args in items], False
    return [
        Call(apply_chunk, (fn, items[a : a + chunksize]), None, "map()")
        for a in range(0, len(items), chunksize)
    ], True


def deadline_of(timeout: object) -> float | None:
    """When map's `timeout` (seconds from now, or None) runs out."""
    return None if timeout is None else time.monotonic() + _check_timeout(timeout)


class MapResults(Iterator[Any]):
    """map's iterator: closing it (or dropping it) cancels the items not
    started, even before the first next()."""

    def __init__(self, futures: list[Future], chunked: bool, deadline: float | None):
        self._futures = futures
        self._results = _results(futures, chunked, deadline)

    def __next__(self) -> Any:
        return next(self._results)

    def close(self) -> None:
        self._results.close()
        for future in self._futures:
            future.cancel()

    __del__ = close


def _results(
    futures: list[Future], chunked: bool, deadline: float | None
) -> Generator[Any]:
    """map's results in order; none kept once yielded (the futures are
    popped, the value never bound here)."""
    futures.reverse()
    try:
        while futures:
            if not chunked:
                yield _result_or_cancel(futures.pop(), deadline)
                continue
            values, errors = pickle.loads(_result_or_cancel(futures.pop(), deadline))
            values.reverse()
            for i in range(len(values)):
                if i in errors:
                    raise rebuild(errors[i])
                yield values.pop()
    finally:
        for future in futures:
            future.cancel()


def _result_or_cancel(future: Future, deadline: float | None) -> Any:
    try:
        if deadline is None:
            return future.result()
        return future.result(deadline - time.monotonic())
    finally:
        future.cancel()  # a no-op once done


def check_chunksize(chunksize: object) -> int:
    if (
        isinstance(chunksize, bool)
        or not isinstance(chunksize, numbers.Integral)
        or chunksize < 1
    ):
        raise ValueError(
            f"chunksize must be a positive int, not {chunksize!r}: give the "
            "items per call, or 1 (the default) to let qjamfab batch them"
        )
    return int(chunksize)


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds or None, not "
            f"{timeout!r}: e.g. timeout=30"
        )
    return float(timeout)
