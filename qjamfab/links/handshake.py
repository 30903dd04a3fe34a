"""A link's start: the first frames on a new stream, before it carries runs.

To one worker (`start_direct`): its HELLO, checked, makes its handle. To a
host's agent (`start_agent`): the runtime installed if the agent asks for
it, then its HELLO, checked against this master (protocol version, Python);
then `attach` asks it for workers and takes each one's HELLO, or, on a host
of one worker, sees its daemon take the stream itself (runtime/handover.py).
Each waits `HANDSHAKE_TIMEOUT_S` at most. A stream that ends, stalls or says
something else closes the link and raises an error that says what to do (a
Python that is not there, a login shell's preamble, another protocol).

This module owns the handshake; what a started link carries, frames in and
out as events, is workers.py's `Link`.
"""

from __future__ import annotations

import struct
import time

from .. import protocol, runtime, text
from ..errors import (
    PreflightFailed,
    ProtocolError,
    QjamfabError,
    WorkerLost,
    describe_exit,
)
from ..hostspec import env_setting, python_mismatch
from ..runtime import spool
from .answers import await_answer
from .workers import Link, WorkerHandle

HANDSHAKE_TIMEOUT_S = 30.0


def start_direct(link: Link, name: str) -> WorkerHandle:
    """A stream to one worker: its HELLO makes its handle."""
    link.transport.set_read_timeout(HANDSHAKE_TIMEOUT_S)
    event = _frame(link, name)
    if event[0] != protocol.HELLO:
        raise _fail(
            link,
            ProtocolError(
                f"worker {name} sent {protocol.KIND_NAMES.get(event[0])} "
                "before HELLO: restart it"
            ),
        )
    _check_version(link, name, event[2])
    handle = link.handles[0] = WorkerHandle(link, 0, name, event[2])
    link.transport.set_read_timeout(link.stall_timeout)
    return handle


def start_agent(link: Link, python: str) -> dict:
    """The agent's first words: install the runtime if it asks, then
    its HELLO, checked against this master (version, Python).
    `python` is what the host was asked to run it with."""
    link.python = python
    link.transport.set_read_timeout(HANDSHAKE_TIMEOUT_S)
    try:
        line = link.reader.read_line(256)
    except (EOFError, OSError, TimeoutError, ProtocolError) as exc:
        raise _failed_start(link, exc) from exc
    if line == runtime.NEED_RUNTIME:
        bundle = runtime.bundle_zip()
        link.write([struct.pack("!Q", len(bundle)), bundle])
    elif line != runtime.HAVE_RUNTIME:
        who, fix = link.transport.preamble
        raise _fail(
            link,
            PreflightFailed(
                f"{link.label}: {who} printed {line[:80]!r} "
                f"before qjamfab's agent started: {fix}",
                host=link.label,
            ),
        )
    kind, _, head = _frame(link, link.label)
    if kind != protocol.HELLO or not head.get("agent"):
        raise _fail(
            link,
            ProtocolError(
                f"{link.label}: the agent did not say HELLO: restart with "
                "this qjamfab's runtime (stop-workers, then start-workers)"
            ),
        )
    _check_version(link, link.label, head)
    mismatch = python_mismatch(link.label, head, link.label)
    if mismatch is not None:
        raise _fail(link, mismatch)
    link.info = head
    return head


