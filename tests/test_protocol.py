"""Protocol framing: frames, FrameReader and write_all over real pipes and
socket pairs, plus encode/decode with out-of-band numpy buffers."""

import os
import socket
import sys
import textwrap
import threading

import numpy as np
import pytest

from qjamfab import protocol
from qjamfab.errors import ProtocolError, QjamfabError
from qjamfab.links.handshake import start_direct
from qjamfab.links.transport import ProcessTransport
from qjamfab.links.workers import Link
from qjamfab.protocol import (
    KIND_NAMES,
    FrameReader,
    decode,
    encode,
    frame,
    frame_size,
    write_all,
)

pytestmark = pytest.mark.timeout(20)

MiB = 1 << 20


# --- helpers ----------------------------------------------------------------


class Channel:
    """One byte stream: a writev for the writer end, a readinto for the
    reader end, and close() for each side."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "pipe":
            r, w = os.pipe()
            self._rfile = os.fdopen(r, "rb", buffering=0)
            self._wfd = w
            self.readinto = self._rfile.readinto
            self.writev = lambda bufs: os.writev(self._wfd, bufs)
        else:
            self._a, self._b = socket.socketpair()
            self._a.settimeout(15)
            self._b.settimeout(15)
            self.readinto = self._b.recv_into
            self.writev = self._a.sendmsg
        self._writer_closed = False

    def close_writer(self):
        if self._writer_closed:
            return
        self._writer_closed = True
        if self.kind == "pipe":
            os.close(self._wfd)
        else:
            self._a.close()

    def close_reader(self):
        if self.kind == "pipe":
            self._rfile.close()
        else:
            self._b.close()

    def close(self):
        self.close_writer()
        self.close_reader()


@pytest.fixture(params=["pipe", "socketpair"])
def channel(request):
    ch = Channel(request.param)
    yield ch
    ch.close()


def run_writer(channel, frames, close=True):
    """Write frames (lists of buffers) in a thread; return (thread, errors)."""
    errors = []

    def target():
        try:
            for buffers in frames:
                write_all(channel.writev, buffers)
        except BaseException as e:  # reported by the test
            errors.append(e)
        finally:
            if close:
                channel.close_writer()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, errors


def read_all_frames(channel, count, **reader_kw):
    """Read `count` frames in a thread, then expect EOF."""
    result = {"frames": [], "eof": False, "error": None}

    def target():
        reader = FrameReader(channel.readinto, **reader_kw)
        try:
            for _ in range(count):
                kind, _, head, parts = reader.read()
                result["frames"].append((kind, head, parts))
            try:
                reader.read()
            except EOFError:
                result["eof"] = True
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def transfer(channel, frames, **reader_kw):
    reader_thread, result = read_all_frames(channel, len(frames), **reader_kw)
    writer_thread, errors = run_writer(channel, frames)
    reader_thread.join(15)
    assert not reader_thread.is_alive(), "reader hung"
    if result["error"] is not None:
        # Unblock a writer stuck on a full pipe or socket, then report.
        channel.close_reader()
        writer_thread.join(15)
        raise result["error"]
    writer_thread.join(15)
    assert not writer_thread.is_alive(), "writer hung"
    assert not errors, errors
    assert result["eof"], "expected EOFError after the last frame"
    return result["frames"]


# --- KIND_NAMES and frame shapes -------------------------------------------


def test_kind_names_maps_every_kind():
    expected = {
        1: "HELLO",
        2: "TASK",
        3: "STATE",
        4: "REFS",
        5: "RESULT",
        6: "ERROR",
        7: "FUNC",
        8: "HEARTBEAT",
        9: "LOG",
        10: "CLEAR",
        11: "STATS",
        12: "CANCEL",
        13: "ATTACH",
        14: "COLLECT",
        15: "GONE",
        16: "PACKAGES",
        17: "FETCH",
        18: "PARAMS",
        19: "TASKS",
        20: "SPOOL",
    }
    assert KIND_NAMES == expected
    for value, name in expected.items():
        assert getattr(protocol, name) == value


def test_a_frame_names_its_worker():
    data = b"".join(
        bytes(b) for b in frame(protocol.TASK, {"task": 1}, encode([1]), worker=513)
    )
    kind, worker, head, payload = FrameReader(one_byte_readinto(data)).read()
    assert (kind, worker, head, decode(payload)) == (
        protocol.TASK,
        513,
        {"task": 1},
        [1],
    )
    agent = b"".join(
        bytes(b) for b in frame(protocol.ATTACH, {}, worker=protocol.AGENT)
    )
    assert FrameReader(one_byte_readinto(agent)).read()[1] == protocol.AGENT


def test_a_line_before_the_frames_is_read_up_to_its_newline():
    data = b"qjamfab: runtime ok\n" + b"".join(
        bytes(b) for b in frame(protocol.HELLO, {"version": 3})
    )
    reader = FrameReader(one_byte_readinto(data))
    assert reader.read_line(256) == b"qjamfab: runtime ok\n"
    assert reader.read()[2] == {"version": 3}
    assert FrameReader(one_byte_readinto(b"x" * 300)).read_line(256) == b"x" * 256


def test_small_frame_is_one_buffer():
    bufs = frame(protocol.TASK, {"task": 1, "func": "abc"}, encode([1, 2, 3]))
    assert len(bufs) == 1
    raw = bytes(bufs[0])
    assert raw[:2] == b"QJ"
    assert raw[2] == protocol.TASK
    assert frame_size(bufs) == len(raw)


def test_large_frame_keeps_payload_buffers_separate():
    arr = np.arange(MiB // 8, dtype=np.float64)
    payload = encode(arr)
    bufs = frame(protocol.REFS, {"ref": "r"}, payload)
    assert len(bufs) == 1 + len(payload)
    assert frame_size(bufs) > arr.nbytes


def test_encode_numpy_array_goes_out_of_band():
    arr = np.random.default_rng(0).random(MiB // 8)  # 1 MiB of float64
    assert arr.nbytes == MiB and arr.flags.c_contiguous
    parts = encode(arr)
    assert len(parts) >= 2
    assert len(parts[0]) < 1024, "array bytes went into the main stream"
    assert sum(memoryview(p).nbytes for p in parts[1:]) == arr.nbytes
    back = decode(parts)
    assert isinstance(back, np.ndarray)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_encode_decode_plain_objects():
    obj = {"a": [1, 2.5, "x"], "b": (None, True), "c": b"bytes" * 10}
    parts = encode(obj)
    assert len(parts) == 1
    assert decode(parts) == obj


# --- round trips over real streams -----------------------------------------


def test_small_frame_round_trip(channel):
    head = {"task": 7, "func": "f" * 40, "refs": ["r1", "r2"]}
    [(kind, got_head, payload)] = transfer(
        channel, [frame(protocol.TASK, head, encode((3, 4.5)))]
    )
    assert kind == protocol.TASK
    assert got_head == head
    assert decode(payload) == (3, 4.5)


def test_frame_without_payload_round_trip(channel):
    [(kind, head, payload)] = transfer(channel, [frame(protocol.STATS, {})])
    assert (kind, head, payload) == (protocol.STATS, {}, [])


def test_large_frame_round_trip_with_numpy(channel):
    rng = np.random.default_rng(1)
    a = rng.random((512, 1024))  # 4 MiB float64
    b = rng.integers(0, 1 << 30, size=MiB // 4, dtype=np.int32)  # 1 MiB
    obj = {"a": a, "b": b, "label": "slice-0"}
    parts = encode(obj)
    assert len(parts) == 3
    assert len(parts[0]) < 4096
    bufs = frame(protocol.REFS, {"ref": "abc"}, parts)
    assert len(bufs) > 1
    [(kind, head, payload)] = transfer(channel, [bufs])
    assert kind == protocol.REFS and head == {"ref": "abc"}
    assert [len(p) for p in payload] == [memoryview(p).nbytes for p in parts]
    back = decode(payload)
    assert back["label"] == "slice-0"
    np.testing.assert_array_equal(back["a"], a)
    np.testing.assert_array_equal(back["b"], b)
    assert back["a"].shape == a.shape and back["b"].dtype == b.dtype


def test_many_frames_back_to_back(channel):
    rng = np.random.default_rng(2)
    frames, expected = [], []
    for i in range(300):
        if i % 50 == 7:
            value = rng.random(20_000 + i)  # large, several buffers
        elif i % 3 == 0:
            value = list(range(i))
        else:
            value = "x" * i
        kind = 1 + i % 11
        head = {"i": i}
        frames.append(frame(kind, head, encode(value)))
        expected.append((kind, head, value))
    got = transfer(channel, frames)
    assert len(got) == len(expected)
    for (kind, head, payload), (ekind, ehead, evalue) in zip(got, expected):
        assert kind == ekind and head == ehead
        value = decode(payload)
        if isinstance(evalue, np.ndarray):
            np.testing.assert_array_equal(value, evalue)
        else:
            assert value == evalue


def test_frames_with_small_reader_buffer(channel):
    """A part larger than the reader's buffer is read straight into place."""
    arr = np.arange(100_000, dtype=np.float64)
    frames = [frame(protocol.RESULT, {"task": i}, encode(arr + i)) for i in range(5)]
    got = transfer(channel, frames, buffer_size=256)
    for i, (kind, head, payload) in enumerate(got):
        assert kind == protocol.RESULT and head == {"task": i}
        np.testing.assert_array_equal(decode(payload), arr + i)


