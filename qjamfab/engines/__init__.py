"""Where workers run: the engine seam.

A Master holds a list of hosts. Each is an engine's `Host`: it starts or
finds that host's workers (`prepare`, before every run), and its workers'
handles are what a `Run` speaks to (workers.py); `close` lets it go. How
the workers are reached is the engine's alone, and nothing outside an
engine names one:

- `local` (engines/local.py): worker processes on this machine, each
  over its pipes;
- `inproc` (engines/inproc.py): one host whose agent and workers are
  threads of this process, the agent at the end of a pair of pipes;
- `ssh` (engines/ssh/engine.py): one stream per host to the host's agent;
- `slurm` (engines/slurm.py): the same agent as a job step per node of a
  Slurm allocation (the step's stdin and stdout are the stream);
- `command` (engines/command.py): the same agent under a command line of
  the user's (`docker exec -i BOX python3`), its stdin and stdout the stream;
- `dask` (engines/dask/engine.py): an existing Dask cluster as one host.

An engine registers a factory by host-spec kind (hostspec.py says the
kind of each entry of `Master(hosts)`); one that recognises a `hosts`
value of its own (a Dask `Client`) registers a `claims` test too.
Adding an engine is one module here and one `register` call in it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import text
from ..errors import BadHostSpec, QjamfabError
from ..hostspec import HostSpec, parse_hosts
from ..links.inbox import Inbox
from ..links.workers import WorkerHandle


@dataclass(frozen=True)
class EngineSettings:
    """What an engine takes from its Master's options."""

    heartbeat_timeout: float
    workers_per_host: int | None = None
    ssh_config: str | None = None
    ssh_client: str | None = None
    cache_limit: int | str | None = None
    packages: Sequence[Any] = ()  # packages.Distribution to ship
    base: str = ""  # this machine's base directory (local workers)
    # Where start-up waits (a Slurm job pending) are said: the Master's
    # status line (display.StatusLine); None: through logging only.
    status: Callable[[], StatusLine] | None = None


class Host(Protocol):
    """One entry of the Master's hosts, as its engine runs it."""

    spec: HostSpec
    label: str  # the prefix of its workers' names
    handles: dict[int, WorkerHandle]  # its workers by number
    failures: int  # starts that failed in a row (the Master's backoff)
    retry_at: float  # when the Master may try it again

    @property
    def count(self) -> int | None:
        """How many workers it runs (None until it is known)."""

    @property
    def client(self) -> str | None:
        """What carries its stream now, for `Master.ssh_clients` ("" when
        the question means nothing for this engine)."""

    def prepare(self, inbox: Inbox) -> None:
        """Connect if need be and attach every worker that is not up,
        adding new streams to `inbox`; raise a QjamfabError if it cannot."""

    def close(self) -> None:
        """Let the workers go (local ones end) and drop the connection."""


HostsFactory = Callable[[Sequence[HostSpec], EngineSettings], list[Host]]


class StatusLine(Protocol):
    """One line that says what start-up waits for (the display layer's)."""

    def show(self, text: str) -> bool:
        """Show `text`; False when nothing is shown (then log it)."""

    def close(self) -> None:
        """Clear the line."""


@dataclass(frozen=True)
class Engine:
    name: str
    kinds: tuple[str, ...] = ()  # host-spec kinds it runs
    make: HostsFactory | None = None
    # For a `hosts` value that is no host list (a Dask Client): the
    # engine's own `hosts` test and its one Host for it.
    claims: Callable[[object], bool] | None = None
    make_for: Callable[[object, EngineSettings], Host] | None = None


_ENGINES: dict[str, Engine] = {}
# The engines of this package, imported when first needed (Dask only
# when a Dask cluster is given, so distributed stays optional).
_BUILTIN = ("local", "inproc", "ssh.engine", "slurm", "command", "dask.engine")


def register(engine: Engine) -> None:
    _ENGINES[engine.name] = engine


def _engines() -> list[Engine]:
    for name in _BUILTIN:
        if name not in _ENGINES:
            importlib.import_module(f"{__name__}.{name}")
    return list(_ENGINES.values())


def claimed(hosts: object) -> Engine | None:
    """The engine that takes `hosts` as a whole (a Dask Client), if any."""
    for engine in _engines():
        if engine.claims is not None and engine.claims(hosts):
            return engine
    return None


def hosts_for(hosts: object, settings: EngineSettings) -> list[Host]:
    """The Master's hosts for `Master(hosts)`, each run by its engine."""
    engine = claimed(hosts)
    if engine is not None and engine.make_for is not None:
        return [engine.make_for(hosts, settings)]
    specs = parse_hosts(hosts)  # type: ignore[arg-type]
    by_kind = {kind: e.make for e in _engines() for kind in e.kinds if e.make}
    made: list[Host] = []
    labels: set[str] = set()
    for spec in specs:
        make = by_kind.get(spec.kind)
        if make is None:
            raise BadHostSpec(
                f"no engine runs hosts of kind {spec.kind!r} ({spec.raw}): "
                f"use one of {', '.join(sorted(by_kind))}",
                host=spec.raw,
            )
        for host in make([spec], settings):  # a Slurm spec: a host per node
            while host.label in labels:  # two entries for one host stay apart
                host.label += "'"
            labels.add(host.label)
            made.append(host)
    return made


def cannot_serve(failures: Sequence[tuple[str, QjamfabError]]) -> QjamfabError:
    """One error for the hosts (label, error) that cannot serve: a lone
    host's own; for several, one of the type they share (HostUnreachable
    when all are) whose first line says so and whose next lines give each
    host's reason, a line each."""
    if len(failures) == 1:
        return failures[0][1]
    errors = [exc for _, exc in failures]
    shared = next(
        c
        for c in type(errors[0]).__mro__
        if issubclass(c, QjamfabError) and all(isinstance(e, c) for e in errors)
    )
    lines = "".join(
        f"\n  {label}: {text.first_line(exc, label)}" for label, exc in failures
    )
    return shared(
        f"{len(failures)} hosts cannot serve: fix each as its line says "
        f"(or leave it out) and retry{lines}"
    )
