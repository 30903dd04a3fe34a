"""This host's runtime processes as /proc shows them, and ending them: a
process's command line and environment, what the template recorded
forking a daemon (its keeper and its env. settings), and stopping daemons
with their keepers (SIGTERM, then SIGKILL to what is left). manage.py and
template.py both use it; it imports neither."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import NamedTuple

from . import process_ended, process_stat

START_WAIT_S = 15.0
STOP_WAIT_S = 5.0  # from SIGTERM to SIGKILL, and for SIGKILL to take


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def fork_record(worker: dict) -> dict | None:
    """What the template recorded forking daemon `worker`: its keeper's
    pid and its env. settings; None for a daemon started by exec."""
    if not worker.get("forked"):
        return None
    try:
        with open(worker["socket"][: -len(".sock")] + ".env") as f:
            record = json.load(f)
        stat = process_stat(worker["pid"])
        if stat is not None and record["keeper"] == stat[1]:
            return {"keeper": stat[1], "env": dict(record["env"])}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def environ_of(pid: int) -> dict[str, str]:
    """The environment process `pid` was started with ({} if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return {}
    return dict(e.split("=", 1) for e in data.split("\0") if "=" in e)


class Stopped(NamedTuple):
    """What stop_daemons did: the daemons' names, and those of them that
    (or whose keeper) had not ended STOP_WAIT_S after SIGTERM and were
    killed."""

    names: list[str]
    killed: list[str]


def stop_daemons(
    base: str,
    workers: list[dict],
    clock: Callable[[], float] = time.monotonic,
) -> Stopped:
    """End these daemons and their keepers, and return once they have
    exited: SIGTERM, then SIGKILL to what is left after STOP_WAIT_S."""
    pids: dict[int, str] = {}
    for w in workers:
        pids[w["pid"]] = w["name"]
        stat = process_stat(w["pid"])
        # Its keeper is its parent, unless that ended and it was adopted.
        if stat is not None and (
            w["socket"] in cmdline(stat[1]) or fork_record(w) is not None
        ):
            pids[stat[1]] = w["name"]
    for w in workers:
        try:
            os.kill(w["pid"], signal.SIGTERM)  # the keeper ignores it
        except ProcessLookupError:
            pass
    left = _wait_ended(pids, clock)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_ended(left, clock)
    for w in workers:
        stem = w["socket"][: -len(".sock")]
        for path in (w["socket"], stem + ".pid", stem + ".served"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    killed = set(left.values())
    return Stopped(
        [w["name"] for w in workers],
        [w["name"] for w in workers if w["name"] in killed],
    )


def _wait_ended(pids: dict[int, str], clock: Callable[[], float]) -> dict[int, str]:
    """Poll until these processes have exited, for up to STOP_WAIT_S; those
    that have not."""
    deadline = clock() + STOP_WAIT_S
    left = dict(pids)
    while True:
        left = {pid: name for pid, name in left.items() if not process_ended(pid)}
        if not left or clock() >= deadline:
            return left
        time.sleep(0.01)
