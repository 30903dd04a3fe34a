"""2. Overhead: one run of a trivial job whose data is already cached.

The job returns 0 for each slice of a small array (4 slices per worker,
qjamfab's default cut), so a run is pure coordination: pickle the job and
params, send a TASK per worker, collect and reduce the RESULTs. Measured
as the caller sees it (wall time around Master.run), after warm-up runs,
on 1, 2, 4, 8 workers, local (`local:N`) and over SSH (one worker per
host up to 4 hosts, then 2 per host).

In the same process-run, for ratios:
- multiprocessing.Pool with the same number of processes and the data
  already in each process (given by the initializer, like a warm cache):
  one task per process carrying the params and its slice indices,
  `pool.map(..., chunksize=1)`, results summed;
- a raw paramiko round trip: an exec channel running `cat` on an SSH test
  host (over the same kind of connection qjamfab opens), 100 bytes sent
  and the 100 echoed bytes received;
- a local pipe round trip (`cat` subprocess), the floor of any IPC.

The targets come from a paired measurement of 2 workers: Pool, local and
SSH open at once and timed in alternating blocks (`paired`). This shared
2-core VM has slower spells that last seconds; timing each in its own
stretch can skew a ratio by 30 %.

Its own command, against execnet (`pip install execnet`) on the same 2
SSH hosts, each contender open at once and timed in alternating blocks,
with the CPU each spends per run (the master process, its OpenSSH
clients, the workers: from /proc):

    python -m benchmarks.overhead [--rounds 40] [--block 50] [--qjamfab DIR]

`--qjamfab DIR` times the qjamfab in DIR (another commit's tree, e.g.
`mkdir DIR && git archive 2b90029 | tar -x -C DIR`), its workers included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np

from .common import (
    Scale,
    local_home,
    ssh_hosts,
    ssh_layout,
    sshd_missing,
    summary_ms,
    target,
)

TICK = os.sysconf("SC_CLK_TCK")
SLICES_PER_WORKER = 4
ROWS_PER_SLICE = 16


def trivial(params, rows):
    return 0


def _dataset(workers: int):
    from qjamfab import DataSet

    n = workers * SLICES_PER_WORKER * ROWS_PER_SLICE
    return DataSet(np.arange(n * 8, dtype=np.float64).reshape(n, 8))


def time_runs(master, dataset, runs: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        master.run(trivial, params=1, dataset=dataset)
    assert master.last_run.dataset_bytes_sent == 0
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        master.run(trivial, params=1, dataset=dataset)
        out.append(time.perf_counter() - started)
    return out


# --- multiprocessing.Pool -------------------------------------------------------

_POOL_SLICES = None


def _pool_init(slices):
    global _POOL_SLICES
    _POOL_SLICES = slices


def _pool_task(task):
    params, indices = task
    total = 0
    for i in indices:
        total += trivial(params, _POOL_SLICES[i])
    return total


@contextlib.contextmanager
def pool_runner(workers: int):
    """A function timing n runs on a multiprocessing.Pool of `workers`."""
    dataset = _dataset(workers)
    slices = list(dataset.for_workers(workers))
    per = len(slices) // workers
    tasks = [(1, list(range(k * per, (k + 1) * per))) for k in range(workers)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_pool_init, initargs=(slices,)) as pool:

        def runs(n: int) -> list[float]:
            out = []
            for _ in range(n):
                started = time.perf_counter()
                sum(pool.map(_pool_task, tasks, chunksize=1))
                out.append(time.perf_counter() - started)
            return out

        runs(20)  # warm-up
        yield runs


def time_pool(workers: int, runs: int) -> list[float]:
    with pool_runner(workers) as timed:
        return timed(runs)


def master_runner(master, workers: int):
    """A function timing n runs of the trivial job on a warm master."""
    dataset = _dataset(workers)
    time_runs(master, dataset, 0)

    def runs(n: int) -> list[float]:
        return time_runs(master, dataset, n, warmup=0)

    return runs


def paired(servers, workers: int, runs: int, rounds: int = 8) -> dict:
    """Pool, local and SSH with `workers` each, all open at once and timed
    in alternating blocks, so that their ratio is not skewed by a slower
    spell of this shared machine: {name: summary_ms}."""
    from qjamfab import Master

    names = ("multiprocessing.Pool", "qjamfab local", "qjamfab ssh")
    times: dict[str, list[float]] = {name: [] for name in names}
    k, per_host = ssh_layout(workers)
    with (
        pool_runner(workers) as pool,
        local_home(),
        Master(f"local:{workers}") as local,
        Master(
            servers.aliases[:k],
            workers_per_host=per_host,
            ssh_config=servers.ssh_config,
        ) as remote,
    ):
        runners = dict(
            zip(
                names,
                (pool, master_runner(local, workers), master_runner(remote, workers)),
            )
        )
        block = max(1, runs // rounds)
        for _ in range(rounds):
            for name, timed in runners.items():
                times[name] += timed(block)
    return {name: summary_ms(t) for name, t in times.items()}


# --- echo round trips -----------------------------------------------------------


def _echo(send, recv, rounds: int, size: int = 100) -> list[float]:
    message = os.urandom(size)
    out = []
    for i in range(rounds + 20):
        started = time.perf_counter()
        send(message)
        got = 0
        while got < size:
            got += len(recv(size - got))
        if i >= 20:
            out.append(time.perf_counter() - started)
    return out


def time_paramiko_echo(alias: str, ssh_config: str, rounds: int) -> list[float]:
    from qjamfab.engines.ssh import hosts

    conn = hosts.connect(alias, ssh_config=ssh_config)
    try:
        channel = conn.client.get_transport().open_session()
        channel.exec_command("cat")
        try:
            return _echo(channel.sendall, channel.recv, rounds)
        finally:
            channel.close()
    finally:
        conn.close()


def time_pipe_echo(rounds: int) -> list[float]:
    proc = subprocess.Popen(
        ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    try:
        fd_in, fd_out = proc.stdin.fileno(), proc.stdout.fileno()
        return _echo(lambda b: os.write(fd_in, b), lambda n: os.read(fd_out, n), rounds)
    finally:
        proc.stdin.close()
        proc.wait(5)
        proc.stdout.close()


# --- the benchmark ----------------------------------------------------------------


def run(scale: Scale, log=print) -> dict:
    from qjamfab import Master

    rows: dict[str, dict] = {}

    def record(name: str, seconds: list[float], **extra) -> None:
        rows[name] = {**summary_ms(seconds), **extra}
        log(
            f"  overhead {name:>26}: median {rows[name]['median_ms']:.3f} ms,"
            f" p99 {rows[name]['p99_ms']:.3f} ms"
        )

    with local_home():
        for n in scale.overhead_workers:
            with Master(f"local:{n}") as m:
                record(
                    f"qjamfab local {n}",
                    time_runs(m, _dataset(n), scale.overhead_runs),
                    workers=n,
                )
    for n in scale.overhead_workers:
        record(
            f"multiprocessing.Pool {n}", time_pool(n, scale.overhead_runs), workers=n
        )
    record("local pipe echo 100 B", time_pipe_echo(scale.echo_rounds))
    why_not = sshd_missing()
    pairs: dict[str, dict] = {}
    if not why_not:
        max_hosts = 4
        layouts = {n: ssh_layout(n, max_hosts) for n in scale.overhead_workers}
        with ssh_hosts(max(h for h, _ in layouts.values())) as servers:
            for n, (k, per_host) in layouts.items():
                with Master(
                    servers.aliases[:k],
                    workers_per_host=per_host,
                    ssh_config=servers.ssh_config,
                ) as m:
                    record(
                        f"qjamfab ssh {n}",
                        time_runs(m, _dataset(n), scale.overhead_runs),
                        workers=n,
                        hosts=k,
                        workers_per_host=per_host,
                    )
            record(
                "paramiko echo 100 B",
                time_paramiko_echo(
                    servers.aliases[0], servers.ssh_config, scale.echo_rounds
                ),
            )
            pairs = paired(servers, 2, scale.overhead_runs)
            for name, row in pairs.items():
                log(
                    f"  overhead {'paired ' + name + ' 2':>26}: median "
                    f"{row['median_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms"
                )
    ratios = {}
    for n in scale.overhead_workers:
        pool = rows[f"multiprocessing.Pool {n}"]["median_ms"]
        for kind in ("local", "ssh"):
            row = rows.get(f"qjamfab {kind} {n}")
            if row is None:
                continue
            row["vs_pool"] = row["median_ms"] / pool
            if "paramiko echo 100 B" in rows and kind == "ssh":
                row["vs_paramiko_echo"] = (
                    row["median_ms"] / rows["paramiko echo 100 B"]["median_ms"]
                )
            row["vs_pipe_echo"] = (
                row["median_ms"] / rows["local pipe echo 100 B"]["median_ms"]
            )
            ratios[f"{kind} {n}"] = {k: row[k] for k in row if k.startswith("vs_")}
    out = {
        "rows": rows,
        "ratios": ratios,
        "ssh_skipped": why_not,
        "paired_2_workers": pairs,
        "table": table(rows, scale.overhead_workers),
    }
    out["targets"] = targets(pairs)
    return out


def table(rows: dict, workers) -> str:
    from qjamfab.display.tables import render_table

    lines = []
    for name, row in rows.items():
        ratio = []
        if "vs_pool" in row:
            ratio.append(f"{row['vs_pool']:.2f}x Pool")
        if "vs_paramiko_echo" in row:
            ratio.append(f"{row['vs_paramiko_echo']:.1f}x paramiko echo")
        if "vs_pipe_echo" in row:
            ratio.append(f"{row['vs_pipe_echo']:.1f}x pipe echo")
        lines.append(
            [name, f"{row['median_ms']:.3f}", f"{row['p99_ms']:.3f}", ", ".join(ratio)]
        )
    return render_table(
        ["what", "median ms", "p99 ms", "ratio (medians)"], lines, "lrrl"
    )


def targets(pairs: dict) -> list[dict]:
    """From the paired measurement of 2 workers (see `paired`)."""
    if not pairs:
        return []
    ssh = pairs["qjamfab ssh"]
    pool = pairs["multiprocessing.Pool"]["median_ms"]
    local = pairs["qjamfab local"]["median_ms"]
    return [
        target(
            "trivial run, cached data, 2 SSH workers",
            "<= 0.35 ms",
            round(ssh["median_ms"], 3),
            "ms",
            ssh["median_ms"] <= 0.35,
            f"p99 {ssh['p99_ms']:.3f} ms; timed in alternating "
            "blocks with Pool and local",
        ),
        target(
            "trivial run, 2 SSH workers vs multiprocessing.Pool",
            "<= 1.1x",
            round(ssh["median_ms"] / pool, 2),
            "x",
            ssh["median_ms"] / pool <= 1.1,
            f"Pool {pool:.3f} ms; 2 local workers {local:.3f} ms = "
            f"{local / pool:.2f}x Pool",
        ),
    ]


# --- against execnet, CPU included (its own command) -------------------------------

# Runs in each execnet gateway: the slices arrive once (a warm cache), then
# each params message is one trivial run over them, answered by its sum.
_EXECNET_WORKER = """
import os
slices = channel.receive()
channel.send(os.getpid())
def trivial(params, rows):
    return 0