# --- readers and writers that move few bytes at a time ---------------------


def one_byte_readinto(data: bytes):
    pos = 0

    def readinto(view):
        nonlocal pos
        if pos >= len(data) or len(view) == 0:
            return 0
        view[0] = data[pos]
        pos += 1
        return 1

    return readinto


def test_reader_fed_one_byte_at_a_time():
    arr = np.arange(5000, dtype=np.float64)
    frames = [
        frame(protocol.HELLO, {"version": protocol.VERSION}),
        frame(protocol.REFS, {"ref": "r"}, encode(arr)),
        frame(protocol.LOG, {"text": "hello\n"}, encode("small")),
    ]
    data = b"".join(bytes(b) for f in frames for b in f)
    reader = FrameReader(one_byte_readinto(data))
    kind, _, head, payload = reader.read()
    assert (kind, head, payload) == (protocol.HELLO, {"version": protocol.VERSION}, [])
    kind, _, head, payload = reader.read()
    assert kind == protocol.REFS and head == {"ref": "r"}
    np.testing.assert_array_equal(decode(payload), arr)
    kind, _, head, payload = reader.read()
    assert kind == protocol.LOG and decode(payload) == "small"
    with pytest.raises(EOFError):
        reader.read()


def test_reader_fed_one_byte_at_a_time_small_buffer():
    arr = np.arange(3000, dtype=np.int64)
    data = b"".join(bytes(b) for b in frame(protocol.REFS, {"ref": "r"}, encode(arr)))
    reader = FrameReader(one_byte_readinto(data), buffer_size=64)
    kind, _, head, payload = reader.read()
    np.testing.assert_array_equal(decode(payload), arr)


