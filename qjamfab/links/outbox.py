"""Frames waiting for one stream to take them, written as it drains.

A slice for one host must not hold up the next host's: the Master queues
big frames (workers.py's `Link.send`, `queued`) in the link's `Outbox` and
writes them as far as the stream takes them without waiting, again each
time the inbox's poll finds it writable, so the slices for several hosts
stream at once. A frame written whole (`Link.send`) goes after what is
queued (`take`), so frames keep their order. `when_drained` runs a
callback once everything queued so far has left: a task's clock starts
when the data it waited for is sent, not when it was queued.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable

_IOV_MAX = 512  # buffers per writev


class Outbox:
    """The frames queued for one stream, as byte views in order."""

    def __init__(self, writev: Callable[[list], int]):
        self._writev = writev  # non-blocking: 0 when the stream is full
        self._views: collections.deque[memoryview] = collections.deque()
        self._drained: list[Callable[[], None]] = []

    def __bool__(self) -> bool:
        return bool(self._views)

    def add(self, buffers: list) -> None:
        self._views.extend(
            v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes
        )

    def flush(self) -> None:
        """Write what the stream takes now; the transport's error (the
        stream is lost) passes on, with the queue left as it was."""
        while self._views:
            n = self._writev(list(itertools.islice(self._views, _IOV_MAX)))
            if not n:
                return
            while n:
                if n >= len(self._views[0]):
                    n -= len(self._views.popleft())
                else:
                    self._views[0] = self._views[0][n:]
                    n = 0
        self._done()

    def take(self) -> list[memoryview]:
        """Everything still queued, removed: for a writer that writes it
        whole, first, and then calls `written`."""
        views = list(self._views)
        self._views.clear()
        return views

    def written(self) -> None:
        """What `take` gave has been written."""
        self._done()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` once what is queued now has been written (now,
        when nothing is)."""
        if self._views:
            self._drained.append(callback)
        else:
            callback()

    def drop(self) -> None:
        """The stream is gone: nothing will be written, nor called."""
        self._views.clear()
        self._drained.clear()

    def _done(self) -> None:
        callbacks, self._drained = self._drained, []
        for callback in callbacks:
            callback()
