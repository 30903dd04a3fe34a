"""Where the time goes: the trivial-run path and the large-transfer path.

    python -m benchmarks.profile trivial [--runs 3000]
    python -m benchmarks.profile transfer [--mib 400]

Both run against 2 (trivial) or 1 (transfer) private SSH hosts and write,
under benchmarks/results/profile/:

- `<path>-cprofile.txt`: cProfile of the calling thread (the one running
  Master.run), sorted by own time and by cumulative time;
- `trivial-worker-cprofile.txt`: cProfile of a worker daemon's main
  thread over the same runs (its Python loads a sitecustomize from a
  private directory that profiles between two SIGUSR2s);
- `<path>-phases.txt`: time per run spent inside the Master's steps,
  their cumulative times read from that cProfile's stats by file and
  function name (nothing in qjamfab is wrapped or patched);
- `<path>-cpu.txt`: CPU seconds per run of every thread of the master
  (main, paramiko transports), of its OpenSSH client processes, of the
  sshd processes of the hosts and of the worker daemons (from /proc);
- `<path>-pyspy-*.txt` when py-spy is installed: sampled stacks (all
  threads, idle included) of the master and of a worker, aggregated by
  function (own samples and inclusive samples);
- `trivial-timeline.txt`: each run's master path in three stretches,
  medians: from `Master.run`'s call to its first frame written (the
  master's work before any worker can start), from there to the last
  frame read (the workers' work, the streams and the master's work in
  between), and from there to `run` returning.

Nothing here changes qjamfab: it is only profiled and observed (the
timeline wraps two methods, the transport's write and the link's read,
with a time stamp each, for its own runs only).
"""

from __future__ import annotations

import argparse
import ast
import collections
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time

from .common import one_blas_thread

one_blas_thread()

from .common import ROOT, ssh_hosts  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "profile")
TICK = os.sysconf("SC_CLK_TCK")


# --- CPU per thread and process -------------------------------------------------


def _cpu(path: str) -> float:
    try:
        with open(path, "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _comm(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def cpu_snapshot(servers, worker_pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: master threads by name, sshd per host, workers."""
    snap: dict[str, float] = collections.defaultdict(float)
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid)) or _comm(f"/proc/self/task/{tid}/comm")
        if name.startswith("Thread-") or name == "?":
            name = "paramiko transport / other"
        snap[f"master: {name}"] += _cpu(f"/proc/self/task/{tid}/stat")
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _comm(f"/proc/{pid}/comm") == "ssh":
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == os.getpid():
                snap["master: OpenSSH clients"] += _cpu(f"/proc/{pid}/stat")
    worker_set = set(worker_pids.values())
    for host in servers:
        for pid in host.processes():
            if pid in worker_set:
                continue
            comm = _comm(f"/proc/{pid}/comm")
            if comm == "sshd" or comm.startswith("sshd"):
                snap["sshd (all hosts)"] += _cpu(f"/proc/{pid}/stat")
            elif comm.startswith("python"):
                snap["host python (relay etc.)"] += _cpu(f"/proc/{pid}/stat")
            else:
                snap[f"host {comm}"] += _cpu(f"/proc/{pid}/stat")
    for pid in worker_pids.values():
        snap["worker daemons"] += _cpu(f"/proc/{pid}/stat")
    return snap


def cpu_report(before: dict, after: dict, runs: int, wall: float) -> str:
    keys = sorted(
        set(before) | set(after), key=lambda k: -(after.get(k, 0) - before.get(k, 0))
    )
    lines = [
        f"CPU per run over {runs} runs ({wall / runs * 1e3:.3f} ms wall "
        "per run); /proc utime+stime, clock ticks of "
        f"{1e3 / TICK:.0f} ms, so only totals over many runs mean much",
        f"{'where':44} {'ms CPU/run':>11} {'share of wall':>14}",
    ]
    total = 0.0
    for k in keys:
        d = after.get(k, 0) - before.get(k, 0)
        total += d
        lines.append(f"{k:44} {d / runs * 1e3:11.4f} {d / wall * 100:13.1f}%")
    lines.append(f"{'total':44} {total / runs * 1e3:11.4f} {total / wall * 100:13.1f}%")
    return "\n".join(lines)


# --- phases: the Master's steps, read from the cProfile ---------------------------

