"""The paper's sparse autoencoder (examples/sparse_autoencoder.py) and the
benchmark suite (benchmarks/): distributed cost and gradient equal the
serial ones on any slicing, the gradient is right, and the suite runs end
to end at a tiny size and writes what it promises."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from qjamfab import DataSet, Master
from tests.conftest import processes_mentioning
from tests.sshd_hosts import sshd_available

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("scipy")


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "sparse_autoencoder", ROOT / "examples" / "sparse_autoencoder.py"
    )
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["sparse_autoencoder"] = module
    spec.loader.exec_module(module)
    return module


sae = _load_example()


@pytest.fixture(scope="module")
def patches():
    images = sae.natural_images(count=2, size=64, seed=3)
    return sae.sample_patches(257, images=images, seed=3)  # odd on purpose


def _random_theta(visible, hidden, seed=1):
    """Not the initial point: nonzero biases, so every term is exercised."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.3, sae.theta_size(visible, hidden))


def _assert_same(got, want):
    assert np.isclose(got[0], want[0], rtol=1e-11, atol=0), (got[0], want[0])
    assert np.allclose(got[1], want[1], rtol=1e-9, atol=1e-13), np.max(
        np.abs(got[1] - want[1])
    )


def test_patches_are_deterministic_and_in_tanh_range(patches):
    again = sae.sample_patches(
        257, images=sae.natural_images(count=2, size=64, seed=3), seed=3
    )
    assert np.array_equal(patches, again)
    assert patches.shape == (257, 64) and patches.flags.c_contiguous
    assert -0.9 <= patches.min() and patches.max() <= 0.9
    assert np.allclose(patches.mean(axis=1), 0, atol=0.15)


def test_slice_statistics_add_up_on_any_cut(patches):
    """mapfunc over any cut, summed, then finish == the textbook code."""
    theta = _random_theta(64, 30)
    want = sae.serial_cost(theta, patches)
    for bounds in (
        [0, 257],
        [0, 1, 257],
        [0, 100, 101, 200, 257],
        list(range(0, 257, 7)) + [257],
    ):
        stats = sum(
            sae.mapfunc((theta, 30), patches[a:b]) for a, b in zip(bounds, bounds[1:])
        )
        _assert_same(sae.finish(stats, theta, 64, 30), want)


@pytest.mark.parametrize("hosts", ["local:1", "local:3"])
def test_distributed_equals_serial(patches, hosts):
    theta = _random_theta(64, 30)
    want = sae.serial_cost(theta, patches)
    with Master(hosts) as m:
        for slice_size in (None, 1, 7, 64, 300):
            cost = sae.DistributedCost(m, DataSet(patches, slice_size))
            _assert_same(cost(theta), want)
            _assert_same(
                cost(sae.initial_theta()), sae.serial_cost(sae.initial_theta(), patches)
            )


@pytest.mark.parametrize("cost_fn", ["serial_cost", "serial_stats_cost"])
def test_gradient_matches_finite_differences(cost_fn):
    rng = np.random.default_rng(5)
    X = rng.uniform(-0.9, 0.9, (23, 9))  # 3x3 patches, 4 hidden
    hidden = 4
    theta = _random_theta(9, hidden, seed=6)
    fn = getattr(sae, cost_fn)
    cost, grad = fn(theta, X, hidden)
    eps = 1e-6
    numeric = np.empty_like(theta)
    for i in range(len(theta)):
        step = np.zeros_like(theta)
        step[i] = eps
        numeric[i] = (
            fn(theta + step, X, hidden)[0] - fn(theta - step, X, hidden)[0]
        ) / (2 * eps)
    error = np.linalg.norm(numeric - grad) / np.linalg.norm(numeric + grad)
    assert error < 1e-8, error


def test_lbfgs_lowers_the_cost(patches):
    theta0 = sae.initial_theta()
    start = sae.serial_cost(theta0, patches)[0]
    _, final, info = sae.train(lambda t: sae.serial_cost(t, patches), theta0, 15)
    assert final < 0.5 * start
    assert info["funcalls"] <= 15 + 2  # scipy may finish an iteration


def test_minimize_trains_as_the_hand_wired_loop(patches):
    """qjamfab.minimize (the example's default) takes the same steps as
    fmin_l_bfgs_b around Master.run: the same theta, to the bit."""
    theta0 = sae.initial_theta()
    with Master("inproc:2") as m:
        data = DataSet(patches, 32)
        wired = sae.train(sae.DistributedCost(m, data), theta0, 12)
        ported = sae.train_with_minimize(m, data, theta0, 12)
    assert ported[0].tobytes() == wired[0].tobytes()
    assert ported[1] == wired[1] and ported[2]["nit"] == wired[2]["nit"]
    assert ported[2]["funcalls"] == wired[2]["funcalls"]


