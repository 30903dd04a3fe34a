"""3. Transfer: shipping a float64 dataset to an SSH worker, against OpenSSH.

For each size (400 MiB in the full suite) a fresh array (distinct content,
so nothing is cached yet) is run with a trivial job on one SSH worker:

- first run: what a user waits for, including hashing the slices;
- hashing alone (refs of a fresh DataSet over the same array);
- re-sends: the cache cleared (`Master.clear_cache`) and the run repeated,
  so the refs are already known: transfer and caching only;
- OpenSSH: `ssh -F cfg host1 'cat > /dev/null'` fed the same bytes from
  this process, from the start of ssh to its exit, minus the same with no
  bytes (connection, authentication and remote shell, which qjamfab's first
  run does not pay: its Master is connected already): OpenSSH's streaming
  time, the baseline of the ratio. With several hosts, one such ssh per
  host at once, each fed its share of the rows (as the Master cuts them);
- second run: the time (median of 20 runs) and the dataset bytes sent
  (should be 0), which should not grow with the size.

The largest size is also shipped to two hosts at once (one worker each),
against OpenSSH to the same two hosts at once.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time

import numpy as np

from .common import Scale, ssh_hosts, sshd_missing, target

MiB = 1 << 20
SECOND_RUNS = 20  # second-run time: the median of this many runs


def rows_of(params, rows):
    return rows.shape[0]


def _array(mib: int, salt: int) -> np.ndarray:
    n = mib * MiB // 8
    a = np.arange(n, dtype=np.float64)
    a += salt * 1e12
    return a.reshape(-1, 64)


def openssh_cat(
    ssh_config: str, aliases: list[str], data: np.ndarray, command="cat > /dev/null"
) -> float:
    """Seconds for `ssh host 'cat > /dev/null'` (or `command`) to each host
    at once, fed its share of data's rows (one thread each), start to exit."""
    shares = np.array_split(data, len(aliases))
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["ssh", "-F", ssh_config, alias, command],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for alias in aliases
    ]
    feeders = [
        threading.Thread(target=_feed, args=(p, s)) for p, s in zip(procs, shares)
    ]
    for feeder in feeders:
        feeder.start()
    for feeder in feeders:
        feeder.join()
    for proc in procs:
        err = proc.stderr.read()
        if proc.wait(60) != 0:
            raise RuntimeError(f"ssh cat failed: {err.decode(errors='replace')}")
    return time.perf_counter() - started


def _feed(proc: subprocess.Popen, data: np.ndarray) -> None:
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    chunk = 1 << 20
    for i in range(0, len(view), chunk):
        proc.stdin.write(view[i : i + chunk])
    proc.stdin.close()


def _one_size(m, servers, mib: int, salt: int, repeats: int, log, hosts=1) -> dict:
    from qjamfab import DataSet

    data = _array(mib, salt)
    nbytes = data.nbytes
    dataset = DataSet(data)
    started = time.perf_counter()
    m.run(rows_of, dataset=dataset)
    first = time.perf_counter() - started
    first_stats = m.last_run
    second_runs, second_bytes = [], 0
    for _ in range(SECOND_RUNS):
        started = time.perf_counter()
        total = m.run(rows_of, dataset=dataset)
        second_runs.append(time.perf_counter() - started)
        second_bytes = max(second_bytes, m.last_run.dataset_bytes_sent)
        assert total == data.shape[0]
    second = statistics.median(second_runs)
    second_stats = m.last_run
    started = time.perf_counter()
    DataSet(data).for_workers(len(m.workers)).refs()
    hashing = time.perf_counter() - started
    resend = []
    for _ in range(repeats):
        m.clear_cache()
        started = time.perf_counter()
        m.run(rows_of, dataset=dataset)
        resend.append(time.perf_counter() - started)
    aliases = servers.aliases[:hosts]
    ssh = [openssh_cat(servers.ssh_config, aliases, data) for _ in range(repeats)]
    ssh_setup = statistics.median(
        openssh_cat(servers.ssh_config, aliases, data[:0])
        for _ in range(max(3, repeats))
    )
    ssh_stream = max(1e-6, statistics.median(ssh) - ssh_setup)
    row = {
        "mib": mib,
        "bytes": nbytes,
        "workers": len(m.workers),
        "hosts": hosts,
        "first_run_s": first,
        "first_run_dataset_bytes": first_stats.dataset_bytes_sent,
        "first_run_backup_tasks": getattr(first_stats, "backup_tasks", None),
        "first_run_mb_s": nbytes / first / 1e6,
        "hash_s": hashing,
        "resend_s": statistics.median(resend),
        "resend_mb_s": nbytes / statistics.median(resend) / 1e6,
        "openssh_s": statistics.median(ssh),
        "openssh_mb_s": nbytes / statistics.median(ssh) / 1e6,
        "openssh_setup_s": ssh_setup,
        "openssh_stream_s": ssh_stream,
        "openssh_stream_mb_s": nbytes / ssh_stream / 1e6,
        "second_run_s": second,
        "second_run_dataset_bytes": second_bytes,
        "second_run_bytes_sent": second_stats.bytes_sent,
    }
    # Against OpenSSH's streaming time (its run minus an empty run: the
    # connection and remote shell qjamfab already has open). The stricter
    # ratio; against the whole ssh run it is *_vs_openssh_whole.
    row["first_vs_openssh"] = ssh_stream / first
    row["resend_vs_openssh"] = ssh_stream / row["resend_s"]
    row["first_vs_openssh_whole"] = row["openssh_s"] / first
    log(
        f"  transfer {mib:>5} MiB on {len(m.workers)} worker(s): first run "
        f"{first:.2f} s ({row['first_run_mb_s']:.0f} MB/s, hashing "
        f"{hashing:.2f} s), re-send {row['resend_s']:.2f} s, OpenSSH "
        f"{row['openssh_s']:.2f} s (streaming {ssh_stream:.2f} s); "
        f"second run {second * 1e3:.2f} ms, "
        f"{second_bytes} dataset bytes"
    )
    return row


