"""Params once per host: bytes, time and memory of a run's params.

Every run ships params (the model) to the workers. qjamfab sends big
params once per host (the host's agent writes them into shared memory,
each worker maps them) and once into shared memory for local workers;
`QJAMFAB_SHARE_PARAMS=0` sends them with each worker's first task, as
before. Both ways are timed in the same Master, run by run in turn, so a
slow spell of this shared VM hits both alike. Params of 1, 25 and 100
MiB (a float64 array); the job reads one value per page of them (every
page mapped) and returns a float.

- SSH: 1 host x 1 worker, 1 x 4, 2 x 1 and 2 x 4 (private sshds on
  loopback, all on this machine's cores; the four Masters open at once
  and run by run in turn, so their ratios are paired): bytes the master
  sent per run, and wall time per run;
- local:4: wall time per run;
- local:2, 100 MiB: the proportional set size (Pss, /proc/PID/smaps_rollup)
  of the master and of its workers after a run, less after a run of tiny
  params: what the params cost in memory, shared pages counted once (the
  master's includes the caller's own params array);
- Dask, on one `distributed.LocalCluster` of 4 one-thread workers: the
  params scattered to all workers (`client.scatter(params,
  broadcast=True)`), then one task per worker using them, against plain
  per-task arguments (`client.submit(fn, params)`); wall time per run.

    python -m benchmarks.params [--scale full|quick|tiny] [--out DIR]

writes `params.json` in DIR (default benchmarks/results/, or
benchmarks/results/<scale>/). Dask rows need `qjamfab[dask]`; SSH rows
OpenSSH's sshd. Not in `python -m benchmarks`' suite.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

from .common import env, local_home, ssh_hosts, sshd_missing, standalone_main, target

MiB = 1 << 20
# scale -> (params sizes in MiB, runs per configuration)
SIZES = {"full": ((1, 25, 100), 5), "quick": ((1, 25), 3), "tiny": ((1,), 1)}
MODES = {"shared": None, "per worker": "0"}  # QJAMFAB_SHARE_PARAMS
# (hosts, workers per host); 1 x 4 against 1 x 1 is what one real host
# sees, 2 x 4 against 2 x 1 has all 8 workers on these cores
SSH_LAYOUTS = ((1, 1), (1, 4), (2, 1), (2, 4))


def touch(params, data):
    """Reads one value a page: every page of the params is mapped."""
    return float(params[::512].sum())


def _add(a, b):
    return a + b


def _params(mib: int):
    import numpy as np

    return np.ones(mib * MiB // 8, dtype=np.float64)


def _timed_runs(masters: dict, params, runs: int) -> dict:
    """Every Master and both modes in turn, run by run: {name: {mode:
    (median seconds, bytes sent)}}."""
    times: dict = {name: {m: [] for m in MODES} for name in masters}
    sent: dict = {name: {} for name in masters}
    for i in range(runs + 1):  # the first round warms up, untimed
        for name, master in masters.items():
            expected = float(params[::512].sum()) * len(master.workers)
            for mode, value in MODES.items():
                with env(QJAMFAB_SHARE_PARAMS=value):
                    started = time.perf_counter()
                    got = master.run(touch, params, reduce=_add, progress=False)
                    if i:
                        times[name][mode].append(time.perf_counter() - started)
                assert got == expected, (got, expected)
                sent[name][mode] = master.last_run.bytes_sent
    return {
        name: {
            mode: {"s": statistics.median(t), "bytes_sent": sent[name][mode]}
            for mode, t in by_mode.items()
        }
        for name, by_mode in times.items()
    }


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for {pid}")


def _memory(master, mib: int) -> dict:
    """Pss of the master and of its workers (MiB), params of `mib` less
    tiny ones."""
    workers = [s["pid"] for s in master.worker_stats().values()]
    out = {}
    for mode, value in MODES.items():
        with env(QJAMFAB_SHARE_PARAMS=value):
            master.run(touch, _params(0) + 1.0, reduce=_add, progress=False)
            base = _pss(os.getpid()), sum(map(_pss, workers))
            params = _params(mib)
            master.run(touch, params, reduce=_add, progress=False)
            out[mode] = {
                "master": (_pss(os.getpid()) - base[0]) / MiB,
                "workers": (sum(map(_pss, workers)) - base[1]) / MiB,
            }
            del params
    return out


def _dask(sizes, runs: int, log) -> dict:
    try:
        import distributed
    except ImportError:
        log("  params: no distributed here, Dask rows skipped")
        return {}
    import tempfile

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="qjamfab-bench-dask-") as scratch:
        with (
            distributed.LocalCluster(
                n_workers=4,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                local_directory=scratch,
            ) as cluster,
            distributed.Client(cluster, set_as_default=False) as client,
        ):
            client.wait_for_workers(4, timeout=60)
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])

            def scattered(params):
                future = client.scatter(params, broadcast=True, hash=False)
                tasks = [
                    client.submit(touch, future, None, workers=[w], pure=False)
                    for w in workers
                ]
                return sum(client.gather(tasks))

            def per_task(params):
                tasks = [
                    client.submit(touch, params, None, workers=[w], pure=False)
                    for w in workers
                ]
                return sum(client.gather(tasks))

            ways = {"scatter(broadcast=True)": scattered, "per-task argument": per_task}
            for mib in sizes:
                params = _params(mib)
                times: dict[str, list[float]] = {w: [] for w in ways}
                for i in range(runs + 1):  # the first round warms up
                    for way, fn in ways.items():
                        started = time.perf_counter()
                        fn(params)
                        if i:
                            times[way].append(time.perf_counter() - started)
                out[str(mib)] = {w: statistics.median(t) for w, t in times.items()}
                log(f"  params dask {mib} MiB: {out[str(mib)]}")
    return out


def measure(scale_name: str, log=print) -> dict:
    from qjamfab import Master

    sizes, runs = SIZES[scale_name]
    result: dict = {"sizes_mib": list(sizes), "runs": runs, "ssh": {}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(local_home())
        with Master("local:4") as m:
            result["local:4"] = {
                str(mib): _timed_runs({"local:4": m}, _params(mib), runs)["local:4"]
                for mib in sizes
            }
        with Master("local:2") as m:
            result["memory_local2_mib"] = _memory(m, max(sizes))
        log(f"  params local: {result['local:4']}")
        if not sshd_missing():
            servers = stack.enter_context(ssh_hosts(2))
            # All at once, run by run in turn: the ratios are paired.
            masters = {
                f"{hosts} x {per_host}": stack.enter_context(
                    Master(
                        servers.aliases[:hosts],
                        workers_per_host=per_host,
                        ssh_config=servers.ssh_config,
                    )
                )
                for hosts, per_host in SSH_LAYOUTS
            }
            by_size = {
                str(mib): _timed_runs(masters, _params(mib), runs) for mib in sizes
            }
            for name in masters:
                result["ssh"][name] = {mib: got[name] for mib, got in by_size.items()}
                log(f"  params ssh {name}: {result['ssh'][name]}")
    result["dask"] = _dask(sizes, runs, log)
    return result


def table(result: dict) -> str:
    from qjamfab.display.tables import render_table

    rows = []
    configs = {f"SSH {k}": v for k, v in result["ssh"].items()}
    configs["local:4"] = result["local:4"]
    for name, by_size in configs.items():
        for mib, modes in by_size.items():
            for mode, m in modes.items():
                rows.append(
                    [
                        name,
                        f"{mib} MiB",
                        mode,
                        f"{m['s'] * 1e3:.1f}",
                        f"{m['bytes_sent'] / MiB:.1f}" if name != "local:4" else "-",
                    ]
                )
    for mib, ways in result.get("dask", {}).items():
        for way, s in ways.items():
            rows.append(["Dask 4 workers", f"{mib} MiB", way, f"{s * 1e3:.1f}", "-"])
    for mode, extra in result["memory_local2_mib"].items():
        rows.append(
            [
                "local:2 memory",
                f"{max(result['sizes_mib'])} MiB",
                mode,
                f"master +{extra['master']:.0f}, "
                f"workers +{extra['workers']:.0f} MiB Pss",
                "-",
            ]
        )
    return render_table(
        ["where", "params", "how", "median ms per run", "MiB sent per run"],
        rows,
        "lllrr",
    )


def _one_host(ssh: dict, mib: str) -> str:
    """1 x 4 against 1 x 1, as one real host sees it, if measured."""
    if "1 x 4" not in ssh:
        return ""
    four, one = (ssh[n][mib]["shared"]["s"] for n in ("1 x 4", "1 x 1"))
    return f"; one host, 1 x 4 vs 1 x 1: {four / one:.2f}x"


def targets(result: dict) -> list[dict]:
    out = []
    ssh = result["ssh"]
    sizes = [str(s) for s in result["sizes_mib"]]
    mid = "25" if "25" in sizes else sizes[-1]
    if "2 x 4" in ssh:
        sent = ssh["2 x 4"][mid]["shared"]["bytes_sent"] / MiB
        each = ssh["2 x 4"][mid]["per worker"]["bytes_sent"] / MiB
        goal = 2 * int(mid)
        out.append(
            target(
                f"bytes sent for {mid} MiB params, 2 hosts x 4 workers",
                f"<= {goal} MiB (once per host) + 1",
                round(sent, 1),
                " MiB",
                sent <= goal + 1,
                f"per worker: {each:.0f} MiB",
            )
        )
        big = sizes[-1]
        ratio = ssh["2 x 4"][big]["shared"]["s"] / ssh["2 x 1"][big]["shared"]["s"]
        out.append(
            target(
                f"run with {big} MiB params, 2 x 4 vs 2 x 1 (wall, medians)",
                "<= 1.3x",
                round(ratio, 2),
                "x",
                ratio <= 1.3,
                f"{ssh['2 x 4'][big]['shared']['s'] * 1e3:.0f} ms vs "
                f"{ssh['2 x 1'][big]['shared']['s'] * 1e3:.0f} ms; per worker "
                f"{ssh['2 x 4'][big]['per worker']['s'] * 1e3:.0f} ms"
                + _one_host(ssh, big),
            )
        )
    mem = result["memory_local2_mib"]
    big = max(result["sizes_mib"])
    shared, each = mem["shared"], mem["per worker"]
    out.append(
        target(
            f"params of {big} MiB on local:2: extra Pss of the workers",
            f"<= {big * 1.1:.0f} MiB (one copy in all)",
            round(shared["workers"]),
            " MiB",
            shared["workers"] <= big * 1.1,
            f"per worker: {each['workers']:.0f} MiB; the master +"
            f"{shared['master']:.0f} MiB (+{each['master']:.0f} per worker), "
            f"the caller's own {big} MiB array included",
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    return standalone_main("params", __doc__, SIZES, measure, table, targets, argv)


if __name__ == "__main__":
    sys.exit(main())
