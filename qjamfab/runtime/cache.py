"""The worker's slice cache: refs held in memory and in `<base>/cache/`,
each checked against what was written under its name, the whole bounded in
size. It owns the entries in memory and the check of each before use.

A slice arrives into its file (cache_disk.py), and is then that file
memory-mapped copy-on-write, each buffer at a 64-byte aligned offset: one
copy of the data, whether it just arrived or a restarted worker, or another
worker on the same host, finds it on disk.

A slice is its hash. A ref is the master's sha256 of the slice's content
(content_refs.py's content_ref). The worker does not recompute it: a text
matrix's ref hashes its text, not the array the worker gets, and other
objects' refs hash a protocol-4 pickle that cannot be rebuilt byte for byte
from the protocol-5 stream that arrives. Instead, when the file is written
its header records a seal: sha256 over a tag, the ref, the part lengths and
the sha256 of every 8 MiB block of every part, each block hashed from the
file as soon as it has landed (on threads, overlapping the transfer). The
bytes came from the master over the authenticated channel under that ref,
and the seal names the ref, so a flipped byte, a truncated or torn file, or
another slice's file copied over this one all fail the check.

- First use of a file in a daemon (`missing()` or `get()` of a ref not in
  memory): opened O_NOFOLLOW, read with pread, never through a mapping (a
  file that shrinks meanwhile cannot raise SIGBUS), seal checked, then
  mapped from the same descriptor. 400 MiB take about 0.3 s per core.
- Every use after that: one lstat of the path against the (device, inode,
  size, mtime) the mapping was checked with. Unchanged: the mapping is used.
  Changed: the memory copy is dropped unread and the file checked again (a
  copy another worker re-wrote passes). The first `get()` after `missing()`
  trusts the stat `missing()` just made, so a task costs one stat a slice.
- A damaged entry is removed (file and memory copy), logged to stderr
  (which a worker forwards to the master as LOG), listed by
  `take_damaged()`, and reported missing: the worker says it is blocked
  and the master sends the slice again. `get()` finding a ref gone in the
  middle of a task raises `CacheEntryLost`, except when the file was only
  removed (evicted, cleared): its mapping keeps the file, which nobody can
  change any more, so it serves that one last use.
- Not covered: a file truncated while a task reads its mapping still raises
  SIGBUS; the check is made before each use, not during it.

Size limit, pins and eviction: see pins.py.

This module owns `RefCache`, the entries in memory and their checks before
use; receiving a slice into its file, making room and evicting are
cache_disk.py's, the file format, its seal and its check sealed.py's, the
limit, the pins and the eviction plan pins.py's.
"""

from __future__ import annotations

import mmap
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable

from .. import protocol
from . import secure_dir
from .cache_disk import CacheDisk, FileKey, key_of
from .pins import Pins, cache_limit, touch
from .sealed import Damage, map_file, remove, verify

_TOUCH_S = 30.0  # set an entry's atime this often in use
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NOTHING: frozenset[str] = frozenset()


class CacheEntryLost(LookupError):
    """A slice left the cache (damaged, removed) while a task needed it."""


def is_ref(ref: object) -> bool:
    """Whether ref can name a cache file: one name inside the directory,
    short enough for its temporary name too."""
    return (
        isinstance(ref, str)
        and 0 < len(ref) <= 200
        and os.sep not in ref
        and not ref.startswith(".")
        and "\0" not in ref
    )


class _Entry:
    """A slice in memory, mapped from its file at `path`; `key` (dev, inode,
    size, mtime) and `mapping` are None for a slice kept in memory only
    (`path` is then only where its file would be)."""

    __slots__ = ("value", "path", "key", "mapping", "touched")

    def __init__(
        self,
        value: object,
        path: str,
        key: FileKey | None,
        mapping: mmap.mmap | None,
        touched: float,
    ):
        self.value = value
        self.path = path
        self.key = key
        self.mapping = mapping
        self.touched = touched


