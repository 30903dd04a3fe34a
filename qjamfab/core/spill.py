"""The master's held tree nodes under a memory budget: past it, the older
big ones wait in temporary files until their sibling comes.

A run's results combine in one fixed tree (reduce.ReduceTree), so a node
whose sibling has not come yet is held, and in a bad arrival order that
can be half of them. `SpilledNodes` is the tree's node table on the
master: it keeps the newest node in memory and, while the nodes held in
memory are over `budget` bytes, writes the oldest big ones to unlinked
temporary files (in TMPDIR), read back when the tree takes them. Sizes are
what arrays say (`nbytes`, summed through lists and tuples); a value of
unknown size stays in memory. A file that cannot be written (disk full)
leaves its node in memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, MutableMapping
from typing import IO, Any

from .. import protocol
from ..reduce import leaves

log = logging.getLogger("qjamfab")

Key = tuple[int, int]


def nbytes(value: Any) -> int:
    """What a value's array-like leaves say they take, summed through
    lists, tuples, dicts and dataclasses (reduce.leaves); 0 for others."""
    total = 0
    for leaf in leaves(value):
        size = getattr(leaf, "nbytes", 0)
        total += size if isinstance(size, int) else 0
    return total


class SpilledNodes(MutableMapping[Key, Any]):
    """A ReduceTree's nodes: in memory up to `budget` bytes, else on disk."""

    def __init__(self, budget: int):
        self.budget = budget
        self.memory: dict[Key, Any] = {}  # in the order they came
        self.sizes: dict[Key, int] = {}
        self.files: dict[Key, tuple[IO[bytes], list[int]]] = {}
        self.in_memory = 0
        self.spilled = 0  # nodes written out, for RunStats
        self.spilled_bytes = 0

    def __setitem__(self, key: Key, value: Any) -> None:
        if key in self:  # replaced: not read back from disk first
            del self[key]
        size = nbytes(value)
        self.memory[key] = value
        self.sizes[key] = size
        self.in_memory += size
        self._make_room(0, keep=key)

    def __getitem__(self, key: Key) -> Any:
        if key in self.memory:
            return self.memory[key]
        if key in self.files:
            return self._load(key)
        raise KeyError(key)

    def __delitem__(self, key: Key) -> None:
        if key in self.memory:
            del self.memory[key]
            self.in_memory -= self.sizes.pop(key)
        elif key in self.files:
            self.files.pop(key)[0].close()
            del self.sizes[key]
        else:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self.memory or key in self.files

    def __iter__(self) -> Iterator[Key]:
        yield from list(self.memory)
        yield from list(self.files)

    def __len__(self) -> int:
        return len(self.memory) + len(self.files)

    def close(self) -> None:
        """Drop what is held (the files go with their handles)."""
        for file, _ in self.files.values():
            file.close()
        self.files.clear()
        self.memory.clear()
        self.sizes.clear()
        self.in_memory = 0

    def _make_room(self, need: int, keep: Key | None = None) -> None:
        """Spill the oldest big nodes in memory (not `keep`) until `need`
        more bytes fit in the budget."""
        if self.in_memory + need <= self.budget:
            return  # the usual case: every run's tree passes here
        for old in list(self.memory):
            if self.in_memory + need <= self.budget:
                return
            if old != keep and self.sizes[old]:
                self._spill(old)

    def _spill(self, key: Key) -> None:
        parts = protocol.encode(self.memory[key])
        try:
            file = tempfile.TemporaryFile(prefix="qjamfab-node-")
            try:
                for part in parts:
                    file.write(part)
                file.flush()
            except BaseException:
                file.close()
                raise
        except OSError as exc:
            log.warning(
                "could not write a held result to %s (%s): it stays in memory",
                tempfile.gettempdir(),
                exc.strerror or exc,
            )
            return
        self.files[key] = (file, [memoryview(p).nbytes for p in parts])
        self.spilled += 1
        self.spilled_bytes += self.sizes[key]
        del self.memory[key]
        self.in_memory -= self.sizes[key]

    def _load(self, key: Key) -> Any:
        # What comes back counts too: make room for it first.
        self._make_room(self.sizes[key])
        file, lengths = self.files[key]
        file.seek(0)
        parts = []
        for n in lengths:
            part = bytearray(n)
            view = memoryview(part)
            got = 0
            while got < n:
                read = os.readv(file.fileno(), [view[got:]])
                if not read:
                    raise OSError(
                        f"a held result's file ended early ({got} of {n} bytes)"
                    )
                got += read
            parts.append(part)
        return protocol.decode(parts)