@pytest.mark.timeout(180)  # a guard against hangs: 60 s here when idle
def test_suite_smoke(tmp_path):
    """The whole suite at a tiny size: every benchmark ran, results.json
    has its fields, the distributed cost equalled the serial one on every
    configuration, the plots exist and nothing is left running."""
    from benchmarks import NAMES, run_suite

    lines = []
    results = run_suite("tiny", out_dir=str(tmp_path), log=lines.append)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["scale"] == "tiny"
    assert saved["machine"]["cores"] == os.cpu_count()
    assert saved["machine"]["blas_threads"] == "1"
    bench = saved["benchmarks"]
    assert set(bench) == set(NAMES)
    for name, result in bench.items():
        assert not result.get("error"), f"{name}:\n{result.get('error')}"
        assert result["seconds"] > 0 and result["table"]
        assert result["steal_s"] >= 0
    ssh = bool(sshd_available())

    rows = bench["sae"]["rows"]
    expected = {"serial", "serial-blocked", "local 1", "local 2"}
    if ssh:
        expected |= {"ssh 1", "ssh 2"}
    assert expected <= set(rows)
    for config, cells in rows.items():
        cell = cells["600"]
        assert cell["seconds_per_eval"] > 0 and cell["speedup"] > 0
        assert cell["evals"] >= 1 and np.isfinite(cell["final_cost"])
        if not config.startswith("serial"):
            assert cell["vs_serial"]["allclose"], (config, cell["vs_serial"])
            assert cell["vs_serial"]["cost_rel"] < 1e-12
            assert cell["first_run_dataset_bytes"] > 600 * 64 * 8 // 2
            assert cell["dataset_bytes_after_first"] == 0
            assert 0 <= cell["overhead_share"] < 1
    # the same L-BFGS path everywhere: equal cost and gradient -> equal end
    finals = [cells["600"]["final_cost"] for cells in rows.values()]
    assert np.allclose(finals, finals[0], rtol=1e-6)

    over = bench["overhead"]["rows"]
    for n in (1, 2):
        for name in (f"qjamfab local {n}", f"multiprocessing.Pool {n}"):
            assert 0 < over[name]["median_ms"] <= over[name]["p99_ms"]
        assert over[f"qjamfab local {n}"]["vs_pool"] > 0
    if ssh:
        assert over["qjamfab ssh 2"]["vs_paramiko_echo"] > 0
        assert over["paramiko echo 100 B"]["median_ms"] > 0
        t = bench["transfer"]["rows"][0]
        assert t["first_run_dataset_bytes"] >= t["bytes"]
        assert t["second_run_dataset_bytes"] == 0
        assert t["openssh_s"] > 0 and t["first_vs_openssh"] > 0
        mem = bench["memory"]["rows"][0]
        assert mem["dataset_bytes_sent"] >= mem["file_bytes"] - 4096
        assert len(mem["workers"]) == 2
        for w in mem["workers"].values():
            assert w["vm_hwm"] > 0 and w["slice_bytes"] > 0
        assert mem["master"]["vm_hwm"] >= mem["master"]["peak_rss_anon"] > 0
        boot = next(iter(bench["bootstrap"]["rows"].values()))
        assert boot["cold_s"] > 0 and boot["warm_s"] > 0
        # Each layout's ready times come with OpenSSH's alone, their floor.
        layouts = bench["scale"]["rows"]
        assert set(layouts) == {"1 x 1", "2 x 2"}
        assert all(
            r["openssh_s"] > 0 and r["ssh_session_s"] > 0 for r in layouts.values()
        )
    targets = [t for r in bench.values() for t in r["targets"]]
    assert all({"target", "goal", "measured", "met"} <= set(t) for t in targets)
    if ssh:
        assert any("2 SSH workers" in t["target"] for t in targets)
        # targets come from configurations timed in alternating blocks
        assert set(bench["overhead"]["paired_2_workers"]) == {
            "multiprocessing.Pool",
            "qjamfab local",
            "qjamfab ssh",
        }
        configs = bench["sae"]["paired"]["configs"]
        assert set(configs) == {
            "serial-blocked",
            "2 plain processes",
            "local 2",
            "ssh 2",
        }
        assert all(c["evals"] >= 4 and c["median_eval_s"] > 0 for c in configs.values())
    assert any("== Targets ==" in line for line in lines)

    if results.get("plots"):
        assert (tmp_path / "sae.png").stat().st_size > 1000
    from benchmarks.common import USED_DIRS

    assert USED_DIRS
    leftover = [p for d in USED_DIRS for p in processes_mentioning(d)]
    assert not leftover, leftover