def run(scale: Scale, log=print) -> dict:
    from qjamfab import Master

    why_not = sshd_missing()
    if why_not:
        return {"skipped": why_not, "rows": [], "table": why_not, "targets": []}
    rows = []
    with ssh_hosts(2) as servers:
        with Master(
            servers.aliases[:1], workers_per_host=1, ssh_config=servers.ssh_config
        ) as m:
            for i, mib in enumerate(scale.transfer_mib):
                rows.append(
                    _one_size(m, servers, mib, i + 1, scale.transfer_repeats, log)
                )
        if scale.extras:
            with Master(
                servers.aliases[:2], workers_per_host=1, ssh_config=servers.ssh_config
            ) as m:
                mib = max(scale.transfer_mib)
                rows.append(_one_size(m, servers, mib, 100, 3, log, hosts=2))
    return {"rows": rows, "table": table(rows), "targets": targets(rows)}


def table(rows: list[dict]) -> str:
    from qjamfab.display.tables import render_table

    lines = [
        [
            f"{r['mib']} MiB",
            r["workers"],
            f"{r['first_run_s']:.2f} ({r['first_run_mb_s']:.0f} MB/s)",
            f"{r['hash_s']:.2f}",
            f"{r['resend_s']:.2f} ({r['resend_mb_s']:.0f} MB/s)",
            f"{r['openssh_s']:.2f} - {r['openssh_setup_s']:.2f} "
            f"({r['openssh_stream_mb_s']:.0f} MB/s)",
            f"{r['first_vs_openssh']:.2f}x",
            f"{r['second_run_s'] * 1e3:.2f} ms",
            r["second_run_dataset_bytes"],
        ]
        for r in rows
    ]
    return render_table(
        [
            "size",
            "workers",
            "first run s",
            "hashing s",
            "re-send s",
            "OpenSSH cat s - setup s",
            "OpenSSH/first",
            "second run",
            "second run dataset bytes",
        ],
        lines,
        "lrrrrrrrr",
    )


def targets(rows: list[dict]) -> list[dict]:
    single = [r for r in rows if r["workers"] == 1]
    if not single:
        return []
    big = max(single, key=lambda r: r["bytes"])
    small = min(single, key=lambda r: r["bytes"])
    out = [
        target(
            f"first run of {big['mib']} MiB over SSH vs OpenSSH",
            ">= 0.8x OpenSSH",
            round(big["first_vs_openssh"], 3),
            "x",
            big["first_vs_openssh"] >= 0.8,
            f"{big['first_run_mb_s']:.0f} vs "
            f"{big['openssh_stream_mb_s']:.0f} MB/s streaming; without "
            f"hashing (re-send) {big['resend_vs_openssh']:.2f}x; vs the "
            f"whole ssh run {big['first_vs_openssh_whole']:.2f}x",
        ),
        target(
            "second run sends 0 dataset bytes",
            "0 bytes",
            max(r["second_run_dataset_bytes"] for r in rows),
            "bytes",
            all(r["second_run_dataset_bytes"] == 0 for r in rows),
        ),
    ]
    for r in rows:
        if r.get("hosts", 1) > 1:
            out.append(
                target(
                    f"first run of {r['mib']} MiB to {r['hosts']} SSH hosts vs "
                    "OpenSSH to the same hosts at once",
                    ">= 0.95x OpenSSH",
                    round(r["first_vs_openssh"], 3),
                    "x",
                    r["first_vs_openssh"] >= 0.95,
                    f"{r['first_run_mb_s']:.0f} vs "
                    f"{r['openssh_stream_mb_s']:.0f} MB/s streaming; re-send "
                    f"{r['resend_vs_openssh']:.2f}x",
                )
            )
    # "Not growing with size": the largest size's second run within 1.5x
    # (+ 1 ms of noise) of the smallest's.
    growth = big["second_run_s"] / small["second_run_s"]
    out.append(
        target(
            "second run time does not grow with size",
            "largest <= 1.5x smallest (+1 ms)",
            round(growth, 2),
            "x",
            big["second_run_s"] <= 1.5 * small["second_run_s"] + 1e-3,
            f"{small['mib']} MiB {small['second_run_s'] * 1e3:.2f} "
            f"ms, {big['mib']} MiB {big['second_run_s'] * 1e3:.2f} "
            "ms",
        )
    )
    return out
