"""The inbox reads on the caller's thread: one poll over every link, a
frame from each that has one, and a LOST event when a stream ends or
stalls inside a frame. The far ends here are small scripts that speak the
protocol, so each case is exact."""

import sys
import textwrap
import time

import pytest

from qjamfab import WorkerLost, protocol
from qjamfab.links.handshake import start_direct
from qjamfab.links.inbox import Inbox
from qjamfab.links.transport import ProcessTransport
from qjamfab.links.workers import LOST, Link, WorkerHandle

pytestmark = pytest.mark.timeout(30)


def _peer(name: str, script: str, stall_timeout: float = 5.0) -> WorkerHandle:
    """A handle on a Python process that says HELLO, then runs `script`
    (with `send(kind, head)` and `os`, `sys`, `time` at hand)."""
    code = textwrap.dedent("""\
        import os, sys, time
        from qjamfab import WorkerLost, protocol
        def send(kind, head):
            for b in protocol.frame(kind, head):
                os.write(1, b)
        send(protocol.HELLO, {"version": protocol.VERSION, "pid": os.getpid()})
        """) + textwrap.dedent(script)
    link = Link(
        name,
        ProcessTransport(name, [sys.executable, "-c", code]),
        agent=False,
        stall_timeout=stall_timeout,
    )
    return start_direct(link, name)


def read_events(handles, timeout):
    """What one read of the inbox over these workers' links gives."""
    inbox = Inbox()
    for handle in handles:
        inbox.add(handle.link)
    inbox.poll(timeout)
    return list(inbox.pending)


def _kinds(events):
    return [(h.name, kind) for h, kind, _, _ in events]


def test_one_frame_from_each_worker_that_has_one():
    a = _peer(
        "a",
        'send(protocol.STATS, {"n": 1}); '
        'send(protocol.STATS, {"n": 2}); sys.stdin.buffer.read()',
    )
    b = _peer("b", "sys.stdin.buffer.read()")
    try:
        first = read_events([a, b], 5)
        assert _kinds(first) == [("a", protocol.STATS)]
        assert first[0][2] == {"n": 1}
        # The second frame was read along with the first: no select needed.
        assert read_events([a, b], 0)[0][2] == {"n": 2}
        started = time.monotonic()
        assert read_events([a, b], 0.3) == []
        assert time.monotonic() - started >= 0.25  # it waited its timeout
    finally:
        a.close()
        b.close()


def test_end_of_stream_is_lost_and_the_handle_is_left_out_after():
    a = _peer("a", "sys.exit(0)")
    try:
        events = read_events([a], 5)
        assert _kinds(events) == [("a", LOST)] and not a.alive
        assert read_events([a], 0) == []
        # A send after the loss says so and writes nothing.
        sent = a.link.bytes_sent
        with pytest.raises(WorkerLost, match=r"^worker a is gone: its stream ended$"):
            a.send(protocol.STATS, {})
        assert a.link.bytes_sent == sent
    finally:
        a.close()


def test_what_a_worker_wrote_before_it_ended_comes_before_its_loss():
    """A worker writes a frame (say, its last result) and ends; a send to
    it then fails: that frame is still read, and its loss, which says what
    failed, comes after it."""
    a = _peer("a", 'send(protocol.STATS, {"n": 1}); sys.exit(0)')
    inbox = Inbox()
    inbox.add(a.link)
    try:
        a.link.transport.process.wait(10)
        with pytest.raises(WorkerLost):
            a.link.send(protocol.STATS, {})
        events = list(inbox.pending)
        assert _kinds(events) == [("a", protocol.STATS), ("a", LOST)]
        assert events[0][2] == {"n": 1}
        assert events[1][2]["reason"].startswith(
            "sending to worker a on its pipe failed: the far end closed the stream"
        ), events[1][2]
    finally:
        a.close()


def test_a_stream_that_stalls_inside_a_frame_is_lost():
    a = _peer(
        "a",
        """\
        frame = b"".join(protocol.frame(protocol.STATS, {"x": "y" * 100}))
        os.write(1, frame[:20])
        sys.stdin.buffer.read()
        """,
        stall_timeout=0.5,
    )
    try:
        (event,) = read_events([a], 5)
        assert event[1] == LOST
        assert event[2]["reason"] == "worker a sent nothing for 0.5 s"
    finally:
        a.close()


