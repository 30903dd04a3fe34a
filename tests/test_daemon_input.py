"""A worker daemon survives whatever reaches its socket (issue 11 item 5):
each bad input closes that connection only, the daemon keeps listening and
serves the next client, and a declared length costs no memory until its
bytes come. Also: a slice damaged under a running task is fetched again,
not blamed on the job; a blocked task asks once for each slice it lacks,
and again only for one gone since; a bad cache limit stops a worker with its message;
the daemon's own tracebacks go to its log, not into the job output."""

import hashlib
import mmap
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from qjamfab import protocol, runtime
from qjamfab.errors import ProtocolError
from qjamfab.runtime import serving
from qjamfab.runtime.shared_params import HostParams
from tests.daemon_client import Daemon, job, result_value, serves, task_head

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
_HEADER = struct.Struct("!2sBHH")


def header(kind: int, lengths: list[int]) -> bytes:
    """A frame's prefix announcing parts of these lengths."""
    return _HEADER.pack(b"QJ", kind, 0, len(lengths)) + b"".join(
        struct.pack("!Q", n) for n in lengths
    )


def random_bytes() -> bytes:
    data = random.Random(11).randbytes(64 * 1024)
    assert not data.startswith(b"QJ")
    return data


@pytest.fixture
def daemon(qjamfab_home):
    d = Daemon(str(qjamfab_home))
    yield d
    d.stop()


def small(d: Daemon) -> bool:
    return d.rss() < 150 * MiB


BAD_FRAMES = {
    "random bytes": random_bytes(),
    "an unknown frame kind": b"".join(protocol.frame(200, {})),
    "a head length of 2**62": header(protocol.TASK, [2**62]) + b"x" * 100,
    "a part over the limit": header(
        protocol.FUNC, [len(protocol.encode_head({"hash": "h"})), 2**40]
    )
    + protocol.encode_head({"hash": "h"}),
    "a head that is not JSON": b"".join(
        protocol.frame_raw(protocol.TASK, b'{"task": 1, this is not JSON')
    ),
    "a pickled head": b"".join(
        protocol.frame_raw(protocol.TASK, pickle.dumps({"task": 1}, protocol=5))
    ),
    "a head that is not a dict": b"".join(
        protocol.frame_raw(protocol.TASK, b"[1, 2, 3]")
    ),
    "a TASK missing keys": b"".join(protocol.frame(protocol.TASK, {"task": 1})),
    "a TASK naming a file outside the cache": b"".join(
        protocol.frame(protocol.TASK, task_head(1, "f", refs=["../../etc/passwd"]))
    ),
    "a TASK naming a broadcast outside the cache": b"".join(
        protocol.frame(
            protocol.TASK, {**task_head(1, "f"), "broadcasts": ["../../etc/passwd"]}
        )
    ),
    "a FUNC without the job": b"".join(protocol.frame(protocol.FUNC, {"hash": "h"})),
    "a FETCH of a result not parked": b"".join(
        protocol.frame(protocol.FETCH, {"task": 7})
    ),
    "a REFS payload that is no slice": b"".join(
        protocol.frame(protocol.REFS, {"ref": "r1"}, [b"not a pickle"])
    ),
    "a REFS of a bad stored key": b"".join(
        protocol.frame(protocol.REFS, {"ref": "r1", "stored": 7})
    ),
    "a PARAMS naming a file that is no shared params": b"".join(
        protocol.frame(protocol.PARAMS, {"run": 1, "path": "/etc/passwd"})
    ),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_a_bad_frame_closes_that_connection_only(daemon, name):
    client = daemon.connect()
    client.send_raw(BAD_FRAMES[name])
    assert client.closed_by_peer(within=5), "the daemon kept the connection"
    client.close()
    assert daemon.alive()
    serves(daemon)
    assert small(daemon)
    log = daemon.log()
    assert (
        "closed a connection that broke the protocol, serving the next" in log
        and "Traceback" not in log
    )
    assert "Traceback" not in daemon.capture()


def test_a_daemon_survives_every_bad_frame_in_turn(daemon):
    for data in BAD_FRAMES.values():
        client = daemon.connect()
        client.send_raw(data)
        assert client.closed_by_peer(within=5)
        client.close()
    serves(daemon)
    assert small(daemon)
    assert daemon.log().count("broke the protocol") == len(BAD_FRAMES)


@pytest.mark.parametrize("kind", ["FUNC", "REFS"])
def test_a_declared_4_gib_part_costs_no_memory_until_it_comes(daemon, kind):
    head = {"FUNC": {"hash": "h"}, "REFS": {"ref": "r1"}}[kind]
    head_bytes = protocol.encode_head(head)
    client = daemon.connect()
    before = daemon.rss()
    client.send_raw(
        header(getattr(protocol, kind), [len(head_bytes), 4 << 30])
        + head_bytes
        + bytes(MiB)
    )
    time.sleep(1.0)  # the daemon waits inside the frame for the rest
    assert daemon.rss() < before + 32 * MiB
    client.close()  # the frame never ends: the connection does
    serves(daemon)
    assert small(daemon)
    assert [
        n for n in os.listdir(os.path.join(daemon.base, "cache")) if n.endswith(".tmp")
    ] == []


def test_a_part_bigger_than_free_memory_is_refused(daemon):
    available = protocol.available_memory()
    if available is None or 2 * available > serving._MAX_PART:
        pytest.skip("MemAvailable is unknown or above the part limit here")
    head_bytes = protocol.encode_head({"hash": "h"})
    client = daemon.connect()
    client.send_raw(
        header(protocol.FUNC, [len(head_bytes), 2 * available]) + head_bytes
    )
    assert client.closed_by_peer(within=5)
    assert "does not fit in this host's available memory" in daemon.log()
    serves(daemon)


def test_garbage_instead_of_serve_is_dropped(daemon):
    client = daemon.connect(claim=False)
    client.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.closed_by_peer(within=2)
    serves(daemon)


def test_a_client_that_says_nothing_delays_no_one_and_is_dropped(daemon):
    silent = daemon.connect(claim=False)
    slow = daemon.connect(claim=False)
    started = time.monotonic()
    # One byte a second never makes a line: its time runs out all the same.
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.5):
            try:
                slow.send_raw(b"s")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        t0 = time.monotonic()
        serves(daemon)
        # Served well before the silent clients' claim wait ran out.
        waited = time.monotonic() - t0
        assert waited < serving._CLAIM_WAIT_S - 1, f"the next client waited {waited}"
        # Claimed by another: the daemon let go of the two waiting.
        assert silent.closed_by_peer(within=1)
        assert slow.closed_by_peer(within=1)
        # With no one claiming, each is dropped after the claim wait.
        wait = serving._CLAIM_WAIT_S
        t0 = time.monotonic()
        for client in [daemon.connect(claim=False) for _ in range(2)]:
            assert client.closed_by_peer(within=wait + 3)
        assert wait - 1 < time.monotonic() - t0 < wait + 3
        serves(daemon)
    finally:
        stop.set()
    assert time.monotonic() - started < 20


