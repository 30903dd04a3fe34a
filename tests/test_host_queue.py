"""A run's held tasks at their host's agent: each worker runs one at a
time, the rest wait at the agent, a worker that runs dry takes a
sibling's last waiting task (the master told first), a task waiting there
is cancelled there, and what waited for a worker that ended goes with it.

Driven against a real `Agent` over pipes, with scripted daemons on
socketpairs (what each daemon is sent is read off its socket), and then
end to end on one host of workers."""

from __future__ import annotations

import os
import socket
import time

import pytest

from qjamfab import DataSet, Master, protocol
from qjamfab.runtime.agent import Agent
from qjamfab.runtime.daemons import Daemon
from qjamfab.runtime.host_queue import HostQueue

pytestmark = pytest.mark.timeout(60)

RUN = 7


class Host:
    """An agent with two scripted daemons, and the master's end of its
    stream."""

    def __init__(self, home: str):
        self.master_in, self.to_agent = os.pipe()
        self.from_agent, self.master_out = os.pipe()
        os.set_blocking(self.from_agent, False)
        self.agent = Agent(home, self.master_in, self.master_out)
        self.far: dict[int, socket.socket] = {}
        for k in (0, 1):
            near, far = socket.socketpair()
            far.setblocking(False)
            self.far[k] = far
            devnull = os.open(os.devnull, os.O_RDONLY)
            self.agent.daemons[k] = Daemon(k, k, near, {"pid": 0}, devnull)
        self.pending = bytearray()

    def send(self, kind: int, head: dict, worker: int = protocol.AGENT) -> None:
        """A frame from the master, handled."""
        protocol.write_all(
            lambda v: os.writev(self.to_agent, v),
            protocol.frame(kind, head, (), worker),
        )
        self.agent.from_master()
        self.flush()

    def answer(self, worker: int, kind: int, head: dict) -> None:
        """A frame from a daemon, handled."""
        self.far[worker].sendall(b"".join(protocol.frame(kind, head)))
        self.agent.from_daemon(self.agent.daemons[worker])
        self.flush()

    def flush(self) -> None:
        if self.agent.results.due():
            self.agent.tell_done()
        self.agent.master.flush()
        for daemon in self.agent.daemons.values():
            daemon.send_queued()

    def to_daemon(self, worker: int) -> list[tuple[int, dict]]:
        """The frames the daemon was sent since the last call."""
        return _frames(lambda view: self.far[worker].recv_into(view))

    def to_master(self) -> list[tuple[int, int, dict]]:
        """The frames the master was sent since the last call: kind, the
        worker it names, head."""
        return [
            (kind, worker, head)
            for kind, worker, head, _ in _frames_full(
                lambda view: os.readv(self.from_agent, [view])
            )
        ]

    def close(self) -> None:
        for daemon in self.agent.daemons.values():
            daemon.close()
        for sock in self.far.values():
            sock.close()
        for fd in (self.master_in, self.to_agent, self.from_agent, self.master_out):
            os.close(fd)


def _frames_full(read) -> list[tuple[int, int, dict, list]]:
    data = bytearray()
    chunk = bytearray(1 << 16)
    while True:
        try:
            n = read(memoryview(chunk))
        except BlockingIOError:
            break
        if not n:
            break
        data += chunk[:n]
    frames = []
    offset = 0

    def take(view: memoryview) -> int:
        nonlocal offset
        n = min(len(view), len(data) - offset)
        view[:n] = data[offset : offset + n]
        offset += n
        return n

    reader = protocol.FrameReader(take)
    while offset < len(data) or reader.buffered():
        frames.append(reader.read())
    return frames


def _frames(read) -> list[tuple[int, dict]]:
    return [(kind, head) for kind, _, head, _ in _frames_full(read)]


def _tasks(frames: list[tuple[int, dict]]) -> list[int]:
    return [head["task"] for kind, head in frames if kind == protocol.TASK]


@pytest.fixture
def host(tmp_path):
    made = Host(str(tmp_path / "home"))
    common = {"run": RUN, "func": "f", "leaves": 4, "hold": True, "park": None}
    entries = [
        # worker, task, slices, refs, params
        [0, 1, [0], None, False],
        [1, 4, [3], None, False],
        [0, 2, [1], None, False],
        [0, 3, [2], None, False],
    ]
    # No offer (values combined unasked): each note of tasks done is told.
    made.send(protocol.TASKS, {**common, "offer": None, "tasks": entries})
    yield made
    made.close()


def _result(task: int) -> dict:
    return {"task": task, "run": RUN, "compute_s": 0.01, "slices": 1}


def test_each_worker_is_given_one_held_task_at_a_time(host):
    assert _tasks(host.to_daemon(0)) == [1]
    assert _tasks(host.to_daemon(1)) == [4]
    host.answer(0, protocol.RESULT, _result(1))
    assert _tasks(host.to_daemon(0)) == [2]  # its own next, in order
    assert _tasks(host.to_daemon(1)) == []


def test_a_worker_that_runs_dry_takes_a_sibling_s_last_waiting_task(host):
    host.to_daemon(0), host.to_daemon(1), host.to_master()
    host.answer(1, protocol.RESULT, _result(4))
    assert _tasks(host.to_daemon(1)) == [3]  # worker 0's last
    host.answer(0, protocol.RESULT, _result(1))
    assert _tasks(host.to_daemon(0)) == [2]
    host.answer(1, protocol.RESULT, _result(3))
    host.answer(0, protocol.RESULT, _result(2))
    host.agent.tell_done()  # the notes that wait (held.NOTES_WAIT_S)
    host.flush()
    # The move is told at once, before anything the new worker says of
    # the task (its done note here).
    frames = [h for kind, _, h in host.to_master() if "moved" in h or "notes" in h]
    assert frames[0]["moved"] == [[3, 0, 1]], frames
    assert [n[1] for n in frames[0]["tasks"]] == [4], frames
    told = [n[:2] for f in frames for n in f.get("tasks", f.get("notes", []))]
    assert [1, 3] in told and [0, 2] in told and [1, 4] in told, told


