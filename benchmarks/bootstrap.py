"""5. Bootstrap: `cluster.bootstrap` of 3 SSH hosts, cold and warm.

Cold: the hosts' base directories do not exist (removed before each round),
so bootstrap connects, runs the preflight probe and uploads the runtime over
SFTP. Warm: the runtime is there; bootstrap connects and probes. Each is the
wall time of one `cluster.bootstrap` call over the 3 hosts (in parallel),
median of the rounds.

Measured twice: with the default remote Python (`python3` as the SSH
session finds it on PATH) and with QJAMFAB_REMOTE_PYTHON set to this
interpreter's path. Also: a Master ready on the 3 hosts (bootstrap, start
one daemon per host, connect), cold and warm.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time

from .common import Scale, env, ssh_hosts, sshd_missing, target


def _rounds(servers, rounds: int, cold: bool) -> tuple[list[float], list]:
    from qjamfab import hostspec
    from qjamfab.engines import cluster

    specs = hostspec.parse_hosts(servers.aliases)
    times, per_host = [], []
    for _ in range(rounds):
        if cold:
            cluster.stop_workers(specs, ssh_config=servers.ssh_config)
            for home in servers.homes.values():
                shutil.rmtree(home, ignore_errors=True)
        started = time.perf_counter()
        results = cluster.bootstrap(specs, ssh_config=servers.ssh_config)
        times.append(time.perf_counter() - started)
        bad = [r for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"bootstrap failed: {bad[0].error}")
        expected = "uploaded" if cold else "present"
        assert all(r.info["runtime"] == expected for r in results), results
        per_host.append({r.host: round(r.seconds, 4) for r in results})
    return times, per_host


def _master_ready(servers, cold: bool) -> float:
    from qjamfab import Master, hostspec
    from qjamfab.engines import cluster

    if cold:
        cluster.stop_workers(
            hostspec.parse_hosts(servers.aliases), ssh_config=servers.ssh_config
        )
        for home in servers.homes.values():
            shutil.rmtree(home, ignore_errors=True)
    started = time.perf_counter()
    with Master(
        servers.aliases, workers_per_host=1, ssh_config=servers.ssh_config
    ) as m:
        ready = time.perf_counter() - started
        m.run(lambda p, x: 1)
    return ready


def run(scale: Scale, log=print) -> dict:
    why_not = sshd_missing()
    if why_not:
        return {"skipped": why_not, "rows": {}, "table": why_not, "targets": []}
    rows = {}
    with ssh_hosts(3, one_thread_python=False) as servers:
        variants = [
            ("python3 on PATH", None),
            ("QJAMFAB_REMOTE_PYTHON=sys.executable", sys.executable),
        ]
        for label, python in variants if scale.bootstrap_all else variants[1:]:
            with env(QJAMFAB_REMOTE_PYTHON=python):
                cold, cold_hosts = _rounds(servers, scale.bootstrap_rounds, cold=True)
                warm, warm_hosts = _rounds(servers, scale.bootstrap_rounds, cold=False)
                if scale.bootstrap_all:
                    ready_cold = _master_ready(servers, cold=True)
                    ready_warm = _master_ready(servers, cold=False)
                else:
                    ready_cold = ready_warm = None
            rows[label] = {
                "cold_s": statistics.median(cold),
                "cold_all": cold,
                "cold_per_host": cold_hosts,
                "warm_s": statistics.median(warm),
                "warm_all": warm,
                "warm_per_host": warm_hosts,
                "master_ready_cold_s": ready_cold,
                "master_ready_warm_s": ready_warm,
            }
            log(
                f"  bootstrap 3 hosts ({label}): cold "
                f"{rows[label]['cold_s']:.3f} s, warm "
                f"{rows[label]['warm_s']:.3f} s"
                + (
                    f"; Master ready cold {ready_cold:.2f} s, warm {ready_warm:.2f} s"
                    if ready_cold is not None
                    else ""
                )
            )
    return {"rows": rows, "hosts": 3, "table": table(rows), "targets": targets(rows)}


def table(rows: dict) -> str:
    from qjamfab.display.tables import render_table

    return render_table(
        [
            "remote python",
            "bootstrap cold s",
            "bootstrap warm s",
            "Master ready cold s",
            "Master ready warm s",
        ],
        [
            [
                label,
                f"{r['cold_s']:.3f}",
                f"{r['warm_s']:.3f}",
                _secs(r["master_ready_cold_s"]),
                _secs(r["master_ready_warm_s"]),
            ]
            for label, r in rows.items()
        ],
        "lrrrr",
    )


def _secs(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def targets(rows: dict) -> list[dict]:
    out = []
    for label, r in rows.items():
        out.append(
            target(
                f"bootstrap 3 hosts cold ({label})",
                "<= 1.5 s",
                round(r["cold_s"], 3),
                "s",
                r["cold_s"] <= 1.5,
            )
        )
        out.append(
            target(
                f"bootstrap 3 hosts warm ({label})",
                "<= 0.5 s",
                round(r["warm_s"], 3),
                "s",
                r["warm_s"] <= 0.5,
            )
        )
    return out
