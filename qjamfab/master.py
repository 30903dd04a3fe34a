"""The Master: owns the hosts and the worker handles; `run()` = plan,
dispatch, collect, reduce (the run itself is run.py's `Run`).

One `WorkerHandle` (workers.py) per worker; the Master reads them all on the
caller's thread (`_next_event`), so user-visible output and errors all
happen there, and between runs nobody reads: a run starts by taking in
what arrived meanwhile (`_drain`). Every message names its
task, so anything left over from an earlier, interrupted run is recognised
and dropped. Before each run, lost workers are restarted or reconnected,
and unreachable hosts are retried with backoff.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from . import display, protocol, serialize
from .cluster import HostSession
from .dataset import BaseDataSet, DataSet
from .errors import QjamfabError, WorkerLost
from .futures import FuturesMixin, closes_executor, exclusive
from .hosts import HostSpec, openssh_client, parse_hosts
from .run import Run, RunStats, print_log
from .runtime import NO_RUNTIME, default_base, relay
from .transport import OPENSSH_FAILED, LocalPipeTransport
from .workers import LOST, Event, WorkerHandle, read_events

log = logging.getLogger("qjamfab")


def _log_from_env() -> None:
    """$QJAMFAB_LOG_LEVEL (INFO, DEBUG, ...): the "qjamfab" logger to stderr."""
    level = os.environ.get("QJAMFAB_LOG_LEVEL", "").strip().upper()
    if not level or any(getattr(h, "_qjamfab_env", False)
                        for h in log.handlers):
        return
    handler = display.StderrHandler()
    handler._qjamfab_env = True   # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(
        "%(name)s: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(getattr(logging, level, logging.INFO))


class Master(FuturesMixin):
    """Runs jobs on workers: `local[:N]` processes, or SSH hosts.

    `hosts=None` means $QJAMFAB_HOSTS, else `local` with one worker per core.
    `ssh_client` ("auto", "openssh" or "paramiko"; default
    $QJAMFAB_SSH_CLIENT, else auto) is what carries the frames to SSH
    workers: auto takes the system's OpenSSH client when installed, and
    a host it fails on falls back to paramiko with a warning.
    """

    def __init__(self, hosts: None | str | Sequence[str] = None, *,
                 workers_per_host: int | None = None,
                 ssh_config: str | None = None,
                 heartbeat_timeout: float = 5.0, replicas: int = 1,
                 straggler_factor: float = 4.0,
                 ssh_client: str | None = None):
        if workers_per_host is not None and (
                not isinstance(workers_per_host, int) or workers_per_host < 1):
            raise ValueError(
                f"workers_per_host must be a positive int, not "
                f"{workers_per_host!r}: give e.g. 2, or None for one per core")
        if replicas not in (1, 2):
            raise ValueError(f"replicas must be 1 or 2, not {replicas!r}")
        _log_from_env()
        self.ssh_client = ssh_client
        self.hosts: list[HostSpec] = parse_hosts(hosts)
        if not all(h.is_local for h in self.hosts):
            openssh_client(ssh_client)   # a bad choice fails here, not later
        self.replicas = replicas
        self.straggler_factor = straggler_factor
        # Split each worker's slices into two tasks so a worker that runs
        # dry can take one: at first, then as Run.split_next says.
        self._split = True
        self.ssh_config = ssh_config
        self._workers_per_host = workers_per_host
        self.heartbeat_timeout = heartbeat_timeout
        self.last_run: RunStats | None = None
        self._base = default_base()
        self._pending: collections.deque = collections.deque()  # events read
        self._task_ids = itertools.count(1)
        self._hosts = _label_hosts(self.hosts, workers_per_host)
        self._handles: dict[str, WorkerHandle] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._handles,
                                           self._hosts)
        self._start_missing(first=True)

    # --- workers --------------------------------------------------------

    def _slots(self) -> list[tuple[str, "_Host", int]]:
        return [(f"{h.label}-{k}", h, k) for h in self._hosts
                for k in range(h.count or 0)]

    def _missing(self, host: "_Host") -> list[tuple[str, int]]:
        if host.count is None:
            return [("", -1)]
        return [(f"{host.label}-{k}", k) for k in range(host.count)
                if f"{host.label}-{k}" not in self._handles
                or not self._handles[f"{host.label}-{k}"].alive]

    def _connect(self, host: "_Host") -> None:
        """An open session to an SSH host; and when the host has not said
        how many workers it runs (one per core), its daemons started."""
        if host.session is not None and not host.session.connected:
            host.session.close()
            host.session = None
        if host.session is None:
            host.session = HostSession(host.spec, ssh_config=self.ssh_config,
                                       ssh_client=self.ssh_client)
        if host.count is None:
            self._start_daemons(host, host.starts)

    def _start_daemons(self, host: "_Host", seen: int) -> None:
        """start-workers on the host (it bootstraps the host if needed,
        starts missing daemons and replaces those of another runtime),
        unless it ran since the caller saw `host.starts` == seen: the
        workers of a host attach at once, and two starts at once could
        both start the same daemon."""
        with host.start_lock:
            if host.starts == seen:
                started = host.session.start_workers(
                    host.count or self._workers_per_host or "auto")
                host.count = host.count or started["count"]
                host.starts += 1

    def _stream(self, host: "_Host", name: str, k: int) -> WorkerHandle:
        """A handle on daemon k of an SSH host, through the OpenSSH client
        or, where that cannot reach the host, paramiko."""
        try:
            return WorkerHandle(name, host.session.worker_transport(name, k),
                                self.heartbeat_timeout)
        except WorkerLost as exc:
            if exc.exit_status != OPENSSH_FAILED:
                raise
            with host.start_lock:
                if not host.session.openssh_failed:
                    # paramiko reached this host a moment ago: use it.
                    log.warning(
                        "the OpenSSH client cannot reach %s (%s); using "
                        "paramiko for its workers", host.spec.raw,
                        (exc.stderr_tail or "no message").splitlines()[-1])
                    host.session.openssh_failed = True
        return WorkerHandle(name, host.session.worker_transport(name, k),
                            self.heartbeat_timeout)

    def _attach(self, host: "_Host", name: str, k: int) -> WorkerHandle:
        """A handle on worker k of the host. An SSH host's daemons outlive
        a Master, so attaching comes first. start-workers runs when a
        daemon is missing, dead or of another runtime, and then attaching
        is tried again (twice at most: a daemon may end in between); on
        any other failure it runs too, since its errors name what the host
        lacks (python, a writable base directory)."""
        if host.spec.is_local:
            return WorkerHandle(name, LocalPipeTransport(name, self._base),
                                self.heartbeat_timeout)
        for _ in range(2):
            seen = host.starts
            try:
                return self._stream(host, name, k)
            except WorkerLost as exc:
                self._start_daemons(host, seen)
                if not _daemon_missing(exc):
                    raise
        return self._stream(host, name, k)

    def _prepare(self, host: "_Host") -> None:
        """Connect the host and attach every worker of it that is not up,
        all at once."""
        if not host.spec.is_local:
            self._connect(host)
        missing = self._missing(host)
        for name, _ in missing:
            old = self._handles.pop(name, None)
            if old is not None:
                old.close()
        with ThreadPoolExecutor(max_workers=len(missing)) as pool:
            attaching = [(name, pool.submit(self._attach, host, name, k))
                         for name, k in missing]
            failure = None
            for name, future in attaching:
                try:
                    self._handles[name] = future.result()
                except QjamfabError as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure

    def _start_missing(self, first: bool = False) -> None:
        """Start or reconnect every worker that is not up.

        On the first start any failure raises. Later, a host that fails is
        skipped for this run and retried with backoff, while others work.
        """
        now = time.monotonic()
        todo = [h for h in self._hosts if self._missing(h)
                and (first or h.retry_at <= now)]
        if not todo:
            return
        failures: dict[int, QjamfabError] = {}

        def prepare(host: _Host) -> None:
            try:
                self._prepare(host)
                host.failures = 0
            except QjamfabError as exc:
                failures[id(host)] = exc
                host.failures += 1
                host.retry_at = time.monotonic() + min(60, 2 ** host.failures)

        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            list(pool.map(prepare, todo))
        for host in todo:
            exc = failures.get(id(host))
            if exc is None:
                continue
            if first:
                self.close()
                raise exc
            log.warning("host %s is unavailable, retrying later: %s",
                        host.spec.raw, str(exc).splitlines()[0])

    @property
    def workers(self) -> list[str]:
        return [name for name, _, _ in self._slots()]

    @closes_executor
    def close(self) -> None:
        """End this session: stop local workers, drop connections."""
        self._finalizer()

    def __enter__(self) -> "Master":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repr_html_(self) -> str:
        return display.master_html(self)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __repr__(self) -> str:
        state = "closed" if not self._finalizer.alive else \
            f"{sum(h.alive for h in self._handles.values())} workers up"
        return (f"Master({', '.join(s.raw for s in self.hosts)}: "
                f"{len(self._slots())} workers, {state})")

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise QjamfabError("this Master is closed: create a new Master")

    def _live(self) -> list[WorkerHandle]:
        self._check_open()
        live = [self._handles[n] for n, _, _ in self._slots()
                if n in self._handles and self._handles[n].alive]
        if not live:
            raise WorkerLost("no worker is reachable: check the hosts (inv "
                             "status), then run again")
        return live

    # --- runs -----------------------------------------------------------

    @exclusive
    def run(self, job: object, params: object = None, dataset: object = None,
            *, reduce: Callable | None = None,
            progress: bool | None = None) -> object:
        """mapfunc(params, slice) over the dataset's slices, reduced.

        `job` is a module with `mapfunc` (and optional `reduce`) or a
        function. Without a dataset every worker runs mapfunc(params, None)
        once. Results combine with `reduce`, else `+` (element-wise for
        lists and tuples), in slice order.
        """
        self._check_open()
        started = time.perf_counter()
        mapfunc, reduce = serialize.job_functions(job, reduce)
        func_hash, func_bytes = serialize.encode_job(mapfunc, reduce)
        params_parts = serialize.encode_params(params)
        if dataset is not None and not isinstance(dataset, BaseDataSet):
            dataset = DataSet(dataset)
        self._drain()
        self._start_missing()
        workers = self._live()
        if dataset is not None:
            dataset = dataset.for_workers(len(workers))
        run = Run(self, workers, func_hash, func_bytes, params_parts,
                  dataset, reduce, progress)
        try:
            value = run.execute()
        finally:
            run.stats.elapsed_s = time.perf_counter() - started
            self.last_run = run.stats
            self._split = run.split_next()
            self._drop_silent_hosts(run.silent)
        log.info("run: %r", run.stats)
        return value

    def _drop_silent_hosts(self, silent: set[str]) -> None:
        """A host whose worker went silent may be unreachable: its SSH
        connection is dropped, so the next run reconnects (with a connect
        timeout) instead of waiting on a dead link."""
        for host in self._hosts:
            if host.session is not None and any(
                    name.rsplit("-", 1)[0] == host.label for name in silent):
                host.session.close()
                host.session = None

    @exclusive
    def clear_cache(self) -> dict[str, dict]:
        """Empty every worker's cache, memory and disk; what each removed."""
        replies = {}
        for handle in self._live():
            handle.refs.clear()
            handle.funcs.clear()
            handle.send(protocol.CLEAR, {})
            replies[handle.name] = self._await(handle, protocol.CLEAR)
        return replies

    @exclusive
    def worker_stats(self) -> dict[str, dict]:
        """Each worker's cache entries, bytes, pid and uptime."""
        replies = {}
        for handle in self._live():
            handle.send(protocol.STATS, {})
            replies[handle.name] = self._await(handle, protocol.STATS)
        return replies

    def _await(self, handle: WorkerHandle, kind: int) -> dict:
        deadline = time.monotonic() + self.heartbeat_timeout
        while time.monotonic() < deadline:
            event = self._next_event(0.1)
            if event is None:
                continue
            source, got, head, _ = event
            if source is handle and got == kind:
                return head
            if got == protocol.LOG:
                print_log(source.name, head["text"])
            if source is handle and got == LOST:
                break
        raise WorkerLost(f"worker {handle.name} did not answer: it will be "
                         "restarted before the next run", worker=handle.name)

    # --- reading what workers send ---------------------------------------

    def _read_ready(self, timeout: float) -> bool:
        """Read a frame from each worker that has input, waiting up to
        `timeout` s for one; whether any was read."""
        events = read_events(self._handles.values(), timeout)
        self._pending.extend(e for e in events if e[1] != protocol.HEARTBEAT)
        return bool(events)

    def _next_event(self, timeout: float) -> Event | None:
        """The next event (heartbeats only mark workers alive), or None
        after `timeout` s without one."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            self._read_ready(deadline - time.monotonic())
            if time.monotonic() >= deadline:
                break
        return self._pending.popleft() if self._pending else None

    def _read_available(self, limit_s: float = 1.0) -> None:
        """Read what workers have sent, without waiting for more; for at
        most limit_s s, since workers never stop sending (heartbeats)."""
        deadline = time.monotonic() + limit_s
        while self._read_ready(0) and time.monotonic() < deadline:
            pass

    def _drain(self) -> None:
        """Before a run: take in what workers sent since the last one
        (heartbeats, output left from an interrupted run, the end of a
        worker that died) without waiting, so lost workers are restarted."""
        self._read_available()
        while self._pending:
            source, kind, head, _ = self._pending.popleft()
            if kind == protocol.LOG:
                print_log(source.name, head["text"])


class _Host:
    """One entry of Master(hosts): its session and how many workers it runs
    (None for an SSH host until it says how many cores it has)."""

    def __init__(self, spec: HostSpec, label: str, count: int | None):
        self.spec = spec
        self.label = label
        self.count = count
        self.session: HostSession | None = None
        self.failures = 0
        self.retry_at = 0.0
        # start-workers and the switch to paramiko, one thread at a time
        self.start_lock = threading.Lock()
        self.starts = 0


def _daemon_missing(exc: WorkerLost) -> bool:
    """Whether attaching failed because the daemon is not there to serve
    this Master: not started, ended, of another runtime, or the host lacks
    this runtime. start-workers mends all of these."""
    return exc.exit_status in (relay.NO_WORKER, relay.WORKER_DIED,
                               relay.OTHER_RUNTIME) \
        or NO_RUNTIME in (exc.stderr_tail or "")


def _label_hosts(specs: list[HostSpec], workers_per_host: int | None
                 ) -> list[_Host]:
    hosts, seen = [], set()
    for spec in specs:
        label = "local" if spec.is_local else spec.raw
        while label in seen:  # two entries for one host stay apart
            label += "'"
        seen.add(label)
        count = spec.workers or workers_per_host or (
            os.cpu_count() or 1 if spec.is_local else None)
        hosts.append(_Host(spec, label, count))
    return hosts


def _close_all(handles: dict[str, WorkerHandle], hosts: list[_Host]) -> None:
    for handle in list(handles.values()):
        handle.close()
    handles.clear()
    for host in hosts:
        if host.session is not None:
            host.session.close()
            host.session = None
