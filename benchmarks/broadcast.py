"""Broadcast: a big constant in params, sent once per host, kept on disk.

`python -m benchmarks.broadcast [--scale full|quick|tiny]`. A float64 array
(100 MiB at full scale, fresh content so no host has it yet) wrapped in a
`qjamfab.Broadcast`, in the params of a trivial job, on 2 SSH hosts x 2
workers (local:2 where sshd is not installed):

- making the Broadcast: pickling and hashing it once, on the master;
- the check each run makes that it did not change (`Broadcast.payload`);
- first run: time, bytes of the Broadcast sent (once per host), all bytes;
- second run (median of 5): time and bytes;
- a second Master on the same hosts (a new session), its first run;
- the same array as plain params, for comparison: every run sends it to
  every worker;
- for each, the memory it added to the workers once a job read it all
  (their proportional set size, summed: the Broadcast is mapped from the
  host's cache file, so the workers of a host share one copy; plain
  params are one per worker).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

MiB = 1 << 20
SIZES = {"full": {"mib": 100}, "quick": {"mib": 25}, "tiny": {"mib": 2}}
RUNS = 5  # second runs: the median of this many


def first_value(params, rows):
    return float(params["table"][0])


def total(params, rows):
    return float(params["table"].sum())  # reads every page of it


def _timed(m, params) -> tuple[float, object]:
    started = time.perf_counter()
    m.run(first_value, params)
    return time.perf_counter() - started, m.last_run


def _workers_pss_mib(m) -> float | None:
    """The workers' proportional set size, summed (MiB): memory they share
    (a Broadcast mapped from the host's cache file) counts once in all.
    None where their /proc is not this machine's."""
    total = 0
    for stats in m.worker_stats().values():
        try:
            with open(f"/proc/{stats['pid']}/smaps_rollup") as f:
                total += sum(int(x.split()[1]) for x in f if x.startswith("Pss:"))
        except OSError:
            return None
    return total / 1024


def _session(m, params, log) -> dict:
    m.run(first_value, {"table": np.zeros(1)})  # the job's imports, first
    before = _workers_pss_mib(m)
    first_s, first = _timed(m, params)
    again = [_timed(m, params) for _ in range(RUNS)]
    second_s = statistics.median(s for s, _ in again)
    m.run(total, params)
    after = _workers_pss_mib(m)
    row = {
        "workers_pss_added_mib": None if None in (before, after) else after - before,
        "first_run_s": first_s,
        "first_run_broadcast_bytes": first.broadcast_bytes_sent,
        "first_run_bytes_sent": first.bytes_sent,
        "second_run_s": second_s,
        "second_run_broadcast_bytes": max(r.broadcast_bytes_sent for _, r in again),
        "second_run_bytes_sent": max(r.bytes_sent for _, r in again),
    }
    log(f"  {row}")
    return row


def measure(scale: str, log=print) -> dict:
    from qjamfab import Broadcast, Master

    from .common import local_home, ssh_hosts, sshd_missing

    mib = SIZES[scale]["mib"]
    table = np.arange(mib * MiB // 8, dtype=np.float64) + time.time()
    started = time.perf_counter()
    shared = Broadcast(table)
    make_s = time.perf_counter() - started
    checks = []
    for _ in range(RUNS):
        started = time.perf_counter()
        shared.payload()
        checks.append(time.perf_counter() - started)
    result = {
        "mib": mib,
        "bytes": table.nbytes,
        "make_s": make_s,
        "check_s": statistics.median(checks),
    }
    why_not = sshd_missing()
    with ssh_hosts(2) if not why_not else local_home() as servers:
        if why_not:
            hosts, opts, layout = "local:2", {}, "local:2"
        else:
            hosts = servers.aliases[:2]
            opts = {"workers_per_host": 2, "ssh_config": servers.ssh_config}
            layout = "2 SSH hosts x 2 workers"
        result["layout"] = layout
        with Master(hosts, **opts) as m:
            result["broadcast"] = _session(m, {"table": shared}, log)
            result["plain"] = _session(m, {"table": table}, log)
        with Master(hosts, **opts) as m:
            result["second_master"] = _session(m, {"table": shared}, log)
    return result


def table(result: dict) -> str:
    from qjamfab.display.tables import render_table
    from qjamfab.text import format_bytes

    def line(name: str, r: dict) -> list:
        return [
            name,
            f"{r['first_run_s']:.3f}",
            format_bytes(r["first_run_broadcast_bytes"]),
            format_bytes(r["first_run_bytes_sent"]),
            f"{r['second_run_s'] * 1e3:.1f}",
            format_bytes(r["second_run_broadcast_bytes"]),
            format_bytes(r["second_run_bytes_sent"]),
            "-"
            if r["workers_pss_added_mib"] is None
            else f"{r['workers_pss_added_mib']:.0f}",
        ]

    rows = [
        line("Broadcast", result["broadcast"]),
        line("Broadcast, second Master", result["second_master"]),
        line("plain params", result["plain"]),
    ]
    head = (
        f"{result['mib']} MiB on {result['layout']}; making the Broadcast "
        f"{result['make_s'] * 1e3:.0f} ms, its check per run "
        f"{result['check_s'] * 1e3:.1f} ms\n"
    )
    return head + render_table(
        [
            "params",
            "first run s",
            "its Broadcast sent",
            "all sent",
            "second run ms",
            "its Broadcast sent",
            "all sent",
            "workers' PSS added, MiB",
        ],
        rows,
        "lrrrrrrr",
    )


def targets(result: dict) -> list[dict]:
    again = result["broadcast"]["second_run_broadcast_bytes"]
    new = result["second_master"]["first_run_broadcast_bytes"]
    return [
        {
            "target": f"a Broadcast of {result['mib']} MiB, second run",
            "measured": again,
            "unit": "bytes of it sent",
            "goal": "0",
            "met": again == 0,
        },
        {
            "target": f"a Broadcast of {result['mib']} MiB, a second Master",
            "measured": new,
            "unit": "bytes of it sent",
            "goal": "0",
            "met": new == 0,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    from .common import standalone_main

    return standalone_main("broadcast", __doc__, SIZES, measure, table, targets, argv)


if __name__ == "__main__":
    sys.exit(main())
