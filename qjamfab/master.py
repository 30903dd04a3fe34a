"""The Master: owns the hosts and the inbox; `run()` = plan, dispatch,
collect, reduce (the run itself is run.py's `Run`).

Each host is run by its engine (engines/: local processes, in-process
threads, SSH hosts, a Dask cluster), which starts or finds its workers;
the Master asks every host that has workers down to prepare them before
each run, and speaks to the workers through their handles. The inbox reads every link on
the caller's thread, so user-visible output and errors all happen there,
and between runs nobody reads: a run starts by taking in what arrived
meanwhile (`_drain`). Every message names its task, so anything left over
from an earlier, interrupted run is recognised and dropped. Before each
run, lost workers are restarted or reconnected, and unreachable hosts are
retried with backoff.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeGuard

from . import display, engines, protocol, text
from .core.run import Run
from .core.runstats import RunStats, print_event_log
from .core.settings import RunSettings
from .data import serialize
from .data.broadcast import Broadcast
from .data.broadcast import encode_params as encode_run_params
from .data.dataset import BaseDataSet, DataSet
from .display import logs
from .engines import EngineSettings, Host
from .engines.ssh.openssh import SSH_CLIENTS, openssh_client
from .errors import ConfigError, QjamfabError, WorkerLost
from .futures.executor import FuturesMixin, closes_executor, exclusive
from .futures.stream import TaskStream
from .hostspec import HostSpec
from .links import packages as shipping
from .links.answers import await_answer
from .links.inbox import Inbox
from .links.workers import Event, WorkerHandle
from .runtime import default_base
from .runtime.pins import CacheLimitError, parse_size

log = logging.getLogger("qjamfab")
# A run's stats show as a table in notebooks, drawn by the display layer.
RunStats.render_html = display.runstats_html


def _log_from_env() -> None:
    """$QJAMFAB_LOG_LEVEL (INFO, DEBUG, ...): the "qjamfab" logger to stderr."""
    level = os.environ.get("QJAMFAB_LOG_LEVEL", "").strip()
    if level:
        logs.log_to_stderr(level, "env")


def _check_arguments(
    *,
    workers_per_host: object,
    ssh_config: object,
    heartbeat_timeout: object,
    replicas: object,
    straggler_factor: object,
    ssh_client: object,
    require_all: object,
    cache_limit: object,
) -> None:
    """Raise ConfigError for the first of the Master's settings it cannot
    use, whatever the hosts: a bad one fails here, not on some host later."""

    def number(value: object) -> TypeGuard[float]:  # True is an int, not a number
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if workers_per_host is not None and not (
        number(workers_per_host)
        and isinstance(workers_per_host, int)
        and workers_per_host >= 1
    ):
        raise ConfigError(
            f"workers_per_host must be a positive int, not "
            f"{workers_per_host!r}: give e.g. 2, or None for one per core"
        )
    if ssh_config is not None:
        if not isinstance(ssh_config, (str, os.PathLike)):
            raise ConfigError(
                f"ssh_config must be a path, not {type(ssh_config).__name__}: "
                "give the ssh_config file's path, or None for ~/.ssh/config"
            )
        if not os.path.exists(os.path.expanduser(ssh_config)):
            raise ConfigError(
                f"ssh_config file {os.fspath(ssh_config)!r} does not exist: fix "
                "the path, or leave ssh_config out for ~/.ssh/config"
            )
    least = 2 * protocol.HEARTBEAT_INTERVAL_S
    if not (number(heartbeat_timeout) and heartbeat_timeout >= least):
        raise ConfigError(
            f"heartbeat_timeout must be at least {least:g} s (twice the "
            f"heartbeat interval), not {heartbeat_timeout!r}: a shorter one "
            "would lose workers that are fine"
        )
    if not (number(replicas) and replicas in (1, 2)):
        raise ConfigError(
            f"replicas must be 1 or 2, not {replicas!r}: 2 runs every slice "
            "on two workers at once, 1 (the default) on one"
        )
    if not (number(straggler_factor) and straggler_factor >= 1):
        raise ConfigError(
            f"straggler_factor must be a number of at least 1, not "
            f"{straggler_factor!r}: a task this many times slower than the "
            "median gets a backup copy (default 4)"
        )
    choice = ssh_client or os.environ.get("QJAMFAB_SSH_CLIENT") or "auto"
    if not (isinstance(choice, str) and choice.lower() in SSH_CLIENTS):
        source = "ssh_client" if ssh_client else "QJAMFAB_SSH_CLIENT"
        raise ConfigError(
            f"{source}={choice!r} is not an SSH client qjamfab can use: give "
            "'openssh', 'paramiko' or 'auto' (openssh when installed)"
        )
    if not isinstance(require_all, bool):
        raise ConfigError(f"require_all must be True or False, not {require_all!r}")
    if cache_limit is not None:
        try:
            parse_size(str(cache_limit), env=None)
        except CacheLimitError as exc:  # the runtime's own, not a QjamfabError
            raise ConfigError(str(exc)) from None


class Master(FuturesMixin):
    """Runs jobs on workers: `local[:N]` processes, or SSH hosts.

    `hosts=None` means $QJAMFAB_HOSTS, else `local` with one worker per core.
    `ssh_client` ("auto", "openssh" or "paramiko"; default
    $QJAMFAB_SSH_CLIENT, else auto) is what carries a host's stream:
    auto takes the system's OpenSSH client when installed, and a host it
    fails on falls back to paramiko with a warning. `packages` names
    distributions installed here to ship to SSH hosts that lack them
    (packages.py). `progress` shows what start-up waits for (a Slurm job
    pending, and why) on a line: None in a terminal, True always, False
    never (logging says it instead).
    """

    def __init__(
        self,
        hosts: None | str | Sequence[str] = None,
        *,
        workers_per_host: int | None = None,
        ssh_config: str | None = None,
        heartbeat_timeout: float = 5.0,
        replicas: int = 1,
        straggler_factor: float = 4.0,
        ssh_client: str | None = None,
        require_all: bool = False,
        cache_limit: int | str | None = None,
        packages: Sequence[str] | None = None,
        progress: bool | None = None,
    ):
        _check_arguments(
            workers_per_host=workers_per_host,
            ssh_config=ssh_config,
            heartbeat_timeout=heartbeat_timeout,
            replicas=replicas,
            straggler_factor=straggler_factor,
            ssh_client=ssh_client,
            require_all=require_all,
            cache_limit=cache_limit,
        )
        self.require_all = require_all
        self._packages = shipping.resolve(packages)  # BadPackage here
        self.cache_limit = cache_limit
        _log_from_env()
        self._hosts: list[Host] = engines.hosts_for(
            hosts,
            EngineSettings(
                heartbeat_timeout=heartbeat_timeout,
                workers_per_host=workers_per_host,
                ssh_config=ssh_config,
                ssh_client=ssh_client,
                cache_limit=cache_limit,
                packages=self._packages,
                base=default_base(),
                status=lambda: display.StatusLine(progress),
            ),
        )
        self.hosts: list[HostSpec] = [h.spec for h in self._hosts]
        logs.warn_if_cli_hosts_ignored(
            hosts if engines.claimed(hosts) is None else self.hosts[0].raw
        )
        self.ssh_client = ssh_client
        if not all(h.is_local for h in self.hosts):
            openssh_client(ssh_client)  # a bad choice fails here, not later
        self.replicas = replicas
        self.straggler_factor = straggler_factor
        # Split each worker's slices into two tasks so a worker that runs
        # dry can take one: at first, then as Run.split_next says.
        self._split = True
        self.ssh_config = ssh_config
        self._workers_per_host = workers_per_host
        self.heartbeat_timeout = heartbeat_timeout
        self.last_run: RunStats | None = None
        self._inbox = Inbox()
        self._finalizer = weakref.finalize(self, _close_all, self._inbox, self._hosts)
        self._start_missing(first=True)

    # --- workers --------------------------------------------------------

    def _handles(self) -> list[WorkerHandle]:
        return [h.handles[k] for h in self._hosts for k in sorted(h.handles)]

    def _needs_start(self, host: Host) -> bool:
        return host.count is None or any(
            k not in host.handles or not host.handles[k].alive
            for k in range(host.count)
        )

    def _start_missing(self, first: bool = False) -> None:
        """Start or reconnect every worker that is not up.

        A host that fails is left out with a warning and retried with
        backoff, while the others work; at the first start the Master
        raises only when no host can serve (or, with `require_all`, when
        any fails).
        """
        now = time.monotonic()
        todo = [
            h
            for h in self._hosts
            if self._needs_start(h) and (first or h.retry_at <= now)
        ]
        if not todo:
            return
        failures: dict[int, QjamfabError] = {}

        def prepare(host: Host) -> None:
            try:
                host.prepare(self._inbox)
                host.failures = 0
            except QjamfabError as exc:
                failures[id(host)] = exc
                host.failures += 1
                host.retry_at = time.monotonic() + min(60, 2**host.failures)

        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            list(pool.map(prepare, todo))
        failed = [(h, failures[id(h)]) for h in todo if id(h) in failures]
        if (
            first
            and failed
            and (self.require_all or not any(h.alive for h in self._handles()))
        ):
            self.close()
            error = engines.cannot_serve([(h.spec.raw, exc) for h, exc in failed])
            raise error.with_traceback(None) from None
        for host, exc in failed:
            log.warning(
                "host %s is unavailable, retrying later: %s",
                host.spec.raw,
                text.first_line(exc),
            )

    @property
    def workers(self) -> list[str]:
        return [f"{h.label}-{k}" for h in self._hosts for k in range(h.count or 0)]

    @property
    def ssh_clients(self) -> dict[str, str | None]:
        """What carries each SSH host's stream now, by the host's label (the
        prefix of its workers' names): "openssh" (the system's client) or
        "paramiko"; None while the host is not connected. Local and Dask
        hosts are not listed. (`ssh_client` is what was asked for.)"""
        return {h.label: h.client for h in self._hosts if h.client != ""}

    @closes_executor
    def close(self) -> None:
        """End this session: stop local workers, drop connections."""
        self._finalizer()

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_html_(self) -> str:
        return display.master_html(self)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __repr__(self) -> str:
        state = (
            "closed"
            if not self._finalizer.alive
            else text.plural(sum(h.alive for h in self._handles()), "worker") + " up"
        )
        return (
            f"Master({', '.join(s.raw for s in self.hosts)}: "
            f"{text.plural(len(self.workers), 'worker')}, {state})"
        )

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise QjamfabError("this Master is closed: create a new Master")

    def _live(self) -> list[WorkerHandle]:
        self._check_open()
        live = [h for h in self._handles() if h.alive]
        if not live:
            raise WorkerLost(
                "no worker is reachable: check the hosts (inv status), then run again"
            )
        return live

    # --- runs -----------------------------------------------------------

    @exclusive
    def run(
        self,
        job: object,
        params: object = None,
        dataset: object = None,
        *,
        reduce: Callable | None = None,
        progress: bool | None = None,
    ) -> object:
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
        params_parts, broadcasts = encode_run_params(params)
        if dataset is not None and not isinstance(dataset, BaseDataSet):
            dataset = DataSet(dataset)
        self._drain()
        self._start_missing()
        workers = self._live()
        if dataset is not None:
            dataset = dataset.for_workers(len(workers))
        run = Run(
            self._inbox,
            workers,
            func_hash,
            func_bytes,
            params_parts,
            dataset,
            reduce,
            RunSettings(
                heartbeat_timeout=self.heartbeat_timeout,
                straggler_factor=self.straggler_factor,
                replicas=self.replicas,
                split=self._split,
            ),
            lambda total, unit: display.RunProgress(total, enabled=progress, unit=unit),
            broadcasts,
        )
        try:
            value = run.execute()
        finally:
            run.stats.elapsed_s = time.perf_counter() - started
            self.last_run = run.stats
            self._split = run.split_next()
        log.info("run: %r", run.stats)
        return value

    def broadcast(self, value: object, *, check: bool = True) -> Broadcast:
        """`qjamfab.Broadcast(value, check=check)`: put it in params; it
        crosses to each host once, and stays in the hosts' caches for later
        sessions."""
        return Broadcast(value, check=check)

    def task_stream(self) -> TaskStream:
        """For the futures dispatcher (futures/executor.py), which holds the run
        lock: this Master's workers as a stream of tasks, lost ones
        restarted first."""
        self._check_open()
        self._drain()

        def restart() -> list[WorkerHandle]:
            self._start_missing()
            return self._live()

        return TaskStream(self._inbox, restart, self.heartbeat_timeout)

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
        def take(event: Event) -> bool:
            if event.kind == protocol.LOG:
                print_event_log(event)
            return event.source is handle and not handle.alive

        event = await_answer(
            lambda: filter(None, [self._inbox.next_event(0.1)]),
            lambda event: event.source is handle and event.kind == kind,
            time.monotonic() + self.heartbeat_timeout,
            take,
        )
        if event is not None:
            return event.head
        raise WorkerLost(
            f"worker {handle.name} did not answer: it will be "
            "restarted before the next run",
            worker=handle.name,
        )

    def _drain(self) -> None:
        """Before a run: take in what workers sent since the last one
        (heartbeats, output left from an interrupted run, the end of a
        worker that died) without waiting, so lost workers are restarted."""
        self._inbox.read_available()
        while self._inbox.pending:
            event = self._inbox.pending.popleft()
            if event.kind == protocol.LOG:
                print_event_log(event)


def _close_all(inbox: Inbox, hosts: Sequence[Host]) -> None:
    inbox.close()
    for host in hosts:
        host.close()
