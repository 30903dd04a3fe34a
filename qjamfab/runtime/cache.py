"""The worker's slice cache: refs held in memory and in `<base>/cache/`.

A slice is stored on disk exactly as its REFS payload arrived (pickle
protocol 5 main stream plus out-of-band buffers), written to a temporary file
and renamed, so a crash never leaves a half-written entry and a restarted
worker, or another worker on the same host, reads it instead of the network.
Disk writes happen on a thread of their own, so the worker keeps reading
the next slice off the wire meanwhile.
"""
from __future__ import annotations

import os
import queue
import struct
import threading

from .. import protocol

_COUNT = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")


class RefCache:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._memory: dict[str, object] = {}
        self._writes: queue.Queue = queue.Queue()
        threading.Thread(target=self._writer, name="qjamfab-cache-writer",
                         daemon=True).start()

    def _path(self, ref: str) -> str:
        return os.path.join(self.directory, ref)

    def missing(self, refs) -> list[str]:
        return [r for r in refs
                if r not in self._memory and not os.path.exists(self._path(r))]

    def put(self, ref: str, parts: list) -> None:
        self._memory[ref] = protocol.decode(parts)
        self._writes.put((ref, parts))

    def flush(self) -> None:
        """Wait until every slice put so far is on disk."""
        self._writes.join()

    def _writer(self) -> None:
        while True:
            ref, parts = self._writes.get()
            try:
                self._write(ref, parts)
            except OSError:
                pass  # a full disk costs the disk copy, not the slice
            finally:
                self._writes.task_done()

    def _write(self, ref: str, parts: list) -> None:
        tmp = f"{self._path(ref)}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            header = _COUNT.pack(len(parts)) + b"".join(
                _LENGTH.pack(len(p)) for p in parts)
            protocol.write_all(lambda views: os.writev(fd, views),
                               [header, *parts])
        finally:
            os.close(fd)
        os.replace(tmp, self._path(ref))

    def get(self, ref: str) -> object:
        try:
            return self._memory[ref]
        except KeyError:
            pass
        with open(self._path(ref), "rb") as f:
            data = memoryview(bytearray(f.read()))
        (count,) = _COUNT.unpack_from(data, 0)
        pos = _COUNT.size + count * _LENGTH.size
        parts = []
        for i in range(count):
            (n,) = _LENGTH.unpack_from(data, _COUNT.size + i * _LENGTH.size)
            parts.append(data[pos:pos + n])
            pos += n
        value = self._memory[ref] = protocol.decode(parts)
        return value

    def drop_memory(self) -> None:
        self._memory.clear()

    def clear(self) -> dict:
        stats = self.stats()  # flushes pending writes first
        self._memory.clear()
        for name in os.listdir(self.directory):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass  # another worker on this host removed it first
        return stats

    def stats(self) -> dict:
        self.flush()
        entries = disk_bytes = 0
        for entry in os.scandir(self.directory):
            if not entry.name.endswith(".tmp"):
                entries += 1
                disk_bytes += entry.stat().st_size
        return {"entries": entries, "bytes": disk_bytes,
                "in_memory": len(self._memory)}
