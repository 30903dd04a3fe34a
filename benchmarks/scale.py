"""6. Scale: many hosts and many workers per host on stock sshds.

All hosts are private sshds on this machine's 2 cores (MaxStartups and
MaxSessions at their defaults). Measured in one run, so the ratios compare
configurations under the same conditions:

- Master ready (constructor returns, every worker attached) at H x W
  against 1 x 1, cold (no daemons, no runtime: the agent installs it and
  starts the daemons) and warm (daemons up), median of the rounds;
- the master's own CPU per trivial run (`process_time` of this process
  over many `Master.run(f)`, f the same function each time), at H x W
  against 1 x 1;
- OpenSSH client processes under the master, and agents per host;
- the CPU the hosts' processes (sshd, agent, daemons) used for a cold
  start: on real hosts each host spends its share on its own cores, at
  the same time as the others; here all of it shares 2 cores;
- one host's workers, 1 and 8, forked from its template and each its own
  Python (QJAMFAB_FORKSERVER=0), cold and warm: ready, and the CPU the
  host's processes used to start them;
- the floor under the ready times, in the same rounds: OpenSSH alone
  starting on each host at once the Python qjamfab's hosts run (`ssh host
  PYTHON -c pass`, one client per host), and a session alone (`ssh host
  true`): every session costs the hosts' sshds (key exchange, session,
  the login shell and what its rc file runs) on these same 2 cores.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import time

from .common import Scale, ssh_hosts, sshd_missing, target


def _children_named(word: bytes) -> int:
    """Processes whose parent is this one and whose command is `word`."""
    count = 0
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0]
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and os.path.basename(argv0) == word:
            count += 1
    return count


def _host_cpu(servers) -> float:
    """CPU seconds used so far by every process of every host."""
    return sum(_cpu_by_process(servers).values())


def _ready(servers, aliases, per_host: int, cold: bool) -> dict:
    from qjamfab import Master, hostspec
    from qjamfab.engines import cluster

    specs = hostspec.parse_hosts(aliases)
    if cold:
        cluster.stop_workers(specs, ssh_config=servers.ssh_config)
        for alias in aliases:
            shutil.rmtree(servers.homes[alias], ignore_errors=True)
    cpu_before = _host_cpu(servers)
    started = time.perf_counter()
    with Master(aliases, workers_per_host=per_host, ssh_config=servers.ssh_config) as m:
        ready = time.perf_counter() - started
        assert len(m.workers) == len(aliases) * per_host
        clients = _children_named(b"ssh")
        assert m.run(lambda p, x: 1) == len(m.workers)
    return {
        "ready_s": ready,
        "ssh_clients": clients,
        "host_cpu_s": _host_cpu(servers) - cpu_before,
    }


def _openssh_ready(servers, aliases, command: str) -> float:
    """Seconds for OpenSSH alone to run `command` on every host at once
    (one `ssh host COMMAND` per host): what any tool that runs an agent
    over SSH pays before its own work."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["ssh", "-F", servers.ssh_config, alias, command],
            stdin=subprocess.DEVNULL,
        )
        for alias in aliases
    ]
    for proc in procs:
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ssh exited with {proc.returncode}")
    return time.perf_counter() - started


def _cpu_by_process(servers) -> dict[int, float]:
    """CPU seconds used so far by each process of every host."""
    hz = os.sysconf("SC_CLK_TCK")
    found = {}
    for host in servers:
        for pid in host.processes():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                found[pid] = (int(fields[11]) + int(fields[12])) / hz
            except (OSError, ValueError, IndexError):
                pass
    return found


def _start_cost(servers, alias: str, workers: int, fork: bool, cold: bool) -> dict:
    """One host's workers started by a Master: the wall time until it is
    ready and the CPU the host's processes used meanwhile (those alive once
    it is ready: the previous session's daemons, retired meanwhile, only
    exited)."""
    from qjamfab import Master, hostspec
    from qjamfab.engines import cluster

    spec = alias if fork else f"{alias} env.QJAMFAB_FORKSERVER=0"
    if cold:
        cluster.stop_workers(
            hostspec.parse_hosts([alias]), ssh_config=servers.ssh_config
        )
        shutil.rmtree(servers.homes[alias], ignore_errors=True)
    before = _cpu_by_process(servers)
    started = time.perf_counter()
    with Master([spec], workers_per_host=workers, ssh_config=servers.ssh_config) as m:
        ready = time.perf_counter() - started
        after = _cpu_by_process(servers)
        assert m.run(lambda p, x: 1) == workers
    return {
        "ready_s": ready,
        "host_cpu_s": sum(t - before.get(pid, 0.0) for pid, t in after.items()),
    }


