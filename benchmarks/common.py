"""What every benchmark shares: scales, BLAS threads, private SSH hosts,
a private QJAMFAB_HOME, statistics, /proc readers and targets."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLAS_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


#: every private directory (QJAMFAB_HOME, sshd servers) a benchmark made in
#: this process: nothing should run from them once the benchmark is done
USED_DIRS: list[str] = []


def one_blas_thread() -> None:
    """One BLAS thread, and the library's own choice of kernels, in this
    process and in every process it starts (local workers and srun's
    inherit the environment). sshd gives SSH workers a clean environment:
    a machine's kernel settings (here OPENBLAS_CORETYPE=Haswell on an AMD
    CPU) would otherwise reach the master and its local and Slurm workers
    alone, and make their compute slower or faster than the SSH workers'.
    Call before numpy is imported to affect this process too."""
    for name in [k for k in os.environ if _blas_tuning(k)]:
        del os.environ[name]
    for name in BLAS_VARS:
        os.environ[name] = "1"


def _blas_tuning(name: str) -> bool:
    """Whether an environment variable picks a BLAS library's kernels or
    sizes (not its thread count, which is one everywhere)."""
    prefixes = ("OPENBLAS_", "GOTOBLAS", "MKL_", "NVPL_", "BLIS_")
    return name.startswith(prefixes) and name not in BLAS_VARS


if ROOT not in sys.path:  # tests.sshd_hosts, and the examples/ folder
    sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class Scale:
    """How big each benchmark runs. `full` is the measured suite, `quick`
    a one-minute look, `tiny` the test suite's smoke run."""

    name: str
    sae_sizes: tuple
    sae_evals: dict  # patches -> L-BFGS evaluations timed
    overhead_workers: tuple
    overhead_runs: int
    echo_rounds: int
    transfer_mib: tuple
    transfer_repeats: int
    memory_mib: tuple
    bootstrap_rounds: int
    bootstrap_all: bool = True  # both remote Pythons, and Master ready
    extras: bool = True  # extra rows: 2-host transfer


SCALES = {
    "full": Scale(
        "full",
        (1_000, 10_000, 100_000),
        {1_000: 80, 10_000: 50, 100_000: 30},
        (1, 2, 4, 8),
        2000,
        3000,
        (25, 100, 400),
        3,
        (64, 256, 1024),
        5,
    ),
    "quick": Scale(
        "quick",
        (1_000, 10_000),
        {1_000: 20, 10_000: 10},
        (1, 2),
        300,
        500,
        (4, 16),
        1,
        (16,),
        1,
        bootstrap_all=False,
    ),
    "tiny": Scale(
        "tiny",
        (600,),
        {600: 4},
        (1, 2),
        30,
        50,
        (1,),
        1,
        (4,),
        1,
        bootstrap_all=False,
        extras=False,
    ),
}


# --- statistics -----------------------------------------------------------


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered))) - 1))
    return ordered[k]


def summary_ms(seconds) -> dict:
    """median / p99 / mean / min of durations in seconds, as ms."""
    seconds = list(seconds)
    return {
        "median_ms": statistics.median(seconds) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "mean_ms": statistics.fmean(seconds) * 1e3,
        "min_ms": min(seconds) * 1e3,
        "n": len(seconds),
    }


def target(
    name: str, goal: str, measured: float, unit: str, met: bool, note: str = ""
) -> dict:
    return {
        "target": name,
        "goal": goal,
        "measured": measured,
        "unit": unit,
        "met": bool(met),
        "note": note,
    }