def test_write_all_with_partial_writev():
    arr = np.arange(10_000, dtype=np.float64)
    frames = [
        frame(protocol.TASK, {"task": 1}, encode([1, 2, 3])),
        frame(protocol.REFS, {"ref": "r"}, encode(arr)),
        frame(protocol.STATS, {}),
    ]
    out = bytearray()
    calls = []

    def writev(views):
        calls.append(len(views))
        budget = 7
        for v in views:
            chunk = bytes(v[:budget])
            out.extend(chunk)
            budget -= len(chunk)
            if not budget:
                break
        return 7 - budget

    for f in frames:
        write_all(writev, f)
    expected = b"".join(bytes(b) for f in frames for b in f)
    assert bytes(out) == expected
    assert len(calls) >= len(expected) // 7
    reader = FrameReader(one_byte_readinto(bytes(out)))
    assert reader.read()[2] == {"task": 1}
    np.testing.assert_array_equal(decode(reader.read()[3]), arr)
    assert reader.read()[0] == protocol.STATS


def test_write_all_partial_writev_over_socketpair():
    """A writev that sends at most 7 bytes per call, on a real socket."""
    a, b = socket.socketpair()
    a.settimeout(15)
    b.settimeout(15)
    try:
        arr = np.arange(2000, dtype=np.float64)
        bufs = frame(protocol.REFS, {"ref": "r"}, encode(arr))

        def writev(views):
            budget, chosen = 7, []
            for v in views:
                chosen.append(v[:budget])
                budget -= len(chosen[-1])
                if not budget:
                    break
            return a.sendmsg(chosen)

        errors = []

        def writer():
            try:
                write_all(writev, bufs)
            except BaseException as e:
                errors.append(e)
            finally:
                a.close()

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        reader = FrameReader(b.recv_into)
        kind, _, head, payload = reader.read()
        t.join(15)
        assert not t.is_alive() and not errors
        assert kind == protocol.REFS and head == {"ref": "r"}
        np.testing.assert_array_equal(decode(payload), arr)
        with pytest.raises(EOFError):
            reader.read()
    finally:
        a.close()
        b.close()


def test_write_all_skips_empty_buffers():
    out = bytearray()

    def writev(views):
        assert all(len(v) for v in views)
        n = sum(len(v) for v in views)
        for v in views:
            out.extend(v)
        return n

    write_all(writev, [b"", b"abc", bytearray(), memoryview(b"de"), b""])
    assert bytes(out) == b"abcde"


