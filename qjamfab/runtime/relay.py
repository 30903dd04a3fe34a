"""The attach relay: joins an SSH exec channel to a worker daemon.

Run by the master over SSH as `python3 -c <boot relay> WORKER`. It connects
to the daemon's Unix socket `<base>/run/WORKER.sock`, waits for the daemon's
"ready" line (a daemon serves one connection at a time), hands it the
channel's stdin and stdout (SCM_RIGHTS), then only waits: frames flow
between sshd and the daemon directly. When the daemon ends the connection the relay exits, which closes
the channel; if the daemon died, the relay first writes the tail of the
worker's captured output to stderr for the master to show.

Exit status: 0 when the master hung up, 3 when no daemon listens there,
4 when the daemon died, 5 when it is serving another master (a daemon
serves one connection at a time), 6 when it runs another runtime (after an
upgrade: start-workers replaces it).
"""
from __future__ import annotations

import json
import os
import socket
import sys

from . import default_base, read_tail, this_runtime

NO_WORKER = 3
WORKER_DIED = 4
WORKER_BUSY = 5
OTHER_RUNTIME = 6
_BUSY_WAIT_S = 5.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    path = os.path.join(default_base(), "run", f"{sys.argv[1]}.sock")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as exc:
        sys.stderr.write(f"qjamfab relay: no worker listens on {path} ({exc})\n")
        sys.exit(NO_WORKER)
    reader = conn.makefile("rb")
    conn.settimeout(_BUSY_WAIT_S)
    try:
        line = reader.readline()
    except socket.timeout:
        sys.stderr.write(
            f"{sys.argv[1]} is serving another Master: close that session or "
            "wait for it, or start more workers per host\n")
        sys.exit(WORKER_BUSY)
    except OSError:
        line = b""
    if not line:
        sys.stderr.write(f"qjamfab relay: {sys.argv[1]} ended as we "
                         "connected\n")
        sys.exit(WORKER_DIED)
    conn.settimeout(None)
    info = json.loads(line)
    if info.get("runtime") != this_runtime():
        sys.stderr.write(f"{sys.argv[1]} runs qjamfab runtime "
                         f"{info.get('runtime')}, not {this_runtime()}: "
                         "start-workers replaces it\n")
        sys.exit(OTHER_RUNTIME)
    socket.send_fds(conn, [b"attach"], [0, 1])
    # Keep no copy of the channel's pipes: when the daemon dies, sshd must
    # see their end at once.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    while reader.read(65536):
        pass
    pid = info.get("pid")
    if pid and not _alive(pid):
        sys.stderr.write(f"qjamfab: worker process {pid} died; its last "
                         f"output:\n{read_tail(info.get('log', ''), 4096)}")
        sys.exit(WORKER_DIED)
