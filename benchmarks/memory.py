"""4. Memory: peak RSS of the master and of each worker vs dataset size.

Each size runs in a fresh child process (so its high-water mark is its
own) on fresh SSH workers (stopped, and their caches cleared, between
sizes): a float64 .npy file of that size is opened as a memory-mapped
`DataSet(path)` and run twice with a trivial job that reads every value
on 2 SSH hosts, one worker each.

- master: VmHWM (peak resident set, which counts the pages of the
  memory-mapped file that were touched: page cache, not a copy) and the
  peak of RssAnon (memory of the process's own: copies), sampled every
  5 ms by a thread;
- workers: VmHWM of the worker pids from `master.worker_stats()`, against
  the bytes of the slices each holds (its host's cache bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time

from .common import Scale, proc_status, run_child, ssh_hosts, sshd_missing, target

MiB = 1 << 20


def write_npy(path: str, mib: int, salt: int) -> None:
    """A (rows, 64) float64 .npy file of `mib` MiB, written in blocks so
    this process never holds it."""
    import numpy as np

    rows = mib * MiB // (64 * 8)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(rows, 64))
    block = 1 << 14
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        out[start:stop] = (
            np.arange(start * 64, stop * 64, dtype=np.float64).reshape(-1, 64)
            + salt * 1e12
        )
    out.flush()
    del out


def trivial(params, rows):
    # Reads every value: a worker's slices (mapped from its cache files)
    # count in its resident set once touched.
    return rows.shape[0] + 0 * float(rows.sum())


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        status = proc_status()
        for key in ("RssAnon", "RssFile", "VmRSS"):
            self.peak[key] = max(self.peak.get(key, 0), status.get(key, 0))

    def stop(self) -> dict:
        self._done.set()
        self.join()
        self.sample()
        return self.peak


def child(path: str, ssh_config: str, aliases: list[str]) -> dict:
    """Runs in the child: measures one size and returns the numbers."""
    from qjamfab import DataSet, Master

    sampler = _Sampler()
    with Master(aliases, workers_per_host=1, ssh_config=ssh_config) as m:
        m.run(lambda p, x: 0)
        before = proc_status()
        stats = m.worker_stats()
        workers_before = {n: proc_status(s["pid"])["VmHWM"] for n, s in stats.items()}
        sampler.start()
        dataset = DataSet(path)
        started = time.perf_counter()
        rows = m.run(trivial, dataset=dataset)
        first = time.perf_counter() - started
        sent = m.last_run.dataset_bytes_sent
        backups = getattr(m.last_run, "backup_tasks", None)
        m.run(trivial, dataset=dataset)
        peak = sampler.stop()
        after = proc_status()
        stats = m.worker_stats()
        workers = {}
        for name, s in stats.items():
            status = proc_status(s["pid"])
            workers[name] = {
                "pid": s["pid"],
                "vm_hwm": status["VmHWM"],
                "vm_rss": status["VmRSS"],
                "vm_hwm_before": workers_before.get(name),
                "slice_bytes": s["bytes"],
                "slices": s["entries"],
            }
    return {
        "rows": int(rows),
        "file_bytes": os.path.getsize(path),
        "first_run_s": first,
        "dataset_bytes_sent": sent,
        "first_run_backup_tasks": backups,
        "master": {
            "vm_hwm": after["VmHWM"],
            "vm_hwm_before": before["VmHWM"],
            "rss_anon_before": before.get("RssAnon"),
            "peak_rss_anon": peak.get("RssAnon"),
            "peak_rss_file": peak.get("RssFile"),
        },
        "workers": workers,
    }


def run(scale: Scale, log=print) -> dict:
    from qjamfab import hostspec
    from qjamfab.engines import cluster

    why_not = sshd_missing()
    if why_not:
        return {"skipped": why_not, "rows": [], "table": why_not, "targets": []}
    rows = []
    scratch = tempfile.mkdtemp(prefix="qjamfab-bench-npy-")
    try:
        with ssh_hosts(2) as servers:
            specs = hostspec.parse_hosts(servers.aliases)
            for i, mib in enumerate(scale.memory_mib):
                path = os.path.join(scratch, f"data-{mib}.npy")
                write_npy(path, mib, i + 1)
                try:
                    row = run_child(
                        "benchmarks.memory",
                        [path, servers.ssh_config, ",".join(servers.aliases)],
                        f"memory child for {mib} MiB",
                    )
                finally:
                    os.unlink(path)
                row["mib"] = mib
                rows.append(row)
                cluster.stop_workers(specs, ssh_config=servers.ssh_config)
                cluster.clear_cache(specs, ssh_config=servers.ssh_config)
                ws = row["workers"].values()
                log(
                    f"  memory {mib:>5} MiB: master VmHWM "
                    f"{row['master']['vm_hwm'] / MiB:.0f} MiB (anon peak "
                    f"{row['master']['peak_rss_anon'] / MiB:.0f} MiB); "
                    "workers VmHWM "
                    + ", ".join(
                        f"{w['vm_hwm'] / MiB:.0f} MiB for "
                        f"{w['slice_bytes'] / MiB:.0f} MiB"
                        for w in ws
                    )
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": rows, "table": table(rows), "targets": targets(rows)}


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def table(rows: list[dict]) -> str:
    from qjamfab.display.tables import render_table

    lines = []
    for r in rows:
        m = r["master"]
        ws = list(r["workers"].values())
        lines.append(
            [
                f"{r['mib']} MiB",
                _mib(m["vm_hwm_before"]),
                _mib(m["vm_hwm"]),
                _mib(m["peak_rss_anon"]),
                _mib(m["peak_rss_file"]),
                " / ".join(_mib(w["slice_bytes"]) for w in ws),
                " / ".join(_mib(w["vm_hwm"]) for w in ws),
                " / ".join(_mib(1.3 * w["slice_bytes"] + 80e6) for w in ws),
            ]
        )
    return render_table(
        [
            "dataset",
            "master base MiB",
            "master VmHWM MiB",
            "master anon peak MiB",
            "master file peak MiB",
            "worker slices MiB",
            "worker VmHWM MiB",
            "worker limit MiB",
        ],
        lines,
        "lrrrrrrr",
    )


def targets(rows: list[dict]) -> list[dict]:
    if not rows:
        return []
    out = []
    worst = max(
        (
            (w["vm_hwm"] - (1.3 * w["slice_bytes"] + 80e6), w, r["mib"])
            for r in rows
            for w in r["workers"].values()
        ),
        key=lambda t: t[0],
    )
    excess, w, mib = worst
    out.append(
        target(
            "worker peak RSS",
            "<= 1.3 x slice bytes + 80 MB",
            round(w["vm_hwm"] / 1e6, 1),
            "MB",
            excess <= 0,
            f"worst at {mib} MiB: {w['vm_hwm'] / 1e6:.0f} MB for "
            f"{w['slice_bytes'] / 1e6:.0f} MB of slices (limit "
            f"{(1.3 * w['slice_bytes'] + 80e6) / 1e6:.0f} MB)",
        )
    )
    big = max(rows, key=lambda r: r["file_bytes"])
    m = big["master"]
    out.append(
        target(
            f"master peak RSS, {big['mib']} MiB memory-mapped dataset (VmHWM)",
            "<= 300 MB",
            round(m["vm_hwm"] / 1e6, 1),
            "MB",
            m["vm_hwm"] <= 300e6,
            f"of which mapped file pages up to "
            f"{m['peak_rss_file'] / 1e6:.0f} MB; anonymous peak "
            f"{m['peak_rss_anon'] / 1e6:.0f} MB",
        )
    )
    out.append(
        target(
            f"master never copies the {big['mib']} MiB dataset "
            "whole (anonymous peak minus base)",
            "< dataset size",
            round((m["peak_rss_anon"] - m["rss_anon_before"]) / 1e6, 1),
            "MB",
            m["peak_rss_anon"] - m["rss_anon_before"] < big["file_bytes"],
        )
    )
    return out


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        from .common import one_blas_thread

        one_blas_thread()
        result = child(sys.argv[2], sys.argv[3], sys.argv[4].split(","))
        print(json.dumps(result))
    else:
        sys.exit(
            "usage: python -m benchmarks.memory --child NPY SSH_CONFIG "
            "ALIASES (run by the memory benchmark)"
        )
