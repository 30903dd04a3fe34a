"""7. qjamfab on a Dask cluster against plain Dask on the same cluster.

One `distributed.LocalCluster` (2 worker processes, one thread each, with
nannies, as `dask worker --nworkers 2 --nthreads 1` would run them), and
on it, open at once:

- "qjamfab on Dask": `Master(client)`, the same `Master.run` as anywhere;
- "plain Dask": what a Dask user would write for the same loop: the data
  scattered once, half to each worker (`client.scatter(workers=[w])`),
  then per round one pinned task per worker (`client.submit(fn, params,
  half, workers=[w], allow_other_workers=False, pure=False)`), `gather`
  and sum;
- "qjamfab local 2": qjamfab's own two local workers (`Master("local:2")`),
  the reference for the autoencoder's speed-up.

Two workloads: the trivial run (the job returns 0 for each slice of a
small cached array, as in benchmarks/overhead.py: pure coordination), and
one cost-and-gradient evaluation of the sparse autoencoder at 100k patches
(examples/sparse_autoencoder.py, as in benchmarks/sae.py; the serial code,
`serial_stats_cost` in this process, gives the speed-ups). Every
contender is warm (data in place, functions loaded) and they are timed in
turn, run by run, so a slower spell of this shared VM hits all alike (and
each meets Dask's batched streams in the same rhythm).
Targets (issue 15): qjamfab on Dask costs at most 1.1x plain Dask per run,
and its autoencoder speed-up on 2 Dask workers is within 10 % of qjamfab's
own 2 local workers.

    python -m benchmarks.dask [--scale full|quick|tiny] [--out DIR]

writes `dask.json` in DIR (default benchmarks/results/, or
benchmarks/results/<scale>/). Needs `pip install 'qjamfab[dask]'`. Not in
`python -m benchmarks`' suite.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import tempfile
import time

from .common import local_home, percentile, standalone_main, target

# scale -> (trivial: rounds, runs per block; sae: patches, rounds, block)
SIZES = {
    "full": (10, 100, 100_000, 8, 5),
    "quick": (4, 50, 100_000, 3, 3),
    "tiny": (2, 10, 10_000, 1, 2),
}
SLICES_PER_WORKER = 4
ROWS_PER_SLICE = 16


def trivial(params, rows):
    return 0


def _plain_trivial(params, halves):
    return sum(trivial(params, rows) for rows in halves)


def _plain_sae(params, rows):
    """The autoencoder's mapfunc, loaded on the Dask worker (Dask pickles
    functions of importable modules by name)."""
    from benchmarks.sae import load_example

    return load_example().mapfunc(params, rows)


class PlainDask:
    """The loop written for Dask itself: data scattered once, pinned to
    each worker; per round, one task per worker, gather, sum."""

    def __init__(self, client, parts: list):
        self.client = client
        self.workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        assert len(self.workers) == len(parts)
        self.data = [
            client.scatter(part, workers=[w], hash=False)
            for part, w in zip(parts, self.workers)
        ]

    def run(self, fn, params):
        futures = [
            self.client.submit(
                fn, params, data, workers=[w], allow_other_workers=False, pure=False
            )
            for data, w in zip(self.data, self.workers)
        ]
        return sum(self.client.gather(futures))


@contextlib.contextmanager
def dask_cluster():
    """A private LocalCluster of 2 workers (one thread each) and a Client."""
    import distributed

    with tempfile.TemporaryDirectory(prefix="qjamfab-bench-dask-") as scratch:
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            local_directory=scratch,
        )
        client = distributed.Client(cluster, set_as_default=False)
        try:
            client.wait_for_workers(2, timeout=60)
            yield client
        finally:
            client.close()
            cluster.close()


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(scale_name: str, log=print) -> dict:
    import numpy as np

    from qjamfab import DataSet, Master

    from .sae import load_example

    rounds, block, patches, sae_rounds, sae_block = SIZES[scale_name]
    sae = load_example()
    theta0 = sae.initial_theta()
    X = sae.sample_patches(patches)
    rng = np.random.default_rng(7)
    n = 2 * SLICES_PER_WORKER * ROWS_PER_SLICE
    small = np.arange(n * 8, dtype=np.float64).reshape(n, 8)
    small_slices = np.array_split(small, 2 * SLICES_PER_WORKER)
    trivial_times: dict[str, list[float]] = {}
    sae_times: dict[str, list[float]] = {"serial": []}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(dask_cluster())
        on_dask = stack.enter_context(Master(client))
        stack.enter_context(local_home())
        local = stack.enter_context(Master("local:2"))
        plain_small = PlainDask(
            client, [small_slices[:SLICES_PER_WORKER], small_slices[SLICES_PER_WORKER:]]
        )
        plain_sae = PlainDask(client, np.array_split(X, 2))
        small_data, sae_data = DataSet(small), DataSet(X)
        trivial_runs = {
            "qjamfab on Dask": lambda: on_dask.run(trivial, 1, small_data),
            "plain Dask": lambda: plain_small.run(_plain_trivial, 1),
            "qjamfab local 2": lambda: local.run(trivial, 1, small_data),
        }
        costs = {
            "qjamfab on Dask": sae.DistributedCost(on_dask, sae_data),
            "qjamfab local 2": sae.DistributedCost(local, sae_data),
        }

        def plain_cost(theta):
            stats = plain_sae.run(_plain_sae, (theta, sae.HIDDEN))
            return sae.finish(stats, theta, X.shape[1])

        sae_runs = {
            "qjamfab on Dask": costs["qjamfab on Dask"],
            "plain Dask": plain_cost,
            "qjamfab local 2": costs["qjamfab local 2"],
        }
        reference = sae.serial_stats_cost(theta0, X)
        for name, cost in sae_runs.items():  # ships the data, checks
            got = cost(theta0)
            assert np.isclose(got[0], reference[0], rtol=1e-10), name
            assert np.allclose(got[1], reference[1], rtol=1e-8, atol=1e-12)
        for run in trivial_runs.values():
            for _ in range(20):
                run()
        assert on_dask.last_run is not None
        for master in (on_dask, local):
            master.run(trivial, 1, small_data)
            assert master.last_run.dataset_bytes_sent == 0
        # Paired run by run: Dask's latency depends on the rhythm of the
        # messages (its batched streams wait 2-10 ms after a send), so
        # each contender follows the others, round after round.
        for _ in range(rounds):
            for _ in range(block):
                for name, run in trivial_runs.items():
                    trivial_times.setdefault(name, []).append(_timed(run))
        log(f"  dask trivial: {rounds} rounds of {block} runs each done")
        for r in range(sae_rounds):
            for _ in range(sae_block):
                theta = theta0 + 0.01 * rng.standard_normal(theta0.size)
                sae_times["serial"].append(
                    _timed(functools.partial(sae.serial_stats_cost, theta, X))
                )
                for name, cost in sae_runs.items():
                    sae_times.setdefault(name, []).append(
                        _timed(functools.partial(cost, theta))
                    )
            log(
                f"  dask sae round {r + 1}/{sae_rounds}: "
                + ", ".join(
                    f"{k} {statistics.median(v) * 1e3:.1f} ms"
                    for k, v in sae_times.items()
                )
            )
        overhead = {
            name: float(
                np.median(np.array(c.seconds[1:]) - np.array(c.compute_seconds[1:]))
                * 1e3
            )
            for name, c in costs.items()
        }
        compute = {
            name: float(np.median(c.compute_seconds[1:]) * 1e3)
            for name, c in costs.items()
        }
    trivial_ms = {k: statistics.median(v) * 1e3 for k, v in trivial_times.items()}
    sae_ms = {k: statistics.median(v) * 1e3 for k, v in sae_times.items()}
    return {
        "trivial_ms": trivial_ms,
        "trivial_p10_p90_ms": {
            k: [percentile(v, 10) * 1e3, percentile(v, 90) * 1e3]
            for k, v in trivial_times.items()
        },
        "sae_ms": sae_ms,
        "sae_speedup": {k: sae_ms["serial"] / v for k, v in sae_ms.items()},
        "sae_master_overhead_ms": overhead,
        "sae_busiest_worker_compute_ms": compute,
        "sizes": {
            "trivial_runs": rounds * block,
            "sae_patches": patches,
            "sae_evals": sae_rounds * sae_block,
        },
    }


def table(result: dict) -> str:
    from qjamfab.display.tables import render_table

    rows = []
    for name, ms in result["trivial_ms"].items():
        lo, hi = result["trivial_p10_p90_ms"][name]
        rows.append(
            [
                "trivial run",
                name,
                f"{ms:.2f}",
                f"{ms / result['trivial_ms']['plain Dask']:.2f}x",
                f"p10-p90 {lo:.2f}-{hi:.2f} ms",
            ]
        )
    for name, ms in result["sae_ms"].items():
        rows.append(
            [
                f"autoencoder {result['sizes']['sae_patches'] // 1000}k",
                name,
                f"{ms:.2f}",
                "-"
                if name == "serial"
                else f"{ms / result['sae_ms']['plain Dask']:.2f}x",
                f"{result['sae_speedup'][name]:.2f}x vs serial",
            ]
        )
    return render_table(
        ["workload", "what", "median ms", "vs plain Dask", ""], rows, "llrrl"
    )


def targets(result: dict) -> list[dict]:
    trivial_ratio = (
        result["trivial_ms"]["qjamfab on Dask"] / result["trivial_ms"]["plain Dask"]
    )
    sae_ratio = result["sae_ms"]["qjamfab on Dask"] / result["sae_ms"]["plain Dask"]
    speedup = result["sae_speedup"]
    share = speedup["qjamfab on Dask"] / speedup["qjamfab local 2"]
    patches = f"{result['sizes']['sae_patches'] // 1000}k"
    return [
        target(
            "trivial run, qjamfab on Dask vs plain Dask (paired)",
            "<= 1.1x",
            round(trivial_ratio, 2),
            "x",
            trivial_ratio <= 1.1,
            f"{result['trivial_ms']['qjamfab on Dask']:.2f} ms vs "
            f"{result['trivial_ms']['plain Dask']:.2f} ms",
        ),
        target(
            f"sparse autoencoder {patches}, qjamfab on Dask vs plain Dask (paired)",
            "<= 1.1x",
            round(sae_ratio, 2),
            "x",
            sae_ratio <= 1.1,
            f"{result['sae_ms']['qjamfab on Dask']:.1f} ms vs "
            f"{result['sae_ms']['plain Dask']:.1f} ms",
        ),
        target(
            f"sparse autoencoder {patches}, speed-up on 2 Dask workers vs "
            "on 2 local workers",
            ">= 0.9 of it",
            round(share, 3),
            "",
            share >= 0.9,
            f"{speedup['qjamfab on Dask']:.2f}x vs "
            f"{speedup['qjamfab local 2']:.2f}x (plain Dask "
            f"{speedup['plain Dask']:.2f}x)",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        "dask",
        __doc__,
        SIZES,
        measure,
        table,
        targets,
        argv,
        extra_machine=_distributed_version,
    )


def _distributed_version() -> dict:
    import distributed

    return {"distributed": distributed.__version__}


if __name__ == "__main__":
    sys.exit(main())
