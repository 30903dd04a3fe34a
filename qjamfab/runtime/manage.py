"""Worker daemons on one host: start, status, stop, clear.

Run from the bundle as `python3 -c <boot manage> COMMAND ...`; answers one
line of JSON. The host agent (agent.py) uses the same functions. Daemon k
listens on `<host dir>/worker-k.sock` and records its pid in
`worker-k.pid`, in the host-local directory `host_dir(base)` (not under the
base, which other machines may share); a pid counts as a worker only while
its command line names that socket, so a recycled pid is never signalled.
`start --count N` records N in `<host dir>/count`: the number of workers a
later session's agent attaches when the Master does not say.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import time

from . import (
    default_base,
    fs_type,
    host_dir,
    process_start,
    secure_dir,
    secure_host_dir,
    start_detached,
    template,
    this_runtime,
)
from .packages import installed
from .pins import cache_limit, forget_over_limit, pinned_over_limit
from .procs import (
    START_WAIT_S,
    cmdline,
    environ_of,
    fork_record,
    stop_daemons,
)


def socket_path(base: str, k: int) -> str:
    """Where daemon worker-k listens."""
    return os.path.join(host_dir(base), f"worker-{k}.sock")


def live_workers(base: str) -> list[dict]:
    """The daemons of this base that are alive, by their pid files."""
    return _workers_in(host_dir(base))


def legacy_workers(base: str) -> list[dict]:
    """Daemons that an earlier qjamfab (per-host state in the base) runs
    from `<base>/run/`: stop-workers and an upgraded Master stop them. A
    pid there may be another host's (a shared base), but one counts only
    when a process of this host has that socket on its command line."""
    return _workers_in(os.path.join(base, "run"))


def _workers_in(run: str) -> list[dict]:
    found = []
    for name in sorted(os.listdir(run)) if os.path.isdir(run) else ():
        if not (name.startswith("worker-") and name.endswith(".pid")):
            continue
        try:
            with open(os.path.join(run, name)) as f:
                word, *start = f.read().split()
            pid = int(word)
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        sock = os.path.join(run, name[:-4] + ".sock")
        # Started by exec, its command line names the socket; forked from
        # the template, its start time is the one its pid file records.
        if sock not in cmdline(pid) and start != [str(process_start(pid))]:
            continue
        try:  # an exiting worker may remove its pid file meanwhile
            started = os.stat(os.path.join(run, name)).st_mtime
        except OSError:
            continue
        try:
            slot = int(name[len("worker-") : -len(".pid")])
        except ValueError:
            continue
        found.append(
            {
                "name": name[:-4],
                "slot": slot,
                "pid": pid,
                "socket": sock,
                "uptime_s": time.time() - started,
                "served": _served(os.path.join(run, name[:-4] + ".served"), pid),
                "forked": sock not in cmdline(pid),
            }
        )
    return found


def _served(path: str, pid: int) -> str | None:
    """The session daemon `pid` served (its agent wrote `path`: "PID
    SESSION", "-" for a session without a name), None if none yet."""
    try:
        with open(path) as f:
            said = f.read().split()
    except OSError:
        return None
    return said[1] if len(said) == 2 and said[0] == str(pid) else None


def mark_served(worker_socket: str, pid: int, session: str | None) -> None:
    """Record that daemon `pid` serves `session` (see retire_served)."""
    with open(worker_socket[: -len(".sock")] + ".served", "w") as f:
        f.write(f"{pid} {session or '-'}\n")


def recorded_count(base: str) -> int:
    """The worker count start-workers was last given here, else one per
    core."""
    try:
        with open(os.path.join(host_dir(base), "count")) as f:
            return max(1, int(f.read().strip()))
    except (OSError, ValueError):
        return os.cpu_count() or 1


def stop_other_runtimes(base: str) -> list[str]:
    """A daemon of another runtime (qjamfab was upgraded) would not speak
    this one's protocol: it is stopped, its disk cache kept."""
    runtime = this_runtime()
    return stop_daemons(
        base,
        [w for w in live_workers(base) if runtime not in cmdline(w["pid"])]
        + legacy_workers(base),
    ).names


def worker_env(template: dict[str, str], index: int) -> dict[str, str]:
    """A host's env. settings for its worker `index` ({worker} filled in)."""
    return {k: v.replace("{worker}", str(index)) for k, v in template.items()}


def env_differs(worker: dict, wanted: dict[str, str]) -> bool:
    """Whether daemon `worker` (as live_workers lists it) runs with other
    values for these variables."""
    have = environ_of(worker["pid"])
    record = fork_record(worker)
    if record is not None:  # /proc shows the template's: add its own
        have.update(record["env"])
    return any(have.get(k) != v for k, v in wanted.items())


def start_slots(
    base: str,
    slots: list[int],
    idle_timeout: float,
    envs: dict[int, dict[str, str]] | None = None,
) -> list[int]:
    """Start daemons worker-<slot> for these slots, all at once (slot k
    with envs[k] added to its environment): forked from the host's template
    (forkserver.py) when it is on, else each its own Python. Wait until
    each listens; the slots that did not start in time."""
    envs = envs or {}
    forked = template.fork_slots(base, slots, idle_timeout, envs)
    for k in slots:
        if k in forked:
            continue
        name = f"worker-{k}"
        start_detached(
            "worker",
            ["--socket", socket_path(base, k), "--name", name]
            + ["--base", base, "--idle-timeout", str(idle_timeout)],
            os.path.join(host_dir(base), f"{name}.daemon"),
            {**os.environ, **envs.get(k, {})},
        )
    deadline = time.monotonic() + START_WAIT_S
    waiting = set(slots)
    while waiting and time.monotonic() < deadline:
        up = {w["name"] for w in live_workers(base)}
        waiting = {k for k in waiting if f"worker-{k}" not in up}
        if waiting:
            time.sleep(0.02)
    return sorted(waiting)


def start(
    base: str, count: int, idle_timeout: float, env: dict[str, str] | None = None
) -> dict:
    replaced = stop_other_runtimes(base) + retire_served(base)
    env = env or {}
    replaced += stop_daemons(
        base,
        [
            w
            for w in live_workers(base)
            if env and env_differs(w, worker_env(env, w["slot"]))
        ],
    ).names
    running = {w["name"] for w in live_workers(base)}
    missing = [k for k in range(count) if f"worker-{k}" not in running]
    failed = start_slots(
        base, missing, idle_timeout, {k: worker_env(env, k) for k in missing}
    )
    with open(os.path.join(host_dir(base), "count"), "w") as f:
        f.write(f"{count}\n")
    return {
        "started": [f"worker-{k}" for k in missing if k not in failed],
        "replaced": replaced,
        "failed": [f"worker-{k}" for k in failed],
        "workers": [w["name"] for w in live_workers(base)],
        "count": count,
        "cores": os.cpu_count(),
    }


def status(base: str) -> dict:
    entries = size = 0
    cache = os.path.join(base, "cache")
    for entry in os.scandir(cache) if os.path.isdir(cache) else ():
        if not entry.name.endswith(".tmp"):
            entries += 1
            size += entry.stat().st_size
    runtime = os.path.join(base, "runtime")
    try:
        limit = cache_limit(cache)
    except ValueError:  # a bad QJAMFAB_CACHE_LIMIT: the daemons say so
        limit = None
    return {
        "cache_pinned_over": pinned_over_limit(cache),
        "workers": live_workers(base),
        "template": template.live_template(base),
        "cache_entries": entries,
        "cache_bytes": size,
        "cache_limit": limit,
        "cores": os.cpu_count(),
        "base": base,
        "base_fs": fs_type(base),
        "host_dir": host_dir(base),
        "packages": installed(base),
        "runtimes": sorted(n for n in os.listdir(runtime) if not n.startswith("."))
        if os.path.isdir(runtime)
        else [],
    }


def stop(base: str) -> dict:
    """End the host's daemons and its template."""
    workers = live_workers(base) + legacy_workers(base)
    found = template.live_template(base)
    done = stop_daemons(base, workers + ([found] if found else []))
    return {
        "stopped": len(workers),
        "killed": done.killed,
        "template": found is not None,
    }


def retire_served(base: str, session: str | None = None) -> list[str]:
    """Stop the daemons that served a session other than `session` and
    whose slot no session claims: no later session runs its jobs beside
    what an earlier one's left in them."""
    ended, locks = [], []
    for w in live_workers(base):
        if w["served"] is None or (session and w["served"] == session):
            continue
        fd = os.open(
            os.path.join(host_dir(base), f"{w['name']}.lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        locks.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its session is still on
            continue
        ended.append(w)
    try:
        return stop_daemons(base, ended).names  # all at once
    finally:
        for fd in locks:
            os.close(fd)


def clear(base: str) -> dict:
    for w in live_workers(base):
        os.kill(w["pid"], signal.SIGUSR1)  # drops the daemon's memory cache
    before = status(base)
    cache = os.path.join(base, "cache")
    for name in os.listdir(cache) if os.path.isdir(cache) else ():
        try:
            os.unlink(os.path.join(cache, name))
        except FileNotFoundError:
            pass
    forget_over_limit(cache)
    return {"entries": before["cache_entries"], "bytes": before["cache_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="qjamfab-manage")
    parser.add_argument("command", choices=["start", "status", "stop", "clear"])
    parser.add_argument("--count", default="auto")
    parser.add_argument("--idle-timeout", type=float, default=3600.0)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="NAME=VALUE for every daemon started ({worker}: its number)",
    )
    args = parser.parse_args()
    base = default_base()
    try:
        secure_dir(base)
        secure_dir(os.path.join(base, "cache"))
        secure_host_dir(base)
    except OSError as exc:
        sys.exit(str(exc))  # its first line says what to do
    if args.command == "start":
        count = (os.cpu_count() or 1) if args.count == "auto" else int(args.count)
        result = start(
            base, count, args.idle_timeout, dict(e.split("=", 1) for e in args.env)
        )
    else:
        result = {"status": status, "stop": stop, "clear": clear}[args.command](base)
    print(json.dumps(result))
