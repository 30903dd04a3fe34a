"""qjamfab on an existing Dask cluster: the Dask side of the engine seam.

`Master(client)` or `Master("tcp://scheduler:8786")` puts one `DaskHost`
in the Master's host list where SSH hosts would be. The Master and its
`Run` go on as they do for our own workers: a Run sends protocol messages
to `WorkerHandle`s and reads `Event`s from the inbox. Here, what carries
them is Dask, built from its own pieces:

- `DaskSession` (session.py) holds the Client: it registers the
  worker plugin (worker.py) once and watches the scheduler for
  workers lost, joined and alive.
- One qjamfab worker per Dask worker thread (Dask's unit of work, as a
  core is ours), named `dask-<n>`; a Dask worker's name keeps its
  numbers across restarts by its nanny. Each is a `WorkerHandle` on a
  `DaskLink` (link.py) of its own, the way a local worker has a Link
  of its own, so the Run treats its loss alone. A DaskLink turns frames
  into Dask operations (submits pinned to the worker, scatters, cancels)
  and their results into the inbox's events.

This module is the entry: which hosts are a Dask cluster, the Master's
host entry for one (`DaskHost`: numbering the workers, attaching them
after their hello is checked), and the engine's registration.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, TypeGuard, cast

from ... import protocol
from ...errors import HostUnreachable, PreflightFailed, QjamfabError, WorkerLost
from ...hostspec import HostSpec, python_mismatch
from ...links.inbox import Inbox
from ...links.workers import Link, WorkerHandle
from .. import Engine, EngineSettings, register
from .link import DaskLink
from .session import DaskSession

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("qjamfab")

LABEL = "dask"  # workers are dask-0, dask-1, ...
CONNECT_TIMEOUT_S = 10.0  # to reach a scheduler given by address
_SCHEMES = ("tcp://", "tls://", "ucx://", "ws://", "wss://", "inproc://")
_OPTIONS = {  # Master options that mean nothing to a Dask cluster
    "workers_per_host": "Dask decides: one qjamfab worker per Dask worker thread",
    "ssh_config": "Dask workers are not reached over SSH",
    "ssh_client": "Dask workers are not reached over SSH",
    "packages": "install them in the Dask workers' environment, for example "
    "with distributed's PipInstall worker plugin",
}


def is_dask(hosts: object) -> TypeGuard[str | Client]:
    """Whether Master(hosts) names a Dask cluster: a `distributed.Client`,
    or a scheduler address such as "tcp://10.0.0.5:8786"."""
    if isinstance(hosts, str):
        return hosts.strip().lower().startswith(_SCHEMES)
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(hosts, distributed.Client)


def dask_host(hosts: object, settings: EngineSettings) -> DaskHost:
    """The Master's host entry for a Dask cluster (`hosts` is_dask). The
    Master's SSH options must be left out. A scheduler address gets a
    Client of its own, closed with the Master."""
    assert is_dask(hosts)
    heartbeat_timeout = settings.heartbeat_timeout
    options = {
        "workers_per_host": settings.workers_per_host,
        "ssh_config": settings.ssh_config,
        "ssh_client": settings.ssh_client,
        "packages": settings.packages or None,
    }
    for option, value in options.items():
        if value is not None:
            raise ValueError(
                f"{option} does not apply to a Dask cluster "
                f"({_OPTIONS[option]}): leave it out"
            )
    shown = hosts.strip() if isinstance(hosts, str) else "a Client"
    try:
        import distributed
    except ImportError as exc:
        raise QjamfabError(
            f"Master({shown!r}) needs Dask's distributed package: "
            f"pip install 'qjamfab[dask]'\n({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(hosts, str):
        if hosts.asynchronous:
            raise ValueError(
                "Master needs a synchronous Client: create it "
                "with Client(..., asynchronous=False)"
            )
        if hosts.status != "running":
            raise ValueError(
                f"this Client is {hosts.status}, not running: pass a connected Client"
            )
        return DaskHost(DaskSession(hosts, False, heartbeat_timeout))
    try:
        client = distributed.Client(
            shown, timeout=CONNECT_TIMEOUT_S, set_as_default=False
        )
    except (OSError, TimeoutError) as exc:
        raise HostUnreachable(
            f"cannot reach the Dask scheduler at {shown} in "
            f"{CONNECT_TIMEOUT_S:g} s: check the address and that the "
            f"scheduler runs ({type(exc).__name__}: {exc})",
            host=shown,
        ) from exc
    return DaskHost(DaskSession(client, True, heartbeat_timeout))


def check_hello(address: str, hello: dict | BaseException) -> QjamfabError | None:
    """What is wrong with a Dask worker, from its hello (or the exception
    that came instead), or None: it can serve this Master."""
    from ...version import __version__

    install = (
        f"install this qjamfab ({__version__}) in the Dask "
        "workers' environment (or the image they run)"
    )
    if isinstance(hello, BaseException):
        return PreflightFailed(
            f"Dask worker {address} cannot run qjamfab "
            f"({type(hello).__name__}: {hello}): {install}",
            host=address,
        )
    if hello["version"] != protocol.VERSION:
        return PreflightFailed(
            f"Dask worker {address} speaks qjamfab protocol "
            f"{hello['version']}, this Master {protocol.VERSION}: {install}",
            host=address,
        )
    mismatch = python_mismatch(
        f"Dask worker {address}", hello, address, "run the Dask workers with a {python}"
    )
    if mismatch is not None:
        return mismatch
    if hello["error"]:
        return PreflightFailed(f"Dask worker {address}: {hello['error']}", host=address)
    return None


class DaskHost:
    """A Dask cluster as one entry of the Master's hosts: its workers
    (one per Dask worker thread, `handles` by number) and the session."""

    def __init__(self, session: DaskSession):
        self.spec = HostSpec(session.address, "dask")
        self.label = LABEL
        self.link = session
        self.handles: dict[int, WorkerHandle] = {}
        self.failures = 0
        self.retry_at = 0.0
        self._slots: dict[tuple[str, int], int] = {}  # (name, thread) -> n
        self._refused: set[str] = set()  # Dask workers left out, warned once
        self._started = False

    @property
    def count(self) -> int | None:
        """Workers numbered so far (None before the first start): every
        Dask worker thread seen, up or not."""
        if not self._started:
            return None
        self._number(self.link.members)
        return len(self._slots)

    client = ""  # carried by Dask: nothing to name

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        # Its session stays: a closed Master still counts its workers.
        self.link.close()

    def _number(self, members: dict) -> None:
        for _, info in sorted(members.items(), key=lambda m: _natural(m[1]["name"])):
            for thread in range(info["nthreads"]):
                self._slots.setdefault((info["name"], thread), len(self._slots))

    def prepare(self, inbox: Inbox) -> None:
        """Give a handle to every numbered worker whose Dask worker is up
        and has none alive (the Master calls this before each run)."""
        first = not self._started
        if first:
            self.link.start()
            self._started = True
        members = self.link.members
        self._number(members)
        by_name = {
            info["name"]: address
            for address, info in members.items()
            if info["status"] == "running"
        }
        wanted: dict[str, list[int]] = {}
        for (name, thread), n in self._slots.items():
            handle = self.handles.get(n)
            address = by_name.get(name)
            if (
                (handle is not None and handle.alive)
                or address is None
                or address in self._refused
                or thread >= members[address]["nthreads"]
            ):
                continue
            wanted.setdefault(address, []).append(n)
        if wanted:
            hellos = self.link.hellos(list(wanted))
            for address, numbers in wanted.items():
                if address not in hellos:
                    continue  # it left meanwhile
                problem = check_hello(address, hellos[address])
                if problem is not None:
                    if first:
                        raise problem
                    self._refused.add(address)
                    log.warning("left out: %s", str(problem).splitlines()[0])
                    continue
                hello = cast(dict, hellos[address])  # not an exception: checked
                for n in numbers:
                    self._attach(inbox, address, n, hello)
        if first and not any(h.alive for h in self.handles.values()):
            raise WorkerLost(
                f"the Dask cluster at {self.spec.raw} has no running workers: "
                "start some (cluster.scale(n)) or wait for them "
                "(client.wait_for_workers(n)), then create the Master"
            )

    def _attach(self, inbox: Inbox, address: str, n: int, hello: dict) -> None:
        old = self.handles.pop(n, None)
        if old is not None:
            old.close()
        link = DaskLink(self.link, address)
        # A DaskLink serves as a Link (the attributes and methods that
        # WorkerHandle and Inbox use), without being one.
        as_link = cast(Link, link)
        handle = link.handles[0] = WorkerHandle(as_link, n, f"{LABEL}-{n}", hello)
        handle.refs.update(hello["refs"])  # the slices it has already
        self.handles[n] = handle
        inbox.add(as_link)
        self.link.watch(link)


def _natural(name: str) -> list:
    """Sort key: "worker-2" before "worker-10"."""
    return [
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)
    ]


register(Engine("dask", claims=is_dask, make_for=dask_host))
