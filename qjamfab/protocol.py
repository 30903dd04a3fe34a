"""The wire protocol: frames, message kinds and object encoding.

Standard library only: this module is shipped to workers as source and runs
on both ends. A frame is

    "QJ" | kind: u8 | worker: u16 | nparts: u16 | nparts x length: u64 |
    part 0 | part 1 ...

`worker` names the worker a frame is for or from: a host's one stream
carries all of its workers' frames, and its agent (runtime/agent.py) sends
them on to the right daemon. AGENT marks frames for or from the agent
itself; on a stream to a single worker (local workers, the agent's own
socket to each daemon) it is 0. Part 0 is the message head, a small
dict of plain data (str, int, float, bool, None, lists, dicts with str
keys) as ASCII JSON: read without pickle, so a peer's head cannot run code
here. The other parts are the payload, a pickled object split by pickle
protocol 5 into its main stream and out-of-band buffers, so numpy arrays
cross without being copied into a pickle (`encode` / `decode`). A REFS
frame's payload is stored on the worker's disk exactly as it arrived.
"""

from __future__ import annotations

import functools
import io
import json
import mmap
import os
import pickle
import stat
import struct
from collections.abc import Callable, Sequence

from .errors import ProtocolError

VERSION = 5  # 5: heads are JSON (4 pickled them)
AGENT = 0xFFFF  # the worker field of frames for or from a host's agent

# Message kinds. qjam's five (TASK, STATE, REFS, RESULT, ERROR) plus what
# long-lived workers and host agents need.
HELLO = 1  # worker -> master, first frame: version, name, pid, versions;
# from the agent: the host's python, cores, base, runtime
TASK = 2  # master -> worker: {task, run, func, refs, slices, leaves,
# params: bool, hold: bool, park: bytes}; payload = params,
# sent with a run's first task to a worker only (params false:
# the run's params again); slices: their indices, leaves: how
# many the run has (results combine in reduce.ReduceTree);
# hold: the agent keeps the result for COLLECT; offer (with
# hold): held results of the run under this many bytes are
# combined and sent unasked once none is left to finish on
# the host; park: a result of this many bytes or more waits
# at the worker for FETCH;
# broadcasts (optional): the refs the params name, held in the
# cache as slices are (a worker lacking one is blocked on it)
STATE = 3  # worker -> master: {task, state: "blocked", refs, func};
# "cancelled"; "parked" {compute_s, slices, bytes}: the result
# waits for FETCH (or CANCEL drops it); from the agent (AGENT),
# {state: "done", tasks: [[worker, task, run, compute_s, slices,
# bytes], ...]}: held tasks done since its last such note
REFS = 4  # master -> worker: {ref, broadcast?}; payload = the slice
# (or a Broadcast: for every worker of the host). From the
# agent to its daemons {ref, stored: file key}, no payload:
# the slice is in the host's cache, sealed, as that file; or
# {ref, memory: true} + the slice: no room for it on disk
RESULT = 5  # worker -> master: {task, compute_s, slices}; payload =
# [(lo, size, value)], ReduceTree nodes. From the agent:
# {tasks} for a COLLECT; {tasks, notes} offered (notes: as
# "done" says, of tasks not told yet)
ERROR = 6  # worker -> master: {task, type, message, traceback}
FUNC = 7  # master -> worker: {hash}; payload = [cloudpickled job]. To the
# agent (AGENT): for every worker of the host, each given it before its
# first TASK of that job
HEARTBEAT = 8  # worker -> master, every HEARTBEAT_INTERVAL_S while
# connected; the agent's own: {stale: [silent workers]}; for a
# daemon it handed the stream to: {}, in its place, while it runs
LOG = 9  # worker -> master: {text} captured from fds 1 and 2
CLEAR = 10  # master -> worker; answered by CLEAR {entries, bytes}
STATS = 11  # master -> worker; answered by STATS {...}
CANCEL = 12  # master -> worker: {task}; a queued task is dropped and
# answered by STATE {task, state: "cancelled"}
ATTACH = 13  # master -> agent: {count, idle_timeout}; the agent starts
# missing daemons, connects to each, forwards their HELLOs
# and answers ATTACH {workers: [k...], failed: {k: reason}}
COLLECT = 14  # master -> agent: {run, func, leaves, tasks: [held task
# ids]}; answered by RESULT {tasks}, their nodes combined
# with the job's reduce
GONE = 15  # agent -> master, for worker k: its daemon's connection
# ended {reason, tail, status, task: the one it ran, or null}
PACKAGES = 16  # master -> agent: {offer}, {install} + [zip] or {use}; the
# agent answers offer and use (runtime/packages.py); agent ->
# daemon: {paths, packages} to put on sys.path
FETCH = 17  # master -> worker: {task}; a parked result, answered by
# its RESULT
PARAMS = 18  # a run's params, before its first TASK (whose params is
# then false): master -> agent {run} + the params; agent or master ->
# worker {run, path}: they are in shared memory there
# (runtime/shared_params.py), or {run} + the params
TASKS = 19  # master -> agent: a run's first tasks for the host's workers
# in one frame: a TASK head without task, slices, refs and params, and
# tasks: [[worker, task, slices, refs, params], ...]; payload = the
# params when an entry's params is true. The agent passes each on as
# that worker's TASK
SPOOL = 20  # either way over a stream that holds big frames back (srun):
# {name}; the frame itself is in that file of the session's spool
# directory, which both ends see (runtime/spool.py)