def test_an_error_in_the_daemon_goes_to_its_log_not_the_job_output(daemon):
    shutil.rmtree(os.path.join(daemon.base, "cache"))  # CLEAR will fail
    client = daemon.connect()
    client.send(protocol.CLEAR, {})
    assert client.closed_by_peer(within=5)
    log = daemon.log()
    assert "closed a connection after an error in the daemon" in log
    assert "Traceback" in log and "FileNotFoundError" in log
    assert "Traceback" not in daemon.capture()
    serves(daemon)


def _flip_byte(path: str) -> None:
    time.sleep(0.05)  # a later mtime than the file was written with
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_slice_damaged_under_its_task_is_fetched_again(daemon):
    a, b = np.arange(10_000), np.arange(10_000, 20_000)
    refs = [hashlib.sha256(x.tobytes()).hexdigest() for x in (a, b)]
    cache = os.path.join(daemon.base, "cache")

    def mapfunc(params, data):
        marker, victim = params
        if not os.path.exists(marker):
            open(marker, "w").close()
            _flip_byte(victim)  # what the next get() of the task finds
        return int(data.sum())

    func, data = job(mapfunc)
    client = daemon.connect()
    for ref, x in zip(refs, (a, b)):
        client.send(protocol.REFS, {"ref": ref}, protocol.encode(x))
    client.send(protocol.FUNC, {"hash": func}, [data])
    client.send(
        protocol.TASK,
        task_head(1, func, refs=refs),
        protocol.encode(
            (os.path.join(daemon.base, "marker"), os.path.join(cache, refs[1]))
        ),
    )
    kind, head, _ = client.next()
    assert (kind, head.get("state"), head.get("refs")) == (
        protocol.STATE,
        "blocked",
        [refs[1]],
    ), head
    assert head["damaged"] == [refs[1]] and not head["func"]
    client.send(protocol.REFS, {"ref": refs[1]}, protocol.encode(b))
    kind, head, parts = client.next()
    assert kind == protocol.RESULT, head
    assert result_value(parts) == int(a.sum() + b.sum())
    client.close()


