"""The slice cache's disk side: a slice arriving into its file in
`<base>/cache/`, room made for it first, and the entries that leave when
the cache is full.

Receiving. A slice arrives as a REFS frame whose payload (pickle protocol 5
main stream plus out-of-band buffers) goes straight from the stream into its
cache file, by splice when the stream is a pipe: the bytes never pass
through this process. The file is written and sealed (sealed.py) under a
temporary name and renamed, so no reader ever sees a half-written entry;
on a network filesystem it is synced first, as another machine may open it
the moment its name shows. The slice in memory is then the file
memory-mapped copy-on-write: one copy of the data (the page cache), whether
it just arrived or a restarted worker, or another worker on the same host,
finds it on disk.

Room. The temporary file is first set to its full size (sparse), so that a
writer evicting meanwhile counts it, and the least recently used entries
are removed until the cache fits its limit (pins.py: the limit, the pins,
the eviction plan); both under a lock the host's processes share, as is
the rename. A slice bigger than the limit stays in memory only, as does one
the disk has no room for, even when the disk fills up while it arrives.

This module owns `CacheDisk`: the directory's files as they are written
in, made room for, evicted, counted and cleared. The entries in memory and
their checks before use are cache.py's `RefCache`, which holds one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .. import protocol
from . import NETWORK_FS, fs_type
from .pins import Pins, forget_over_limit, holder, holder_alive, plan_eviction
from .sealed import (
    Layout,
    check_pickle,
    known_digests,
    layout,
    map_file,
    read_landed,
    remove,
    tidy,
    write_sealed,
)

# (device, inode, size, mtime in ns): a cache file as it was checked.
FileKey = tuple[int, int, int, int]

_DISK_MARGIN = 16 << 20  # leave this much free on the disk
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def key_of(st: os.stat_result) -> FileKey:
    """A cache file's key, from its stat."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Stored(NamedTuple):
    """A slice written into its file: the file's key and, when it was
    loaded, the file's mapping and the slice mapped from it (else None)."""

    key: FileKey
    mapping: mmap.mmap | None
    value: object


