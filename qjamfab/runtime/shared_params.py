"""A run's params in shared memory: written once on a host, mapped by each
of its workers.

The host agent (or, for local workers, the master) writes the params'
parts (protocol.encode: a pickle stream and its out-of-band buffers) into
an anonymous memory file (memfd, 0600, in no directory), and tells each
worker its name as `/proc/<pid>/fd/<fd>`: only a process of the same user
can open it there, and it is gone when the writer closes it and the last
worker lets go of its mapping, even after a SIGKILL. Each worker maps it
copy-on-write: numpy buffers are read in place, and a mapfunc that writes
into its params changes only its own pages.

File layout: b"QJP1" | count: u32 | count x length: u64 | each part, from
a multiple of 64 bytes (numpy's alignment).

Shipped to hosts with the runtime: stdlib only.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Sequence

from .. import protocol

_MAGIC = b"QJP1"
_PREFIX = struct.Struct("!4sI")
_LENGTH = struct.Struct("!Q")
_ALIGN = 64
_MAX_PARTS = 1 << 16
SHARE_MIN_BYTES = 64 << 10  # smaller params travel inline with each first task


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(lengths: Sequence[int]) -> tuple[bytes, list[int], int]:
    """(header, each part's offset, the file's size)."""
    header = _PREFIX.pack(_MAGIC, len(lengths)) + b"".join(
        _LENGTH.pack(n) for n in lengths
    )
    offsets = [_aligned(len(header))]
    for n in lengths:
        offsets.append(_aligned(offsets[-1] + n))
    return header, offsets[:-1], offsets[-1]


_PATH = re.compile(r"/proc/[0-9]{1,10}/fd/[0-9]{1,10}")


def is_shared_params_path(path: object) -> bool:
    """Whether a PARAMS frame's path is one a writer here makes (a worker
    opens nothing else it is told to)."""
    return isinstance(path, str) and _PATH.fullmatch(path) is not None


def available() -> bool:
    """Whether this host can share params (Linux: memfd and /proc)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class SharedParams:
    """Params parts in a memory file this process holds open."""

    def __init__(self, lengths: Sequence[int]):
        self.header, self.offsets, self.size = _layout(lengths)
        self.lengths = list(lengths)
        self.fd = os.memfd_create("qjamfab-params", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            os.pwrite(self.fd, self.header, 0)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        """Where a worker of the same user opens it."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def write(self, parts: Sequence) -> None:
        for offset, part in zip(self.offsets, parts):
            view = memoryview(part).cast("B")
            while view.nbytes:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written

    def take(self, reader: protocol.FrameReader, source_fd: int | None) -> None:
        """The parts, off the stream (spliced from a pipe: no copy here)."""
        for offset, n in zip(self.offsets, self.lengths):
            os.lseek(self.fd, offset, os.SEEK_SET)
            reader.copy_to(self.fd, n, source_fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class HostParams:
    """One run's params as the one who holds them for a host's workers (a
    host's agent, or the master for local workers) hands them out: the
    PARAMS frame each worker gets once, before its first TASK of the run.
    Where shared memory is unavailable, the parts themselves."""

    def __init__(self, run: int, shared: SharedParams | None, parts: list):
        self.run = run
        self.shared = shared
        self.parts = parts
        self.told: set[object] = set()

    @classmethod
    def from_parts(cls, run: int, parts: Sequence) -> HostParams:
        shared = _new([memoryview(p).nbytes for p in parts])
        if shared is None:
            return cls(run, None, list(parts))
        try:
            shared.write(parts)
        except BaseException:
            shared.close()
            raise
        return cls(run, shared, [])

    @classmethod
    def receive(
        cls,
        run: int,
        lengths: list[int],
        reader: protocol.FrameReader,
        source_fd: int | None,
    ) -> HostParams:
        """From a PARAMS frame's payload, still in the stream."""
        shared = _new(lengths)
        if shared is None:
            return cls(run, None, [reader.read_part(n) for n in lengths])
        try:
            shared.take(reader, source_fd)
        except BaseException:
            shared.close()
            raise
        return cls(run, shared, [])

    def for_worker(self, worker: object, run: int) -> tuple[dict, list] | None:
        """The PARAMS frame's (head, payload) that `worker` needs before a
        TASK of `run`; None when it has them (or they are another run's)."""
        if run != self.run or worker in self.told:
            return None
        self.told.add(worker)
        if self.shared is None:
            return {"run": run}, self.parts
        return {"run": run, "path": self.shared.path}, []

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


def _new(lengths: Sequence[int]) -> SharedParams | None:
    """A memory file for parts of these lengths, if this host has them."""
    if not available():
        return None
    try:
        return SharedParams(lengths)
    except OSError:  # no memfd here (seccomp, an old kernel), or no memory
        return None


def open_params(path: str) -> list[memoryview]:
    """A run's params parts, mapped copy-on-write from `path`."""
    if not is_shared_params_path(path):
        raise ValueError(f"{path!r} is not where a host shares params")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        size = os.fstat(fd).st_size
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else None
    finally:
        os.close(fd)
    if mapping is None or size < _PREFIX.size:
        raise ValueError(f"{path} holds no params ({size} bytes)")
    data = memoryview(mapping)
    magic, count = _PREFIX.unpack_from(data)
    if magic != _MAGIC or count > _MAX_PARTS:
        raise ValueError(f"{path} is not a qjamfab params file")
    lengths = [
        _LENGTH.unpack_from(data, _PREFIX.size + i * _LENGTH.size)[0]
        for i in range(count)
    ]
    _, offsets, expected = _layout(lengths)
    if expected != size:
        raise ValueError(f"{path} is {size} bytes, its header says {expected}")
    return [data[o : o + n] for o, n in zip(offsets, lengths)]
