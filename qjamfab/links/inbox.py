"""The Master's inbox: every link's events, read on the caller's thread.

The `Inbox` owns a Master's links (workers.py) and what they sent: it
waits on all of them at once (poll) and reads on the caller's thread, so
a result reaches the caller without a thread switch; a `Run` is handed
the inbox, not the Master.
"""

from __future__ import annotations

import collections
import itertools
import select
import time

from ..errors import WorkerLost
from .workers import Event, Link


class Inbox:
    """Every link of a Master and the events read from them, in order."""

    def __init__(self) -> None:
        self.links: list[Link] = []
        self.pending: collections.deque[Event] = collections.deque()
        self.ids = itertools.count(1)  # of runs, groups and tasks: unique

    def add(self, link: Link) -> None:
        """Read this link too (links that ended are dropped)."""
        self.links = [x for x in self.links if x.alive] + [link]
        link.pending = self.pending

    def push_front(self, event: Event) -> None:
        self.pending.appendleft(event)

    def poll(self, timeout: float) -> bool:
        """Read a frame from each link that has input, waiting up to
        `timeout` s for one; whether any was read."""
        live = [x for x in self.links if x.alive]
        ready = [x for x in live if x.reader.buffered()]
        if not ready and live:
            by_fd = {x.fileno(): x for x in live}
            # Links with frames queued: written as they take them.
            writing = {
                fd: x
                for x in live
                if x.outbox and (fd := x.transport.write_fileno()) is not None
            }
            poller = select.poll()  # unlike select(), any number of fds
            for fd in by_fd.keys() | writing.keys():
                poller.register(
                    fd,
                    (select.POLLIN if fd in by_fd else 0)
                    | (select.POLLOUT if fd in writing else 0),
                )
            ready = []
            for fd, events in poller.poll(max(0.0, timeout) * 1000):
                if fd in writing and events & (select.POLLOUT | select.POLLERR):
                    try:
                        writing[fd].flush()
                    except WorkerLost:
                        continue  # its LOST events are pending
                if fd in by_fd and events & ~select.POLLOUT:
                    if by_fd[fd].transport.has_input():
                        ready.append(by_fd[fd])
        elif not live and timeout > 0:
            time.sleep(timeout)
        for link in ready:
            self.pending.extend(link.read_events())
        return bool(ready)

    def next_event(self, timeout: float) -> Event | None:
        """The next event, or None after `timeout` s without one."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.poll(deadline - time.monotonic())
            if time.monotonic() >= deadline:
                break
        return self.pending.popleft() if self.pending else None

    def read_available(self, limit_s: float = 1.0) -> None:
        """Read what has arrived, without waiting for more; for at most
        limit_s s, since workers never stop sending (heartbeats)."""
        deadline = time.monotonic() + limit_s
        while self.poll(0) and time.monotonic() < deadline:
            pass

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links = []
