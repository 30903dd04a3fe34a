"""The first run of a dataset to 2 SSH hosts against OpenSSH, paired, with
the CPU each side spends.

`python -m benchmarks.first_run [--mib 400] [--rounds 6] [--hosts 2]`
(not in the suite; transfer.py is the suite's). Each round makes a fresh
array (nothing cached), then times in turn, one right after the other:

- qjamfab: `Master.run` over it (hashing, sending, storing: the first run
  of a Master already connected, after `clear_cache`);
- OpenSSH: one `ssh host 'cat > /dev/null'` per host at once, each fed its
  share of the rows from a thread of this process, minus the same with no
  bytes (connection and remote shell, which the Master has already);
- the same with `'cat > f'`: the bytes land in a file, as a slice does.

CPU seconds are of every process involved: this one (its threads and its
OpenSSH clients) and each host's (sshd, agent, daemons, cat), from /proc
(utime + stime of the live ones, cutime + cstime of those reaped). The
ratio is per round (OpenSSH's streaming time / qjamfab's), so a busy
spell of the machine hits both alike; medians over the rounds. Writes
`first_run.json` under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from .common import ROOT, one_blas_thread

one_blas_thread()

from .common import ssh_hosts  # noqa: E402
from .transfer import _array, openssh_cat, rows_of  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 0.3  # for processes that just ended to be reaped


def _ticks(pid: int | str, fields: slice) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    values = stat[stat.rindex(")") + 2 :].split()
    return sum(int(v) for v in values[fields]) / TICK


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def cpu(servers) -> tuple[float, float]:
    """CPU seconds so far: (this process and its children, the hosts)."""
    here = sum(os.times()[:4])  # threads, and children reaped
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _ppid(pid) == os.getpid():
            here += _ticks(pid, slice(11, 13))
    hosts = sum(
        _ticks(pid, slice(11, 15)) for host in servers for pid in host.processes()
    )
    return here, hosts


def measure(servers, what, *args, **kwargs) -> dict:
    """Wall and CPU seconds of what(*args, **kwargs)."""
    time.sleep(SETTLE_S)
    here0, hosts0 = cpu(servers)
    started = time.perf_counter()
    what(*args, **kwargs)
    wall = time.perf_counter() - started
    time.sleep(SETTLE_S)
    here1, hosts1 = cpu(servers)
    return {"wall_s": wall, "cpu_here_s": here1 - here0, "cpu_hosts_s": hosts1 - hosts0}


def _minus(full: dict, empty: dict) -> dict:
    return {k: full[k] - empty[k] for k in full}


def run(mib: int, rounds: int, hosts: int, log=print) -> dict:
    from qjamfab import DataSet, Master

    rows = []
    with ssh_hosts(hosts) as servers:
        cfg, aliases = servers.ssh_config, servers.aliases[:hosts]
        with Master(aliases, workers_per_host=1, ssh_config=cfg) as m:
            m.run(rows_of, dataset=DataSet(_array(2, 999)))  # numpy imported there
            for r in range(rounds):
                data = _array(mib, 1000 + r + time.time_ns() % 10**6)
                m.clear_cache()
                dataset = DataSet(data)
                row: dict = {
                    "qjamfab": measure(servers, m.run, rows_of, dataset=dataset)
                }
                for name, dest in (("null", "cat > /dev/null"), ("file", "cat > f")):
                    full = measure(servers, openssh_cat, cfg, aliases, data, dest)
                    empty = measure(servers, openssh_cat, cfg, aliases, data[:0], dest)
                    row[f"openssh_{name}"] = _minus(full, empty)
                    row[f"ratio_{name}"] = (
                        row[f"openssh_{name}"]["wall_s"] / row["qjamfab"]["wall_s"]
                    )
                rows.append(row)
                q = row["qjamfab"]
                log(
                    f"round {r}: qjamfab {q['wall_s']:.2f} s (CPU here "
                    f"{q['cpu_here_s']:.2f}, hosts {q['cpu_hosts_s']:.2f}); OpenSSH "
                    f"/dev/null {row['openssh_null']['wall_s']:.2f} s, file "
                    f"{row['openssh_file']['wall_s']:.2f} s; ratio "
                    f"{row['ratio_null']:.2f}x / {row['ratio_file']:.2f}x; load "
                    f"{os.getloadavg()[0]:.1f}"
                )
    return {"mib": mib, "hosts": hosts, "rows": rows, "summary": summary(rows)}


def summary(rows: list[dict]) -> dict:
    med = statistics.median
    out: dict = {}
    for side in ("qjamfab", "openssh_null", "openssh_file"):
        for key in ("wall_s", "cpu_here_s", "cpu_hosts_s"):
            out[f"{side}_{key}"] = med(r[side][key] for r in rows)
    for name in ("null", "file"):
        ratios = [r[f"ratio_{name}"] for r in rows]
        out[f"ratio_{name}"] = med(ratios)
        out[f"ratio_{name}_range"] = [min(ratios), max(ratios)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--hosts", type=int, default=2)
    args = parser.parse_args(argv)
    result = run(args.mib, args.rounds, args.hosts)
    s = result["summary"]
    print(
        f"medians of {args.rounds}: qjamfab {s['qjamfab_wall_s']:.2f} s, CPU "
        f"{s['qjamfab_cpu_here_s']:.2f} here + {s['qjamfab_cpu_hosts_s']:.2f} hosts; "
        f"OpenSSH to /dev/null {s['openssh_null_wall_s']:.2f} s, CPU "
        f"{s['openssh_null_cpu_here_s']:.2f} + {s['openssh_null_cpu_hosts_s']:.2f}; "
        f"to a file {s['openssh_file_wall_s']:.2f} s; OpenSSH / qjamfab per "
        f"round: {s['ratio_null']:.2f}x ({s['ratio_null_range'][0]:.2f}-"
        f"{s['ratio_null_range'][1]:.2f}), to a file {s['ratio_file']:.2f}x"
    )
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "first_run.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
