"""qjamfab's benchmark suite: `python -m benchmarks [--quick] [--only NAME]`
or `inv bench`.

Six benchmarks (see each module's docstring): `sae` (the qjam paper's
sparse-autoencoder table), `overhead` (a trivial run with cached data, vs
multiprocessing.Pool and a raw paramiko echo), `transfer` (a first run of a
large dataset over SSH vs OpenSSH `cat`), `memory` (peak RSS of master and
workers vs dataset size), `bootstrap` (3 hosts, cold and warm) and
`scale` (8 hosts x 8 workers against 1 x 1: ready, master CPU per run).
Each starts and stops its own private OpenSSH servers on 127.0.0.x
(tests/sshd_hosts.py) and its own workers. Results: a printed table per
benchmark and the targets met or not, `results.json` and PNG plots in the
output directory (benchmarks/results/ for the full suite).
"""

from __future__ import annotations

import json
import os
import time
import traceback

NAMES = ("sae", "overhead", "transfer", "memory", "bootstrap", "scale")
TITLES = {
    "sae": "1. Sparse autoencoder (mean seconds per iteration, speed-up vs serial)",
    "overhead": "2. Overhead of a trivial run with cached data",
    "transfer": "3. Transfer of a float64 dataset over SSH",
    "memory": "4. Peak memory vs dataset size",
    "bootstrap": "5. Bootstrap of 3 SSH hosts",
    "scale": "6. Many hosts and workers per host on stock sshds",
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_suite(
    scale: str = "full",
    only: list[str] | None = None,
    out_dir: str | None = None,
    log=print,
    merge: bool = True,
) -> dict:
    """Run the benchmarks named in `only` (default: all) at `scale`
    ("full", "quick" or "tiny"); write results.json and the plots to
    out_dir (merging into an earlier results.json there when `merge`).
    Returns the results dict. BLAS threads should be limited before numpy
    is imported (`common.one_blas_thread`; `python -m benchmarks` does)."""
    from . import common

    common.one_blas_thread()
    names = list(only or NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(
            f"unknown benchmark {unknown[0]!r}: choose from {', '.join(NAMES)}"
        )
    out_dir = out_dir or (
        RESULTS_DIR if scale == "full" else os.path.join(RESULTS_DIR, scale)
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    results = {}
    if merge and os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        if results.get("scale") != scale:
            results = {}
    results.update({"scale": scale, "machine": common.machine()})
    results.setdefault("benchmarks", {})
    scale_obj = common.SCALES[scale]
    for name in names:
        log(f"== {TITLES[name]} ==")
        module = __import__(f"benchmarks.{name}", fromlist=["run"])
        started = time.perf_counter()
        load_before = common.loadavg()
        steal_before = common.steal_seconds()
        try:
            result = module.run(scale_obj, log=log)
        except Exception:
            result = {"error": traceback.format_exc(), "targets": [], "table": "FAILED"}
            log(result["error"])
        result["seconds"] = time.perf_counter() - started
        # This machine may be shared: the load average around each benchmark
        # says whether something else competed for the 2 cores.
        result["loadavg_before"] = load_before
        result["loadavg_after"] = common.loadavg()
        # On a VM, time the hypervisor took from its cores.
        result["steal_s"] = common.steal_seconds() - steal_before
        result["busy_other_processes"] = common.busy_others(
            0.5 if scale == "full" else 0.1
        )
        result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        results["benchmarks"][name] = result
        log(result.get("table", ""))
        for t in result.get("targets", []):
            log(format_target(t))
        log(
            f"({name}: {result['seconds']:.1f} s; CPU stolen by the "
            f"hypervisor meanwhile: {result['steal_s']:.2f} s)\n"
        )
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    from . import plots

    try:
        results["plots"] = plots.write_all(results, out_dir)
    except ImportError as exc:
        log(f"(no plots: {exc}; pip install -e '.[bench]')")
        results["plots"] = []
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    log(summary(results))
    return results


def format_target(t: dict) -> str:
    mark = "met    " if t["met"] else "NOT MET"
    note = f" ({t['note']})" if t.get("note") else ""
    return (
        f"  [{mark}] {t['target']}: {t['measured']} {t['unit']} "
        f"(goal {t['goal']}){note}"
    )


def summary(results: dict) -> str:
    lines = ["== Targets =="]
    for name, result in results.get("benchmarks", {}).items():
        if result.get("error"):
            lines.append(
                f"  [FAILED ] {name}: {result['error'].strip().splitlines()[-1]}"
            )
        if result.get("skipped"):
            lines.append(f"  [SKIPPED] {name}: {result['skipped']}")
        lines += [format_target(t) for t in result.get("targets", [])]
    return "\n".join(lines)
