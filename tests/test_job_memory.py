"""What a worker daemon and a host agent keep of the jobs they are sent:
least recently used out past a budget of bytes (runtime/lru.py), never the
job of a task in flight; a job dropped and needed again is sent again."""

import os

import numpy as np
import pytest

from qjamfab import Master, protocol
from qjamfab.runtime.agent import Agent
from qjamfab.runtime.lru import DEFAULT_BUDGET, JobCache, job_budget
from qjamfab.runtime.pins import CacheLimitError

pytestmark = pytest.mark.timeout(120)


def test_least_recently_used_jobs_leave_past_the_budget():
    jobs: JobCache[str] = JobCache(100)
    jobs.put("a", "A", 40)
    jobs.put("b", "B", 40)
    assert jobs.get("a") == "A"  # a is now the most recently used
    jobs.put("c", "C", 40)
    assert ("a" in jobs, "b" in jobs, "c" in jobs) == (True, False, True)
    assert jobs.bytes == 80 and len(jobs) == 2
    # Pinned (a task in flight) and the newest stay, even over budget.
    jobs.put("d", "D", 90, pinned={"a"})
    assert ("a" in jobs, "c" in jobs, "d" in jobs) == (True, False, True)
    assert jobs.bytes == 130
    jobs.put("a", "A2", 10)  # replaced: its size counts once
    assert jobs.get("a") == "A2" and jobs.bytes == 100
    assert jobs.get("gone") is None
    jobs.clear()
    assert (len(jobs), jobs.bytes) == (0, 0)


def test_the_job_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("QJAMFAB_JOB_CACHE", raising=False)
    assert job_budget() == DEFAULT_BUDGET == 64 << 20
    monkeypatch.setenv("QJAMFAB_JOB_CACHE", "2M")
    assert job_budget() == 2 << 20
    monkeypatch.setenv("QJAMFAB_JOB_CACHE", "lots")
    with pytest.raises(CacheLimitError) as info:
        job_budget()
    assert str(info.value).splitlines()[0] == (
        "QJAMFAB_JOB_CACHE='lots' is not a size: write bytes, or a number "
        "with K, M, G or T (powers of 1024), e.g. QJAMFAB_JOB_CACHE=20G, "
        "500M or 1.5G"
    )


def _closure():
    """A new job each call: mapfunc over a fresh 256 KiB array."""
    weights = np.random.default_rng().integers(0, 1000, 1 << 15)  # 256 KiB

    def mapfunc(params, data):
        return int(weights.sum()) * sum(data)

    return mapfunc, int(weights.sum())


def test_a_workers_jobs_stay_within_the_budget_and_evicted_ones_come_back(
    monkeypatch,
):
    monkeypatch.setenv("QJAMFAB_JOB_CACHE", "1M")
    with Master("local:2") as m:
        first, first_sum = _closure()
        assert m.run(first, dataset=[1, 2, 3, 4]) == first_sum * 10
        for _ in range(12):  # 3 MiB of jobs
            job, total = _closure()
            assert m.run(job, dataset=[1, 2, 3, 4]) == total * 10
            for name, stats in m.worker_stats().items():
                assert 0 < stats["job_bytes"] <= 1 << 20, (name, stats)
                # Each job is over 256 KiB: at most 4 fit.
                assert stats["job_bytes"] >= stats["jobs"] << 18, (name, stats)
        # So `first` was dropped by both workers long ago, and the master
        # sent it once: each worker says it lacks it and gets it again.
        assert m.run(first, dataset=[1, 2, 3, 4]) == first_sum * 10


def test_over_ssh_an_agent_that_dropped_a_job_gets_it_again_to_combine(ssh):
    """Two workers on a host: the agent combines their results with the
    job's reduce, so it needs the job too, within its budget; a job it and
    its workers dropped is sent again when a worker asks. (The agent's own
    ask, for a job only it dropped, is the test below.)"""
    host = "host1 workers=2 env.QJAMFAB_JOB_CACHE=1M"
    with Master([host], ssh_config=ssh.ssh_config) as m:
        first, first_sum = _closure()
        assert m.run(first, dataset=[1, 2, 3, 4]) == first_sum * 10
        for _ in range(6):
            job, total = _closure()
            assert m.run(job, dataset=[1, 2, 3, 4]) == total * 10
        for name, stats in m.worker_stats().items():
            assert stats["job_bytes"] <= 1 << 20, (name, stats)
            assert stats["agent_job_bytes"] <= 1 << 20, (name, stats)
            assert stats["agent_job_bytes"] >= stats["agent_jobs"] << 18
        assert m.run(first, dataset=[1, 2, 3, 4]) == first_sum * 10


def _frames(fd: int):
    reader = protocol.FrameReader(lambda view: os.readv(fd, [view]))
    while True:
        try:
            yield reader.read()
        except EOFError:
            return


def test_an_agent_keeps_its_jobs_within_the_budget_and_asks_for_a_dropped_one(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("QJAMFAB_JOB_CACHE", "100K")
    master_in, to_agent = os.pipe()
    from_agent, master_out = os.pipe()
    agent = Agent(str(tmp_path / "home"), master_in, master_out)

    def send(kind: int, head: dict, payload=()) -> None:
        protocol.write_all(
            lambda v: os.writev(to_agent, v), protocol.frame(kind, head, payload)
        )
        agent.from_master()

    def task(run: int, func: str) -> None:
        send(
            protocol.TASK,
            {
                "task": run,
                "run": run,
                "func": func,
                "refs": None,
                "slices": [0],
                "leaves": 1,
                "params": False,
                "hold": True,
            },
        )

    job = bytes(40 << 10)
    for run in range(6):
        send(protocol.FUNC, {"hash": f"job{run}"}, [job])
        task(run, f"job{run}")
        assert agent.funcs.bytes <= 100 << 10
    assert "job0" not in agent.funcs and "job5" in agent.funcs
    # A run's job stays while it is in flight, however many come after.
    for extra in ("x1", "x2", "x3"):
        send(protocol.FUNC, {"hash": extra}, [job])
    assert "job5" in agent.funcs and agent.funcs.bytes <= 100 << 10
    task(6, "job0")  # sent in an earlier run, dropped since
    agent.master.flush()
    os.close(master_out)
    said = [(k, h) for k, _, h, _ in _frames(from_agent) if k == protocol.STATE]
    assert said == [
        (protocol.STATE, {"task": 6, "state": "blocked", "refs": [], "func": True})
    ]
    for fd in (master_in, to_agent, from_agent):
        os.close(fd)
