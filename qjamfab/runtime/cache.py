"""The worker's slice cache: refs held in memory and in `<base>/cache/`.

A slice arrives as a REFS frame whose payload (pickle protocol 5 main
stream plus out-of-band buffers) goes straight from the stream into its
cache file, by splice when the stream is a pipe: the bytes never pass
through this process. The file is written under a temporary name and
renamed, so a crash never leaves a half-written entry. The slice in memory
is then the file memory-mapped copy-on-write, each buffer at a 64-byte
aligned offset: one copy of the data (the page cache), whether it just
arrived or a restarted worker, or another worker on the same host, finds it
on disk.

File layout: b"QJC2" | count: u32 | count x length: u64 | each part, padded
to a multiple of 64 bytes from the start of the file.
"""
from __future__ import annotations

import mmap
import os
import shutil
import struct

from .. import protocol
from . import secure_dir

_MAGIC = b"QJC2"
_COUNT = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")
_ALIGN = 64
_DISK_MARGIN = 16 << 20   # leave this much free on the disk


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class RefCache:
    def __init__(self, directory: str):
        self.directory = directory
        secure_dir(directory)
        self._memory: dict[str, object] = {}
        _tidy(directory)

    def _path(self, ref: str) -> str:
        return os.path.join(self.directory, ref)

    def missing(self, refs) -> list[str]:
        return [r for r in refs
                if r not in self._memory and not os.path.exists(self._path(r))]

    def receive(self, ref: str, lengths: list[int],
                reader: protocol.FrameReader, source_fd: int | None) -> None:
        """Take a REFS payload off the stream into the cache. Without room
        on the disk it is kept in memory only."""
        header = _MAGIC + _COUNT.pack(len(lengths)) + b"".join(
            _LENGTH.pack(n) for n in lengths)
        size = _aligned(len(header)) + sum(_aligned(n) for n in lengths)
        if shutil.disk_usage(self.directory).free < size + _DISK_MARGIN:
            parts = [reader.read_part(n) for n in lengths]
            self._memory[ref] = protocol.decode(parts)
            return
        tmp = f"{self._path(ref)}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_NOFOLLOW, 0o600)
        try:
            pos = _write_padded(fd, header)
            for n in lengths:
                reader.copy_to(fd, n, source_fd)
                pos += n
                pos += _write_padded(fd, b"", _aligned(pos) - pos)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self._path(ref))
        self._memory[ref] = _load(self._path(ref))

    def get(self, ref: str) -> object:
        try:
            return self._memory[ref]
        except KeyError:
            pass
        value = self._memory[ref] = _load(self._path(ref))
        return value

    def drop_memory(self) -> None:
        self._memory.clear()

    def clear(self) -> dict:
        stats = self.stats()
        self._memory.clear()
        for name in os.listdir(self.directory):
            _unlink(os.path.join(self.directory, name))
        return stats

    def stats(self) -> dict:
        entries = disk_bytes = 0
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(".tmp"):
                entries += 1
                disk_bytes += entry.stat().st_size
        return {"entries": entries, "bytes": disk_bytes,
                "in_memory": len(self._memory)}


def _write_padded(fd: int, data: bytes, pad: int | None = None) -> int:
    """Write data then zeros up to the next 64-byte boundary (or `pad`
    zeros); the bytes written."""
    if pad is None:
        pad = _aligned(len(data)) - len(data)
    view = memoryview(data + bytes(pad))
    total = len(view)
    while view:
        view = view[os.write(fd, view):]
    return total


def _tidy(directory: str) -> None:
    """Remove what a worker finds in the cache that no one can use: entries
    an older qjamfab wrote in another layout, and temporary files of
    workers that died writing them (`<ref>.<pid>.tmp`)."""
    for entry in os.scandir(directory):
        if entry.name.endswith(".tmp"):
            if not _writer_alive(entry.name):
                _unlink(entry.path)
            continue
        try:
            with open(entry.path, "rb") as f:
                if f.read(len(_MAGIC)) != _MAGIC:
                    os.unlink(entry.path)
        except OSError:
            pass   # removed meanwhile


def _writer_alive(tmp_name: str) -> bool:
    try:
        os.kill(int(tmp_name.split(".")[-2]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass   # another worker here removed it first


def _load(path: str) -> object:
    """A cache file's slice, its buffers in a copy-on-write mapping."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY))
    finally:
        os.close(fd)
    if bytes(data[:len(_MAGIC)]) != _MAGIC:
        raise ValueError(f"cache entry {path} is damaged: remove it")
    (count,) = _COUNT.unpack_from(data, len(_MAGIC))
    lengths = [_LENGTH.unpack_from(data, len(_MAGIC) + _COUNT.size
                                   + i * _LENGTH.size)[0]
               for i in range(count)]
    pos = _aligned(len(_MAGIC) + _COUNT.size + count * _LENGTH.size)
    parts = []
    for n in lengths:
        parts.append(data[pos:pos + n])
        pos = _aligned(pos + n)
    return protocol.decode(parts)