def one_host_start(servers, rounds: int) -> dict:
    """1 and 8 workers started on one host, forked from its template and
    each its own Python (QJAMFAB_FORKSERVER=0), cold (no runtime, no
    daemons, no template) and warm (right after a session): medians of the
    rounds, every configuration measured in turn in each round."""
    alias = servers.aliases[0]
    samples: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for fork in (True, False):
            for workers in (1, 8):
                for state in ("cold", "warm"):
                    key = f"{'forked' if fork else 'exec'} {workers} {state}"
                    samples.setdefault(key, []).append(
                        _start_cost(servers, alias, workers, fork, state == "cold")
                    )
    return {
        key: {
            m: statistics.median(r[m] for r in results)
            for m in ("ready_s", "host_cpu_s")
        }
        for key, results in samples.items()
    }


def _one(params, rows) -> int:
    return 1


def _master_cpu_per_run(servers, aliases, per_host: int, runs: int) -> float:
    """This process's CPU per trivial run. The same function every run, as
    a training loop passes its step: a new lambda each run would be
    pickled again each run, as much at 1 x 1 as at 8 x 8."""
    from qjamfab import Master

    with Master(aliases, workers_per_host=per_host, ssh_config=servers.ssh_config) as m:
        for _ in range(20):
            m.run(_one)
        before = time.process_time()
        for _ in range(runs):
            m.run(_one)
        return (time.process_time() - before) / runs


