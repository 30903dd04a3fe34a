"""What a host agent keeps of a run's results (qjamfab/runtime/held.py),
driven directly with a clock of the test's own: notes of held tasks done,
the offer once none is left to run, COLLECT, and a new run."""

from __future__ import annotations

import numpy as np

from qjamfab import protocol
from qjamfab.reduce import ReduceTree
from qjamfab.runtime.held import NOTES_WAIT_S, HeldResults
from qjamfab.runtime.lru import JobCache
from qjamfab.runtime.task import encode_result
from tests.daemon_client import job

LEAVES = 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _held(offer: int | None = 1 << 20) -> tuple[HeldResults, Clock, dict]:
    """Held results for run 1, its job's reduce the default; and the head
    every TASK of that run starts with."""
    func, data = job(lambda p, x: x)
    jobs: JobCache[bytes] = JobCache(1 << 20)
    jobs.put(func, data, len(data))
    clock = Clock()
    head = {"run": 1, "func": func, "leaves": LEAVES, "hold": True}
    if offer is not None:
        head["offer"] = offer
    return HeldResults(jobs, clock), clock, head


def _value(slice_index: int) -> list:
    """A worker's RESULT payload for one slice: its tree node, in writable
    buffers as the agent reads them."""
    tree = ReduceTree(LEAVES)
    tree.add(slice_index, 1, np.full(3, float(slice_index + 1)))
    return [bytearray(p) for p in encode_result(tree.items())]


def _done(held: HeldResults, worker: int, task: int, slice_index: int) -> bool:
    head = {"task": task, "run": 1, "compute_s": 0.01, "slices": 1}
    return held.result(worker, head, _value(slice_index))


def _read(frame: list) -> tuple[int, dict, object]:
    """A frame the agent would send: its kind, head and decoded payload."""
    reader = protocol.FrameReader(_reads_from(b"".join(bytes(b) for b in frame)))
    kind, worker, head, parts = reader.read()
    assert worker == protocol.AGENT
    return kind, head, protocol.decode(parts) if parts else None


def _reads_from(data: bytes):
    view = memoryview(data)

    def readinto(buffer: memoryview) -> int:
        nonlocal view
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        view = view[n:]
        return n

    return readinto


def test_the_last_held_task_done_sends_its_notes_with_the_results_combined():
    held, clock, head = _held()
    for task in (10, 11, 12):
        assert held.task({**head, "task": task})
    assert _done(held, 0, 10, 0) and _done(held, 1, 11, 1)
    # Two of three done: their notes wait for the third, up to NOTES_WAIT_S.
    assert not held.due()
    clock.now += NOTES_WAIT_S / 2
    assert not held.due()
    assert _done(held, 0, 12, 2)
    assert held.due()  # all in: at once
    kind, answer, nodes = _read(held.frame())
    assert kind == protocol.RESULT
    assert answer["tasks"] == [10, 11, 12] and answer["run"] == 1
    assert [note[1] for note in answer["notes"]] == [10, 11, 12]
    total = ReduceTree(LEAVES)
    total.add_all(nodes)
    assert total.complete is False  # slice 3 is another host's
    total.add(3, 1, np.full(3, 4.0))
    assert np.array_equal(total.result(), np.full(3, 10.0))
    assert held.frame() is None and not held.due()  # offered once


def test_notes_go_alone_once_they_have_waited_while_a_task_runs():
    held, clock, head = _held()
    for task in (10, 11):
        held.task({**head, "task": task})
    _done(held, 0, 10, 0)
    clock.now += NOTES_WAIT_S
    assert held.due()
    kind, answer, _ = _read(held.frame())
    assert (kind, answer["state"]) == (protocol.STATE, "done")
    assert [note[1] for note in answer["tasks"]] == [10]
    # The last one's offer brings every value not offered, with its note.
    _done(held, 1, 11, 1)
    kind, answer, _ = _read(held.frame())
    assert kind == protocol.RESULT
    assert answer["tasks"] == [10, 11]
    assert [note[1] for note in answer["notes"]] == [11]


def test_an_offer_declined_is_collected_from_values_it_left_unchanged():
    """The default reduce adds into what it decodes: the offer combines
    copies, so a COLLECT of the same values gives the same bits."""
    held, _, head = _held()
    for task in (10, 11):
        held.task({**head, "task": task})
    _done(held, 0, 10, 0)
    _done(held, 1, 11, 1)
    _, _, offered_nodes = _read(held.frame())
    kind, answer, nodes = held.collect({**head, "tasks": [10, 11]})
    assert (kind, answer["tasks"]) == (protocol.RESULT, [10, 11])
    again = protocol.decode(nodes)
    assert [(lo, size) for lo, size, _ in again] == [(0, 2)]
    assert np.array_equal(again[0][2], offered_nodes[0][2])
    assert np.array_equal(again[0][2], np.full(3, 3.0))
    assert held.held == {}  # taken out by COLLECT


def test_big_held_results_are_not_offered_but_noted_for_collect():
    held, _, head = _held(offer=64)
    held.task({**head, "task": 10})
    _done(held, 0, 10, 0)
    kind, answer, _ = _read(held.frame())
    assert (kind, answer["state"]) == (protocol.STATE, "done")
    assert 10 in held.held


def test_without_offer_the_results_wait_for_collect():
    held, _, head = _held(offer=None)
    held.task({**head, "task": 10})
    _done(held, 0, 10, 0)
    assert not held.can_offer()
    kind, _, _ = _read(held.frame())
    assert kind == protocol.STATE


def test_a_task_cancelled_or_failed_is_no_longer_waited_for():
    held, _, head = _held()
    for task in (10, 11):
        held.task({**head, "task": task})
    _done(held, 0, 10, 0)
    assert not held.can_offer()
    held.ended(11)
    assert held.can_offer()
    _, answer, _ = _read(held.frame())
    assert answer["tasks"] == [10]


def test_a_new_run_forgets_what_the_last_left_and_a_result_not_held_passes():
    held, _, head = _held()
    held.task({**head, "task": 10})
    _done(held, 0, 10, 0)
    assert not held.task({**head, "run": 2, "hold": False, "task": 20})
    assert held.held == {} and held.run == 2 and not held.can_offer()
    head2 = {"task": 20, "run": 2, "compute_s": 0.0, "slices": 1}
    assert not held.result(0, head2, _value(0))  # the worker's to send on
