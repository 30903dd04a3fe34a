"""A worker daemon's keeper: the small process, forked before the daemon
starts, that waits for it and records how it ended (its exit status, or
minus the signal that killed it) in `<socket stem>.exit`, for the host
agent to tell the master. A daemon's own exit status is known only to its
parent: this is that parent.

Shipped to hosts with the runtime: stdlib only.
"""

from __future__ import annotations

import json
import os
import signal


def keep(child: int, record: str) -> None:
    """The daemon's keeper: wait for the daemon, record how it ended (its
    exit status, or minus the signal that killed it) for the host agent to
    tell the master, then exit."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    tmp = f"{record}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": child, "status": os.waitstatus_to_exitcode(status)}, f)
    os.replace(tmp, record)
    os._exit(0)