# (module of qjamfab, qualified name, label): looked up in the profile's
# stats by file and name, so nothing is wrapped or patched; a step this
# qjamfab no longer has is reported as not seen.
STEPS = [
    ("master", "Master.run", "Master.run (total)"),
    ("serialize", "job_functions", "serialize.job_functions"),
    (
        "serialize",
        "encode_job",
        "serialize.encode_job (cloudpickle + sha256 of the job, every run)",
    ),
    ("serialize", "encode_params", "serialize.encode_params"),
    ("serialize", "encode_slice", "serialize.encode_slice"),
    ("master", "Master._drain", "Master._drain"),
    ("master", "Master._start_missing", "Master._start_missing"),
    ("master", "Master._live", "Master._live"),
    ("dataset", "BaseDataSet.refs", "DataSet.refs (hashing when new)"),
    ("scheduler", "plan", "scheduler.plan"),
    ("run", "Run.__init__", "Run.__init__"),
    ("run", "Run._send_task", "Run._send_task (FUNC/TASK frames written)"),
    ("run", "Run._collect", "Run._collect (waiting for results, incl. REFS sent)"),
    ("run", "Run._supply", "Run._supply (slices encoded and written)"),
    ("run", "Run._balance", "Run._balance (load balancing, backups)"),
    ("run", "Run._check_heartbeats", "Run._check_heartbeats"),
    ("run", "Run._result", "Run._result (decode result)"),
    ("workers", "WorkerHandle.send", "WorkerHandle.send (any frame)"),
    ("reduce", "reduce_all", "reduce_all"),
]


def _qualnames(path: str) -> dict[int, str]:
    """First line of each function in a source file (its `def` and its
    first decorator, either of which a code object may start at) ->
    its qualified name."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return {}
    names: dict[int, str] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                names[child.lineno] = name
                for deco in child.decorator_list[:1]:
                    names[deco.lineno] = name
                walk(child, f"{name}.<locals>.")

    walk(tree, "")
    return names


def phases_report(profiler: cProfile.Profile, runs: int) -> str:
    """Cumulative time and calls per run of each of STEPS, from the
    profile (so under its overhead: the shares, more than the absolute
    times, are what to read)."""
    import qjamfab

    package = os.path.dirname(os.path.abspath(qjamfab.__file__))
    wanted = {
        (os.path.join(package, f"{module}.py"), qualname): label
        for module, qualname, label in STEPS
    }
    files = {path for path, _ in wanted}
    found: dict[str, tuple[float, int]] = {}
    lines_of: dict[str, dict[int, str]] = {}
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    for (path, line, _name), (_, calls, _tt, cumtime, _) in stats.items():
        path = os.path.abspath(path)
        if path not in files:
            continue
        if path not in lines_of:
            lines_of[path] = _qualnames(path)
        label = wanted.get((path, lines_of[path].get(line, "")))
        if label is not None:
            secs, n = found.get(label, (0.0, 0))
            found[label] = (secs + cumtime, n + calls)
    total = found.get("Master.run (total)", (0.0, 0))[0]
    lines = [
        f"cumulative time inside each step, per run ({runs} runs), from the "
        "cProfile of the calling thread (its overhead included); steps "
        "nest (_collect contains _supply, which contains send)",
        f"{'step':62} {'ms/run':>9} {'calls/run':>10} {'share':>7}",
    ]
    for label, (secs, n) in sorted(found.items(), key=lambda kv: -kv[1][0]):
        lines.append(
            f"{label:62} {secs / runs * 1e3:9.4f} "
            f"{n / runs:10.2f} "
            f"{secs / total * 100 if total else 0:6.1f}%"
        )
    missing = [label for _, _, label in STEPS if label not in found]
    if missing:
        lines.append("not seen (not called, or no longer in qjamfab):")
        lines += [f"  {label}" for label in missing]
    return "\n".join(lines)


# --- the worker daemons' cProfile ---------------------------------------------------

# Put on the SSH hosts' PYTHONPATH: a worker daemon (or its keeper) starts
# a profiler at the first SIGUSR2 and writes it out at the second.
_WORKER_SITECUSTOMIZE = """\
import os, signal, sys
if "--socket" in sys.argv:
    import cProfile
    _profile = cProfile.Profile()
    _on = []
    def _toggle(*_):
        if _on:
            _profile.disable()
            _on.clear()
            _profile.dump_stats(os.path.join({out!r}, f"worker-{{os.getpid()}}.prof"))
        else:
            _on.append(1)
            _profile.enable()
    signal.signal(signal.SIGUSR2, _toggle)
