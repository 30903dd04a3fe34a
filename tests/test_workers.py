"""The inbox reads on the caller's thread: one poll over every link, a
frame from each that has one, and a LOST event when a stream ends or
stalls inside a frame. The far ends here are small scripts that speak the
protocol, so each case is exact."""

import sys
import textwrap
import time

import pytest

from qjamfab import protocol
from qjamfab.transport import ProcessTransport
from qjamfab.workers import LOST, Inbox, Link, WorkerHandle

pytestmark = pytest.mark.timeout(30)


def _peer(name: str, script: str, stall_timeout: float = 5.0) -> WorkerHandle:
    """A handle on a Python process that says HELLO, then runs `script`
    (with `send(kind, head)` and `os`, `sys`, `time` at hand)."""
    code = textwrap.dedent("""\
        import os, sys, time
        from qjamfab import protocol
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
    return link.start_direct(name)


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
    from qjamfab import workers
    from qjamfab.errors import WorkerLost

    monkeypatch.setattr(workers, "HANDSHAKE_TIMEOUT_S", 0.5)
    transport = ProcessTransport(
        "a", [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"]
    )
    with pytest.raises(
        WorkerLost,
        match=r"^worker a did not start: no "
        r"answer in 0.5 s; check the host's load",
    ):
        Link("a", transport, agent=False, stall_timeout=5.0).start_direct("a")
