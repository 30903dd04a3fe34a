"""The slice cache's size limit and what it keeps: the limit (parsed from a
size, $QJAMFAB_CACHE_LIMIT or the filesystem's), the eviction plan (least
recently used first, never a pinned entry), the pins every cache object of
a host writes to `<directory>.pins/` so that a pin holds across processes,
the mark each eviction leaves there for the others, and the record of the
pinned entries alone exceeding the limit (which ``inv status`` reads);
`touch`, which marks an entry used.

Size limit, per host (all daemons of a base share the directory): the
`limit` argument, else `$QJAMFAB_CACHE_LIMIT`, else a quarter of the cache's
filesystem and at most 64 GiB. A value is bytes, or a number with K, M, G
or T (powers of 1024, optionally followed by B or iB): `20G`, `500M`,
`1.5G`, `1000000`; 0 keeps every slice in memory only. Before a slice is
written, the least recently used entries are removed until it fits
(`plan_eviction`). "Used" is the later of an entry's atime and mtime: a
daemon sets the atime (not the mtime, which cache.py's check compares) when
it first uses an entry and at most every 30 s after. Never removed: the
slice being written and the pinned entries: the refs of the task a worker
of this host runs or waits for, in any session. Each cache object writes
what it pins to a file of its own in `<directory>.pins/` (named by its
process id, read by every process that evicts; a dead process's file is
ignored and removed), so a pin holds across processes without any clock.
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

Shipped to hosts with the runtime: stdlib only.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Collection, Iterable

from . import host_id, pid_alive, secure_dir
from .sealed import remove, write_padded

_OVER_LIMIT = "over-limit"  # in the pins directory: pinned alone > limit
_EVICTED = "evicted"  # in the pins directory: a byte more per eviction
_PIN_HEAD = struct.Struct("!QI")  # a pin file: length, crc32 of the refs
_PIN_READS = 100  # tries to read a pin file not being rewritten
_DEFAULT_SHARE = 4  # default limit: 1/4 of the filesystem...
_DEFAULT_CAP = 64 << 30  # ...at most this
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_instances = itertools.count()  # names each cache object's pin file
PIN_REFRESH_S = 60.0  # a pin file's writer touches it this often, and...
PIN_STALE_S = 600.0  # ...another host's older than this pins nothing
_pinning: weakref.WeakSet[Pins] = weakref.WeakSet()  # kept fresh
_refresher_started = threading.Lock()  # taken once, by the first pin file


class CacheLimitError(ValueError):
    """A cache size limit that is not a size."""


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
    remove(os.path.join(pins_dir(directory), _OVER_LIMIT))


class Pins:
    """What one cache object pins, in a pin file of its own, and what the
    other cache objects pin and evict: of this host, or of another sharing
    the directory (a home on NFS). A pin file is `pin.<host>-<pid>.<n>`
    (`holder()`): one of this host counts while its process lives (a dead
    one's is removed); one of another host, whose pids mean nothing here,
    while it is younger than PIN_STALE_S by `clock` (epoch seconds, as file
    times are): its writer touches it every PIN_REFRESH_S while it pins
    something, and writes it again if another host removed it as stale.
    Nothing relies on flock, or on a pid of another host."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.time):
        self.directory = directory
        self.path = pins_dir(directory)
        self._clock = clock
        secure_dir(self.path)
        self._file = os.path.join(self.path, f"pin.{holder()}.{next(_instances)}")
        self._io: io.FileIO | None = None  # the pin file, once opened
        self._lock = threading.Lock()  # pin() and the refresher write it
        self.refs: frozenset[str] = frozenset()
        self._evictions = os.path.join(self.path, _EVICTED)
        self._evictions_seen = -1  # its size at the last evicted_since_last()

    def pin(self, refs: Iterable[str]) -> None:
        """Keep these refs (the running or waiting task's) from eviction by
        any process of this host, until the next pin(); pin(()) when no
        task is in flight. One pwrite into the pin file: a header (length,
        crc32) then the refs, which readers check."""
        pinned = frozenset(refs)
        if pinned == self.refs:
            return
        with self._lock:
            self.refs = pinned
            self._write()

    def _write(self) -> None:
        data = "\n".join(sorted(self.refs)).encode()
        try:
            if self._io is None:
                if not self.refs:
                    return
                fd = os.open(
                    self._file,
                    os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                self._io = os.fdopen(fd, "r+b", buffering=0)  # closed with us
                _keep_fresh(self)
            os.pwrite(
                self._io.fileno(),
                _PIN_HEAD.pack(len(data), zlib.crc32(data)) + data,
                0,
            )
        except OSError:
            pass  # a full disk: pinned for this process's evictions only

    def refresh(self) -> None:
        """Show other hosts that these pins still hold (they judge them by
        age): touch the pin file, or write it again if another host
        removed it as stale."""
        with self._lock:
            if self._io is None or not self.refs:
                return
            try:
                if os.fstat(self._io.fileno()).st_nlink:
                    os.utime(self._io.fileno())
                    return
            except OSError:
                pass  # ESTALE: removed by another NFS client
            self._io.close()
            self._io = None
            self._write()

    def anywhere(self) -> set[str]:
        """What every cache object pins now: its pin file, while its holder
        lives (a dead or stale one's file is removed)."""
        pinned = set(self.refs)
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return pinned
        now = self._clock()
        for name in names:
            path = os.path.join(self.path, name)
            if not name.startswith("pin.") or path == self._file:
                continue  # the over-limit record, or our own
            if not holder_alive(name.split(".")[1], path, now):
                remove(path)
            else:
                pinned.update(_read_pins(path))
        return pinned

    def mark_evicted(self) -> None:
        """Tell the host's other cache objects to drop their mappings of
        evicted files: a byte more in the evictions mark."""
        try:
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

    def evicted_since_last(self) -> bool:
        """Whether any process here evicted since the last call: one stat."""
        try:
            mark = os.stat(self._evictions).st_size
        except FileNotFoundError:
            mark = 0
        if mark == self._evictions_seen:
            return False
        self._evictions_seen = mark
        return True

    def say_over_limit(self, pinned: int, limit: int) -> None:
        """Once per host and limit: what tasks in flight need exceeds the
        limit. The first process to find it says so and records it."""
        path = os.path.join(self.path, _OVER_LIMIT)
        record = json.dumps(
            {"pinned": pinned, "limit": limit, "time": time.time()}
        ).encode()
        tmp = f"{path}.{holder()}.tmp"
        try:
            _write_file(tmp, record)
            try:
                os.link(tmp, path)  # whole, and only if no one said it first
            except FileExistsError:
                said = pinned_over_limit(self.directory)
                if said is not None and said.get("limit") == limit:
                    return  # said already
                os.replace(tmp, path)  # said under another limit: news
        except OSError:
            pass  # a full disk: say it at least
        finally:
            remove(tmp)
        print(
            f"qjamfab: the slices that tasks on this host need right now "
            f"({pinned} bytes) exceed the cache limit ({limit} bytes), "
            "so the cache holds more than its limit while they run: raise "
            f"QJAMFAB_CACHE_LIMIT (or Master(cache_limit=...)) above {pinned} "
            "bytes",
            file=sys.stderr,
            flush=True,
        )


def holder(pid: int | None = None) -> str:
    """`<host>-<pid>`: process `pid` of this host (this process by
    default), in the names of the files it writes into a cache that other
    machines may share."""
    return f"{host_id()}-{os.getpid() if pid is None else pid}"


def holder_alive(who: str, path: str, now: float) -> bool:
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


def _keep_fresh(pins: Pins) -> None:
    """Have this process's refresher touch `pins`' file every
    PIN_REFRESH_S (the refresher starts with the first pin file)."""
    _pinning.add(pins)
    if _refresher_started.acquire(blocking=False):
        threading.Thread(target=_refresh_pins, name="qjamfab-pins", daemon=True).start()


def _refresh_pins() -> None:
    while True:
        time.sleep(PIN_REFRESH_S)
        for pins in list(_pinning):
            pins.refresh()


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
        write_padded(fd, data, 0)
    finally:
        os.close(fd)


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


def touch(path: str) -> None:
    """Mark an entry used: its atime becomes now. The mtime is left alone
    (os.utime would set it back, hiding a write made meanwhile from the
    identity check). Without utimensat, eviction goes by write order."""
    touch = _utimensat()
    if touch is not None:
        touch(path)
