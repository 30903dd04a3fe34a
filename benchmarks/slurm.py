"""Slurm vs SSH to the same machine: a Master ready, runs, a first run.

On a real one-node Slurm started here (tests/slurm_cluster.py; its start
is timed too) and one private OpenSSH server (tests/sshd_hosts.py), both
on this machine, 2 workers each (the node's CPUs, up to 2):

- `slurm` inside: `Master("slurm")` in a script run under
  `salloc --nodes=1 --ntasks=1 --cpus-per-task=2` (the interpreter's start
  and imports excluded);
- `slurm:` outside: `Master("slurm:nodes=1,cpus-per-node=2,time=5")`,
  which asks salloc for the allocation (granted at once on this idle
  node: no queue wait to exclude) and releases it on close;
- `ssh`: `Master(["host1"], workers_per_host=2)`;
- and `slurm.request` alone: salloc granting the idle node (what
  `slurm:` adds to a Master's ready time here, a queue wait aside).

Each contender: ROUNDS Masters in a row in a fresh QJAMFAB_HOME. The first
is cold (the runtime goes over the stream, the daemons start), the later
ones warm (the previous Master's daemons are found: over Slurm they wait
5 s for a next session). Each Master then does one run, then RUNS trivial
runs (`lambda p, x: 1`, no dataset), timed one by one: median and p90.

Then the sparse autoencoder's cost and gradient (benchmarks/sae.py's
example), paired: a `slurm:` Master and an SSH one (2 workers each, one
BLAS thread in every worker) up at once, the patches shipped to both, then
timed in alternating blocks of evaluations at the same parameters, so that
a slower spell of this shared machine hits both alike: per contender the
median evaluation and the master overhead (wall minus the busiest
worker's compute).

With the same pair, each one's first run of fresh rows (100 MiB at full
scale; the slices stream on srun), in turn: median seconds and MB/s.

Last, what a message costs through srun's stdin and stdout: a child that
echoes each message back (an 8-byte length, then the bytes), its round
trip by message size, run through `srun --unbuffered` and over plain
pipes: median and slowest ms.

`python -m benchmarks.slurm [--scale quick|tiny]`; results in
benchmarks/results/[SCALE/]slurm.json. Needs slurm-wlm and munge.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from .common import (
    env,
    local_home,
    percentile,
    ssh_hosts,
    standalone_main,
    target,
)

SIZES = {"full": (3, 50), "quick": (2, 20), "tiny": (2, 5)}  # rounds, runs
# The autoencoder, paired: patches, rounds, evaluations per block.
SAE = {"full": (100_000, 8, 5), "quick": (10_000, 3, 4), "tiny": (1_000, 1, 2)}
# A first run's slices, paired: MiB of fresh rows, rounds.
FIRST_RUN = {"full": (100, 3), "quick": (25, 2), "tiny": (2, 1)}
WORKERS = min(2, os.cpu_count() or 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rounds(make, rounds: int, runs: int) -> dict:
    """ROUNDS Masters made by make(): ready seconds, trivial run seconds."""
    ready, run_s = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with make() as m:
            ready.append(time.perf_counter() - started)
            assert m.run(lambda p, x: 1) == WORKERS
            for _ in range(runs):
                started = time.perf_counter()
                m.run(lambda p, x: 1)
                run_s.append(time.perf_counter() - started)
    return {"ready_s": ready, "run_s": run_s}


def _grants(rounds: int) -> dict:
    """How long salloc takes to grant an idle node (and to release it)."""
    from qjamfab.engines import slurm

    ready, release = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        allocation = slurm.request({"nodes": "1", "cpus-per-node": str(WORKERS)})
        ready.append(time.perf_counter() - started)
        started = time.perf_counter()
        allocation.release()
        release.append(time.perf_counter() - started)
    return {"ready_s": ready, "run_s": [], "release_s": release}


def _sae_paired(masters: dict, patches: int, rounds: int, block: int) -> dict:
    """The autoencoder's evaluations on each Master, in alternating blocks
    at the same parameters: median seconds, overhead ms, evaluations."""
    import numpy as np

    from qjamfab import DataSet

    from .sae import load_example

    sae = load_example()
    theta0 = sae.initial_theta()
    X = sae.sample_patches(patches)
    costs = {name: sae.DistributedCost(m, DataSet(X)) for name, m in masters.items()}
    first = [cost(theta0)[0] for cost in costs.values()]  # ships the patches
    assert np.allclose(first, first[0]), first
    for cost in costs.values():
        cost.seconds.clear()
        cost.compute_seconds.clear()
    rng = np.random.default_rng(7)
    for _ in range(rounds):
        thetas = [
            theta0 + 0.01 * rng.standard_normal(theta0.size) for _ in range(block)
        ]
        for cost in costs.values():
            for theta in thetas:
                cost(theta)
    out = {}
    for name, cost in costs.items():
        secs = np.array(cost.seconds)
        overhead = secs - np.array(cost.compute_seconds)
        out[name] = {
            "median_eval_s": float(np.median(secs)),
            "p90_eval_s": float(np.percentile(secs, 90)),
            "overhead_ms": float(np.median(overhead) * 1e3),
            "evals": len(secs),
        }
    return {"patches": patches, "rows": out}


def _first_runs(masters: dict, mib: int, rounds: int) -> dict:
    """Each Master's first run of `mib` MiB of fresh rows (slices stream
    on srun, not through the spool), in turn, `rounds` times: median
    seconds and MB/s."""
    from qjamfab import DataSet

    from .transfer import _array, rows_of

    seconds: dict[str, list[float]] = {name: [] for name in masters}
    for r in range(rounds):
        for k, (name, m) in enumerate(masters.items()):
            data = _array(mib, 200 + r * len(masters) + k)  # nothing cached
            started = time.perf_counter()
            assert m.run(rows_of, dataset=DataSet(data)) == data.shape[0]
            seconds[name].append(time.perf_counter() - started)
    return {
        "mib": mib,
        "rows": {
            name: {
                "median_s": statistics.median(s),
                "mb_s": mib * 2**20 / statistics.median(s) / 1e6,
            }
            for name, s in seconds.items()
        },
    }


_ECHO = """
import os
while True:
    head = os.read(0, 8)
    if not head:
        break
    n, got = int(head), b""
    while len(got) < n:
        got += os.read(0, n - len(got))
    os.write(1, head + got)
