"""Whether silent workers and hosts are gone: one judgement, for runs
(run.py) and task streams (futures/stream.py).

What each engine observes feeds it: every frame a worker or a host's
agent sends (heartbeats included, the agent's naming the workers it finds
stale) moves their `last_seen` (workers.py); `Link.computing()` says
whether the far end's process still runs (a worker busy in C code
holding its GIL beats late but is not gone; Dask answers from its
scheduler's heartbeats). Time is the caller's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..links.inbox import Inbox
from ..links.workers import Link, WorkerHandle


class Silent(NamedTuple):
    """Who is gone: workers whose host still answers, and whole hosts."""

    workers: list[WorkerHandle]
    hosts: list[Link]


def judge(
    busy: Iterable[WorkerHandle],
    waiting: Iterable[Link],
    timeout: float,
    clock: Callable[[], float],
    inbox: Inbox,
) -> Silent:
    """Of `busy` workers (owing an answer) and `waiting` hosts (owing a
    combined one), those silent for `timeout` s. A worker whose process
    still computes is not; one whose host still answers is lost alone;
    otherwise its whole host is silent."""
    deadline = clock() - timeout
    late = [h for h in busy if h.alive and h.last_seen < deadline]
    late_hosts = [x for x in waiting if x.alive and x.last_seen < deadline]
    if not late and not late_hosts:
        return Silent([], [])
    inbox.read_available()  # heartbeats may wait unread: read them first
    hosts = [x for x in late_hosts if x.alive and x.last_seen < deadline]
    workers = []
    for handle in late:
        link = handle.link
        if not handle.alive or handle.last_seen >= deadline or link in hosts:
            continue
        if link.computing():
            handle.last_seen = clock()  # busy, not gone
        elif link.agent and link.last_seen >= deadline:
            workers.append(handle)
        else:
            hosts.append(link)
    return Silent(workers, hosts)


def silence(link: Link, inbox: Inbox, reason: str) -> None:
    """A host (or a direct worker's stream) gone silent: closed, each of
    its workers' loss the next event."""
    for event in link.lost(reason, died=False):
        inbox.push_front(event)
    link.close()
