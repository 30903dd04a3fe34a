"""The host's template (forkserver.py) as manage.py sees it: find it, start
it (one per host and runtime, restarted when it died or runs another
runtime or Python), and ask it for daemons.

`QJAMFAB_FORKSERVER=0`, in the host's environment or a host's env.
settings, turns it off: every daemon is then its own Python, as
manage.py starts one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from . import (
    forkserver,
    host_dir,
    process_ended,
    procs,
    start_detached,
    this_runtime,
)

FORKSERVER = "QJAMFAB_FORKSERVER"  # "0": every daemon its own Python
# Read as an interpreter or a library (BLAS, OpenMP) starts: the template
# is started with the values the daemons are to have (restarted when they
# change), and a daemon whose value differs from its siblings' is started
# afresh.
_READ_AT_START = (
    "PYTHON",
    "LD_",
    "OMP_",
    "OPENBLAS_",
    "MKL_",
    "GOTO",
    "BLIS_",
    "VECLIB_",
    "NUMEXPR_",
    "KMP_",
    "GOMP_",
)


def forkserver_on(envs: dict[int, dict[str, str]]) -> bool:
    """Whether daemons come from the template: unless QJAMFAB_FORKSERVER is
    0 here or in the workers' env. settings (a host's env.NAME=)."""
    return all(
        env.get(FORKSERVER, os.environ.get(FORKSERVER, "1")).strip() != "0"
        for env in [{}, *envs.values()]
    )


def template_socket(base: str) -> str:
    return os.path.join(host_dir(base), f"{forkserver.TEMPLATE}.sock")


def live_template(base: str) -> dict | None:
    """The host's template if it runs: its pid, what it preloaded, its
    thread count, uptime, and whether it runs this runtime."""
    path = template_socket(base)
    pid_path = path[: -len(".sock")] + ".pid"
    try:
        with open(pid_path) as f:
            info = json.load(f)
        pid = int(info["pid"])
        started = os.stat(pid_path).st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None
    line = procs.cmdline(pid)
    if path not in line or process_ended(pid):
        return None
    return {
        **info,
        "name": forkserver.TEMPLATE,
        "socket": path,
        "uptime_s": time.time() - started,
        "current": this_runtime() in line and line.split(" ", 1)[0] == sys.executable,
    }


def _read_at_start(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_READ_AT_START)}


def ensure_template(
    base: str, idle_timeout: float, settings: dict[str, str] | None = None
) -> dict | None:
    """The host's template of this runtime and Python, with these
    settings of variables read at start (and the others as here), started
    (or restarted) if need be; None when it did not start (its log says
    why)."""
    env = {**os.environ, **(settings or {})}
    lock = os.open(
        os.path.join(host_dir(base), "template.lock"),
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions start one template
        found = live_template(base)
        if (
            found is not None
            and found["current"]
            and _read_at_start(procs.environ_of(found["pid"])) == _read_at_start(env)
        ):
            return found
        if found is not None:
            procs.stop_daemons(base, [found])
        path = template_socket(base)
        started = start_detached(
            "forkserver",
            ["--socket", path, "--base", base, "--idle-timeout", str(idle_timeout)],
            path[: -len(".sock")] + ".log",
            env,
        )
        deadline = time.monotonic() + procs.START_WAIT_S
        while time.monotonic() < deadline and started.poll() is None:
            found = live_template(base)
            if found is not None and found["pid"] == started.pid:
                return found
            time.sleep(0.01)
        return None
    finally:
        os.close(lock)


def fork_slots(
    base: str, slots: list[int], idle_timeout: float, envs: dict[int, dict[str, str]]
) -> set[int]:
    """Ask the template to fork daemons for these slots (starting it, or
    again once when it died); the slots it forked."""
    if not slots or not forkserver_on(envs):
        return set()
    # The settings read at start that every daemon shares go to the template.
    shared = _read_at_start(envs.get(slots[0], {}))
    shared = {
        k: v
        for k, v in shared.items()
        if all(envs.get(s, {}).get(k) == v for s in slots)
    }
    for _ in range(2):
        template = ensure_template(base, idle_timeout, shared)
        if template is None:
            return set()
        have = procs.environ_of(template["pid"])
        wanted = [
            k
            for k in slots
            if not any(
                name.startswith(_READ_AT_START) and have.get(name) != value
                for name, value in envs.get(k, {}).items()
            )
        ]
        request = {
            "idle_timeout": idle_timeout,
            "workers": [
                {"name": f"worker-{k}", "env": envs.get(k, {})} for k in wanted
            ],
        }
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(procs.START_WAIT_S)
                conn.connect(template["socket"])
                conn.sendall(json.dumps(request).encode() + b"\n")
                answer = conn.makefile("rb").readline()
            # It forks them in order, and says how many it could.
            return set(wanted[: len(json.loads(answer)["pids"])])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        procs.stop_daemons(base, [template])  # it died or hung: a new one
    return set()