"""
ECHO_SIZES = (100, 1000, 2000, 4000, 26_000, 200_000)  # bytes per message


def _echo(argv: list[str], reps: int) -> dict:
    """Round trips of messages of each size through a child's stdin and
    stdout: {size: [median ms, slowest ms]}."""
    child = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert child.stdin is not None and child.stdout is not None
    out = {}
    for n in ECHO_SIZES:
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            child.stdin.write(b"%08d" % n + b"x" * n)
            got = 0
            while got < 8 + n:
                got += len(child.stdout.read(8 + n - got))
            times.append(1000 * (time.perf_counter() - started))
        out[str(n)] = [statistics.median(times), max(times)]
    child.stdin.close()
    child.wait()
    child.stdout.close()
    return out


def _echoes(reps: int) -> dict:
    """_echo over plain pipes and through srun, on an allocation of ours."""
    from qjamfab.engines import slurm

    pipes = _echo([sys.executable, "-c", _ECHO], reps)
    allocation = slurm.request({"nodes": "1", "cpus-per-node": "1"})
    try:
        node = allocation.nodes[0]
        argv = slurm.srun_argv(
            allocation.job_id, node, 1, [sys.executable, "-c", _ECHO]
        )
        return {"pipes": pipes, "srun": _echo(argv, reps)}
    finally:
        allocation.release()


def _inside(rounds: int, runs: int) -> None:
    """Under salloc: print the rounds of Master("slurm") as JSON."""
    from qjamfab import Master

    print(json.dumps(_rounds(lambda: Master("slurm"), rounds, runs)))


def measure(scale_name: str, log=print) -> dict:
    from qjamfab import Master
    from tests.slurm_cluster import SlurmCluster, slurm_available

    rounds, runs = SIZES[scale_name]
    if not slurm_available():
        return {"skipped": "Slurm is not installed", "rows": {}}
    rows = {}
    # srun gives the nodes' workers this process's environment, from which
    # one_blas_thread (in standalone_main) dropped this machine's BLAS
    # kernel settings: with them, the Slurm workers alone took 40 against
    # 32 ms of compute per evaluation.
    with (
        SlurmCluster() as cluster,
        env(SLURM_CONF=cluster.conf),
    ):
        rows["slurm cluster start"] = {"ready_s": [cluster.started_s], "run_s": []}
        with local_home():
            done = subprocess.run(
                ["salloc", "--nodes=1", "--ntasks=1", f"--cpus-per-task={WORKERS}"]
                + ["--", sys.executable, "-m", "benchmarks.slurm", "--inside"]
                + [str(rounds), str(runs)],
                env={**os.environ, "PYTHONPATH": REPO},
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(f"the run under salloc failed:\n{done.stderr}")
            rows["slurm (inside salloc)"] = json.loads(done.stdout.splitlines()[-1])
        rows["salloc: granted, released"] = _grants(rounds)
        spec = f"slurm:nodes=1,cpus-per-node={WORKERS},time=5"
        with local_home():
            rows["slurm: (asks salloc)"] = _rounds(lambda: Master(spec), rounds, runs)
        patches, sae_rounds, block = SAE[scale_name]
        with (
            local_home(),
            ssh_hosts(1) as servers,
            Master(spec.replace("time=5", "time=30")) as srun,
            Master(
                ["host1"], workers_per_host=WORKERS, ssh_config=servers.ssh_config
            ) as ssh,
        ):
            pair = {"slurm: (srun streams)": srun, "ssh (OpenSSH)": ssh}
            sae = _sae_paired(pair, patches, sae_rounds, block)
            first_runs = _first_runs(pair, *FIRST_RUN[scale_name])
        echoes = _echoes(runs)
    with ssh_hosts(1, one_thread_python=False) as servers:
        rows["ssh (OpenSSH)"] = _rounds(
            lambda: Master(
                ["host1"], workers_per_host=WORKERS, ssh_config=servers.ssh_config
            ),
            rounds,
            runs,
        )
    return {
        "rows": rows,
        "sae": sae,
        "first_run": first_runs,
        "echo": echoes,
        "rounds": rounds,
        "runs": runs,
        "workers": WORKERS,
    }


def _ms(values: list[float]) -> str:
    return f"{1000 * values[0]:.0f}" if values else "-"


def table(result: dict) -> str:
    from qjamfab.display.tables import render_table

    if result.get("skipped"):
        return result["skipped"]
    lines = []
    for name, row in result["rows"].items():
        ready, runs = row["ready_s"], row["run_s"]
        lines.append(
            [
                name,
                _ms(ready),
                _ms([statistics.median(ready[1:])]) if len(ready) > 1 else "-",
                f"{1000 * statistics.median(runs):.1f}" if runs else "-",
                f"{1000 * percentile(runs, 90):.1f}" if runs else "-",
            ]
        )
    sae = result["sae"]
    return (
        render_table(
            [
                "contender",
                "ready cold ms",
                "ready warm ms",
                "run median ms",
                "run p90 ms",
            ],
            lines,
        )
        + f"\n\nautoencoder, {sae['patches']} patches, paired:\n"
        + render_table(
            ["contender", "eval median ms", "eval p90 ms", "overhead ms", "evals"],
            [
                [
                    name,
                    f"{1000 * row['median_eval_s']:.1f}",
                    f"{1000 * row['p90_eval_s']:.1f}",
                    f"{row['overhead_ms']:.1f}",
                    str(row["evals"]),
                ]
                for name, row in sae["rows"].items()
            ],
        )
        + f"\n\nfirst run of {result['first_run']['mib']} MiB, paired:\n"
        + render_table(
            ["contender", "median s", "MB/s"],
            [
                [name, f"{row['median_s']:.2f}", f"{row['mb_s']:.0f}"]
                for name, row in result["first_run"]["rows"].items()
            ],
        )
        + "\n\nround trip of one message, median / slowest ms:\n"
        + render_table(
            ["stream", *(f"{n} B" for n in ECHO_SIZES)],
            [
                [name, *(f"{a:.1f} / {b:.1f}" for a, b in row.values())]
                for name, row in result["echo"].items()
            ],
        )
    )


def targets(result: dict) -> list[dict]:
    if result.get("skipped"):
        return []
    rows = result["rows"]
    ssh = statistics.median(rows["ssh (OpenSSH)"]["run_s"])
    out = []
    for name in ("slurm (inside salloc)", "slurm: (asks salloc)"):
        srun = statistics.median(rows[name]["run_s"])
        out.append(
            target(
                f"trivial run, {name} vs SSH",
                "within 2x of SSH",
                round(srun / ssh, 2),
                "x",
                srun <= 2 * ssh,
            )
        )
    sae = result["sae"]["rows"]
    ratio = (
        sae["slurm: (srun streams)"]["median_eval_s"]
        / sae["ssh (OpenSSH)"]["median_eval_s"]
    )
    out.append(
        target(
            "autoencoder evaluation, srun streams vs SSH",
            "within 10% of SSH",
            round(ratio, 3),
            "x",
            ratio <= 1.1,
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inside"]:
        _inside(int(argv[1]), int(argv[2]))
        return 0
    return standalone_main("slurm", __doc__, SIZES, measure, table, targets, argv)


if __name__ == "__main__":
    sys.exit(main())