def test_a_host_that_keeps_slices_off_its_disk_does_not_move_tasks(host):
    """With cache_limit 0 a slice lives in the memory of the worker that
    ran it: a move would send it again in every later run (each run puts
    a slice back where the layout has it). The master decides, as for
    local workers, weighing the data."""
    host.agent.cache.limit = 0
    host.to_daemon(0), host.to_daemon(1)
    host.answer(1, protocol.RESULT, _result(4))
    assert _tasks(host.to_daemon(1)) == []
    host.answer(0, protocol.RESULT, _result(1))
    assert _tasks(host.to_daemon(0)) == [2]  # its own, still one at a time


def test_a_waiting_task_the_master_cancels_is_answered_by_the_agent(host):
    host.to_daemon(0), host.to_master()
    host.send(protocol.CANCEL, {"task": 2, "run": RUN}, worker=0)
    assert host.to_daemon(0) == []  # busy with task 1: not asked
    cancelled = [
        (worker, head)
        for kind, worker, head in host.to_master()
        if kind == protocol.STATE and head.get("state") == "cancelled"
    ]
    assert cancelled == [(0, {"task": 2, "run": RUN, "state": "cancelled"})]
    host.answer(0, protocol.RESULT, _result(1))
    assert _tasks(host.to_daemon(0)) == [3]  # 2 is gone from its queue


def test_a_cancel_of_a_moved_task_goes_to_the_worker_it_moved_to(host):
    host.to_daemon(0), host.to_daemon(1)
    host.answer(1, protocol.RESULT, _result(4))
    assert _tasks(host.to_daemon(1)) == [3]
    # The master sent this before it read of the move: it names worker 0.
    host.send(protocol.CANCEL, {"task": 3, "run": RUN}, worker=0)
    assert host.to_daemon(0) == []
    assert host.to_daemon(1) == [(protocol.CANCEL, {"task": 3, "run": RUN})]


def test_what_waited_for_a_worker_that_ended_goes_with_it(host):
    host.to_daemon(0), host.to_daemon(1), host.to_master()
    host.far[0].close()
    daemon = host.agent.daemons[0]
    while not daemon.closed:
        host.agent.from_daemon(daemon)
    host.flush()
    gone = [h for kind, _, h in host.to_master() if kind == protocol.GONE]
    assert gone[0]["task"] == 1  # running; 2 and 3 waited: not run
    host.answer(1, protocol.RESULT, _result(4))
    assert _tasks(host.to_daemon(1)) == []  # nothing of worker 0's is left


def test_a_worker_without_a_task_of_the_run_takes_none(tmp_path):
    """Its params came with its first task of the run: a worker that had
    none (more workers than tasks), answering an earlier run's task, is
    not given a sibling's, which would run with the earlier run's params."""
    host = Host(str(tmp_path / "home"))
    try:
        common = {"run": RUN, "func": "f", "leaves": 4, "hold": True, "park": None}
        entries = [[0, task, [task], None, task == 1] for task in (1, 2, 3)]
        host.send(protocol.TASKS, {**common, "offer": None, "tasks": entries})
        assert _tasks(host.to_daemon(0)) == [1]
        earlier = {"task": 99, "run": RUN - 1, "state": "cancelled"}
        host.answer(1, protocol.STATE, earlier)
        assert _tasks(host.to_daemon(1)) == []
        host.answer(0, protocol.RESULT, _result(1))
        assert _tasks(host.to_daemon(0)) == [2]
    finally:
        host.close()


def test_a_new_run_forgets_what_waited_for_the_last():
    queue = HostQueue()
    head = {"run": 1, "task": 5}
    queue.new_task(head)
    queue.wait(0, head)
    queue.passed(1, {"run": 1, "task": 6})
    queue.new_task({"run": 2, "task": 7})
    assert queue.next_for(1, {0, 1}) is None
    assert queue.route(6, 0) == 0


def test_a_sibling_is_taken_from_only_while_it_is_live():
    queue = HostQueue()
    for task in (1, 2):
        head = {"run": 1, "task": task}
        queue.new_task(head)
        queue.wait(0, head)
    assert queue.next_for(1, {1}) is None  # worker 0 is not live
    assert queue.next_for(1, {0, 1}) == ({"run": 1, "task": 2}, 0)


def test_a_waiting_task_runs_on_a_worker_that_ran_dry_at_once(tmp_path):
    """End to end on one host of two workers: slice 0 waits until slice 1
    has run. Slice 1 waits at the host behind slice 0, on the same worker:
    only a sibling that takes it lets slice 0 go on (else slice 0 waits
    out its 30 s and the run fails)."""
    scratch = str(tmp_path)

    def job(params, xs):
        (i,) = xs
        if i == 0:
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(params, "1-ran")):
                if time.monotonic() > deadline:
                    raise TimeoutError("slice 1 did not run while slice 0 ran")
                time.sleep(0.01)
        if i == 1:
            open(os.path.join(params, "1-ran"), "w").close()
        return i + 1

    data = DataSet([0, 1, 2, 3], slice_size=1)
    with Master("inproc:2", straggler_factor=1000) as m:
        assert m.run(job, params=scratch, dataset=data) == 10
        stats = m.last_run
        assert stats.tasks == 4 and stats.moved_at_hosts == 1, stats