KIND_NAMES = {
    HELLO: "HELLO",
    TASK: "TASK",
    STATE: "STATE",
    REFS: "REFS",
    RESULT: "RESULT",
    ERROR: "ERROR",
    FUNC: "FUNC",
    HEARTBEAT: "HEARTBEAT",
    LOG: "LOG",
    CLEAR: "CLEAR",
    STATS: "STATS",
    CANCEL: "CANCEL",
    ATTACH: "ATTACH",
    COLLECT: "COLLECT",
    GONE: "GONE",
    PACKAGES: "PACKAGES",
    FETCH: "FETCH",
    PARAMS: "PARAMS",
    TASKS: "TASKS",
    SPOOL: "SPOOL",
}

HEARTBEAT_INTERVAL_S = 1.0
# A big buffer is hashed in blocks of this size, on both ends alike: a
# master's ref of an array (content_refs.py) and a host's cache seal
# (runtime/sealed.py), so the master's digests of a slice's blocks serve
# as the host's, sent in its REFS head ("blocks").
HASH_BLOCK = 8 << 20

_MAGIC = b"QJ"
_HEADER = struct.Struct("!2sBHH")
_LENGTH = struct.Struct("!Q")
_IOV_MAX = 512
_MAX_PARTS = 0xFFFF
_LAZY_PART = 1 << 20  # under limits, parts this big fill a mapping lazily
_NOT_QJAMFAB = (
    f"the peer is not a qjamfab endpoint of protocol version "
    f"{VERSION}, or the stream was corrupted"
)
# ensure_ascii: a str with lone surrogates (a path decoded with
# surrogateescape) crosses as an escape and comes back the same.
_HEAD_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)
_HEAD_DECODER = json.JSONDecoder()


def _one_shot_encoder() -> Callable[[dict], str]:
    """JSONEncoder.encode without building its C encoder at every call
    (half its time for a TASK head): the C encoder that encode() makes,
    made once. Where this Python's json has none, or makes it otherwise,
    encode() itself."""
    try:
        from json.encoder import (  # type: ignore[attr-defined]
            c_make_encoder,
            encode_basestring_ascii,
        )

        c_encode = c_make_encoder(
            None,  # check_circular=False: no markers
            _HEAD_ENCODER.default,
            encode_basestring_ascii,
            None,
            ":",
            ",",
            False,
            False,
            True,
        )
        sample = {"a": [1, 2.5, None, True, "\udcff"], "b": {"c": "d"}}
        if "".join(c_encode(sample, 0)) == _HEAD_ENCODER.encode(sample):
            return lambda head: "".join(c_encode(head, 0))
    except (ImportError, TypeError):
        pass
    return _HEAD_ENCODER.encode