@pytest.mark.timeout(120)
def test_reduce_benchmark_smoke(tmp_path, restored_environ):
    """`python -m benchmarks.reduce` at a tiny size: every configuration
    ran and was right, and it wrote reduce.json with its targets."""
    import glob
    import tempfile

    from benchmarks import reduce as reduce_bench

    leftovers = os.path.join(tempfile.gettempdir(), "qjamfab-bench-verify-*")
    before = set(glob.glob(leftovers))
    assert reduce_bench.main(["--scale", "tiny", "--out", str(tmp_path)]) == 0
    assert set(glob.glob(leftovers)) == before  # its cache's lock and pins too
    with open(tmp_path / "reduce.json") as f:
        saved = json.load(f)
    rows = saved["memory"]
    assert {r["workers"] for r in rows} >= {"8 local"}
    assert all(r["correct"] and r["held_peak"] > 0 for r in rows)
    assert {r["config"] for r in rows} == {"as shipped", "unbounded"}
    assert saved["verify"]["verify_mb_per_s"] > 0
    assert any(t["target"].startswith("master peak memory") for t in saved["targets"])


@pytest.mark.timeout(120)
def test_broadcast_benchmark_smoke(tmp_path, restored_environ):
    """`python -m benchmarks.broadcast` at a tiny size: it measured the
    three sessions and wrote broadcast.json with both targets met."""
    from benchmarks import broadcast as broadcast_bench

    assert broadcast_bench.main(["--scale", "tiny", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "broadcast.json") as f:
        saved = json.load(f)
    assert saved["broadcast"]["first_run_broadcast_bytes"] >= saved["bytes"]
    assert saved["plain"]["second_run_bytes_sent"] >= saved["bytes"]
    assert [t["met"] for t in saved["targets"]] == [True, True]


@pytest.mark.skipif(sshd_available() is None, reason="needs OpenSSH's sshd")
def test_the_trivial_run_against_execnet_is_timed_in_one_process_with_cpu():
    """benchmarks.overhead's own command: qjamfab and execnet on the same 2
    SSH hosts, and local:2, each with times and CPU per run."""
    pytest.importorskip("execnet")
    from benchmarks.overhead import versus_execnet

    out = versus_execnet(rounds=2, block=3)
    for name in ("execnet ssh 2x1", "qjamfab ssh 2x1", "qjamfab local:2"):
        row = out[name]
        assert row["n"] == 6 and row["median_ms"] > 0
        assert set(row["cpu_ms_per_run"]) == {"master", "ssh clients", "workers"}
        assert row["cpu_ms_per_run"]["master"] > 0
    assert out["qjamfab ssh 2x1"]["vs_execnet"] > 0


def test_benchmarks_run_one_blas_thread_with_the_librarys_own_kernels(
    restored_environ,
):
    """A machine's BLAS kernel settings would reach the master and its
    local and Slurm workers but not SSH workers (sshd cleans their
    environment): the benchmarks drop them, and keep one BLAS thread."""
    from benchmarks.common import BLAS_VARS, one_blas_thread

    os.environ.update(
        OPENBLAS_CORETYPE="Haswell", MKL_ENABLE_INSTRUCTIONS="AVX2", PATH_KEPT="x"
    )
    one_blas_thread()
    assert "OPENBLAS_CORETYPE" not in os.environ
    assert "MKL_ENABLE_INSTRUCTIONS" not in os.environ
    assert os.environ["PATH_KEPT"] == "x"
    assert all(os.environ[name] == "1" for name in BLAS_VARS)


@pytest.mark.timeout(180)
def test_history_times_the_trivial_run_at_each_commit_in_turn(restored_environ):
    """`python -m benchmarks.history REV ...`: a commit's own qjamfab,
    exported and timed in a child of its own, once per pass."""
    import shutil
    import subprocess

    from benchmarks import common, history

    if (
        shutil.which("git") is None
        or subprocess.run(
            ["git", "-C", common.ROOT, "rev-parse", "HEAD"], capture_output=True
        ).returncode
    ):
        pytest.skip("needs a git clone of the repository")
    rows = history.measure(["HEAD"], passes=2, runs=20)
    assert list(rows) == ["HEAD"]
    row = rows["HEAD"]
    assert len(row["passes"]) == 2
    assert row["master_ms"] > 0 and row["wall_ms"] > 0
    assert row["workers_ms"] >= 0  # /proc counts whole clock ticks