while True:
    params = channel.receive()
    if params is None:
        break
    total = 0
    for rows in slices:
        total += trivial(params, rows)
    channel.send(total)
"""


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process pid so far, 0 when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _ssh_children() -> list[int]:
    """This process's OpenSSH clients (qjamfab's and execnet's streams)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")]
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if comm == b"ssh" and ppid == os.getpid():
            pids.append(int(entry))
    return pids


@contextlib.contextmanager
def execnet_runner(servers, hosts: int):
    """(a function timing n trivial runs over execnet gateways to `hosts`
    SSH hosts, the gateways' pids)."""
    import execnet

    dataset = _dataset(hosts)
    slices = [np.asarray(s).tobytes() for s in dataset.for_workers(hosts)]
    per = len(slices) // hosts
    python = os.environ.get("QJAMFAB_REMOTE_PYTHON") or "python3"
    group = execnet.Group()
    try:
        channels, pids = [], []
        for k, alias in enumerate(servers.aliases[:hosts]):
            gateway = group.makegateway(
                f"ssh={alias}//ssh_config={servers.ssh_config}//python={python}"
            )
            channel = gateway.remote_exec(_EXECNET_WORKER)
            channel.send(slices[k * per : (k + 1) * per])
            pids.append(channel.receive())
            channels.append(channel)

        def runs(n: int) -> list[float]:
            out = []
            for _ in range(n):
                started = time.perf_counter()
                for channel in channels:
                    channel.send(1)
                sum(channel.receive() for channel in channels)
                out.append(time.perf_counter() - started)
            return out

        runs(20)  # warm-up
        yield runs, pids
        for channel in channels:
            channel.send(None)
    finally:
        group.terminate(timeout=5)


