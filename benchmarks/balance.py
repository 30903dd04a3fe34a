"""Balance: an uneven run on one host of several workers.

`python -m benchmarks.balance [--scale full|quick|tiny]`. One SSH host
(a private sshd; `command:python3` where sshd is not installed) with 4
workers runs a job over 32 slices whose first 8 (the first worker's
share, in the layout every run keeps) take 40 ms each and the others 5 ms:
440 ms of work, 110 ms per worker if spread evenly, 320 ms if the first
worker does its share alone. Each worker's share goes as two tasks (the
first run splits, and so does every run after an uneven one), so a worker
that runs dry can take the first worker's second task.

The job sleeps rather than computes, so the 4 workers do not compete for
this machine's 2 cores: what is measured is where the work goes, as on a
host with cores of its own. Reported: the first run of a new Master, and
the median of the runs after it; the tasks moved by the host (its agent)
and by the master.
"""

from __future__ import annotations

import statistics
import sys
import time

SIZES = {"full": {"runs": 9}, "quick": {"runs": 5}, "tiny": {"runs": 2}}
SLICES = 32
WORKERS = 4
SLOW_S, FAST_S = 0.040, 0.005


def uneven(params, xs):
    time.sleep(SLOW_S if xs[0] < SLICES // WORKERS else FAST_S)
    return xs[0]


def _timed(m, data) -> tuple[float, object]:
    started = time.perf_counter()
    assert m.run(uneven, dataset=data) == sum(range(SLICES))
    return time.perf_counter() - started, m.last_run


def measure(scale: str, log=print) -> dict:
    from qjamfab import DataSet, Master

    from .common import local_home, ssh_hosts, sshd_missing

    data = DataSet(list(range(SLICES)), slice_size=1)
    runs = SIZES[scale]["runs"]
    why_not = sshd_missing()
    with ssh_hosts(1) if not why_not else local_home() as servers:
        if why_not:
            hosts, opts = "command:python3", {"workers_per_host": WORKERS}
            layout = f"command:python3 x {WORKERS} workers"
        else:
            hosts = servers.aliases[:1]
            opts = {"workers_per_host": WORKERS, "ssh_config": servers.ssh_config}
            layout = f"1 SSH host x {WORKERS} workers"
        # No backup copies: moves only (a backup would hide where work went).
        with Master(hosts, straggler_factor=1000, **opts) as m:
            m.run(lambda p, xs: 0, dataset=data)  # the slices, in the cache
        with Master(hosts, straggler_factor=1000, **opts) as m:
            first_s, first = _timed(m, data)
            later = [_timed(m, data) for _ in range(runs)]
    result = {
        "layout": layout,
        "ideal_s": (SLICES // WORKERS * (SLOW_S + 3 * FAST_S)) / WORKERS,
        "alone_s": SLICES // WORKERS * SLOW_S,
        "first_run_s": first_s,
        "first_moved_at_hosts": first.moved_at_hosts,
        "first_moved_tasks": first.moved_tasks,
        "later_run_s": statistics.median(s for s, _ in later),
        "later_moved_at_hosts": sum(r.moved_at_hosts for _, r in later),
        "later_moved_tasks": sum(r.moved_tasks for _, r in later),
        "later_runs": runs,
    }
    log(f"  {result}")
    return result


def table(result: dict) -> str:
    from qjamfab.display.tables import render_table

    rows = [
        [
            "first run of a new Master",
            f"{result['first_run_s'] * 1e3:.0f}",
            str(result["first_moved_at_hosts"]),
            str(result["first_moved_tasks"]),
        ],
        [
            f"runs after it (median of {result['later_runs']}; moves summed)",
            f"{result['later_run_s'] * 1e3:.0f}",
            str(result["later_moved_at_hosts"]),
            str(result["later_moved_tasks"]),
        ],
    ]
    head = (
        f"{SLICES} slices on {result['layout']}: spread evenly "
        f"{result['ideal_s'] * 1e3:.0f} ms, the first worker's share alone "
        f"{result['alone_s'] * 1e3:.0f} ms\n"
    )
    return head + render_table(
        ["run", "wall ms", "moved by the host", "moved by the master"], rows, "lrrr"
    )


def targets(result: dict) -> list[dict]:
    # Its second task (160 ms) taken by a worker that ran dry: 200 ms.
    goal = result["alone_s"] * 0.75
    return [
        {
            "target": "an uneven run on one host of 4 workers, runs after the first",
            "measured": round(result["later_run_s"] * 1e3),
            "unit": "ms",
            "goal": f"< {goal * 1e3:.0f} (its first worker's share alone: "
            f"{result['alone_s'] * 1e3:.0f})",
            "met": result["later_run_s"] < goal,
        }
    ]


def main(argv: list[str] | None = None) -> int:
    from .common import standalone_main

    return standalone_main("balance", __doc__, SIZES, measure, table, targets, argv)


if __name__ == "__main__":
    sys.exit(main())