def run(scale: Scale, log=print) -> dict:
    why_not = sshd_missing()
    if why_not:
        return {"skipped": why_not, "rows": {}, "table": why_not, "targets": []}
    n_hosts, per_host = (
        (8, 8) if scale.name == "full" else (2, 4) if scale.name == "quick" else (2, 2)
    )
    rounds = 3 if scale.name == "full" else 1
    runs = 300 if scale.name == "full" else 30
    from qjamfab.engines import cluster

    rows: dict = {}
    with ssh_hosts(n_hosts) as servers:
        big, small = servers.aliases, servers.aliases[:1]
        for label, aliases, workers in (
            ("1 x 1", small, 1),
            (f"{n_hosts} x {per_host}", big, per_host),
        ):
            row = rows[label] = {}
            for state in ("cold", "warm"):
                results = [
                    _ready(servers, aliases, workers, state == "cold")
                    for _ in range(rounds)
                ]
                row[f"{state}_s"] = statistics.median(r["ready_s"] for r in results)
                row[f"{state}_host_cpu_s"] = statistics.median(
                    r["host_cpu_s"] for r in results
                )
                row["ssh_clients"] = results[-1]["ssh_clients"]
            # The Python qjamfab's hosts run (this benchmark's wrapper of
            # this Python), as qjamfab starts it; and the session alone.
            python = shlex.quote(cluster.remote_python())
            for key, command in (
                ("openssh_s", f"{python} -c pass"),
                ("ssh_session_s", "true"),
            ):
                row[key] = statistics.median(
                    _openssh_ready(servers, aliases, command) for _ in range(rounds)
                )
            row["master_cpu_ms"] = 1e3 * _master_cpu_per_run(
                servers, aliases, workers, runs
            )
            log(
                f"  {label}: ready cold {row['cold_s']:.2f} s (hosts' CPU "
                f"{row['cold_host_cpu_s']:.2f} s), warm {row['warm_s']:.2f} s"
                f"; OpenSSH alone {row['openssh_s']:.2f} s (a session alone "
                f"{row['ssh_session_s']:.2f} s)"
                f"; master CPU per trivial run {row['master_cpu_ms']:.3f} ms;"
                f" {row['ssh_clients']} OpenSSH clients"
            )
        start = one_host_start(servers, rounds)
    one, many = rows["1 x 1"], rows[f"{n_hosts} x {per_host}"]
    label = f"{n_hosts} x {per_host}"
    table = "\n".join(
        [
            f"{'layout':>8} {'cold s':>8} {'hosts CPU s':>12} {'warm s':>8} "
            f"{'OpenSSH s':>10} {'session s':>10} {'master ms/run':>14} "
            f"{'ssh':>4}"
        ]
        + [
            f"{k:>8} {r['cold_s']:8.2f} {r['cold_host_cpu_s']:12.2f} "
            f"{r['warm_s']:8.2f} {r['openssh_s']:10.2f} "
            f"{r['ssh_session_s']:10.2f} {r['master_cpu_ms']:14.3f} "
            f"{r['ssh_clients']:4d}"
            for k, r in rows.items()
        ]
    )
    table += "\n\none host, 1 and 8 workers: ready s, hosts' CPU s\n" + "\n".join(
        f"{k:>16} {r['ready_s']:8.2f} {r['host_cpu_s']:8.2f}" for k, r in start.items()
    )
    cold_ratio = many["cold_s"] / one["cold_s"]
    warm_ratio = many["warm_s"] / one["warm_s"]
    cpu_ratio = many["master_cpu_ms"] / one["master_cpu_ms"]
    floor = (
        f"; OpenSSH alone, a Python started on each host at once: "
        f"{many['openssh_s']:.2f} s vs {one['openssh_s']:.2f} s "
        f"({many['openssh_s'] / one['openssh_s']:.2f}x); a session alone "
        f"(ssh host true): {many['ssh_session_s']:.2f} s vs "
        f"{one['ssh_session_s']:.2f} s "
        f"({many['ssh_session_s'] / one['ssh_session_s']:.2f}x)"
    )
    targets = [
        target(
            f"Master ready at {label}, cold, vs 1 x 1 cold",
            "<= 3x",
            round(cold_ratio, 2),
            "x",
            cold_ratio <= 3,
            f"{many['cold_s']:.2f} s vs {one['cold_s']:.2f} s; the hosts' "
            f"processes (sshd, agent, daemons) used "
            f"{many['cold_host_cpu_s']:.1f} s of CPU, all on these 2 "
            "cores: real hosts spend theirs on their own cores, at once" + floor,
        ),
        target(
            f"Master ready at {label}, warm, vs 1 x 1 warm",
            "<= 2x",
            round(warm_ratio, 2),
            "x",
            warm_ratio <= 2,
            f"{many['warm_s']:.2f} s vs {one['warm_s']:.2f} s" + floor,
        ),
        target(
            f"master CPU per trivial run at {label} vs 1 x 1",
            "<= 8x",
            round(cpu_ratio, 2),
            "x",
            cpu_ratio <= 8,
            f"{many['master_cpu_ms']:.3f} ms vs {one['master_cpu_ms']:.3f} ms",
        ),
        *(
            target(
                f"hosts' CPU to start 8 workers vs 1 on a host, {state}",
                "<= 2x",
                round(ratio, 2),
                "x",
                ratio <= 2,
                f"{start[f'forked 8 {state}']['host_cpu_s']:.2f} s vs "
                f"{start[f'forked 1 {state}']['host_cpu_s']:.2f} s; each its own "
                f"Python (QJAMFAB_FORKSERVER=0): "
                f"{start[f'exec 8 {state}']['host_cpu_s']:.2f} s vs "
                f"{start[f'exec 1 {state}']['host_cpu_s']:.2f} s",
            )
            for state in ("cold", "warm")
            for ratio in [
                start[f"forked 8 {state}"]["host_cpu_s"]
                / start[f"forked 1 {state}"]["host_cpu_s"]
            ]
        ),
        target(
            f"OpenSSH client processes under the master at {label}",
            f"<= {n_hosts}",
            many["ssh_clients"],
            "",
            many["ssh_clients"] <= n_hosts,
        ),
    ]
    return {
        "rows": rows,
        "one_host_start": start,
        "table": table,
        "targets": targets,
        "layout": [n_hosts, per_host],
    }