_encode_json = _one_shot_encoder()


def encode(obj: object, dumps: Callable = pickle.dumps) -> list:
    """Pickle obj (protocol 5) into [main stream, *out-of-band buffers]."""
    buffers: list = []
    main = dumps(obj, protocol=5, buffer_callback=buffers.append)
    if len(buffers) >= _MAX_PARTS - 2:
        # More arrays than a frame can count: carry them in-band instead.
        return [dumps(obj, protocol=5)]
    return [main, *(b.raw() for b in buffers)]


def decode(
    parts: Sequence, persistent_load: Callable[[str], object] | None = None
) -> object:
    """The inverse of encode; `persistent_load` gives the object a
    persistent id names (a run's params name their broadcasts so)."""
    if persistent_load is None:
        return pickle.loads(parts[0], buffers=parts[1:])
    unpickler = pickle.Unpickler(io.BytesIO(parts[0]), buffers=parts[1:])
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()


def encode_head(head: dict) -> bytes:
    """A frame head as bytes: JSON. Tuples become lists and dict keys
    strings on the way; anything not plain data (bytes, sets, objects)
    is a TypeError here, at the sender."""
    return _encode_json(head).encode("ascii")


def decode_head(data: bytes | bytearray | mmap.mmap) -> dict:
    """The inverse of encode_head; anything else, a pickle above all, is
    refused with ProtocolError (never unpickled)."""
    raw = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    if raw[:1] == b"\x80":  # a pickle's PROTO opcode: an older qjamfab
        raise ProtocolError(
            f"a frame head that is a pickle, which protocol {VERSION} never "
            "reads: the peer runs an older qjamfab runtime (stop its workers "
            "with stop-workers and start again with this qjamfab) or is not "
            "qjamfab"
        )
    try:
        head = _parse(raw.decode("ascii"))
    except (ValueError, RecursionError) as exc:  # not ASCII, not JSON, too deep
        raise ProtocolError(
            f"a frame head that is not JSON ({type(exc).__name__}: "
            f"{str(exc):.200}): {_NOT_QJAMFAB}"
        ) from None
    if not isinstance(head, dict):
        raise ProtocolError(
            f"a frame head that is a {type(head).__name__}, not a dict: {_NOT_QJAMFAB}"
        )
    return head


def _parse(text: str) -> object:
    """JSONDecoder.decode(text): a head as encode_head writes it (no
    whitespace around) in one scan, without decode()'s two regex matches;
    anything else through decode() itself, which says what is wrong."""
    try:
        head, end = _HEAD_DECODER.scan_once(text, 0)  # type: ignore[attr-defined]
    except StopIteration:  # no value at the start: decode() raises
        end = -1
    return head if end == len(text) else _HEAD_DECODER.decode(text)


def frame(kind: int, head: dict, payload: Sequence = (), worker: int = 0) -> list:
    """The buffers that make up one frame, ready for a vectored write."""
    return frame_raw(kind, encode_head(head), payload, worker)


def frame_raw(
    kind: int, head_bytes: bytes, payload: Sequence = (), worker: int = 0
) -> list:
    """A frame from a head already encoded (encode_head); tests use it to
    send heads no sender would."""
    lengths = [len(head_bytes), *(memoryview(p).nbytes for p in payload)]
    prefix = _HEADER.pack(_MAGIC, kind, worker, len(lengths)) + _lengths(
        len(lengths)
    ).pack(*lengths)
    if sum(lengths) - lengths[0] < 4096:
        # Small frames leave in one piece: one syscall, one SSH packet.
        return [b"".join([prefix, head_bytes, *payload])]
    return [prefix + head_bytes, *payload]


