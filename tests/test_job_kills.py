"""A job that ends the workers it runs on: the run stops at the second
worker it ends (any slices), says what the job did, and names what each
lost worker was running; the Master stays usable."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from qjamfab import DataSet, Master, WorkerLost

pytestmark = pytest.mark.timeout(60)

DATA = DataSet(list(range(16)), slice_size=1)


def _exits(params, xs):
    sys.exit(3)


def _hard_exits(params, xs):
    os._exit(4)


@pytest.mark.parametrize(
    "job, status", [(_exits, 3), (_hard_exits, 4)], ids=["sys.exit", "os._exit"]
)
def test_a_job_that_exits_every_worker_stops_at_the_second(job, status):
    with Master("local:4") as m:
        with pytest.raises(WorkerLost) as info:
            m.run(job, dataset=DATA)
        first = str(info.value).splitlines()[0]
        assert first.startswith(
            "the job ended 2 workers by exiting while running mapfunc (local-"
        ), first
        assert first.count(f"exit status {status}, dataset slice") == 2, first
        assert first.endswith(
            "mapfunc (or what it calls) exits its process, with sys.exit, "
            "os._exit or exit(): fix mapfunc so it returns or raises; the "
            "workers are restarted for the next run"
        ), first
        assert len(m.last_run.lost_workers) == 2  # not all four
        assert m.run(lambda p, xs: sum(xs), dataset=DATA) == sum(range(16))


def test_when_no_worker_is_left_each_lost_worker_is_named_with_its_slices():
    def killed(params, xs):
        os.kill(os.getpid(), signal.SIGKILL)  # a signal: not the job exiting

    with Master("local:2") as m:
        with pytest.raises(WorkerLost) as info:
            m.run(killed, dataset=DataSet(list(range(4)), slice_size=1))
        first = str(info.value).splitlines()[0]
        if first.startswith("dataset slice"):  # both died on one slice
            assert "killed workers local-" in first
        elif first.startswith("worker "):  # the other's end not read yet
            assert " was lost (killed by SIGKILL) running dataset slice" in first
            assert "and no worker is left" in first
        else:
            assert first.startswith("workers were lost (local-"), first
            for name in ("local-0", "local-1"):
                assert f"{name}: killed by SIGKILL, dataset slice" in first
            assert "and no worker is left" in first
        assert m.run(lambda p, xs: sum(xs), dataset=DATA) == sum(range(16))


@pytest.mark.parametrize("end", ["running", "cancelled", "written to"])
def test_an_agent_tells_what_its_daemon_said_and_ran_before_it_ended(tmp_path, end):
    """The master learns of a host's finished tasks late (notes wait at the
    agent) and keeps a moved copy open until its worker confirms, so its
    own view of what a worker ran can be behind: the agent's GONE names
    the first task it passed on to the daemon without an answer (the
    daemon runs them in order), or none. A frame the agent fails to write
    to a daemon that ended does not lose what the daemon wrote before it
    ended: that comes first, then the GONE."""
    import socket

    from qjamfab import protocol
    from qjamfab.runtime.agent import Agent
    from qjamfab.runtime.daemons import Daemon

    master_in, to_agent = os.pipe()
    from_agent, master_out = os.pipe()
    agent = Agent(str(tmp_path / "home"), master_in, master_out)
    near, far = socket.socketpair()
    daemon = agent.daemons[0] = Daemon(0, 0, near, {}, os.open(os.devnull, os.O_RDONLY))

    def send(kind: int, head: dict) -> None:
        protocol.write_all(
            lambda v: os.writev(to_agent, v), protocol.frame(kind, head, (), 0)
        )
        agent.from_master()

    for task in (1, 2, 3):
        head = {"task": task, "run": 1, "func": "f", "refs": None, "slices": [task]}
        send(protocol.TASK, {**head, "leaves": 3, "params": False})
    daemon.send_queued()
    reader = protocol.FrameReader(far.recv_into)
    assert [reader.read()[2]["task"] for _ in range(3)] == [1, 2, 3]
    far.sendall(b"".join(protocol.frame(protocol.RESULT, {"task": 1, "run": 1})))
    if end == "cancelled":  # 2 and 3 cancelled before it ran them
        for task in (2, 3):
            state = {"task": task, "run": 1, "state": "cancelled"}
            far.sendall(b"".join(protocol.frame(protocol.STATE, state)))
    far.close()
    if end == "written to":
        send(protocol.CANCEL, {"task": 3, "run": 1})
        daemon.send_queued()
        assert daemon.broken == "its connection broke (Broken pipe)"
    while not daemon.closed:
        agent.from_daemon(daemon)
    agent.master.flush()
    os.close(master_out)
    reader = protocol.FrameReader(lambda view: os.readv(from_agent, [view]))
    frames = []
    while True:
        try:
            frames.append(reader.read()[::2])
        except EOFError:
            break
    assert [kind for kind, _ in frames][0] == protocol.RESULT
    assert frames[-1][0] == protocol.GONE
    gone = frames[-1][1]
    assert gone["task"] == (None if end == "cancelled" else 2), gone
    assert gone["reason"] == (
        "its connection broke (Broken pipe)" if end == "written to" else "stream closed"
    )
    for fd in (master_in, to_agent, from_agent):
        os.close(fd)