def test_write_all_nothing_to_write():
    def writev(views):  # pragma: no cover - must not be called
        raise AssertionError("writev called with nothing to write")

    write_all(writev, [])
    write_all(writev, [b""])


# --- end of stream and garbage ----------------------------------------------


def test_eof_between_frames(channel):
    frames = [frame(protocol.HEARTBEAT, {"n": i}) for i in range(3)]
    got = transfer(channel, frames)  # transfer asserts EOFError afterwards
    assert [h for _, h, _ in got] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_eof_on_empty_stream(channel):
    channel.close_writer()
    with pytest.raises(EOFError):
        FrameReader(channel.readinto).read()


@pytest.mark.parametrize("cut", ["header", "lengths", "head", "payload"])
def test_eof_inside_a_frame(channel, cut):
    arr = np.arange(20_000, dtype=np.float64)
    data = b"".join(
        bytes(b) for b in frame(protocol.REFS, {"ref": "r" * 30}, encode(arr))
    )
    nparts = int.from_bytes(data[5:7], "big")
    head_len = int.from_bytes(data[7:15], "big")
    prefix = 7 + 8 * nparts
    where = {
        "header": 3,
        "lengths": 9,
        "head": prefix + head_len // 2,
        "payload": prefix + head_len + 1000,
    }[cut]
    assert where < len(data)
    complete = frame(protocol.HEARTBEAT, {})
    thread, errors = run_writer(channel, [complete, [data[:where]]])
    reader = FrameReader(channel.readinto)
    assert reader.read()[0] == protocol.HEARTBEAT
    with pytest.raises(EOFError):
        reader.read()
    thread.join(15)
    assert not errors


def test_eof_inside_large_part_read_directly():
    """EOF while a big part is read straight into its own buffer."""
    arr = np.arange(200_000, dtype=np.float64)
    data = b"".join(bytes(b) for b in frame(protocol.REFS, {"ref": "r"}, encode(arr)))
    cut = data[: len(data) - 500_000]
    pos = 0

    def readinto(view):
        nonlocal pos
        n = min(len(view), len(cut) - pos, 4096)
        view[:n] = cut[pos : pos + n]
        pos += n
        return n

    with pytest.raises(EOFError):
        FrameReader(readinto, buffer_size=1024).read()


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"Traceback (most recent call last):\n",
        b"\x00\x00\x00\x00\x00\x00\x00\x00",
    ],
)
def test_bad_magic_is_protocol_error(channel, garbage):
    thread, errors = run_writer(channel, [[garbage]])
    with pytest.raises(ProtocolError) as info:
        FrameReader(channel.readinto).read()
    assert "not a qjamfab endpoint" in str(info.value)
    thread.join(15)
    assert not errors


def test_zero_parts_is_protocol_error():
    data = (
        b"QJ"
        + bytes([protocol.TASK])
        + (0).to_bytes(2, "big")
        + (0).to_bytes(2, "big")
        + b"x" * 20
    )
    with pytest.raises(ProtocolError, match="not a qjamfab endpoint"):
        FrameReader(one_byte_readinto(data)).read()


def test_protocol_error_is_a_qjamfab_error():
    from qjamfab.errors import QjamfabError

    assert issubclass(ProtocolError, QjamfabError)


# --- many out-of-band buffers ------------------------------------------------


@pytest.mark.parametrize("count", [100, 9000])
def test_frame_with_many_out_of_band_buffers(channel, count):
    """A payload of many small arrays: one out-of-band part per array.

    With 9000 arrays the lengths table (8 bytes per part) is larger than
    the reader's default 64 KiB buffer.
    """
    arrays = [np.full(3, i, dtype=np.int64) for i in range(count)]
    parts = encode(arrays)
    assert len(parts) == count + 1
    [(kind, head, payload)] = transfer(
        channel, [frame(protocol.RESULT, {"task": 1}, parts)]
    )
    back = decode(payload)
    assert len(back) == count
    assert all(int(a[0]) == i for i, a in enumerate(back))


def test_head_larger_than_reader_buffer(channel):
    head = {"refs": [f"{i:064x}" for i in range(2000)]}  # ~130 KB encoded
    assert len(protocol.encode_head(head)) > 1 << 16
    [(kind, got, payload)] = transfer(channel, [frame(protocol.TASK, head)])
    assert got == head and payload == []


