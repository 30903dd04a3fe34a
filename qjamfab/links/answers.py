"""Waiting for the answer to a request: the one loop a link's handshake,
the Master's requests to its workers (stats, clear) and package shipping
share, each with its own reader, test and deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

_T = TypeVar("_T")


def await_answer(
    read: Callable[[], Iterable[_T]],
    is_answer: Callable[[_T], bool],
    deadline: float = math.inf,
    take: Callable[[_T], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> _T | None:
    """The answer to a request: the first item that `is_answer`, of those
    `read()` gives (each call may wait; it is called at least once).
    `take` is given each item before the answer, and returns True to give
    up. None when it gave up, or when `deadline` (by `clock`) passed."""
    while True:
        for item in read():
            if is_answer(item):
                return item
            if take is not None and take(item):
                return None
        if clock() >= deadline:
            return None
