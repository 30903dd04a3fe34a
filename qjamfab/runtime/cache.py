"""The worker's slice cache: refs held in memory and in `<base>/cache/`,
each checked against what was written under its name, the whole bounded in
size. It owns the cache file layout, the check of a file before each use,
and which entries leave when the cache is full.

Receiving. A slice arrives as a REFS frame whose payload (pickle protocol 5
main stream plus out-of-band buffers) goes straight from the stream into its
cache file, by splice when the stream is a pipe: the bytes never pass
through this process. The file is written under a temporary name and
renamed, so no reader ever sees a half-written entry. The slice in memory is
then the file memory-mapped copy-on-write, each buffer at a 64-byte aligned
offset: one copy of the data (the page cache), whether it just arrived or a
restarted worker, or another worker on the same host, finds it on disk.

A slice is its hash. A ref is the master's sha256 of the slice's content
(dataset.py's content_ref). The worker does not recompute it: a text
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

Size limit, per host (all daemons of a base share the directory): the
`limit` argument, else `$QJAMFAB_CACHE_LIMIT`, else a quarter of the cache's
filesystem and at most 64 GiB. A value is bytes, or a number with K, M, G
or T (powers of 1024, optionally followed by B or iB): `20G`, `500M`,
`1.5G`, `1000000`; 0 keeps every slice in memory only. Before a slice is
written, the least recently used entries are removed until it fits
(`plan_eviction`). "Used" is the later of an entry's atime and mtime: a
daemon sets the atime (not the mtime, which the check above compares) when
it first uses an entry and at most every 30 s after. Never removed: the
slice being written and the pinned entries: the refs of the task a worker
runs or waits for, in any session, on this host or another sharing the
directory (a home on NFS). Each cache object writes what it pins to a file
of its own in `<directory>.pins/`, named `pin.<host>-<pid>.<n>` (host_id:
which process table the pid belongs to) and read by every process that
evicts. A file of this host counts while its process lives (a dead one's
is removed). One of another host, whose pids mean nothing here, counts
while it is younger than PIN_STALE_S: its writer touches it every
PIN_REFRESH_S while it pins something (and writes it again if another host
removed it as stale), so only the pins of a host down or stopped that long
lapse. Temporary files (`<ref>.<host>-<pid>.tmp`) are judged the same way.
Nothing here relies on flock, or on a pid of another host.
So the cache exceeds its limit only by what tasks in flight need; when
that alone is over the limit, the first process to find it says so once
(on its stderr, which a worker forwards to the master) and records it in
`<directory>.pins/over-limit`, which `pinned_over_limit` reads for
`inv status`. A slice bigger than the limit stays in memory only, as does
one the disk has no room for, even when the disk fills up while it
arrives. A worker whose file another removed drops its memory copy at the
next check and the slice is fetched again; and since a mapping keeps its
file's disk space, each eviction is also marked in `<directory>.pins/evicted`
(a byte more), so every worker drops its copies of evicted files before its
next task.

File layout: b"QJC3" | count: u32 | seal: 32 bytes | count x length: u64 |
each part, padded to a multiple of 64 bytes from the start of the file.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import itertools
import json
import mmap
import os
import re
import shutil
import stat
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING

from .. import protocol
from . import NETWORK_FS, fs_type, host_id, pid_alive, secure_dir

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

# (device, inode, size, mtime in ns): a cache file as it was checked.
FileKey = tuple[int, int, int, int]

_MAGIC = b"QJC3"
_PREFIX = struct.Struct("!4sI32s")  # magic, count, seal
_SEAL_AT = 8  # offset of the seal in the file
_LENGTH = struct.Struct("!Q")
_ALIGN = 64
_BLOCK = 8 << 20  # bytes hashed at a time
_SEAL_TAG = b"qjamfab-cache-seal-1\0"
_MAX_PARTS = 1 << 16  # a count above this is a damaged header
_DISK_MARGIN = 16 << 20  # leave this much free on the disk
_TOUCH_S = 30.0  # set an entry's atime this often in use
_OVER_LIMIT = "over-limit"  # in the pins directory: pinned alone > limit
_EVICTED = "evicted"  # in the pins directory: a byte more per eviction
_PIN_HEAD = struct.Struct("!QI")  # a pin file: length, crc32 of the refs
_PIN_READS = 100  # tries to read a pin file not being rewritten
_DEFAULT_SHARE = 4  # default limit: 1/4 of the filesystem...
_DEFAULT_CAP = 64 << 30  # ...at most this
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOTHING: frozenset[str] = frozenset()
_instances = itertools.count()  # names each cache object's pin file
PIN_REFRESH_S = 60.0  # a pin file's writer touches it this often, and...
PIN_STALE_S = 600.0  # ...another host's older than this pins nothing
_pinning: weakref.WeakSet[RefCache] = weakref.WeakSet()  # kept fresh
_refresher_started = threading.Lock()  # taken once, by the first pin file


class CacheLimitError(ValueError):
    """A cache size limit that is not a size."""


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


def parse_size(text: str, env: str | None = "QJAMFAB_CACHE_LIMIT") -> int:
    """Bytes in a size such as `20G`, `500M`, `1.5G` or `1000000`; `env`
    names the variable it came from, for the error."""
    match = re.fullmatch(
        r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE
    )
    if not match:
        shown = f"{env}={text!r}" if env else f"cache limit {text!r}"
        example = f"{env}=20G, 500M or 1.5G" if env else "20G, 500M or 1.5G"
        raise CacheLimitError(
            f"{shown} is not a size: write bytes, or a number with K, M, G "
            f"or T (powers of 1024), e.g. {example}"
        )
    scale = 1 << (10 * " KMGT".index(match.group(2).upper() or " "))
    return int(float(match.group(1)) * scale)


def cache_limit(directory: str, limit: int | str | None = None) -> int:
    """The cache limit in bytes: `limit` (bytes or a size string), else
    $QJAMFAB_CACHE_LIMIT, else the default (see the module docstring)."""
    if isinstance(limit, str):
        return parse_size(limit, None)
    if limit is not None:
        if limit < 0:
            raise CacheLimitError(
                f"cache limit {limit} is negative: give bytes (0 keeps "
                "slices in memory only)"
            )
        return int(limit)
    value = os.environ.get("QJAMFAB_CACHE_LIMIT", "").strip()
    if value:
        return parse_size(value)
    return min(shutil.disk_usage(directory).total // _DEFAULT_SHARE, _DEFAULT_CAP)


def pins_dir(directory: str) -> str:
    """Where the cache objects of the cache in `directory` say what they
    pin (outside it: the cache directory holds entries only)."""
    return directory.rstrip(os.sep) + ".pins"


def plan_eviction(
    entries: Iterable[tuple[float, str, int]], limit: int, pinned: Collection[str]
) -> tuple[list[str], int]:
    """Which entries (last used, name, size) to remove, least recently used
    first, so that the rest fit `limit`, never a pinned one; and the bytes
    left. More than `limit` left means the pinned ones alone exceed it."""
    ordered = sorted(entries)
    total = sum(size for _, _, size in ordered)
    victims = []
    for _, name, size in ordered:
        if total <= limit:
            break
        if name not in pinned:
            victims.append(name)
            total -= size
    return victims, total


def pinned_over_limit(directory: str) -> dict | None:
    """What the cache in `directory` recorded the last time the entries
    pinned for tasks in flight alone exceeded its limit: {"pinned": bytes,
    "limit": bytes, "time": epoch seconds}, or None."""
    try:
        with open(os.path.join(pins_dir(directory), _OVER_LIMIT)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def forget_over_limit(directory: str) -> None:
    """Drop that record (the cache was cleared): a next time is news."""
    _remove(os.path.join(pins_dir(directory), _OVER_LIMIT))


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Damage(Exception):
    """Why a cache file cannot be used."""


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


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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
        self._clock = clock
        # Another machine may read an entry the moment it is renamed in.
        self._sync = fs_type(directory) in NETWORK_FS
        self.directory = directory
        self.limit = cache_limit(directory, limit)
        self._pins = pins_dir(directory)
        secure_dir(self._pins)
        self._pin_file = os.path.join(self._pins, f"pin.{holder()}.{next(_instances)}")
        self._pin_io: io.FileIO | None = None  # the pin file, once opened
        self._pin_lock = threading.Lock()  # pin() and the refresher write it
        self._memory: dict[str, _Entry] = {}
        self._pinned: frozenset[str] = _NOTHING
        self._checked: frozenset[str] = _NOTHING  # what missing() just checked
        self._damaged: list[str] = []
        self._damaged_total = 0
        # ref -> key checked elsewhere
        self._trusted: dict[str, tuple[int, ...]] = {}
        self._evictions = os.path.join(self._pins, _EVICTED)
        self._evictions_seen = -1  # its size when memory was last swept
        _tidy(directory, clock())

    def _path(self, ref: str) -> str:
        return os.path.join(self.directory, ref)

    def pin(self, refs: Iterable[str]) -> None:
        """Keep these refs (the running or waiting task's) from eviction by
        any process of this host, until the next pin(); pin(()) when no
        task is in flight. One pwrite into this object's pin file: a
        header (length, crc32) then the refs, which readers check."""
        pinned = frozenset(refs)
        if pinned == self._pinned:
            return
        with self._pin_lock:
            self._pinned = pinned
            self._write_pin()

    def _write_pin(self) -> None:
        data = "\n".join(sorted(self._pinned)).encode()
        try:
            if self._pin_io is None:
                if not self._pinned:
                    return
                fd = os.open(
                    self._pin_file,
                    os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                self._pin_io = os.fdopen(fd, "r+b", buffering=0)  # closed with us
                _keep_fresh(self)
            os.pwrite(
                self._pin_io.fileno(),
                _PIN_HEAD.pack(len(data), zlib.crc32(data)) + data,
                0,
            )
        except OSError:
            pass  # a full disk: pinned for this process's evictions only

    def refresh_pin(self) -> None:
        """Show other hosts that this object's pins still hold (they judge
        them by age): touch its pin file, or write it again if another
        host removed it as stale."""
        with self._pin_lock:
            if self._pin_io is None or not self._pinned:
                return
            try:
                if os.fstat(self._pin_io.fileno()).st_nlink:
                    os.utime(self._pin_io.fileno())
                    return
            except OSError:
                pass  # ESTALE: removed by another NFS client
            self._pin_io.close()
            self._pin_io = None
            self._write_pin()

    def _pinned_anywhere(self) -> set[str]:
        """What every cache object pins now: its pin file, while its holder
        lives (a dead or stale one's file is removed)."""
        pinned = set(self._pinned)
        try:
            names = os.listdir(self._pins)
        except FileNotFoundError:
            return pinned
        now = self._clock()
        for name in names:
            path = os.path.join(self._pins, name)
            if not name.startswith("pin.") or path == self._pin_file:
                continue  # the over-limit record, or our own
            if not _holder_alive(name.split(".")[1], path, now):
                _remove(path)
            else:
                pinned.update(_read_pins(path))
        return pinned

    def missing(self, refs: Iterable[str]) -> list[str]:
        """The refs not usable here, checking each one (a file read for the
        first time is verified; one in memory costs a stat). Pins `refs`:
        the worker asks this for the task it is about to run."""
        refs = list(refs)
        self.pin(refs)
        pinned = self._pinned
        self._drop_evicted()
        lacking = [r for r in refs if self._usable(r) is None]
        self._checked = pinned.difference(lacking) if lacking else pinned
        return lacking

    def _drop_evicted(self) -> None:
        """After any process here evicted: drop the memory copies whose
        files are gone, but pinned ones. A mapping keeps its file's disk
        space, so a daemon holding evicted slices would hold the disk
        beyond the limit. One stat when nothing was evicted."""
        try:
            mark = os.stat(self._evictions).st_size
        except FileNotFoundError:
            mark = 0
        if mark == self._evictions_seen:
            return
        self._evictions_seen = mark
        for ref, entry in list(self._memory.items()):
            if entry.key is None or ref in self._pinned:
                continue
            try:
                st: os.stat_result | None = os.lstat(entry.path)
            except FileNotFoundError:
                st = None
            if st is None or _key(st) != entry.key:
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
            if (
                st is not None
                and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == entry.key
            ):
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
            return _key(os.lstat(self._path(ref)))
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
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == entry.key:
                now = time.monotonic()
                if now - entry.touched > _TOUCH_S:
                    entry.touched = now
                    _touch(entry.path)
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
                    raise _Damage("not a regular file")
                try:
                    offsets, lengths = _verify(
                        fd, ref, st, self._trusted.pop(ref, None) != _key(st)
                    )
                except OSError as exc:  # EIO: a bad disk
                    raise _Damage(f"cannot be read: {exc.strerror}") from None
                if _key(os.fstat(fd)) != _key(st):
                    raise _Damage("it changed while it was checked")
                mapping, value = _map(fd, offsets, lengths, st.st_size)
            except _Damage as exc:
                self._drop_damaged(ref, str(exc), st.st_ino)
                return None
        finally:
            os.close(fd)
        _touch(path)
        entry = self._memory[ref] = _Entry(
            value, path, _key(st), mapping, time.monotonic()
        )
        return entry

    def _drop_damaged(self, ref: str, reason: str, inode: int | None = None) -> None:
        self._memory.pop(ref, None)
        _remove(self._path(ref), inode)
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
    ) -> list | None:
        """Take a REFS payload off the stream into the cache and seal it.
        Without room on the disk, or bigger than the limit, it is kept in
        memory only; so is one the disk fills up under while it arrives.
        Without `load` (the host agent, which only stores) nothing is
        unpickled: a slice that stays off the disk is returned as its raw
        parts, for the agent to pass on. Without `to_disk` (the agent found
        no room for it) it stays in memory whatever the room here."""
        if not is_ref(ref):
            raise ValueError(f"{ref!r} is not a ref")
        count = len(lengths)
        lengths_raw = b"".join(_LENGTH.pack(n) for n in lengths)
        header = _PREFIX.pack(_MAGIC, count, bytes(32)) + lengths_raw
        offsets = [_aligned(len(header))]
        for n in lengths:
            offsets.append(_aligned(offsets[-1] + n))
        size = offsets.pop()
        path = self._path(ref)
        tmp = f"{path}.{holder()}.tmp"
        fd = self._reserve(ref, tmp, size) if to_disk else None
        if fd is None:
            parts = [reader.read_part(n) for n in lengths]
            _check_pickle(ref, parts[0][:2] if parts else b"")
            return self.keep_in_memory(ref, parts, load)
        digests: list = []  # digests, or futures of them
        overlap = size > _BLOCK  # small ones are hashed here and now
        try:
            # Hashed through a mapping of its full size: this file is ours
            # and no one else's yet, so it cannot shrink under it.
            written = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
            _write_padded(fd, header)
            for offset, n in zip(offsets, lengths):
                for start in range(0, n, _BLOCK):
                    # Hash each block as it lands, while the next arrives.
                    k = min(_BLOCK, n - start)
                    reader.copy_to(fd, k, source_fd)
                    block = written[offset + start : offset + start + k]
                    digests.append(
                        _pool().submit(_digest, block) if overlap else _digest(block)
                    )
                _write_padded(fd, b"", _aligned(offset + n) - offset - n)
            if overlap:
                digests = [d.result() for d in digests]
            seal = _seal(ref, count, lengths_raw, digests)
            digests = []
            _check_pickle(
                ref, bytes(written[offsets[0] : offsets[0] + 2]) if lengths else b""
            )
            written.release()
            os.pwrite(fd, seal, _SEAL_AT)
            st = os.fstat(fd)
            if load:
                mapping, value = _map(fd, offsets, lengths, st.st_size)
        except BaseException as exc:
            if overlap and digests:
                from concurrent.futures import wait

                for d in digests:
                    d.cancel()
                wait(digests)  # they read the mapping
            try:
                if not (isinstance(exc, OSError) and exc.errno in _DISK_FULL):
                    raise
                kept = self._rescue(ref, exc, fd, offsets, lengths, reader, load)
            finally:
                os.close(fd)
                os.unlink(tmp)
            return kept
        if self._sync:  # whole on the server before its name shows
            os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)  # same inode, size, mtime: st is its key
        if load:
            self._memory[ref] = _Entry(value, path, _key(st), mapping, time.monotonic())
        return None

    def _rescue(
        self,
        ref: str,
        exc: OSError,
        fd: int,
        offsets: list[int],
        lengths: list[int],
        reader: protocol.FrameReader,
        load: bool,
    ) -> list | None:
        """The disk filled up under ref's file (another writer) as it
        arrived: keep the slice in memory, from the bytes that landed in
        the file and the rest of the frame, still in the stream."""
        landed = os.lseek(fd, 0, os.SEEK_CUR)  # copy_to took no more
        parts = []
        for offset, n in zip(offsets, lengths):
            part = bytearray(n)
            view = memoryview(part)
            have = min(n, max(0, landed - offset))
            for start in range(0, have, _BLOCK):
                k = min(_BLOCK, have - start)
                view[start : start + k] = os.pread(fd, k, offset + start)
            reader.read_into(view[have:])
            parts.append(part)
        print(
            f"qjamfab: the disk of {self.directory} filled up while slice "
            f"{ref} arrived ({exc.strerror}): kept in memory only; free "
            "space there to cache slices on disk",
            file=sys.stderr,
            flush=True,
        )
        return self.keep_in_memory(ref, parts, load)

    def keep_in_memory(self, ref: str, parts: list, load: bool = True) -> list | None:
        """The slice in memory only; its raw parts back without `load`."""
        if not load:
            return parts
        self._memory[ref] = _Entry(
            protocol.decode(parts), self._path(ref), None, None, 0.0
        )
        return None

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
            entries, self.limit, self._pinned_anywhere() | writing
        )
        for name in victims:
            self._memory.pop(name, None)
            _remove(os.path.join(self.directory, name), inodes[name])
        if victims:
            try:  # tell the others to drop their mappings of them
                fd = os.open(
                    self._evictions,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                try:
                    os.write(fd, b".")
                finally:
                    os.close(fd)
            except OSError:
                pass  # a full disk: they drop them at their next use
        if total > self.limit:
            self._say_pinned_over(total)

    def _say_pinned_over(self, pinned: int) -> None:
        """Once per host and limit: what tasks in flight need exceeds the
        limit. The first process to find it says so and records it."""
        path = os.path.join(self._pins, _OVER_LIMIT)
        record = json.dumps(
            {"pinned": pinned, "limit": self.limit, "time": time.time()}
        ).encode()
        tmp = f"{path}.{holder()}.tmp"
        try:
            _write_file(tmp, record)
            try:
                os.link(tmp, path)  # whole, and only if no one said it first
            except FileExistsError:
                said = pinned_over_limit(self.directory)
                if said is not None and said.get("limit") == self.limit:
                    return  # said already
                os.replace(tmp, path)  # said under another limit: news
        except OSError:
            pass  # a full disk: say it at least
        finally:
            _remove(tmp)
        print(
            f"qjamfab: the slices that tasks on this host need right now "
            f"({pinned} bytes) exceed the cache limit ({self.limit} bytes), "
            "so the cache holds more than its limit while they run: raise "
            f"QJAMFAB_CACHE_LIMIT (or Master(cache_limit=...)) above {pinned} "
            "bytes",
            file=sys.stderr,
            flush=True,
        )

    def drop_memory(self) -> None:
        self._memory.clear()

    def clear(self) -> dict:
        stats = self.stats()
        self._memory.clear()
        for name in os.listdir(self.directory):
            _remove(os.path.join(self.directory, name))
        forget_over_limit(self.directory)
        return stats

    def stats(self) -> dict:
        entries = disk_bytes = 0
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(".tmp"):
                entries += 1
                disk_bytes += entry.stat(follow_symlinks=False).st_size
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


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # Imported when first needed: 9 ms a worker start would pay otherwise.
    from concurrent.futures import ThreadPoolExecutor

    # A few threads: several daemons share the host's cores.
    return ThreadPoolExecutor(
        max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="qjamfab-seal"
    )


def _digest(block: memoryview) -> bytes:
    return hashlib.sha256(block).digest()  # releases the GIL


def _block_digest(fd: int, offset: int, n: int, buffers: threading.local) -> bytes:
    """sha256 of n bytes of the file at offset, read with pread into this
    thread's buffer: a file that shrank gives a short read, never the
    SIGBUS a mapping would."""
    buf = getattr(buffers, "buf", None)
    if buf is None:
        buf = buffers.buf = bytearray(_BLOCK)
    view = memoryview(buf)[:n]
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise _Damage(
                f"truncated: it ends inside a part, before offset {offset + n}"
            )
        done += got
    return hashlib.sha256(view).digest()


def _seal(ref: str, count: int, lengths_raw: bytes, digests: list[bytes]) -> bytes:
    h = hashlib.sha256(_SEAL_TAG)
    h.update(ref.encode() + b"\0")
    h.update(_PREFIX.pack(_MAGIC, count, bytes(32)) + lengths_raw)
    for digest in digests:
        h.update(digest)
    return h.digest()


def _verify(
    fd: int, ref: str, st: os.stat_result, seal_too: bool = True
) -> tuple[list[int], list[int]]:
    """Check a cache file against its seal (its header only, without
    `seal_too`), reading it with pread; the offsets and lengths of its
    parts. Raises _Damage saying what is wrong."""
    size = st.st_size
    head = os.pread(fd, _PREFIX.size, 0)
    if len(head) < _PREFIX.size:
        raise _Damage(f"truncated to {size} bytes")
    magic, count, seal = _PREFIX.unpack(head)
    if magic != _MAGIC:
        raise _Damage("not a cache file")
    if count > _MAX_PARTS:
        raise _Damage(f"its header says {count} parts")
    lengths_raw = os.pread(fd, count * _LENGTH.size, _PREFIX.size)
    if len(lengths_raw) < count * _LENGTH.size:
        raise _Damage(f"truncated to {size} bytes")
    lengths = list(struct.unpack(f"!{count}Q", lengths_raw))
    pos = _aligned(_PREFIX.size + len(lengths_raw))
    offsets: list[int] = []
    blocks: list[tuple[int, int]] = []  # (offset, size) of each block hashed
    for n in lengths:
        offsets.append(pos)
        blocks += [(pos + i, min(_BLOCK, n - i)) for i in range(0, n, _BLOCK)]
        pos = _aligned(pos + n)
    if size != pos:
        raise _Damage(f"{size} bytes where its header says {pos}")
    if not seal_too:
        return offsets, lengths
    buffers = threading.local()  # one block buffer per thread, this call
    if len(blocks) > 1:
        # (b[0], b[1], not *b: mypy cannot infer a lambda's star-arguments)
        digests = list(
            _pool().map(lambda b: _block_digest(fd, b[0], b[1], buffers), blocks)
        )
    else:
        digests = [_block_digest(fd, *b, buffers) for b in blocks]
    if _seal(ref, count, lengths_raw, digests) != seal:
        raise _Damage("its bytes are not the ones written under this ref")
    return offsets, lengths


def _map(
    fd: int, offsets: list[int], lengths: list[int], size: int
) -> tuple[mmap.mmap, object]:
    """(the mapping, the slice) of a checked cache file."""
    mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    if len(mapping) != size:
        raise _Damage(f"{len(mapping)} bytes now, {size} when checked")
    data = memoryview(mapping)
    return mapping, protocol.decode([data[o : o + n] for o, n in zip(offsets, lengths)])


@functools.lru_cache(maxsize=1)
def _utimensat() -> Callable[[str], int] | None:
    """utimensat(2) with its arguments set (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).utimensat
    except (ImportError, OSError, AttributeError):
        return None

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    utime_now, utime_omit = (1 << 30) - 1, (1 << 30) - 2
    times = (Timespec * 2)(Timespec(0, utime_now), Timespec(0, utime_omit))
    at_fdcwd, at_symlink_nofollow = -100, 0x100
    return lambda path: func(at_fdcwd, os.fsencode(path), times, at_symlink_nofollow)


def _touch(path: str) -> None:
    """Mark an entry used: its atime becomes now. The mtime is left alone
    (os.utime would set it back, hiding a write made meanwhile from the
    identity check). Without utimensat, eviction goes by write order."""
    touch = _utimensat()
    if touch is not None:
        touch(path)


def _check_pickle(ref: str, start: bytes | bytearray) -> None:
    """A slice's payload is a protocol 5 pickle stream (protocol.encode):
    refuse one that is not, before it is stored or passed on. (It is
    unpickled only where it is used.)"""
    if start != b"\x80\x05":
        raise ValueError(
            f"the payload sent for slice {ref} is not a pickle stream of protocol 5"
        )


def _write_padded(fd: int, data: bytes, pad: int | None = None) -> int:
    """Write data then zeros up to the next 64-byte boundary (or `pad`
    zeros); the bytes written."""
    if pad is None:
        pad = _aligned(len(data)) - len(data)
    view = memoryview(data + bytes(pad))
    total = len(view)
    while view:
        view = view[os.write(fd, view) :]
    return total


def _read_pins(path: str) -> list[str]:
    """The refs a pin file names. Its writer rewrites it in place: a read
    that does not match its checksum caught a write half done, and is
    tried again; never consistent, it counts as pinning nothing."""
    for _ in range(_PIN_READS):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        if len(data) < _PIN_HEAD.size:
            continue
        length, crc = _PIN_HEAD.unpack_from(data)
        body = data[_PIN_HEAD.size : _PIN_HEAD.size + length]
        if len(body) == length and zlib.crc32(body) == crc:
            return body.decode(errors="replace").split("\n") if length else []
    return []


def _write_file(path: str, data: bytes) -> None:
    """path (0600, emptied first if there) holds data."""
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        _write_padded(fd, data, 0)
    finally:
        os.close(fd)


def _tidy(directory: str, now: float) -> None:
    """Remove what a worker finds in the cache that no one can use: entries
    an older qjamfab wrote in another layout, anything that is not a
    regular file (a symlink planted there), and temporary files of workers
    that died writing them (`<ref>.<host>-<pid>.tmp`)."""
    for entry in os.scandir(directory):
        if entry.name.endswith(".tmp"):
            if not _holder_alive(entry.name.split(".")[-2], entry.path, now):
                _remove(entry.path)
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                if not entry.is_dir(follow_symlinks=False):
                    _remove(entry.path)
                continue
            # O_NOATIME: looking is not using (eviction goes by atime).
            fd = os.open(
                entry.path,
                os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0),
            )
            try:
                if os.pread(fd, len(_MAGIC), 0) != _MAGIC:
                    _remove(entry.path)
            finally:
                os.close(fd)
        except OSError:
            pass  # removed meanwhile


def holder(pid: int | None = None) -> str:
    """`<host>-<pid>`: process `pid` of this host (this process by
    default), in the names of the files it writes into a cache that other
    machines may share."""
    return f"{host_id()}-{os.getpid() if pid is None else pid}"


def _holder_alive(who: str, path: str, now: float) -> bool:
    """Whether the process `who` names (as holder() does) still holds the
    file at `path`: one of this host while it lives; one of another host
    (or an older qjamfab's name) while the file is younger than
    PIN_STALE_S at `now`."""
    host, _, pid = who.partition("-")
    if host == host_id() and pid.isdigit():
        return pid_alive(int(pid))
    try:
        return now - os.stat(path).st_mtime < PIN_STALE_S
    except OSError:
        return False  # gone meanwhile


def _keep_fresh(cache: RefCache) -> None:
    """Have this process's refresher touch `cache`'s pin file every
    PIN_REFRESH_S (the refresher starts with the first pin file)."""
    _pinning.add(cache)
    if _refresher_started.acquire(blocking=False):
        threading.Thread(target=_refresh_pins, name="qjamfab-pins", daemon=True).start()


def _refresh_pins() -> None:
    while True:
        time.sleep(PIN_REFRESH_S)
        for cache in list(_pinning):
            cache.refresh_pin()


def _remove(path: str, inode: int | None = None) -> None:
    """Unlink path, if it is still the file `inode` (when given): not a
    fresh copy another worker renamed there meanwhile."""
    try:
        if inode is None or os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass  # another worker here removed it first
    except OSError:
        pass  # a directory: nothing qjamfab made, left alone