def test_a_blocked_task_asks_once_per_ref_and_again_for_one_gone_since(daemon):
    """A task whose slices are missing or damaged says which, once: frames
    that wake the worker meanwhile do not make it ask again. A slice found
    damaged after that (fine when the task blocked) is asked for again,
    alone; once it comes, the task runs."""
    x = np.arange(1024, dtype=np.float64)
    cache = os.path.join(daemon.base, "cache")
    func, data = job(lambda params, data: float(data.sum()))
    client = daemon.connect()

    def quiet() -> None:
        """The daemon has taken every frame sent so far, and says nothing
        but the answer to a STATS."""
        client.send(protocol.STATS, {})
        kind, head, _ = client.next()
        assert kind == protocol.STATS, head

    for ref in ("r1", "r2"):
        client.send(protocol.REFS, {"ref": ref}, protocol.encode(x))
    client.send(protocol.FUNC, {"hash": func}, [data])
    quiet()
    _flip_byte(os.path.join(cache, "r1"))
    client.send(
        protocol.TASK, task_head(7, func, refs=["r1", "r2", "r3"]), protocol.encode(0)
    )
    kind, head, _ = client.next()
    assert (kind, head) == (
        protocol.STATE,
        {
            "task": 7,
            "run": "run-1",
            "state": "blocked",
            "refs": ["r1", "r3"],
            "func": False,
            "damaged": ["r1"],
        },
    )
    quiet()
    quiet()
    # r2 was fine when the task blocked, and is damaged now: asked again.
    _flip_byte(os.path.join(cache, "r2"))
    for ref in ("r1", "r3"):
        client.send(protocol.REFS, {"ref": ref}, protocol.encode(x))
    kind, head, _ = client.next()
    assert (kind, head) == (
        protocol.STATE,
        {
            "task": 7,
            "run": "run-1",
            "state": "blocked",
            "refs": ["r2"],
            "func": False,
            "damaged": ["r2"],
        },
    )
    quiet()
    client.send(protocol.REFS, {"ref": "r2"}, protocol.encode(x))
    kind, head, parts = client.next()
    assert kind == protocol.RESULT, head
    assert result_value(parts) == 3 * x.sum()
    client.close()


def _pipe_worker(base: str, env: dict | None = None) -> subprocess.Popen:
    runtime.ensure_local_bundle(base)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            runtime.boot_code("worker"),
            "--pipe",
            "--name",
            "local-0",
            "--base",
            base,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def test_garbage_on_a_pipe_ends_the_worker_saying_why(qjamfab_home):
    proc = _pipe_worker(str(qjamfab_home))
    try:
        out = proc.stdout.fileno()
        reader = protocol.FrameReader(lambda view: os.readv(out, [view]))
        assert reader.read()[0] == protocol.HELLO
        proc.stdin.write(random_bytes())
        proc.stdin.flush()
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1
    assert (
        "qjamfab worker local-0 stopped: its master's stream broke the "
        "protocol (bad frame header" in err.decode()
    )


def test_a_bad_cache_limit_stops_the_worker_with_its_message(qjamfab_home):
    proc = _pipe_worker(str(qjamfab_home), {"QJAMFAB_CACHE_LIMIT": "lots"})
    try:
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1 and out == b""
    assert (
        err.decode()
        .splitlines()[0]
        .startswith("QJAMFAB_CACHE_LIMIT='lots' is not a size: write bytes")
    )


# --- FrameReader's limits on their own ---------------------------------------


def _reader(data: bytes, **limits) -> protocol.FrameReader:
    view = memoryview(data)
    pos = 0

    def readinto(buf):
        nonlocal pos
        n = min(len(buf), len(view) - pos)
        buf[:n] = view[pos : pos + n]
        pos += n
        return n

    return protocol.FrameReader(readinto, **limits)


def test_frame_reader_refuses_a_head_over_its_limit():
    data = b"".join(protocol.frame(protocol.TASK, {"x": "y" * 2000}))
    assert _reader(data, max_head=4096).read()[2] == {"x": "y" * 2000}
    with pytest.raises(
        ProtocolError,
        match="frame head of 20.. bytes is over this endpoint's limit of 1024",
    ):
        _reader(data, max_head=1024).read()