"""


def worker_profiler_dir() -> str:
    """A directory holding the sitecustomize above; the profiles land there."""
    import tempfile

    path = tempfile.mkdtemp(prefix="qjamfab-worker-profile-")
    with open(os.path.join(path, "sitecustomize.py"), "w") as f:
        f.write(_WORKER_SITECUSTOMIZE.format(out=path))
    return path


def toggle_worker_profilers(pids) -> None:
    import signal

    for pid in pids:
        os.kill(pid, signal.SIGUSR2)


def worker_profile_text(path: str, pid: int, runs: int) -> str:
    prof = os.path.join(path, f"worker-{pid}.prof")
    deadline = time.monotonic() + 10
    while not os.path.exists(prof) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the dump may still be in progress
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    out.write(
        f"cProfile of a worker daemon's main thread, {runs} runs (one task "
        "each)\n\n== by own time ==\n"
    )
    stats.sort_stats("tottime").print_stats(30)
    out.write("\n== by cumulative time ==\n")
    stats.sort_stats("cumtime").print_stats(30)
    return out.getvalue()


# --- py-spy ------------------------------------------------------------------------


def start_pyspy(pid: int, path: str, seconds: float, rate: int = 500):
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--threads",
            "--idle",
            "--nonblocking",
            "--duration",
            str(max(1, int(seconds))),
            "--output",
            path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def summarize_pyspy(raw_path: str, top: int = 25) -> str:
    """Collapsed stacks -> per-thread share, and top functions by own and
    inclusive samples (all threads)."""
    own = collections.Counter()
    incl = collections.Counter()
    threads = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            thread = frames[0]
            threads[thread] += n
            total += n
            funcs = [
                fr.split(" (")[0] + " (" + fr.split(" (")[-1] if " (" in fr else fr
                for fr in frames[1:]
            ]
            if funcs:
                own[funcs[-1]] += n
            for fn in set(funcs):
                incl[fn] += n
    lines = [f"{total} samples (idle included) of {raw_path}", "", "by thread:"]
    lines += [f"  {n / total * 100:5.1f}%  {t}" for t, n in threads.most_common()]
    lines += ["", f"top {top} by own samples (where the thread is):"]
    lines += [f"  {n / total * 100:5.1f}%  {fn}" for fn, n in own.most_common(top)]
    lines += ["", f"top {top} by inclusive samples:"]
    lines += [f"  {n / total * 100:5.1f}%  {fn}" for fn, n in incl.most_common(top)]
    return "\n".join(lines)


# --- the two paths -----------------------------------------------------------------


def _cprofile_text(profiler: cProfile.Profile, runs: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write(
        f"cProfile of the thread calling Master.run, {runs} runs\n\n== by own time ==\n"
    )
    stats.sort_stats("tottime").print_stats(30)
    out.write("\n== by cumulative time ==\n")
    stats.sort_stats("cumtime").print_stats(30)
    return out.getvalue()


def _write(name: str, text: str) -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    return path


def trivial_path(runs: int) -> list[str]:
    from qjamfab import Master

    from .overhead import _dataset, trivial

    written = []
    profiles = worker_profiler_dir()
    with ssh_hosts(2, python_path=profiles) as servers:
        with Master(
            servers.aliases, workers_per_host=1, ssh_config=servers.ssh_config
        ) as m:
            data = _dataset(2)
            for _ in range(200):
                m.run(trivial, 1, data)
            pids = {n: s["pid"] for n, s in m.worker_stats().items()}

            # 1. plain timing and CPU budget, nothing attached
            before = cpu_snapshot(servers, pids)
            started = time.perf_counter()
            for _ in range(runs):
                m.run(trivial, 1, data)
            wall = time.perf_counter() - started
            after = cpu_snapshot(servers, pids)
            written.append(
                _write("trivial-cpu.txt", cpu_report(before, after, runs, wall))
            )

            # 2. cProfile of the calling thread, and the steps read from it;
            # of the workers' main threads too
            toggle_worker_profilers(pids.values())
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(runs):
                m.run(trivial, 1, data)
            profiler.disable()
            toggle_worker_profilers(pids.values())
            written.append(
                _write(
                    "trivial-worker-cprofile.txt",
                    worker_profile_text(profiles, next(iter(pids.values())), runs),
                )
            )
            written.append(
                _write("trivial-cprofile.txt", _cprofile_text(profiler, runs))
            )
            written.append(_write("trivial-phases.txt", phases_report(profiler, runs)))

            # 3. py-spy, master and one worker, all threads, idle included
            os.makedirs(OUT, exist_ok=True)
            raw_m = os.path.join(OUT, "trivial-pyspy-master.raw")
            raw_w = os.path.join(OUT, "trivial-pyspy-worker.raw")
            seconds = max(3.0, wall * 1.2)
            spies = [
                start_pyspy(os.getpid(), raw_m, seconds),
                start_pyspy(next(iter(pids.values())), raw_w, seconds),
            ]
            if spies[0] is not None:
                time.sleep(0.5)
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    m.run(trivial, 1, data)
                for spy in spies:
                    spy.wait(60)
                for raw, name in ((raw_m, "master"), (raw_w, "worker")):
                    if os.path.exists(raw):
                        written.append(
                            _write(f"trivial-pyspy-{name}.txt", summarize_pyspy(raw))
                        )
                        os.unlink(raw)
            # 4. the master's path per run, in three stretches
            written.append(
                _write("trivial-timeline.txt", timeline(m, data, runs, trivial))
            )
    shutil.rmtree(profiles, ignore_errors=True)
    return written


def timeline(master, data, runs: int, job) -> str:
    """Per run: call -> first frame written -> last frame read -> return,
    from time stamps taken by the transport's write and the link's read
    (wrapped for these runs only), medians in microseconds."""
    from qjamfab.links import transport, workers

    stamps: dict[str, list[float]] = {"write": [], "read": []}
    clock = time.perf_counter
    real_write = transport.PipesTransport.writev
    real_read = workers.Link.read_events

    def writev(self, buffers):
        stamps["write"].append(clock())
        return real_write(self, buffers)

    def read_events(self):
        stamps["read"].append(clock())
        return real_read(self)

    spans: dict[str, list[float]] = {"before": [], "between": [], "after": []}
    transport.PipesTransport.writev = writev  # type: ignore[method-assign]
    workers.Link.read_events = read_events  # type: ignore[method-assign]
    try:
        for _ in range(runs):
            stamps["write"].clear()
            stamps["read"].clear()
            started = clock()
            master.run(job, 1, data)
            ended = clock()
            spans["before"].append(stamps["write"][0] - started)
            spans["between"].append(stamps["read"][-1] - stamps["write"][0])
            spans["after"].append(ended - stamps["read"][-1])
    finally:
        transport.PipesTransport.writev = real_write  # type: ignore[method-assign]
        workers.Link.read_events = real_read  # type: ignore[method-assign]
    rows = [
        ("Master.run called -> its first frame written", spans["before"]),
        ("first frame written -> last frame read", spans["between"]),
        ("last frame read -> Master.run returns", spans["after"]),
    ]
    total = statistics.median(sum(parts) for parts in zip(*(spans[k] for k in spans)))
    return "\n".join(
        [
            f"the master's path per trivial run, {runs} runs, median us "
            "(time stamps at the transport's write and the link's read)",
            *(f"{name:48} {statistics.median(xs) * 1e6:8.1f}" for name, xs in rows),
            f"{'whole run':48} {total * 1e6:8.1f}",
        ]
    )


def transfer_path(mib: int, resends: int = 2) -> list[str]:
    from qjamfab import DataSet, Master

    from .transfer import _array, rows_of

    written = []
    with ssh_hosts(1) as servers:
        with Master(
            servers.aliases, workers_per_host=1, ssh_config=servers.ssh_config
        ) as m:
            m.run(lambda p, x: 0)
            pids = {n: s["pid"] for n, s in m.worker_stats().items()}
            data = _array(mib, 7)
            dataset = DataSet(data)

            profiler = cProfile.Profile()
            raw_m = os.path.join(OUT, "transfer-pyspy-master.raw")
            raw_w = os.path.join(OUT, "transfer-pyspy-worker.raw")
            os.makedirs(OUT, exist_ok=True)
            # the first run and `resends` cache-cleared re-sends
            est = mib / 100 * (1 + resends) + 2
            spies = [
                start_pyspy(os.getpid(), raw_m, est),
                start_pyspy(pids[next(iter(pids))], raw_w, est),
            ]
            time.sleep(0.5)
            before = cpu_snapshot(servers, pids)
            started = time.perf_counter()
            times = []
            for i in range(1 + resends):
                if i:
                    m.clear_cache()
                t = time.perf_counter()
                profiler.enable()
                m.run(rows_of, dataset=dataset)
                profiler.disable()
                times.append(time.perf_counter() - t)
            wall = time.perf_counter() - started
            after = cpu_snapshot(servers, pids)
            head = (
                f"{mib} MiB to 1 SSH worker: first run {times[0]:.2f} s, "
                "re-sends after clear_cache "
                + ", ".join(f"{t:.2f} s" for t in times[1:])
                + "\n\n"
            )
            written.append(
                _write(
                    "transfer-cpu.txt",
                    head + cpu_report(before, after, len(times), wall),
                )
            )
            written.append(
                _write(
                    "transfer-phases.txt", head + phases_report(profiler, len(times))
                )
            )
            written.append(
                _write(
                    "transfer-cprofile.txt", head + _cprofile_text(profiler, len(times))
                )
            )
            for spy in spies:
                if spy is not None:
                    spy.wait(120)
            for raw, name in ((raw_m, "master"), (raw_w, "worker")):
                if os.path.exists(raw):
                    written.append(
                        _write(f"transfer-pyspy-{name}.txt", summarize_pyspy(raw))
                    )
                    os.unlink(raw)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("path", choices=["trivial", "transfer"])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--mib", type=int, default=400)
    args = parser.parse_args(argv)
    written = (
        trivial_path(args.runs) if args.path == "trivial" else transfer_path(args.mib)
    )
    for path in written:
        print(f"--- {path}")
        with open(path) as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