def attach(
    link: Link,
    indices: list[int] | None,
    count: int | None,
    idle_timeout: float,
    cache_limit: int | str | None = None,
    env: dict[str, str] | None = None,
    session: str | None = None,
    spool_offer: dict | None = None,
) -> tuple[list[WorkerHandle], dict]:
    """Ask the agent for these workers (or `count`, or as many as the
    host was started with), its cache held to `cache_limit` (None:
    the host's own), with `env` settings ({worker}: each one's number),
    for `session` (daemons that served another are not attached), big
    frames through the spool directory `spool_offer` names if the host
    sees it (runtime/spool.py): the new handles, and {index: reason} for
    those that could not be attached."""
    link.transport.set_read_timeout(HANDSHAKE_TIMEOUT_S)
    link.send(
        protocol.ATTACH,
        {
            "workers": indices,
            "count": count,
            "idle_timeout": idle_timeout,
            "cache_limit": cache_limit,
            "env": env or {},
            "session": session,
            "direct": not link.handles,
            **({"spool": spool_offer} if spool_offer else {}),
        },
        worker=protocol.AGENT,
    )
    hellos: dict[int, dict] = {}

    def hello(frame: tuple[int, int, dict]) -> bool:
        kind, worker, head = frame
        if kind == protocol.HELLO and worker != protocol.AGENT:
            _check_version(link, f"worker {link.label}-{worker}", head)
            hellos[worker] = head
        return False

    def frames() -> list[tuple[int, int, dict]]:
        return [_frame(link, link.label)]

    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    answer = await_answer(
        frames, lambda f: f[0] == protocol.ATTACH, deadline, take=hello
    )
    if answer is None:
        raise _fail(
            link,
            WorkerLost(
                f"{link.label}: its workers did not start: no answer in "
                f"{HANDSHAKE_TIMEOUT_S:g} s; check the host's load"
            ),
        )
    head = answer[2]
    if spool_offer and head.get("spool"):  # the host sees the directory
        link.spool = spool.Spool(spool_offer["dir"], "m-")
    if head.get("direct"):
        # A host of one worker: its daemon now has the stream itself,
        # and says HELLO on it (frames for worker 0, no agent between).
        link.agent = False
        # The agent beats for it from the start (runtime/agent.py).
        said = await_answer(frames, lambda f: f[0] != protocol.HEARTBEAT, deadline)
        if said is None or said[0] != protocol.HELLO:
            raise _fail(
                link,
                ProtocolError(
                    f"{link.label}: its worker did not take the stream: "
                    "restart it (stop-workers, then start-workers)"
                ),
            )
        hellos = {head["workers"][0]: said[2]}
    link.transport.set_read_timeout(link.stall_timeout)
    new = []
    for k in head["workers"]:
        if k in hellos:
            handle = WorkerHandle(link, k, f"{link.label}-{k}", hellos[k])
            link.handles[k] = handle
            new.append(handle)
    link.count = head["count"]
    return new, {int(k): v for k, v in head["failed"].items()}


def _frame(link: Link, name: str) -> tuple[int, int, dict]:
    """The next frame while starting (its payload dropped)."""
    try:
        kind, worker, head, _ = link.reader.read()
    except TimeoutError as exc:
        raise _fail(
            link,
            WorkerLost(
                f"worker {name} did not start: no answer in "
                f"{HANDSHAKE_TIMEOUT_S:g} s; check the host's load and its "
                "python",
                worker=name,
            ),
        ) from exc
    except (EOFError, ProtocolError, OSError) as exc:
        raise _failed_start(link, exc, name) from exc
    return kind, worker, head


def _failed_start(
    link: Link, exc: BaseException, name: str | None = None
) -> QjamfabError:
    status, tail = link.transport.exit_report(None)
    link.close()
    name = name or link.label
    if status == 127:
        return PreflightFailed(
            f"{link.label}: python {link.python!r} was not found: install "
            f"python3 there, or set {env_setting('REMOTE_PYTHON')[1]} to "
            f"its path\n"
            f"{tail}",
            host=link.label,
        )
    if tail.strip():
        said = tail.splitlines()[-1]
    elif isinstance(exc, ProtocolError):  # it wrote, but no frame of ours
        said = f"what it wrote is not qjamfab's protocol ({exc})"
    else:
        said = f"it wrote nothing ({type(exc).__name__}: {exc})"

    return WorkerLost(
        f"{'worker ' if name != link.label else ''}{name} did not start "
        f"({describe_exit(status)}): {said}"
        f"{text.stderr_tail(name, tail)}",
        worker=name,
        exit_status=status,
        stderr_tail=tail,
    )


def _check_version(link: Link, name: str, head: dict) -> None:
    if head.get("version") != protocol.VERSION:
        raise _fail(
            link,
            ProtocolError(
                f"{name} speaks protocol {head.get('version')}, not "
                f"{protocol.VERSION}: restart it with this qjamfab's runtime "
                "(stop-workers, then start-workers)"
            ),
        )


def _fail(link: Link, exc: QjamfabError) -> QjamfabError:
    """Close the link that failed to start; exc, to raise."""
    link.close()
    return exc
