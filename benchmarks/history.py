"""The trivial run on `local:2` at several commits, side by side: where
the time per run went, and when.

    python -m benchmarks.history REV [REV ...] [--passes 3] [--runs 2000]

Each REV is exported (`git archive`) into a temporary directory and timed
in a child process of its own that imports qjamfab from there, with a
private QJAMFAB_HOME. The commits run in turn, `--passes` times over, so
a slower spell of the machine hits them alike. Per commit it prints the
medians over the passes of the master's CPU, the two workers' CPU (from
/proc) and the wall time per run. The job and its dataset (8 cached
slices of 100 rows) are defined here, so every commit runs the same
ones. Needs git, and runs from a clone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from .common import ROOT, one_blas_thread

# What the child runs, with the commit's tree first on sys.path: nothing
# of this tree's benchmarks, which the commit may not have.
_CHILD = """
import json, os, sys, time
import numpy as np
import qjamfab
from qjamfab import DataSet, Master
assert qjamfab.__file__.startswith(sys.argv[1]), qjamfab.__file__
runs = int(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick

def trivial(params, rows):
    return 0

with Master("local:2") as m:
    data = DataSet(np.arange(800 * 8, dtype=np.float64).reshape(800, 8))
    for _ in range(300):
        m.run(trivial, 1, data)
    pids = [s["pid"] for s in m.worker_stats().values()]
    workers = sum(map(cpu, pids))
    started, wall = time.process_time(), time.perf_counter()
    for _ in range(runs):
        m.run(trivial, 1, data)
    out = {
        "master_ms": (time.process_time() - started) / runs * 1e3,
        "workers_ms": (sum(map(cpu, pids)) - workers) / runs * 1e3,
        "wall_ms": (time.perf_counter() - wall) / runs * 1e3,
    }
print(json.dumps(out))
"""


def _export(rev: str, into: str) -> None:
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", rev], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)


def _time(tree: str, runs: int) -> dict:
    home = tempfile.mkdtemp(prefix="qjamfab-history-home-")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, tree, str(runs)],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": tree, "QJAMFAB_HOME": home},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the run at {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(revs: list[str], passes: int, runs: int) -> dict[str, dict]:
    """Per commit: the median over the passes of each measure, and the
    passes' values."""
    trees = {rev: tempfile.mkdtemp(prefix="qjamfab-history-") for rev in revs}
    try:
        for rev, tree in trees.items():
            _export(rev, tree)
        samples: dict[str, list[dict]] = {rev: [] for rev in revs}
        for _ in range(passes):
            for rev, tree in trees.items():
                samples[rev].append(_time(tree, runs))
    finally:
        for tree in trees.values():
            shutil.rmtree(tree, ignore_errors=True)
    return {
        rev: {
            key: statistics.median(s[key] for s in got)
            for key in ("master_ms", "workers_ms", "wall_ms")
        }
        | {"passes": got}
        for rev, got in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.history", description=__doc__.splitlines()[0]
    )
    parser.add_argument("revs", nargs="+", help="commits, oldest first")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args(argv)
    one_blas_thread()
    rows = measure(args.revs, args.passes, args.runs)
    print(f"{'commit':>12} {'master ms':>10} {'workers ms':>11} {'wall ms':>9}")
    for rev, row in rows.items():
        print(
            f"{rev:>12} {row['master_ms']:10.3f} {row['workers_ms']:11.3f} "
            f"{row['wall_ms']:9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