# --- /proc --------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmHWM, VmRSS, RssAnon, ...),
    in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this VM wanted it
    (all cores, since boot; /proc/stat's steal column)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def busy_others(window: float = 0.5) -> list[str]:
    """Processes outside this process tree that used > 20% of a core over
    `window` seconds: who else is competing for the cores right now."""

    def ticks():
        out = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        stat = f.read()
                    fields = stat[stat.rindex(b")") + 2 :].split()
                    out[int(pid)] = (int(fields[11]) + int(fields[12]), int(fields[1]))
                except (OSError, ValueError, IndexError):
                    pass
        return out

    first = ticks()
    time.sleep(window)
    second = ticks()
    mine = {os.getpid()}
    changed = True
    while changed:  # this process's descendants
        changed = False
        for pid, (_, ppid) in second.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (t, _) in second.items():
        used = (t - first.get(pid, (t, 0))[0]) / hz / window
        if pid not in mine and used > 0.2:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            busy.append(f"{pid} {used * 100:.0f}% {cmd[:80]}")
    return busy


def machine() -> dict:
    import numpy

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "loadavg": loadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["memory_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    except (OSError, ValueError):
        pass
    try:
        import cloudpickle
        import paramiko

        info["paramiko"] = paramiko.__version__
        info["cloudpickle"] = cloudpickle.__version__
    except ImportError:
        pass
    try:
        info["openssh"] = subprocess.run(
            ["ssh", "-V"], capture_output=True, text=True, timeout=10
        ).stderr.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# --- environment of a benchmark ------------------------------------------------


@contextlib.contextmanager
def env(**values):
    """Set (or with None, unset) environment variables for a block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_home():
    """A private QJAMFAB_HOME for local workers, removed afterwards."""
    home = tempfile.mkdtemp(prefix="qjamfab-bench-home-")
    USED_DIRS.append(home)
    try:
        with env(QJAMFAB_HOME=home):
            yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def sshd_missing() -> str:
    """Why SSH benchmarks cannot run here ("" when they can)."""
    from tests.sshd_hosts import sshd_available

    if sshd_available() is None:
        return "OpenSSH sshd is not installed (apt-get install openssh-server)"
    return ""


_WRAPPER = """#!/bin/sh
# python with one BLAS thread: the benchmark's remote Python
{extra}OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
VECLIB_MAXIMUM_THREADS=1 NUMEXPR_NUM_THREADS=1 exec {python} "$@"
"""


@contextlib.contextmanager
def ssh_hosts(
    k: int, *, one_thread_python: bool = True, python_path: str | None = None
):
    """K private OpenSSH servers on 127.0.0.2.. (tests.sshd_hosts), for one
    benchmark. Their sessions run workers with a one-BLAS-thread wrapper of
    this Python (QJAMFAB_REMOTE_PYTHON) unless `one_thread_python` is
    false; `python_path` is put on that wrapper's PYTHONPATH (the
    profile's worker-side sitecustomize). At the end the workers are
    stopped (cluster.stop_workers) and the servers with everything under
    them."""
    from qjamfab import hostspec
    from qjamfab.engines import cluster
    from tests.sshd_hosts import SshdHosts

    servers = SshdHosts(k, log_level="ERROR")
    USED_DIRS.append(servers.dir)
    try:
        wrapper = os.path.join(servers.dir, "python-1-blas-thread")
        with open(wrapper, "w") as f:
            extra = f"PYTHONPATH={python_path} " if python_path else ""
            f.write(_WRAPPER.format(python=sys.executable, extra=extra))
        os.chmod(wrapper, 0o700)
        python = wrapper if one_thread_python else None
        with env(
            QJAMFAB_REMOTE_PYTHON=python, QJAMFAB_SSH_CONFIG=None, QJAMFAB_HOSTS=None
        ):
            try:
                yield servers
            finally:
                cluster.stop_workers(
                    hostspec.parse_hosts(servers.aliases), ssh_config=servers.ssh_config
                )
    finally:
        servers.stop()


def ssh_layout(workers: int, max_hosts: int = 4) -> tuple[int, int]:
    """(hosts, workers per host) for `workers` SSH workers: one per host up
    to max_hosts hosts, then more per host (4 hosts x 2 for 8)."""
    hosts = min(workers, max_hosts)
    return hosts, workers // hosts


def run_child(module: str, args: list[str], what: str) -> dict:
    """Run `python -m <module> --child ARGS` from the repository (a fresh
    process: its own memory high-water mark) and return the JSON its last
    line prints; RuntimeError naming `what` with its output if it fails."""
    import json

    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
            ),
        },
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def standalone_main(
    name: str,
    doc: str,
    sizes: dict,
    measure,
    table,
    targets,
    argv: list[str] | None = None,
    extra_machine=None,
) -> int:
    """`python -m benchmarks.NAME [--scale S] [--out DIR]` for a benchmark
    outside the suite: measure, print the table and targets, and write
    NAME.json (with the machine before and its load after)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}", description=doc.splitlines()[0]
    )
    parser.add_argument("--scale", choices=sorted(sizes), default="full")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    one_blas_thread()
    from . import RESULTS_DIR, format_target

    out_dir = args.out or (
        RESULTS_DIR if args.scale == "full" else os.path.join(RESULTS_DIR, args.scale)
    )
    os.makedirs(out_dir, exist_ok=True)
    started = machine()
    result = measure(args.scale)
    result["table"] = table(result)
    result["targets"] = targets(result)
    result["machine"] = {
        **started,
        "loadavg_after": machine()["loadavg"],
        **(extra_machine() if extra_machine else {}),
    }
    result["scale"] = args.scale
    print(result["table"])
    for t in result["targets"]:
        print(format_target(t))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    return 0
