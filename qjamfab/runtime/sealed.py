"""A slice cache entry's file: its sealed format, written, checked, mapped.

File layout: b"QJC3" | count: u32 | seal: 32 bytes | count x length: u64 |
each part, padded to a multiple of 64 bytes from the start of the file.
The seal is sha256 over a tag, the ref, the header (seal zeroed) and the
sha256 of every 8 MiB block of every part (cache.py's docstring says why a
ref is sealed, not recomputed). `layout` gives a new file's header and
where its parts go; `write_sealed` writes one from the stream, each block
hashed on a few threads as soon as it lands, while the next arrives, or
not at all when the sender gave its digest (`known_digests`: the master
hashed a slice's array in the same blocks to make its ref, and the bytes
come from it over the authenticated channel, as the ref does; what landed
is checked against them by the next `verify`);
`verify` checks a file with pread (never through a mapping, which a
shrinking file would turn into SIGBUS), and `map_file` maps a checked one
copy-on-write into the slice. Any problem with a file is a `Damage` saying
what is wrong; `remove` unlinks a file only while it is still the one that
was checked, and `tidy` removes what a cache directory holds that no one
can use.

Shipped to hosts with the runtime: stdlib only.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from .. import protocol

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

_MAGIC = b"QJC3"
_PREFIX = struct.Struct("!4sI32s")  # magic, count, seal
_SEAL_AT = 8  # offset of the seal in the file
_LENGTH = struct.Struct("!Q")
_ALIGN = 64
_BLOCK = protocol.HASH_BLOCK  # bytes hashed at a time
_SEAL_TAG = b"qjamfab-cache-seal-1\0"
_MAX_PARTS = 1 << 16  # a count above this is a damaged header
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class Damage(Exception):
    """Why a cache file cannot be used."""


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Layout(NamedTuple):
    """A new file of parts of these lengths: its header (seal zeroed), the
    lengths as the header holds them, each part's offset, the file's size."""

    lengths: list[int]
    header: bytes
    lengths_raw: bytes
    offsets: list[int]
    size: int


def layout(lengths: list[int]) -> Layout:
    lengths_raw = b"".join(_LENGTH.pack(n) for n in lengths)
    header = _PREFIX.pack(_MAGIC, len(lengths), bytes(32)) + lengths_raw
    offsets = [_aligned(len(header))]
    for n in lengths:
        offsets.append(_aligned(offsets[-1] + n))
    return Layout(lengths, header, lengths_raw, offsets[:-1], offsets[-1])


def known_digests(blocks: object, lengths: list[int]) -> list[list[bytes] | None]:
    """A REFS head's "blocks" (per part: None, or the hex sha256 of each of
    its 8 MiB blocks) as digests per part; None for a part whose entry is
    missing or malformed (the wrong count, not hex): that part is hashed."""
    known: list[list[bytes] | None] = [None] * len(lengths)
    if not isinstance(blocks, list) or len(blocks) != len(lengths):
        return known
    for i, (hexes, n) in enumerate(zip(blocks, lengths)):
        if not isinstance(hexes, list) or len(hexes) != -(-n // _BLOCK):
            continue
        try:
            digests = [bytes.fromhex(x) for x in hexes]
        except (TypeError, ValueError):
            continue
        if all(len(d) == 32 for d in digests):
            known[i] = digests
    return known


def write_sealed(
    fd: int,
    ref: str,
    file: Layout,
    reader: protocol.FrameReader,
    source_fd: int | None,
    known: list[list[bytes] | None] | None = None,
) -> None:
    """Write ref's parts from the stream into `fd` (sized to `file.size`
    already) as a sealed file, hashing each block as it lands while the
    next arrives, except the parts whose digests are `known`
    (`known_digests`). An exception leaves no hashing thread reading `fd`."""
    digests: list = []  # digests, or futures of them
    overlap = file.size > _BLOCK  # small ones are hashed here and now
    offsets, lengths = file.offsets, file.lengths
    given = known or [None] * len(lengths)
    try:
        # Hashed through a mapping of its full size: this file is ours
        # and no one else's yet, so it cannot shrink under it.
        written = memoryview(mmap.mmap(fd, file.size, access=mmap.ACCESS_READ))
        write_padded(fd, file.header)
        for offset, n, sent in zip(offsets, lengths, given):
            if sent is not None:
                reader.copy_to(fd, n, source_fd)
                digests += sent
            for start in range(0, n if sent is None else 0, _BLOCK):
                k = min(_BLOCK, n - start)
                reader.copy_to(fd, k, source_fd)
                block = written[offset + start : offset + start + k]
                digests.append(
                    _pool().submit(_digest, block) if overlap else _digest(block)
                )
            write_padded(fd, b"", _aligned(offset + n) - offset - n)
        if overlap:
            digests = [d if isinstance(d, bytes) else d.result() for d in digests]
        sealed = _seal(ref, len(lengths), file.lengths_raw, digests)
        digests = []
        check_pickle(
            ref, bytes(written[offsets[0] : offsets[0] + 2]) if lengths else b""
        )
        written.release()
        os.pwrite(fd, sealed, _SEAL_AT)
    except BaseException:
        futures = [d for d in digests if not isinstance(d, bytes)]
        if futures:
            from concurrent.futures import wait

            for d in futures:
                d.cancel()
            wait(futures)  # they read the mapping
        raise


def read_landed(fd: int, file: Layout, reader: protocol.FrameReader) -> list:
    """The parts of a file whose writing stopped (the disk filled up): the
    bytes that landed in it, then the rest of the frame from the stream."""
    landed = os.lseek(fd, 0, os.SEEK_CUR)  # copy_to took no more
    parts = []
    for offset, n in zip(file.offsets, file.lengths):
        part = bytearray(n)
        view = memoryview(part)
        have = min(n, max(0, landed - offset))
        for start in range(0, have, _BLOCK):
            k = min(_BLOCK, have - start)
            view[start : start + k] = os.pread(fd, k, offset + start)
        reader.read_into(view[have:])
        parts.append(part)
    return parts


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
            raise Damage(
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


def verify(
    fd: int, ref: str, st: os.stat_result, seal_too: bool = True
) -> tuple[list[int], list[int]]:
    """Check a cache file against its seal (its header only, without
    `seal_too`), reading it with pread; the offsets and lengths of its
    parts. Raises Damage saying what is wrong."""
    size = st.st_size
    head = os.pread(fd, _PREFIX.size, 0)
    if len(head) < _PREFIX.size:
        raise Damage(f"truncated to {size} bytes")
    magic, count, seal = _PREFIX.unpack(head)
    if magic != _MAGIC:
        raise Damage("not a cache file")
    if count > _MAX_PARTS:
        raise Damage(f"its header says {count} parts")
    lengths_raw = os.pread(fd, count * _LENGTH.size, _PREFIX.size)
    if len(lengths_raw) < count * _LENGTH.size:
        raise Damage(f"truncated to {size} bytes")
    lengths = list(struct.unpack(f"!{count}Q", lengths_raw))
    pos = _aligned(_PREFIX.size + len(lengths_raw))
    offsets: list[int] = []
    blocks: list[tuple[int, int]] = []  # (offset, size) of each block hashed
    for n in lengths:
        offsets.append(pos)
        blocks += [(pos + i, min(_BLOCK, n - i)) for i in range(0, n, _BLOCK)]
        pos = _aligned(pos + n)
    if size != pos:
        raise Damage(f"{size} bytes where its header says {pos}")
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
        raise Damage("its bytes are not the ones written under this ref")
    return offsets, lengths


def map_file(
    fd: int, offsets: list[int], lengths: list[int], size: int
) -> tuple[mmap.mmap, object]:
    """(the mapping, the slice) of a checked cache file."""
    mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    if len(mapping) != size:
        raise Damage(f"{len(mapping)} bytes now, {size} when checked")
    data = memoryview(mapping)
    return mapping, protocol.decode([data[o : o + n] for o, n in zip(offsets, lengths)])


def check_pickle(ref: str, start: bytes | bytearray) -> None:
    """A slice's payload is a protocol 5 pickle stream (protocol.encode):
    refuse one that is not, before it is stored or passed on. (It is
    unpickled only where it is used.)"""
    if start != b"\x80\x05":
        raise ValueError(
            f"the payload sent for slice {ref} is not a pickle stream of protocol 5"
        )


def write_padded(fd: int, data: bytes, pad: int | None = None) -> int:
    """Write data then zeros up to the next 64-byte boundary (or `pad`
    zeros); the bytes written."""
    if pad is None:
        pad = _aligned(len(data)) - len(data)
    view = memoryview(data + bytes(pad))
    total = len(view)
    while view:
        view = view[os.write(fd, view) :]
    return total


def remove(path: str, inode: int | None = None) -> None:
    """Unlink path, if it is still the file `inode` (when given): not a
    fresh copy another worker renamed there meanwhile."""
    try:
        if inode is None or os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass  # another worker here removed it first
    except OSError:
        pass  # a directory: nothing qjamfab made, left alone


def tidy(directory: str, writing: Callable[[str, str], bool]) -> None:
    """Remove what a worker finds in the cache that no one can use: entries
    an older qjamfab wrote in another layout, anything that is not a
    regular file (a symlink planted there), and temporary files of workers
    that died writing them (`<ref>.<host>-<pid>.tmp`: `writing(who, path)`
    says whether the writer `who` still writes it)."""
    for entry in os.scandir(directory):
        if entry.name.endswith(".tmp"):
            parts = entry.name.split(".")
            if len(parts) < 3 or not writing(parts[-2], entry.path):
                remove(entry.path)
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                if not entry.is_dir(follow_symlinks=False):
                    remove(entry.path)
                continue
            # O_NOATIME: looking is not using (eviction goes by atime).
            fd = os.open(
                entry.path,
                os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0),
            )
            try:
                if os.pread(fd, len(_MAGIC), 0) != _MAGIC:
                    remove(entry.path)
            finally:
                os.close(fd)
        except OSError:
            pass  # removed meanwhile