class CacheDisk:
    def __init__(
        self,
        directory: str,
        limit: int,
        pins: Pins,
        forget: Callable[[str], object],
        now: float,
    ):
        """The files of the cache in `directory` (which exists and is ours),
        at most `limit` bytes; `pins` says what may not be evicted and
        `forget(ref)` drops an evicted entry's memory copy. What no one can
        use is removed first (sealed.tidy); `now` (epoch seconds) judges
        whether another host still writes a temporary file."""
        self.directory = directory
        self.limit = limit
        self._pins = pins
        self._forget = forget
        # Another machine may read an entry the moment it is renamed in.
        self._sync = fs_type(directory) in NETWORK_FS
        tidy(directory, lambda who, path: holder_alive(who, path, now))

    def store(
        self,
        ref: str,
        lengths: list[int],
        reader: protocol.FrameReader,
        source_fd: int | None,
        load: bool,
        to_disk: bool,
        blocks: object,
    ) -> Stored | list:
        """Take ref's REFS payload (parts of `lengths`) off the stream into
        its file and seal it: the file's key, with its mapping and value
        when `load`. Or the payload's raw parts, when the slice stays in
        memory: not `to_disk`, bigger than the limit, no room on the disk,
        or the disk filled up as it arrived. `blocks`: the REFS head's
        digests of its parts' blocks (sealed.known_digests)."""
        file = layout(lengths)
        path = os.path.join(self.directory, ref)
        tmp = f"{path}.{holder()}.tmp"
        fd = self._reserve(ref, tmp, file.size) if to_disk else None
        if fd is None:
            parts = [reader.read_part(n) for n in lengths]
            check_pickle(ref, parts[0][:2] if parts else b"")
            return parts
        mapping: mmap.mmap | None = None
        value: object = None
        try:
            known = known_digests(blocks, lengths)
            write_sealed(fd, ref, file, reader, source_fd, known)
            st = os.fstat(fd)
            if load:
                mapping, value = map_file(fd, file.offsets, lengths, st.st_size)
        except BaseException as exc:
            try:
                if not (isinstance(exc, OSError) and exc.errno in _DISK_FULL):
                    raise
                parts = self._rescue(ref, exc, fd, file, reader)
            finally:
                os.close(fd)
                os.unlink(tmp)
            return parts
        if self._sync:  # whole on the server before its name shows
            os.fsync(fd)
        os.close(fd)
        with self._sizing():  # an eviction's listing never misses it mid-rename
            os.replace(tmp, path)  # same inode, size, mtime: st is its key
        return Stored(key_of(st), mapping, value)

    def _rescue(
        self,
        ref: str,
        exc: OSError,
        fd: int,
        file: Layout,
        reader: protocol.FrameReader,
    ) -> list:
        """The disk filled up under ref's file (another writer) as it
        arrived: the slice's parts, from the bytes that landed in the file
        and the rest of the frame, still in the stream."""
        parts = read_landed(fd, file, reader)
        print(
            f"qjamfab: the disk of {self.directory} filled up while slice "
            f"{ref} arrived ({exc.strerror}): kept in memory only; free "
            "space there to cache slices on disk",
            file=sys.stderr,
            flush=True,
        )
        return parts

    def _reserve(self, ref: str, tmp: str, size: int) -> int | None:
        """A descriptor of ref's temporary file `tmp`, at its full size
        already (so that a writer evicting meanwhile counts it), with room
        made for it; None when the slice stays in memory (bigger than the
        limit, or no room on the disk)."""
        if size > self.limit:
            if self.limit:
                print(
                    f"qjamfab: slice {ref} ({size} bytes) is bigger than "
                    f"the cache limit ({self.limit} bytes): kept in memory "
                    "only; raise QJAMFAB_CACHE_LIMIT to keep it on disk",
                    file=sys.stderr,
                    flush=True,
                )
            return None
        fd = os.open(
            tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with self._sizing():
                os.ftruncate(fd, size)  # sparse: reserves no disk blocks
                self._evict(keep=ref)
            if shutil.disk_usage(self.directory).free >= size + _DISK_MARGIN:
                return fd
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                os.close(fd)
                os.unlink(tmp)
                raise
        os.close(fd)
        os.unlink(tmp)
        return None

    @contextlib.contextmanager
    def _sizing(self) -> Iterator[None]:
        """Held by this host's processes around what changes the cache's
        size: reserving (with the eviction that makes room) and renaming an
        entry in. Without it two workers storing at once could each list
        the directory while the other's entry was mid-rename, miss it, and
        leave the cache an entry over its limit. Where the filesystem has
        no locks, unlocked."""
        try:
            fd = os.open(
                self.directory.rstrip(os.sep) + ".lock",
                os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError:
            yield
            return
        try:
            # Opened per use: flock excludes open files, and a forked
            # worker must not share its parent's.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _evict(self, keep: str) -> None:
        """Remove least recently used entries until the cache, with the
        slices being written (temporary files), fits the limit, sparing
        what any process here pins and the entry `keep`."""
        entries, inodes, writing = [], {}, {keep}
        for entry in os.scandir(self.directory):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.endswith(".tmp"):
                writing.add(entry.name)  # another's slice on its way in
            entries.append((max(st.st_atime, st.st_mtime), entry.name, st.st_size))
            inodes[entry.name] = st.st_ino
        if sum(size for _, _, size in entries) <= self.limit:
            return  # the common case: no pins to read
        victims, total = plan_eviction(
            entries, self.limit, self._pins.anywhere() | writing
        )
        for name in victims:
            self._forget(name)
            remove(os.path.join(self.directory, name), inodes[name])
        if victims:
            self._pins.mark_evicted()  # the others drop their mappings
        if total > self.limit:
            self._pins.say_over_limit(total, self.limit)

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) on disk, not counting slices on their way in."""
        entries = disk_bytes = 0
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(".tmp"):
                entries += 1
                disk_bytes += entry.stat(follow_symlinks=False).st_size
        return entries, disk_bytes

    def clear(self) -> None:
        """Remove every file of the cache, and the record of its pins
        alone exceeding the limit."""
        for name in os.listdir(self.directory):
            remove(os.path.join(self.directory, name))
        forget_over_limit(self.directory)
