"""A run's data supply: what a blocked worker lacks, and replicas.

A worker that lacks the run's function, some of its slices or a Broadcast
of its params says so and waits; `Supply` sends them, a slice or a
Broadcast once per host (its agent stores it
for all its workers there). After a run over a dataset it places a second
copy of each slice on a worker of another host (`RunSettings.replicas`).
What it sent is counted in the run's `RunStats`. A slice that is an array
over 8 MiB goes with the digests of its blocks, which hashing it for its ref
made already: the host seals its cache file with them instead of hashing
the slice again (runtime/sealed.py).
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable

import numpy as np

from .. import protocol, text
from ..data import content_refs, serialize
from ..data.dataset import BaseDataSet
from ..errors import WorkerLost
from ..links.workers import Link, WorkerHandle
from .runstats import RunStats

log = logging.getLogger("qjamfab")


class Supply:
    """Sends one run's function and slices to the workers that lack them."""

    def __init__(
        self,
        dataset: BaseDataSet | None,
        refs: list[str] | None,
        func_hash: str,
        func_bytes: bytes,
        stats: RunStats,
        broadcasts: dict[str, list] | None = None,
    ):
        """`broadcasts`: the payload of each Broadcast in the run's params,
        by ref (broadcast.py); a worker lacking one gets it as a slice."""
        self.dataset = dataset
        self.broadcasts = broadcasts or {}
        self.refs = refs
        self.func_hash = func_hash
        self.func_bytes = func_bytes
        self.stats = stats
        self.sent_refs: set[str] = set()  # slices this run sent
        self._index: dict[str, int] | None = None  # built when data moves
        # per link, what blocked workers wait for, in order: sends, then
        # each worker's `sent`
        self._backlog: dict[Link, collections.deque[Callable[[], None]]] = {}

    def blocked(
        self,
        handle: WorkerHandle,
        head: dict,
        sent: Callable[[], None] = lambda: None,
    ) -> None:
        """The worker is blocked (its STATE head says on what): send the
        function and the slices it lacks, and call `sent` once they have
        left. Slices go one at a time per host, each when the last has
        left (`_feed`), so several hosts' slices stream at once. Raises
        WorkerLost if a send fails now (later: the link's LOST events)."""
        if head.get("func"):
            handle.send(
                protocol.FUNC, {"hash": self.func_hash}, [self.func_bytes], queued=True
            )
        if head.get("damaged"):
            self.stats.damaged_slices += len(head["damaged"])
            log.warning(
                "worker %s found %s damaged in its cache: sent again",
                handle.name,
                text.plural(len(head["damaged"]), "slice"),
            )
        link = handle.link
        backlog = self._backlog.setdefault(link, collections.deque())
        for ref in head.get("refs") or ():
            if (
                link.agent
                and ref in self.sent_refs
                and all(ref in h.refs for h in link.handles.values())
            ):
                continue  # on its way to the host already
            self.sent_refs.add(ref)
            _mark(handle, ref)
            backlog.append(functools.partial(self._send_one, handle, ref))
        backlog.append(sent)
        self._feed(link)

    def close(self) -> None:
        """The run is over: what it has not sent yet is not sent."""
        self._backlog.clear()

    def _feed(self, link: Link) -> None:
        """Send the link's backlog in order, the next slice once the
        last has left the Master (its outbox is empty)."""
        backlog = self._backlog.get(link)
        while backlog and not link.outbox:
            if not link.alive:
                backlog.clear()
                return
            backlog.popleft()()
        if backlog:
            link.outbox.when_drained(lambda: self._feed(link))

    def _send_one(self, handle: WorkerHandle, ref: str) -> None:
        if ref in self.broadcasts:
            self.stats.broadcast_bytes_sent += self._send_broadcast(handle, ref)
            self.stats.broadcasts_sent += 1
        else:
            self.stats.dataset_bytes_sent += self._send_slice(handle, ref, True)
            self.stats.slices_sent += 1

    def replicate(
        self,
        workers: list[WorkerHandle],
        replicas: int,
        send_failed: Callable[[WorkerHandle, WorkerLost], None],
    ) -> None:
        """Place a second copy of each slice on a worker of another host."""
        assert self.refs is not None  # only a run over a dataset replicates
        live = [h for h in workers if h.alive]
        for i, ref in enumerate(self.refs):
            holders = [h for h in live if ref in h.refs]
            if not holders or len(holders) >= replicas:
                continue
            hosts = {h.host for h in holders}
            others = [h for h in live if h not in holders]
            elsewhere = [h for h in others if h.host not in hosts]
            choices = elsewhere or others
            if choices:
                target = choices[i % len(choices)]
                try:
                    self.stats.replica_bytes_sent += self._send_slice(target, ref)
                except WorkerLost as exc:
                    send_failed(target, exc)

    def _send_slice(self, handle: WorkerHandle, ref: str, queued: bool = False) -> int:
        # Only a run over a dataset has slices to send.
        assert self.dataset is not None and self.refs is not None
        if self._index is None:
            self._index = {r: i for i, r in enumerate(self.refs)}
        i = self._index[ref]
        value = self.dataset.slice(i)
        payload = serialize.encode_slice(value, i)
        head: dict = {"ref": ref}
        blocks = _known_blocks(ref, value, payload)
        if blocks is not None:
            head["blocks"] = blocks
        size = handle.send(protocol.REFS, head, payload, queued)
        del payload, value
        # Its pages leave the Master's memory once it has left.
        handle.link.outbox.when_drained(functools.partial(self.dataset.release, i))
        if not queued:
            _mark(handle, ref)
        return size

    def _send_broadcast(self, handle: WorkerHandle, ref: str) -> int:
        # Flagged: a host's agent that has no room for it on disk hands it
        # to all its workers, as they are all counted on to have it.
        head = {"ref": ref, "broadcast": True}
        return handle.send(protocol.REFS, head, self.broadcasts[ref], queued=True)


def _mark(handle: WorkerHandle, ref: str) -> None:
    """The slice is on its way to the worker's host: any worker there has
    it once it lands (its agent stores it for all)."""
    for other in handle.link.handles.values() if handle.link.agent else (handle,):
        other.refs.add(ref)


def _known_blocks(ref: str, value: object, payload: list) -> list | None:
    """A REFS head's "blocks" for this slice: per payload part, the hex
    digests of its 8 MiB blocks, or None where the host is to hash it. Known
    for the buffer of a C-contiguous array that hashing gave its ref blocks:
    the payload's second part is then exactly the bytes hashed."""
    digests = content_refs.block_digests(ref)
    if (
        digests is None
        or len(payload) != 2
        or not isinstance(value, np.ndarray)
        or not value.flags.c_contiguous
        or memoryview(payload[1]).nbytes != value.nbytes
    ):
        return None
    return [None, [d.hex() for d in digests]]