class RefCache:
    def __init__(
        self,
        directory: str,
        limit: int | str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """The cache in `directory` (created 0700 and checked to be ours),
        holding at most `limit` bytes on disk (see cache_limit). `clock`
        (epoch seconds, as file times are) judges other hosts' pins."""
        secure_dir(directory)
        self.directory = directory
        self._pins = Pins(directory, clock)
        self._memory: dict[str, _Entry] = {}
        self._disk = CacheDisk(
            directory,
            cache_limit(directory, limit),
            self._pins,
            lambda ref: self._memory.pop(ref, None),
            clock(),
        )
        self._checked: frozenset[str] = _NOTHING  # what missing() just checked
        self._damaged: list[str] = []
        self._damaged_total = 0
        # ref -> key checked elsewhere
        self._trusted: dict[str, tuple[int, ...]] = {}

    @property
    def limit(self) -> int:
        """The most bytes the cache keeps on disk (pins.cache_limit)."""
        return self._disk.limit

    @limit.setter
    def limit(self, limit: int) -> None:
        self._disk.limit = limit

    def _path(self, ref: str) -> str:
        return os.path.join(self.directory, ref)

    def pin(self, refs: Iterable[str]) -> None:
        """Keep these refs (the running or waiting task's) from eviction by
        any process of this host or another sharing the directory, until
        the next pin(); pin(()) when no
        task is in flight (pins.py)."""
        self._pins.pin(refs)

    def refresh_pin(self) -> None:
        """Show the hosts sharing the directory that the pins still hold
        (this process's refresher does it every PIN_REFRESH_S)."""
        self._pins.refresh()

    def missing(self, refs: Iterable[str]) -> list[str]:
        """The refs not usable here, checking each one (a file read for the
        first time is verified; one in memory costs a stat). Pins `refs`:
        the worker asks this for the task it is about to run."""
        refs = list(refs)
        self.pin(refs)
        pinned = self._pins.refs
        self._drop_evicted()
        lacking = [r for r in refs if self._usable(r) is None]
        self._checked = pinned.difference(lacking) if lacking else pinned
        return lacking

    def _drop_evicted(self) -> None:
        """After any process here evicted: drop the memory copies whose
        files are gone, but pinned ones. A mapping keeps its file's disk
        space, so a daemon holding evicted slices would hold the disk
        beyond the limit. One stat when nothing was evicted."""
        if not self._pins.evicted_since_last():
            return
        for ref, entry in list(self._memory.items()):
            if entry.key is None or ref in self._pins.refs:
                continue
            try:
                st: os.stat_result | None = os.lstat(entry.path)
            except FileNotFoundError:
                st = None
            if st is None or key_of(st) != entry.key:
                del self._memory[ref]

    def get(self, ref: str) -> object:
        """The slice of ref, checked (see the module docstring); raises
        CacheEntryLost when it is damaged or gone."""
        entry = self._memory.get(ref)
        checked, self._checked = self._checked, _NOTHING
        if entry is not None:
            if entry.key is None or ref in checked:
                return entry.value
            try:
                st = os.lstat(entry.path)
            except FileNotFoundError:
                st = None
            if st is not None and key_of(st) == entry.key:
                return entry.value
            if (
                st is None
                and entry.mapping is not None
                and _size(entry.mapping) == entry.key[2]
            ):
                # Removed, not changed: the mapping still holds the file and
                # no one can write it now. Good for this use only.
                self._memory.pop(ref, None)
                return entry.value
        entry = self._usable(ref)
        if entry is None:
            raise CacheEntryLost(
                f"slice {ref} left this worker's cache while its task ran "
                "(damaged or removed on disk): run again, the master will "
                "send it again"
            )
        return entry.value

    def trust(self, ref: str, key: Iterable[int]) -> None:
        """The host's agent wrote and sealed ref's file as `key` (device,
        inode, size, mtime): its first use here maps it unhashed while the
        file is still that one."""
        self._trusted[ref] = tuple(key)

    def file_key(self, ref: str) -> FileKey | None:
        """(device, inode, size, mtime) of ref's file, None without one."""
        try:
            return key_of(os.lstat(self._path(ref)))
        except FileNotFoundError:
            return None

    def take_damaged(self) -> list[str]:
        """The refs found damaged since the last call."""
        damaged, self._damaged = self._damaged, []
        return damaged

    def _usable(self, ref: str) -> _Entry | None:
        """ref's entry after checking it, or None when it is not here or
        was damaged (and is now removed)."""
        entry = self._memory.get(ref)
        if entry is not None:
            if entry.key is None:
                return entry
            try:
                st = os.lstat(entry.path)
            except FileNotFoundError:
                self._memory.pop(ref, None)
                return None
            if key_of(st) == entry.key:
                now = time.monotonic()
                if now - entry.touched > _TOUCH_S:
                    entry.touched = now
                    touch(entry.path)
                return entry
            # Changed under the mapping: drop it without reading a byte
            # (the file may have shrunk), then check what is there now.
            self._memory.pop(ref, None)
        return self._load(ref)

    def _load(self, ref: str) -> _Entry | None:
        path = self._path(ref)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symlink where a file should be
            self._drop_damaged(ref, f"cannot be opened: {exc.strerror}")
            return None
        try:
            st = os.fstat(fd)
            try:
                if not stat.S_ISREG(st.st_mode):
                    raise Damage("not a regular file")
                try:
                    offsets, lengths = verify(
                        fd, ref, st, self._trusted.pop(ref, None) != key_of(st)
                    )
                except OSError as exc:  # EIO: a bad disk
                    raise Damage(f"cannot be read: {exc.strerror}") from None
                if key_of(os.fstat(fd)) != key_of(st):
                    raise Damage("it changed while it was checked")
                mapping, value = map_file(fd, offsets, lengths, st.st_size)
            except Damage as exc:
                self._drop_damaged(ref, str(exc), st.st_ino)
                return None
        finally:
            os.close(fd)
        touch(path)
        entry = self._memory[ref] = _Entry(
            value, path, key_of(st), mapping, time.monotonic()
        )
        return entry

    def _drop_damaged(self, ref: str, reason: str, inode: int | None = None) -> None:
        self._memory.pop(ref, None)
        remove(self._path(ref), inode)
        self._damaged.append(ref)
        self._damaged_total += 1
        print(
            f"qjamfab: cache entry {ref} is damaged ({reason}): removed, "
            "the master will send the slice again",
            file=sys.stderr,
            flush=True,
        )

    def receive(
        self,
        ref: str,
        lengths: list[int],
        reader: protocol.FrameReader,
        source_fd: int | None,
        load: bool = True,
        to_disk: bool = True,
        blocks: object = None,
    ) -> list | None:
        """Take a REFS payload off the stream into the cache and seal it.
        Without room on the disk, or bigger than the limit, it is kept in
        memory only; so is one the disk fills up under while it arrives.
        Without `load` (the host agent, which only stores) nothing is
        unpickled: a slice that stays off the disk is returned as its raw
        parts, for the agent to pass on. Without `to_disk` (the agent found
        no room for it) it stays in memory whatever the room here. `blocks`
        is the REFS head's digests of its parts' blocks where the master sent
        them (sealed.known_digests): those parts are not hashed here."""
        if not is_ref(ref):
            raise ValueError(f"{ref!r} is not a ref")
        stored = self._disk.store(
            ref, lengths, reader, source_fd, load, to_disk, blocks
        )
        if isinstance(stored, list):
            return self.keep_in_memory(ref, stored, load)
        if load:
            self._memory[ref] = _Entry(
                stored.value,
                self._path(ref),
                stored.key,
                stored.mapping,
                time.monotonic(),
            )
        return None

    def keep_in_memory(self, ref: str, parts: list, load: bool = True) -> list | None:
        """The slice in memory only; its raw parts back without `load`."""
        if not load:
            return parts
        self._memory[ref] = _Entry(
            protocol.decode(parts), self._path(ref), None, None, 0.0
        )
        return None

    def drop_memory(self) -> None:
        self._memory.clear()

    def clear(self) -> dict:
        stats = self.stats()
        self._memory.clear()
        self._disk.clear()
        return stats

    def stats(self) -> dict:
        entries, disk_bytes = self._disk.usage()
        return {
            "entries": entries,
            "bytes": disk_bytes,
            "in_memory": len(self._memory),
            "limit_bytes": self.limit,
            "damaged": self._damaged_total,
        }


def _size(mapping: mmap.mmap) -> int:
    """The size of the file behind a mapping now (-1 if unknown)."""
    try:
        return mapping.size()
    except (OSError, ValueError):
        return -1