def test_no_hello_in_time_is_a_worker_that_did_not_start(monkeypatch):
    from qjamfab.errors import WorkerLost
    from qjamfab.links import handshake

    monkeypatch.setattr(handshake, "HANDSHAKE_TIMEOUT_S", 0.5)
    transport = ProcessTransport(
        "a", [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
    )
    with pytest.raises(
        WorkerLost,
        match=r"^worker a did not start: no "
        r"answer in 0.5 s; check the host's load",
    ):
        start_direct(Link("a", transport, agent=False, stall_timeout=5.0), "a")


def test_await_answer_takes_what_comes_first_and_returns_the_answer():
    from qjamfab.links.answers import await_answer

    batches = iter([[], ["log", "beat"], ["other", "answer", "late"]])
    took: list[str] = []
    answer = await_answer(
        lambda: next(batches),
        lambda item: item == "answer",
        take=lambda item: took.append(item) or False,
    )
    assert answer == "answer" and took == ["log", "beat", "other"]


def test_await_answer_gives_up_when_told_or_past_its_deadline():
    from qjamfab.links.answers import await_answer

    # `take` says the one asked is gone: no more reads.
    reads = []
    assert (
        await_answer(
            lambda: reads.append(1) or ["gone", "answer"],
            lambda item: item == "answer",
            take=lambda item: item == "gone",
        )
        is None
    )
    assert reads == [1]
    # The deadline, by an injected clock: read once even when past it.
    now = [10.0]

    def read() -> list[str]:
        now[0] += 1.0
        reads.append(now[0])
        return ["noise"]

    reads.clear()
    assert await_answer(read, lambda item: False, 12.0, clock=lambda: now[0]) is None
    assert reads == [11.0, 12.0]
    reads.clear()
    assert await_answer(read, lambda item: False, 0.0, clock=lambda: now[0]) is None
    assert reads == [13.0]


def test_an_agents_note_of_tasks_done_is_one_event_for_the_host():
    from qjamfab import protocol
    from qjamfab.links.workers import DONE, Link, WorkerHandle

    class Stub:
        def __init__(self, data: bytes):
            self.data = memoryview(data)

        def readinto(self, view):
            n = min(len(view), len(self.data))
            view[:n], self.data = self.data[:n], self.data[n:]
            return n

        def close(self):
            pass

    def link_reading(*frames):
        link = Link("h", Stub(b"".join(b"".join(f) for f in frames)), True, 5.0)
        for k in (0, 1):
            link.handles[k] = WorkerHandle(link, k, f"h-{k}", {})
        return link

    note = [[0, 7, 3, 0.5, 2, 100], [1, 8, 3, 0.25, 1, 50], [5, 9, 3, 0, 1, 1]]
    done = protocol.frame(
        protocol.STATE, {"state": "done", "tasks": note}, (), protocol.AGENT
    )
    link = link_reading(done)
    (event,) = link.read_events()
    assert event.source is link and event.kind == DONE
    assert [
        (h.name, task, run, compute_s, size)
        for h, task, run, compute_s, size in event.head["tasks"]
    ] == [
        ("h-0", 7, 3, 0.5, 100),
        ("h-1", 8, 3, 0.25, 50),
    ]  # worker 5 is no one's
    bad = protocol.frame(
        protocol.STATE, {"state": "done", "tasks": [[0, 7]]}, (), protocol.AGENT
    )
    link = link_reading(bad)
    lost = link.read_events()
    assert not link.alive and len(lost) == 2
    reason = lost[0].head["reason"]
    assert reason.startswith("the agent's note of tasks done is not one")


# --- frames queued in a link's outbox ------------------------------------------

BIG = bytes(range(256)) * (16 << 10)  # 4 MiB: more than a pipe holds

# Reads frames and says what each was: (kind, head, bytes of its payload).
READER = """\
reader = protocol.FrameReader(lambda v: os.readv(0, [v]))
while True:
    kind, _, head, lengths = reader.read_head()
    got = sum(len(reader.read_part(n)) for n in lengths)
    send(protocol.STATS, {"kind": kind, "head": head, "bytes": got})
"""


def _until(inbox, found, timeout=10.0):
    """Poll the inbox until `found(events so far)`; the events."""
    deadline = time.monotonic() + timeout
    while not found(list(inbox.pending)) and time.monotonic() < deadline:
        inbox.poll(0.1)
    return list(inbox.pending)


def test_a_peer_that_takes_nothing_does_not_hold_up_a_queued_frame_to_another():
    a = _peer("a", "time.sleep(30)")  # reads nothing
    b = _peer("b", READER)
    inbox = Inbox()
    for handle in (a, b):
        inbox.add(handle.link)
    try:
        size = a.send(protocol.REFS, {"ref": "x"}, [BIG], queued=True)
        assert size > len(BIG) and a.link.outbox  # the pipe took part of it
        b.send(protocol.REFS, {"ref": "y"}, [BIG], queued=True)
        events = _until(inbox, lambda events: len(events) == 1)
        assert [(e.source.name, e.head) for e in events] == [
            ("b", {"kind": protocol.REFS, "head": {"ref": "y"}, "bytes": len(BIG)})
        ]
        assert a.link.outbox and not b.link.outbox
    finally:
        a.close()
        b.close()


def test_queued_frames_go_first_and_say_when_they_have_left():
    a = _peer("a", READER)
    inbox = Inbox()
    inbox.add(a.link)
    left = []
    try:
        a.send(protocol.REFS, {"ref": "x"}, [BIG], queued=True)
        a.link.outbox.when_drained(lambda: left.append("x"))
        assert left == []  # still queued: a pipe takes 1 MiB at most
        a.send(protocol.CLEAR, {"n": 1})  # written whole, after the queue
        assert left == ["x"] and not a.link.outbox
        a.link.outbox.when_drained(lambda: left.append("now"))
        assert left == ["x", "now"]  # nothing queued: at once
        events = _until(inbox, lambda events: len(events) == 2)
        assert [(e.head["kind"], e.head["bytes"]) for e in events] == [
            (protocol.REFS, len(BIG)),
            (protocol.CLEAR, 0),
        ]
    finally:
        a.close()


def test_the_outbox_writes_what_the_stream_takes_in_order():
    from qjamfab.links.outbox import Outbox

    out = bytearray()
    room = [5]  # what the stream takes until it is full

    def writev(views):
        data = b"".join(bytes(v) for v in views)[: room[0]]
        out.extend(data)
        room[0] -= len(data)
        return len(data)

    box = Outbox(writev)
    drained = []
    box.add([b"abc", b"", memoryview(b"defgh"), bytearray(b"ij")])
    box.when_drained(lambda: drained.append(1))
    box.flush()
    assert out == b"abcde" and box and drained == []
    box.flush()  # full: takes nothing, no wait
    assert out == b"abcde" and box
    room[0] = 100
    box.flush()
    assert out == b"abcdefghij" and not box and drained == [1]
    box.add([b"kl"])
    box.when_drained(lambda: drained.append(2))
    box.drop()
    box.flush()
    assert out == b"abcdefghij" and drained == [1]