def frame_size(buffers: Sequence) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def frame_kind(buffers: Sequence) -> int:
    """The kind of the frame whose buffers these are (frame's)."""
    return int(memoryview(buffers[0]).cast("B")[2])


def write_all(
    writev: Callable[[list], int],
    buffers: Sequence,
    blocked: Callable[[], None] | None = None,
) -> None:
    """Write every byte of buffers with writev, which may write partially;
    when it writes nothing (a non-blocking stream that is full), call
    `blocked()`, which waits for room (or raises)."""
    if len(buffers) == 1 and type(buffers[0]) is bytes and buffers[0]:
        # A small frame is one bytes object (frame_raw): mostly written
        # whole by the first call.
        whole = buffers[0]
        written = writev([whole])
        if written == len(whole):
            return
        buffers = [memoryview(whole)[written:]]
        if not written and blocked is not None:
            blocked()
    views = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
    while views:
        written = writev(views[:_IOV_MAX])
        if not written and blocked is not None:
            blocked()
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0


class FrameReader:
    """Reads frames from `readinto(memoryview) -> int` (0 at end of stream).

    Small reads are served from an internal buffer; large parts are read
    straight into their own buffer, so a big slice is copied only once.

    Limits, for a stream whose peer may be anything (a daemon's socket
    takes any client of the same user): a frame's head is at most
    `max_head` bytes and any other part read into memory at most
    `max_part`. Under limits, a part of 1 MiB or more must also fit in
    the host's available memory, and it is an anonymous mapping whose
    pages are committed as its bytes arrive: a declared length costs
    nothing until the data comes. Breaking a limit raises ProtocolError,
    with the stream left inside the frame: close it.
    """

    def __init__(
        self,
        readinto: Callable[[memoryview], int],
        buffer_size: int = 1 << 16,
        max_head: int | None = None,
        max_part: int | None = None,
    ):
        self._readinto = readinto
        self._buf = bytearray(buffer_size)
        self._start = 0
        self._end = 0
        self.max_head = max_head
        self.max_part = max_part

    def buffered(self) -> bool:
        return self._end > self._start

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            remaining = self._end - self._start
            self._buf[:remaining] = self._buf[self._start : self._end]
            self._start, self._end = 0, remaining
        n = self._readinto(memoryview(self._buf)[self._end :])
        if not n:
            raise EOFError("stream closed")
        self._end += n

    def _buffer(self, n: int) -> int:
        """Wait until n bytes (at most the buffer's size) are buffered;
        where they start in it."""
        while self._end - self._start < n:
            self._fill()
        return self._start

    def read_line(self, limit: int) -> bytes:
        """Bytes up to and including the next newline (at most `limit`):
        what a host says before its frames begin."""
        while True:
            end = self._buf.find(b"\n", self._start, self._end)
            if end >= 0 or self._end - self._start >= limit:
                stop = end + 1 if end >= 0 else self._start + limit
                line = bytes(self._buf[self._start : stop])
                self._start = stop
                return line
            self._fill()

    def read_part(self, n: int) -> bytearray | mmap.mmap:
        """The next n bytes: a bytearray, or under limits a mapping when
        n is 1 MiB or more."""
        start = self._start
        if n <= self._end - start and (self.max_part is None or n <= self.max_part):
            # Buffered whole (a head, a small payload): one slice copies it.
            self._start = start + n
            return self._buf[start : start + n]
        out = self._allocate(n)
        self.read_into(memoryview(out))
        return out

    def _allocate(self, n: int) -> bytearray | mmap.mmap:
        if self.max_part is None:
            return bytearray(n)
        if n > self.max_part:
            raise ProtocolError(
                f"a frame part of {n} bytes is over this endpoint's limit of "
                f"{self.max_part}: {_NOT_QJAMFAB}"
            )
        if n < _LAZY_PART:
            return bytearray(n)
        available = available_memory()
        if available is not None and n > available:
            raise ProtocolError(
                f"a frame part of {n} bytes does not fit in this host's "
                f"available memory ({available} bytes): free memory on the "
                "host, or send smaller slices and params"
            )
        try:
            return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
        except OSError as exc:  # ENOMEM: over what the kernel commits
            raise ProtocolError(
                f"a frame part of {n} bytes cannot be mapped "
                f"({exc.strerror}): free memory on the host, or send "
                "smaller slices and params"
            ) from exc

    def read_into(self, view: memoryview) -> None:
        """Fill view with the next len(view) bytes of the stream."""
        n = len(view)
        have = min(n, self._end - self._start)
        view[:have] = self._buf[self._start : self._start + have]
        self._start += have
        pos = have
        while pos < n:
            if n - pos < len(self._buf) // 4:
                self._fill()
                take = min(n - pos, self._end - self._start)
                view[pos : pos + take] = self._buf[self._start : self._start + take]
                self._start += take
                pos += take
            else:
                got = self._readinto(view[pos:])
                if not got:
                    raise EOFError("stream closed inside a frame")
                pos += got

    def read(self) -> tuple[int, int, dict, list]:
        """Next frame as (kind, worker, head, payload parts). EOFError at
        the end."""
        kind, worker, head, lengths = self.read_head()
        return kind, worker, head, [self.read_part(n) for n in lengths]

    def read_head(self) -> tuple[int, int, dict, list[int]]:
        """The next frame's kind, worker, head and payload part lengths.
        The parts follow in the stream: read them with `read_part` or
        `copy_to`."""
        start = self._buffer(_HEADER.size)
        magic, kind, worker, nparts = _HEADER.unpack_from(self._buf, start)
        self._start = start + _HEADER.size
        if magic != _MAGIC or nparts < 1:
            raise ProtocolError(f"bad frame header {magic!r}: {_NOT_QJAMFAB}")
        lengths = list(_lengths(nparts).unpack(self.read_part(_LENGTH.size * nparts)))
        if self.max_head is not None and lengths[0] > self.max_head:
            raise ProtocolError(
                f"a frame head of {lengths[0]} bytes is over this endpoint's "
                f"limit of {self.max_head}: {_NOT_QJAMFAB}"
            )
        head = decode_head(self.read_part(lengths[0]))
        return kind, worker, head, lengths[1:]

    def copy_to(self, fd: int, n: int, source_fd: int | None = None) -> None:
        """Move the next n bytes of the stream into file `fd`: what is
        buffered, then straight from `source_fd` with splice when it is a
        pipe (the kernel moves the bytes: no copy here, no memory), else
        through the buffer. When a write fails (a full disk), exactly the
        bytes written to fd have left the stream: the caller can read the
        rest of the frame from here."""
        splice_fd = (
            source_fd if source_fd is not None and _can_splice(source_fd) else None
        )
        while n:
            if self._end == self._start and splice_fd is not None:
                moved = os.splice(splice_fd, fd, n)
                if not moved:
                    raise EOFError("stream closed inside a frame")
                n -= moved
                continue
            if self._end == self._start:
                self._fill()
            take = min(n, self._end - self._start)
            written = os.write(
                fd, memoryview(self._buf)[self._start : self._start + take]
            )
            self._start += written
            n -= written


@functools.lru_cache(maxsize=64)
def _lengths(nparts: int) -> struct.Struct:
    """The lengths of a frame of nparts parts, as one struct."""
    return struct.Struct(f"!{nparts}Q")


def available_memory() -> int | None:
    """Bytes the host can still give a process without swapping
    (MemAvailable), None where that is unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _can_splice(fd: int) -> bool:
    try:
        return hasattr(os, "splice") and stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False