def _worker_pids(master) -> list[int]:
    return [s["pid"] for s in master.worker_stats().values()]


def versus_execnet(rounds: int, block: int) -> dict:
    """The trivial run on 2 SSH hosts x 1 worker, qjamfab and execnet, and
    on local:2, all open at once and timed in alternating blocks of
    `block` runs: per contender, wall time (median, min, ...) and CPU
    per run (this process, its OpenSSH clients, the workers)."""
    from qjamfab import Master

    from .common import ssh_hosts

    names = ("execnet ssh 2x1", "qjamfab ssh 2x1", "qjamfab local:2")
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu = {name: {"master": 0.0, "ssh clients": 0.0, "workers": 0.0} for name in names}
    load = os.getloadavg()[0]
    with (
        ssh_hosts(2) as servers,
        local_home(),
        execnet_runner(servers, 2) as (execnet_runs, execnet_pids),
    ):
        ssh_before = set(_ssh_children())
        with (
            Master(
                servers.aliases[:2], workers_per_host=1, ssh_config=servers.ssh_config
            ) as remote,
            Master("local:2") as local,
        ):
            runners = {
                names[0]: (execnet_runs, execnet_pids, sorted(ssh_before)),
                names[1]: (
                    master_runner(remote, 2),
                    _worker_pids(remote),
                    sorted(set(_ssh_children()) - ssh_before),
                ),
                names[2]: (master_runner(local, 2), _worker_pids(local), []),
            }
            for _ in range(rounds):
                for name, (timed, workers, clients) in runners.items():
                    before = (
                        time.process_time(),
                        sum(map(_proc_cpu, clients)),
                        sum(map(_proc_cpu, workers)),
                    )
                    times[name] += timed(block)
                    after = (
                        time.process_time(),
                        sum(map(_proc_cpu, clients)),
                        sum(map(_proc_cpu, workers)),
                    )
                    for key, b, a in zip(cpu[name], before, after):
                        cpu[name][key] += a - b
    import qjamfab

    out: dict = {
        "qjamfab": os.path.dirname(os.path.dirname(qjamfab.__file__)),
        "rounds": rounds,
        "block": block,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }
    for name in names:
        n = len(times[name])
        out[name] = {
            **summary_ms(times[name]),
            "cpu_ms_per_run": {k: v / n * 1e3 for k, v in cpu[name].items()},
        }
    execnet_median = out[names[0]]["median_ms"]
    for name in names[1:]:
        out[name]["vs_execnet"] = out[name]["median_ms"] / execnet_median
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--qjamfab", help="time the qjamfab of this tree")
    args = parser.parse_args(argv)
    if args.qjamfab:
        sys.path.insert(0, os.path.abspath(args.qjamfab))
    out = versus_execnet(args.rounds, args.block)
    for name, row in out.items():
        if isinstance(row, dict):
            cpu = ", ".join(f"{k} {v:.3f}" for k, v in row["cpu_ms_per_run"].items())
            vs = f" ({row['vs_execnet']:.2f}x execnet)" if "vs_execnet" in row else ""
            print(
                f"{name:16} median {row['median_ms']:.3f} ms, min "
                f"{row['min_ms']:.3f}{vs}; CPU ms/run: {cpu}"
            )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    from .common import one_blas_thread

    one_blas_thread()
    sys.exit(main())
