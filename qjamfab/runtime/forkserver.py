"""The fork server: one warm process per host and runtime that forks worker daemons.

Run from the bundle as `python3 -c <boot forkserver> --socket PATH ...`
(manage.py starts it and asks it for daemons). It imports what every worker
imports (the runtime and cloudpickle; numpy too, when installed, once the
first daemons are forked, so a cold start does not wait for it) and starts
no thread: numpy's OpenBLAS starts its pool as it loads, and stops it
before each fork (its own fork handler), so one throwaway fork leaves the
template with its main thread alone. It listens on `<host dir>/template.sock`
(0600, in a 0700 directory); a connection sends one JSON line asking for
daemons, `{"idle_timeout": S, "workers": [{"name": "worker-3", "env": {..}}]}`,
and is answered with their pids in one line once they are forked. A child
drops what it must not share with the template or its siblings (the
template's sockets and stdio, its signal handlers, the random seeds of
`random` and numpy) and runs worker.main as a daemon started by `exec`
would. The template ends after --idle-timeout seconds without a request,
and on SIGTERM.

Shipped to hosts with the runtime: stdlib only, numpy when present.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

from . import (
    default_base,
    listen_unix,
    secure_dir,
    secure_host_dir,
    set_process_name,
)

TEMPLATE = "template"  # its files in the host dir: template.sock, .pid, .log
_NAME = re.compile(r"worker-[0-9]{1,6}")
_REQUEST_WAIT_S = 5.0  # for a client to send its whole request


def preload() -> list[str]:
    """Import the runtime and cloudpickle, as every worker does; the
    modules preloaded."""
    import cloudpickle  # noqa: F401  the runtime's vendored copy

    from . import worker  # noqa: F401  the runtime: cache, calls, task, ...

    # What is loaded stays out of the collector's sight: a child's
    # collections would otherwise write to (and copy) every shared page.
    gc.freeze()
    return ["qjamfab.runtime", "cloudpickle"]


def preload_numpy() -> bool:
    """Import numpy when the host has it, and leave no thread running;
    whether it did. Not before the first daemons are forked: a cold start
    does not wait for it."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    # OpenBLAS started its thread pool as numpy loaded; its fork handler
    # stops the pool before a fork, and nothing here calls BLAS again.
    if os.fork() == 0:
        os._exit(0)  # the kernel reaps it: SIGCHLD is ignored here
    gc.freeze()
    return True


def threads() -> int:
    """How many threads this process runs (Linux; 1 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _child(
    listener: socket.socket,
    conn: socket.socket,
    run: str,
    base: str,
    name: str,
    idle: float,
    env: dict[str, str],
) -> NoReturn:
    """In a forked child: become daemon `name` as if started afresh."""
    code: int | str | None = 1
    try:
        os.setsid()  # as start_new_session: the template's group is not ours
        listener.close()
        conn.close()
        # The template's handlers, back to what a fresh Python has.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDWR)
        log = os.open(
            os.path.join(run, f"{name}.daemon"),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
            0o600,
        )
        for fd, target in ((0, null), (1, null), (2, log)):
            os.dup2(target, fd)
        os.close(null)
        os.close(log)
        os.environ.update(env)
        # How to tell its env. settings: /proc shows the template's.
        with open(os.path.join(run, f"{name}.env"), "w") as f:
            json.dump({"keeper": os.getpid(), "env": env}, f)
        # The template's seeds would give every sibling the same stream.
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        from .worker import main as worker_main

        worker_main(
            [
                "--socket",
                os.path.join(run, f"{name}.sock"),
                "--name",
                name,
                "--base",
                base,
                "--idle-timeout",
                repr(idle),
            ]
        )
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
    finally:
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        try:
            sys.stderr.flush()
        finally:
            os._exit(code or 0)


def _request(conn: socket.socket) -> dict:
    """The client's request, checked: ValueError naming what is wrong."""
    conn.settimeout(_REQUEST_WAIT_S)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk or len(data) > 1 << 20:
            raise ValueError("the request ended early or is too long")
        data += chunk
    request = json.loads(data)
    workers = request.get("workers") if isinstance(request, dict) else None
    if not isinstance(workers, list) or not all(
        isinstance(w, dict)
        and isinstance(w.get("name"), str)
        and _NAME.fullmatch(w["name"])
        and isinstance(w.get("env"), dict)
        and all(isinstance(v, str) for v in w["env"].values())
        for w in workers
    ):
        raise ValueError("its workers are not a list of names and env settings")
    if not isinstance(request.get("idle_timeout"), (int, float)):
        raise ValueError("its idle_timeout is not a number")
    return request


def serve(
    listener: socket.socket,
    run: str,
    base: str,
    idle_timeout: float,
    when_idle: Callable[[], None] | None = None,
) -> None:
    """Fork the daemons each connection asks for, until idle_timeout
    passes without a request (never, when <= 0); `when_idle` is called
    once, the first time no request waits after one was answered."""
    last = time.monotonic()
    answered = False
    while True:
        wait = None if idle_timeout <= 0 else last + idle_timeout - time.monotonic()
        if wait is not None and wait <= 0:
            return
        if (
            answered
            and when_idle is not None
            and not select.select([listener], [], [], 0)[0]
        ):
            when_idle()
            when_idle = None
            continue
        if not select.select([listener], [], [], wait)[0]:
            continue
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        last = time.monotonic()
        with conn:
            try:
                request = _request(conn)
            except (OSError, ValueError) as exc:
                print(
                    f"qjamfab template: dropped a bad request: {exc}", file=sys.stderr
                )
                continue
            pids = []
            sys.stderr.flush()
            for w in request["workers"]:
                try:
                    pid = os.fork()
                except OSError as exc:  # the client starts the rest itself
                    print(f"qjamfab template: cannot fork: {exc}", file=sys.stderr)
                    break
                if pid == 0:
                    _child(
                        listener,
                        conn,
                        run,
                        base,
                        w["name"],
                        float(request["idle_timeout"]),
                        w["env"],
                    )
                pids.append(pid)
            try:
                conn.sendall(json.dumps({"pids": pids}).encode() + b"\n")
            except OSError:
                pass  # the client left: its daemons start all the same
            answered = True


def _record(pid_path: str, preloaded: list[str]) -> None:
    """Say who the template is, what it preloaded and that it runs no
    thread (read by template.py and `inv status`)."""
    with open(f"{pid_path}.tmp", "w") as f:
        json.dump({"pid": os.getpid(), "preloaded": preloaded, "threads": threads()}, f)
    os.replace(f"{pid_path}.tmp", pid_path)


def _exit_on_signal(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qjamfab-template")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--base", default=None)
    parser.add_argument("--idle-timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    os.umask(0o077)
    set_process_name("qjamfab-tmpl")
    base = os.path.expanduser(args.base or default_base())
    try:
        secure_dir(base)
        run = secure_host_dir(base)
    except OSError as exc:
        sys.exit(str(exc))  # its first line says what to do
    preloaded = preload()
    # Its children (the daemons' keepers) are reaped by the kernel.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener, bound = listen_unix(args.socket, 64)
    pid_path = args.socket[: -len(".sock")] + ".pid"
    _record(pid_path, preloaded)

    def numpy_too() -> None:
        if preload_numpy():
            _record(pid_path, [*preloaded, "numpy"])

    try:
        serve(listener, run, base, args.idle_timeout, numpy_too)
    finally:
        listener.close()
        try:
            if os.stat(args.socket).st_ino == bound:  # not a successor's
                os.unlink(args.socket)
                os.unlink(pid_path)
        except FileNotFoundError:
            pass