def test_more_parts_than_the_header_can_count():
    """nparts is a u16: a payload with more than 65535 out-of-band buffers
    must either travel (e.g. pickled in-band) or fail with a qjamfab error,
    never with a bare struct.error."""
    from qjamfab.errors import QjamfabError

    arrays = [np.full(1, i, dtype=np.int64) for i in range(70_000)]
    try:
        bufs = frame(protocol.RESULT, {"task": 1}, encode(arrays))
    except QjamfabError:
        return
    data = b"".join(bytes(b) for b in bufs)
    pos = 0

    def readinto(view):
        nonlocal pos
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
        return n

    kind, _, head, payload = FrameReader(readinto).read()
    back = decode(payload)
    assert len(back) == len(arrays) and int(back[-1][0]) == 69_999


# --- frame heads are plain data (issue 21 item 7) ---------------------------


def _hostile_peer(path: str) -> list[str]:
    """argv of a fake host whose first frame's head is a pickle that,
    unpickled, creates `path` (as a replaced python3 on a host could)."""
    code = textwrap.dedent(f"""\
        import os, pickle, sys
        from qjamfab import protocol
        class Evil:
            def __reduce__(self):
                return (open, ({path!r}, "w"))
        head = pickle.dumps({{"version": protocol.VERSION, "x": Evil()}}, protocol=5)
        for b in protocol.frame_raw(protocol.HELLO, head):
            os.write(1, b)
        sys.stdin.buffer.read()
        """)
    return [sys.executable, "-c", code]


def test_a_host_answering_with_a_pickled_head_runs_nothing_here(tmp_path):
    target = tmp_path / "created-by-the-host"
    transport = ProcessTransport("evil", _hostile_peer(str(target)))
    try:
        transport.set_read_timeout(15)
        with pytest.raises(ProtocolError) as info:
            FrameReader(transport.readinto).read()
    finally:
        transport.close()
    assert (
        str(info.value)
        .splitlines()[0]
        .startswith(
            "a frame head that is a pickle, which protocol "
            f"{protocol.VERSION} never reads: the peer runs an older qjamfab "
            "runtime (stop its workers"
        )
    )
    assert not target.exists()


def test_a_link_to_a_host_with_a_pickled_head_fails_and_runs_nothing(tmp_path):
    target = tmp_path / "created-by-the-host"
    link = Link(
        "evil",
        ProcessTransport("evil", _hostile_peer(str(target))),
        agent=False,
        stall_timeout=5.0,
    )
    with pytest.raises(QjamfabError, match="a frame head that is a pickle") as exc:
        start_direct(link, "evil")
    assert not target.exists()
    # It wrote something, only not our protocol; and it ended at the end
    # of its input rather than being waited for and killed.
    assert "what it wrote is not qjamfab's protocol" in str(exc.value)
    assert "wrote nothing" not in str(exc.value)
    assert exc.value.exit_status == 0  # type: ignore[attr-defined]


def test_heads_cross_as_plain_data():
    head = {
        "task": 3,
        "refs": None,
        "slices": (0, 1),  # a tuple arrives as a list
        "compute_s": 0.25,
        "params": True,
        "base": "/home/u/\udcff",  # a path decoded with surrogateescape
        "failed": {"2": "why"},
    }
    data = protocol.encode_head(head)
    assert data.isascii() and not data.startswith(b"\x80")
    assert protocol.decode_head(data) == {**head, "slices": [0, 1]}
    for bad in ({"x": b"bytes"}, {"x": {1, 2}}, {"x": object()}):
        with pytest.raises(TypeError):
            protocol.encode_head(bad)


def test_head_codec_is_plain_json_either_way():
    """encode_head writes what json.dumps writes (compact, ASCII), and
    decode_head reads any JSON dict the way json.loads does: around
    whitespace too; trailing data is refused as before."""
    import json

    heads = [
        {"task": 7, "run": 6, "refs": ["a" * 64] * 4, "park": None, "x": 1.5e-07},
        {"text": "caf\u00e9 \udcff\n", "nested": {"k": [True, False, [], {}]}},
        {},
    ]
    for head in heads:
        data = protocol.encode_head(head)
        assert data == json.dumps(head, separators=(",", ":")).encode("ascii")
        assert protocol.decode_head(data) == json.loads(data)
        assert protocol.decode_head(b" \n" + data + b" ") == head
    with pytest.raises(ProtocolError, match="not JSON .*Extra data"):
        protocol.decode_head(b'{"task":1}{"task":2}')
    with pytest.raises(TypeError, match="not JSON serializable"):
        protocol.encode_head({"x": b"bytes"})
