"""Big results and cached slices: the master's peak memory reducing 8 big
results, and what verifying a cached slice costs at its first use.

`python -m benchmarks.reduce [--scale full|quick|tiny]` (not in the suite).

1. Master memory: 8 local worker processes, 8 slices, each mapfunc
   returning one float64 array of `result_mb` MB (full: 300), reduced with
   the default `+`. Each configuration runs in a fresh child process, one
   run after a warm-up, while a thread samples the child's RssAnon (its own
   memory: arrays, buffers; not page cache) every 2 ms. Arrival orders:
   "together" (all finish at once) and "evens first" (slices 0, 2, 4, 6
   finish 0.5 s before the odd ones: each waits for its sibling).
   Then 4 SSH hosts of 2 workers each ("together" only): their agents
   combine each pair before it crosses, so 4 results reach the master.
   Configurations: as shipped, and "unbounded" (PARK_BYTES and HELD_BYTES
   set past any result: every result read as it comes and held until its
   sibling comes, as before parking and spilling existed), so the table
   shows both from the same machine at the same time.
2. Verification: a sealed slice file of `verify_mb` MB in a RefCache
   (runtime/cache.py); a fresh RefCache (as after a daemon restart) reads
   it with `get`, which checks its sha256 before first use, against a
   second `get` (mapped, checked already) and a plain read of the file.
   Page cache warm (the file was just written), so this is the hash's
   cost, not the disk's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time

from .common import proc_status, run_child, target

SIZES = {
    "full": {"result_mb": 300, "verify_mb": 400, "verify_rounds": 5},
    "quick": {"result_mb": 60, "verify_mb": 100, "verify_rounds": 3},
    "tiny": {"result_mb": 10, "verify_mb": 10, "verify_rounds": 1, "orders": 1},
}
MB = 10**6
ORDERS = {"together": [0.0] * 8, "evens first": [0.0, 0.5] * 4}


def big_result(params, rows):
    import time

    import numpy as np

    i = int(np.asarray(rows).ravel()[0])
    mb, delays = params
    time.sleep(delays[i])
    return np.full(mb * 10**6 // 8, float(i + 1))


def child(
    mb: int, order: str, unbounded: bool, ssh_config: str = "", aliases: str = ""
) -> dict:
    """Runs in the child: one configuration, its numbers. With `aliases`
    (comma-separated), on those SSH hosts, 2 workers each; else 8 local."""
    import numpy as np

    from qjamfab import Master
    from qjamfab.core import results

    if unbounded:
        results.PARK_BYTES = results.HELD_BYTES = 1 << 62
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc_status()["RssAnon"])
            time.sleep(0.002)

    data = np.arange(8.0).reshape(8, 1)
    hosts = aliases.split(",") if aliases else "local"
    per_host = 2 if aliases else 8
    with Master(hosts, workers_per_host=per_host, ssh_config=ssh_config or None) as m:
        m.run(lambda p, rows: 0, dataset=data)
        base = proc_status()["RssAnon"]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        total = m.run(big_result, dataset=data, params=(mb, ORDERS[order]))
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        stats = m.last_run
    expected = float(sum(range(1, 9)))
    return {
        "order": order,
        "workers": f"{len(hosts)} SSH hosts x 2" if aliases else "8 local",
        "config": "unbounded" if unbounded else "as shipped",
        "result_mb": mb,
        "base_anon": base,
        "peak_anon": peak[0],
        "held_peak": peak[0] - base,
        "seconds": elapsed,
        "spilled_results": stats.spilled_results,
        "correct": bool(total[0] == expected and total[-1] == expected),
    }


def _run_child(mb: int, order: str, unbounded: bool, *ssh: str) -> dict:
    config = "unbounded" if unbounded else "shipped"
    return run_child(
        "benchmarks.reduce", [str(mb), order, config, *ssh], "reduce child"
    )


def measure_memory(mb: int, log=print, orders: int = len(ORDERS)) -> list[dict]:
    """8 local workers in both orders (the first `orders` of them: the
    test suite's smoke run takes one); then, where sshd is installed, 4 SSH
    hosts of 2 workers (whose agents combine their pairs first)."""
    from .common import ssh_hosts, sshd_missing

    configs: list[tuple[str, bool, tuple[str, ...]]] = [
        (order, unbounded, ())
        for unbounded in (False, True)
        for order in list(ORDERS)[:orders]
    ]
    rows = []
    for order, unbounded, ssh in configs:
        rows.append(_run_child(mb, order, unbounded, *ssh))
    if not sshd_missing():
        with ssh_hosts(4) as servers:
            ssh = (servers.ssh_config, ",".join(servers.aliases))
            for unbounded in (False, True):
                rows.append(_run_child(mb, "together", unbounded, *ssh))
    for row in rows:
        log(
            f"  {row['workers']:<16} {row['config']:>10}, {row['order']:<11}: "
            f"master holds {row['held_peak'] / MB:.0f} MB at most "
            f"({row['spilled_results']} spilled), {row['seconds']:.2f} s"
        )
    return rows


def measure_verify(mb: int, rounds: int) -> dict:
    """Seconds per first use (hash checked), second use, and a plain read."""
    import numpy as np

    from qjamfab import protocol
    from qjamfab.runtime.cache import RefCache

    first, second, plain = [], [], []
    with tempfile.TemporaryDirectory(prefix="qjamfab-bench-verify-") as parent:
        # The cache keeps its lock and pins beside its directory: in here.
        tmp = os.path.join(parent, "cache")
        os.mkdir(tmp, 0o700)
        value = np.arange(mb * MB // 8, dtype=np.float64)
        parts = protocol.encode(value)
        for k in range(rounds):
            ref = hashlib.sha256(f"bench-{k}".encode()).hexdigest()
            _store(tmp, ref, parts)
            cache = RefCache(tmp)  # a fresh daemon: nothing checked yet
            started = time.perf_counter()
            got = cache.get(ref)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            cache.get(ref)
            second.append(time.perf_counter() - started)
            assert np.array_equal(got[-3:], value[-3:])
            del got, cache
            started = time.perf_counter()
            with open(os.path.join(tmp, ref), "rb") as f:
                while f.read(1 << 24):
                    pass
            plain.append(time.perf_counter() - started)
    size = sum(memoryview(p).nbytes for p in parts)

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    return {
        "bytes": size,
        "first_use_s": median(first),
        "second_use_s": median(second),
        "plain_read_s": median(plain),
        "verify_mb_per_s": size / MB / median(first),
        "rounds": rounds,
    }


def _store(directory: str, ref: str, parts: list) -> None:
    """Into the cache as a daemon takes a slice: a REFS frame off a pipe."""
    from qjamfab import protocol
    from qjamfab.runtime.cache import RefCache

    read_fd, write_fd = os.pipe()
    frame = protocol.frame(protocol.REFS, {"ref": ref}, parts)

    def write() -> None:
        protocol.write_all(lambda v: os.writev(write_fd, v), frame)
        os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        reader = protocol.FrameReader(lambda v: os.readv(read_fd, [v]))
        _, _, _, lengths = reader.read_head()
        RefCache(directory).receive(ref, lengths, reader, read_fd)
    finally:
        writer.join()
        os.close(read_fd)


def measure(scale: str, log=print) -> dict:
    size = SIZES[scale]
    memory = measure_memory(size["result_mb"], log, size.get("orders", len(ORDERS)))
    verify = measure_verify(size["verify_mb"], size["verify_rounds"])
    log(
        f"  verify: {verify['verify_mb_per_s']:.0f} MB/s at first use "
        f"({verify['first_use_s'] * 1e3:.0f} ms for {verify['bytes'] / MB:.0f} MB)"
    )
    return {"memory": memory, "verify": verify, "sizes": size}


def table(result: dict) -> str:
    from qjamfab.display.tables import render_table

    rows = [
        [
            r["workers"],
            r["config"],
            r["order"],
            f"{r['result_mb']}",
            f"{r['held_peak'] / MB:.0f}",
            f"{r['spilled_results']}",
            f"{r['seconds']:.2f}",
            "yes" if r["correct"] else "NO",
        ]
        for r in result["memory"]
    ]
    v = result["verify"]
    return (
        render_table(
            [
                "workers",
                "config",
                "arrival",
                "result MB",
                "master peak MB",
                "spilled",
                "run s",
                "right",
            ],
            rows,
            "lllrrrrl",
        )
        + "\n"
        + render_table(
            ["slice MB", "first use (checked) ms", "second use ms", "plain read ms"],
            [
                [
                    f"{v['bytes'] / MB:.0f}",
                    f"{v['first_use_s'] * 1e3:.1f}",
                    f"{v['second_use_s'] * 1e3:.2f}",
                    f"{v['plain_read_s'] * 1e3:.1f}",
                ]
            ],
            "rrrr",
        )
    )


def targets(result: dict) -> list[dict]:
    from qjamfab.core.results import HELD_BYTES

    shipped = [r for r in result["memory"] if r["config"] == "as shipped"]
    worst = max(shipped, key=lambda r: r["held_peak"])
    mb = worst["result_mb"]
    out = [
        target(
            f"master peak memory, 8 results of {mb} MB (anonymous, above its base)",
            "well under 1 GiB (<= 3 results)"
            if mb == 300
            else f"<= {HELD_BYTES >> 20} MiB held + 2 x {mb} MB",
            round(worst["held_peak"] / MB, 1),
            "MB",
            worst["held_peak"]
            <= (3 * mb * MB if mb == 300 else HELD_BYTES + 2 * mb * MB),
            f"worst: {worst['workers']}, {worst['order']}; unbounded: "
            + ", ".join(
                f"{r['workers']} {r['order']} {r['held_peak'] / MB:.0f} MB"
                for r in result["memory"]
                if r["config"] == "unbounded"
            ),
        ),
        target(
            "every configuration's result right",
            "all",
            sum(r["correct"] for r in result["memory"]),
            "runs",
            all(r["correct"] for r in result["memory"]),
        ),
    ]
    v = result["verify"]
    out.append(
        target(
            "cached slice verified at first use",
            "reported",
            round(v["verify_mb_per_s"], 0),
            "MB/s",
            True,
            f"{v['first_use_s'] * 1e3:.0f} ms for {v['bytes'] / MB:.0f} MB; a "
            f"plain read of the file {v['plain_read_s'] * 1e3:.0f} ms",
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from .common import standalone_main

    return standalone_main("reduce", __doc__, SIZES, measure, table, targets, argv)


if __name__ == "__main__":
    if len(sys.argv) in (5, 7) and sys.argv[1] == "--child":
        mb, order, config, *ssh = sys.argv[2:]
        print(json.dumps(child(int(mb), order, config != "shipped", *ssh)))
    else:
        sys.exit(main())