def test_frame_reader_refuses_a_part_over_its_limit():
    data = b"".join(protocol.frame(protocol.FUNC, {}, [bytes(5000)]))
    assert len(_reader(data, max_part=5000).read()[3][0]) == 5000
    with pytest.raises(ProtocolError, match="part of 5000 bytes is over"):
        _reader(data, max_part=4999).read()


def test_under_limits_a_big_part_is_a_mapping_filled_as_it_comes():
    payload = np.arange(MiB // 4, dtype=np.float64)  # 2 MiB
    data = b"".join(
        bytes(b) for b in protocol.frame(protocol.REFS, {}, protocol.encode(payload))
    )
    parts = _reader(data, max_part=1 << 30).read()[3]
    assert any(isinstance(p, mmap.mmap) for p in parts)
    np.testing.assert_array_equal(protocol.decode(parts), payload)
    # Without limits (the master's and agent's readers): as before.
    assert all(isinstance(p, bytearray) for p in _reader(data).read()[3])


def test_frame_reader_names_a_head_that_is_no_dict_or_no_json():
    with pytest.raises(ProtocolError, match="head that is a list, not a dict"):
        _reader(b"".join(protocol.frame_raw(protocol.TASK, b"[1]"))).read()
    with pytest.raises(ProtocolError, match="head that is not JSON"):
        _reader(b"".join(protocol.frame_raw(protocol.TASK, b'{"a": '))).read()
    with pytest.raises(ProtocolError, match="head that is not JSON"):
        _reader(b"".join(protocol.frame_raw(protocol.TASK, "{}é".encode()))).read()


def test_params_shared_on_the_host_are_mapped_and_used(daemon):
    """A PARAMS frame naming shared memory this process wrote: the task
    after it (params false) runs on them."""
    shared = HostParams.from_parts(1, protocol.encode(np.arange(100_000.0)))
    func, data = job(lambda params, _: float(params.sum()))
    client = daemon.connect()
    try:
        head, payload = shared.for_worker("worker-0", 1)
        assert "path" in head and not payload
        client.send(protocol.PARAMS, {**head, "run": "run-1"}, payload)
        client.send(protocol.FUNC, {"hash": func}, [data])
        client.send(protocol.TASK, task_head(1, func, params=False))
        kind, head, parts = client.next()
        assert kind == protocol.RESULT, head
        assert result_value(parts) == float(np.arange(100_000.0).sum())
    finally:
        client.close()
        shared.close()


def test_params_that_cannot_be_mapped_fail_the_task_saying_why(daemon):
    path = f"/proc/{os.getpid()}/fd/999999"  # a descriptor no one holds
    func, data = job(lambda params, _: params)
    client = daemon.connect()
    try:
        client.send(protocol.PARAMS, {"run": "run-1", "path": path})
        client.send(protocol.FUNC, {"hash": func}, [data])
        client.send(protocol.TASK, task_head(1, func, params=False))
        kind, head, _ = client.next()
        assert kind == protocol.ERROR, head
        assert head["phase"] == "loading params"
        assert head["message"].startswith(
            f"the run's params, written once for this host at {path}, cannot "
            "be mapped here (FileNotFoundError"
        )
        assert "set QJAMFAB_SHARE_PARAMS=0 on the master" in head["message"]
    finally:
        client.close()
    serves(daemon)  # the daemon goes on


def test_a_handed_stream_takes_its_lock_only_for_frames_a_pipe_may_split(
    tmp_path, monkeypatch
):
    """On the master's stream handed over by the agent (a pipe the agent
    also writes heartbeats to), a frame of one buffer up to PIPE_BUF is
    one atomic write and skips the lock; a bigger one holds it."""
    locked = []
    monkeypatch.setattr(
        serving, "write_locked", lambda lock, writev, buffers: locked.append(buffers)
    )
    read_fd, write_fd = os.pipe()
    lock = os.open(tmp_path / "stream.lock", os.O_RDWR | os.O_CREAT, 0o600)
    channel = serving.fd_channel(read_fd, write_fd, lock)
    try:
        channel.send(protocol.RESULT, {"task": 1, "run": 1}, [b"x" * 100])
        assert locked == []
        kind, _, head, parts = protocol.FrameReader(
            lambda view: os.readv(read_fd, [view])
        ).read()
        assert (kind, head, bytes(parts[0])) == (
            protocol.RESULT,
            {"task": 1, "run": 1},
            b"x" * 100,
        )
        channel.send(protocol.RESULT, {"task": 2, "run": 1}, [b"x" * 5000])
        assert len(locked) == 1
    finally:
        for fd in (read_fd, write_fd, lock):
            os.close(fd)
