"""The Master: owns the hosts, their links and the inbox; `run()` = plan,
dispatch, collect, reduce (the run itself is run.py's `Run`).

An SSH host is one `Link` (workers.py): one SSH connection and one
stream to the host's agent, which attaches all of the host's workers (and
installs the runtime, and starts missing daemons) in one pass. A local
worker is a Link of its own, over its pipes. The inbox reads every link on
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
import shlex
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeAlias

from . import dask_engine, display, openssh, protocol, runtime, serialize, slurm
from . import hosts as hostlib
from . import packages as shipping
from .cluster import remote_python
from .dataset import BaseDataSet, DataSet
from .errors import QjamfabError, WorkerLost
from .futures import FuturesMixin, closes_executor, exclusive
from .hostspec import HostSpec, parse_hosts
from .inproc import InProcessTransport
from .openssh import openssh_client
from .run import Run, RunSettings, RunStats, print_event_log
from .runtime import default_base
from .runtime.cache import parse_size
from .transport import (
    OPENSSH_FAILED,
    LocalPipeTransport,
    OpenSSHTransport,
    SSHChannelTransport,
)
from .workers import Inbox, Link, WorkerHandle

log = logging.getLogger("qjamfab")

IDLE_TIMEOUT_S = 3600.0  # a daemon without a session for this long ends


def _log_from_env() -> None:
    """$QJAMFAB_LOG_LEVEL (INFO, DEBUG, ...): the "qjamfab" logger to stderr."""
    level = os.environ.get("QJAMFAB_LOG_LEVEL", "").strip()
    if level:
        display.log_to_stderr(level, "env")


class Master(FuturesMixin):
    """Runs jobs on workers: `local[:N]` processes, or SSH hosts.

    `hosts=None` means $QJAMFAB_HOSTS, else `local` with one worker per core.
    `ssh_client` ("auto", "openssh" or "paramiko"; default
    $QJAMFAB_SSH_CLIENT, else auto) is what carries a host's stream:
    auto takes the system's OpenSSH client when installed, and a host it
    fails on falls back to paramiko with a warning. `packages` names
    distributions installed here to ship to SSH hosts that lack them
    (packages.py).
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
    ):
        if workers_per_host is not None and (
            not isinstance(workers_per_host, int) or workers_per_host < 1
        ):
            raise ValueError(
                f"workers_per_host must be a positive int, not "
                f"{workers_per_host!r}: give e.g. 2, or None for one per core"
            )
        if replicas not in (1, 2):
            raise ValueError(f"replicas must be 1 or 2, not {replicas!r}")
        if not heartbeat_timeout >= 2 * protocol.HEARTBEAT_INTERVAL_S:
            raise ValueError(
                f"heartbeat_timeout must be at least "
                f"{2 * protocol.HEARTBEAT_INTERVAL_S:g} s (twice the "
                f"heartbeat interval), not {heartbeat_timeout!r}: a shorter "
                "one would lose workers that are fine"
            )
        self.require_all = require_all
        self._packages = shipping.resolve(packages)  # BadPackage here
        if cache_limit is not None:  # a bad value fails here, not on hosts
            parse_size(str(cache_limit), env=None)
        self.cache_limit = cache_limit
        _log_from_env()
        dask = dask_engine.dask_host(  # None unless a Dask Client or address
            hosts,
            heartbeat_timeout,
            workers_per_host=workers_per_host,
            ssh_config=ssh_config,
            ssh_client=ssh_client,
            packages=packages or None,
        )
        display.warn_if_cli_hosts_ignored(dask.spec.raw if dask else hosts)
        self.ssh_client = ssh_client
        self.hosts: list[HostSpec] = [dask.spec] if dask else parse_hosts(hosts)
        if not dask and not all(h.is_local for h in self.hosts):
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
        self._base = default_base()
        self._inbox = Inbox()
        self._hosts: Sequence[AnyHost] = (
            [dask] if dask else _label_hosts(self.hosts, workers_per_host)
        )
        self._finalizer = weakref.finalize(self, _close_all, self._inbox, self._hosts)
        self._start_missing(first=True)

    # --- workers --------------------------------------------------------

    def _handles(self) -> list[WorkerHandle]:
        return [h.handles[k] for h in self._hosts for k in sorted(h.handles)]

    def _missing(self, host: AnyHost) -> list[int]:
        if host.count is None:
            return []  # not known yet: the agent says
        return [
            k
            for k in range(host.count)
            if k not in host.handles or not host.handles[k].alive
        ]

    def _needs_start(self, host: AnyHost) -> bool:
        return host.count is None or bool(self._missing(host))

    def _prepare(self, host: AnyHost) -> None:
        """Connect the host and attach every worker of it that is not up."""
        if isinstance(host, dask_engine.DaskHost):
            host.prepare(self._inbox)
            return
        if host.spec.is_local:
            self._start_local(host)
            return
        if host.link is None or not host.link.alive:
            host.link = self._open_link(host)
            self._inbox.add(host.link)
            if self._packages:
                shipping.ship(host.link, self._packages)
        missing = self._missing(host)
        new, failed = host.link.attach(
            missing or None,
            host.count,
            slurm.IDLE_TIMEOUT_S if host.slurm else IDLE_TIMEOUT_S,
            self.cache_limit,
            dict(host.spec.env),
        )
        if host.count is None:
            host.count = host.link.count
        for handle in new:
            handle.last_seen = time.monotonic()
            host.handles[handle.index] = handle
        if failed:
            reasons = "; ".join(
                f"{host.label}-{k}: {why}" for k, why in sorted(failed.items())
            )
            raise WorkerLost(
                f"{len(failed)} of the workers of {host.label} "
                f"did not start: {reasons}",
                worker=f"{host.label}-{min(failed)}",
            )

    def _start_local(self, host: _Host) -> None:
        def start(k: int) -> WorkerHandle:
            name = f"{host.label}-{k}"
            env = host.spec.worker_env(k)
            if self.cache_limit is not None:
                env["QJAMFAB_CACHE_LIMIT"] = str(self.cache_limit)
            transport = (
                InProcessTransport(name, self._base)
                if host.spec.kind == "inproc"
                else LocalPipeTransport(name, self._base, env)
            )
            link = Link(
                host.label, transport, agent=False, stall_timeout=self.heartbeat_timeout
            )
            return link.start_direct(name)

        missing = self._missing(host)
        for k in missing:
            old = host.handles.pop(k, None)
            if old is not None:
                old.close()
        failure = None
        with ThreadPoolExecutor(max_workers=max(1, len(missing))) as pool:
            for k, future in [(k, pool.submit(start, k)) for k in missing]:
                try:
                    host.handles[k] = future.result()
                    self._inbox.add(host.handles[k].link)
                except QjamfabError as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure

    def _open_link(self, host: _Host) -> Link:
        """One stream to the host's agent: through the OpenSSH client, or
        paramiko where it cannot reach the host (or is not wanted)."""
        if host.slurm is not None:  # the agent as a job step on its node
            python = host.spec.python or sys.executable
            agent = [python, "-c", runtime.boot_code("agent", install=True)]
            link = Link(
                host.label,
                host.slurm.transport(host.label, agent),
                agent=True,
                stall_timeout=self.heartbeat_timeout,
            )
            link.start_agent(python)
            return link
        python = host.spec.python or remote_python()
        command = shlex.join([python, "-c", runtime.boot_code("agent", install=True)])
        ssh = None if host.openssh_failed else openssh_client(self.ssh_client)
        if ssh is not None:
            link = Link(
                host.label,
                OpenSSHTransport(
                    host.label,
                    openssh.openssh_command(
                        ssh, host.spec, command, ssh_config=self.ssh_config
                    ),
                ),
                agent=True,
                stall_timeout=self.heartbeat_timeout,
            )
            try:
                link.start_agent(python)
                return link
            except WorkerLost as exc:
                if exc.exit_status != OPENSSH_FAILED:
                    raise
                # paramiko says why (host key, auth, unreachable) or works.
                conn = hostlib.connect(host.spec, ssh_config=self.ssh_config)
                log.warning(
                    "the OpenSSH client cannot reach %s (%s); using "
                    "paramiko for its workers",
                    host.spec.raw,
                    (exc.stderr_tail or "no message").splitlines()[-1],
                )
                host.openssh_failed = True
        else:
            conn = hostlib.connect(host.spec, ssh_config=self.ssh_config)
        link = Link(
            host.label,
            SSHChannelTransport(host.label, conn, command),
            agent=True,
            stall_timeout=self.heartbeat_timeout,
        )
        link.start_agent(python)
        return link

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

        def prepare(host: AnyHost) -> None:
            try:
                self._prepare(host)
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
            raise failed[0][1]
        for host, exc in failed:
            log.warning(
                "host %s is unavailable, retrying later: %s",
                host.spec.raw,
                display.first_line(exc),
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
        clients: dict[str, str | None] = {}
        for h in self._hosts:
            if not isinstance(h, _Host) or h.spec.is_local or h.slurm:
                continue
            if h.link is None or not h.link.alive:
                clients[h.label] = None
            elif isinstance(h.link.transport, OpenSSHTransport):
                clients[h.label] = "openssh"
            else:
                clients[h.label] = "paramiko"
        return clients

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
            else display.plural(sum(h.alive for h in self._handles()), "worker") + " up"
        )
        return (
            f"Master({', '.join(s.raw for s in self.hosts)}: "
            f"{display.plural(len(self.workers), 'worker')}, {state})"
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
        params_parts = serialize.encode_params(params)
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
            progress,
        )
        try:
            value = run.execute()
        finally:
            run.stats.elapsed_s = time.perf_counter() - started
            self.last_run = run.stats
            self._split = run.split_next()
        log.info("run: %r", run.stats)
        return value

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
            event = self._inbox.next_event(0.1)
            if event is None:
                continue
            if event.source is handle and event.kind == kind:
                return event.head
            if event.kind == protocol.LOG:
                print_event_log(event)
            if event.source is handle and not handle.alive:
                break
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


class _Host:
    """One entry of Master(hosts): its link (SSH) and its workers, and how
    many it runs (None for an SSH host until its agent says)."""

    def __init__(self, spec: HostSpec, label: str, count: int | None):
        self.spec = spec
        self.label = label
        self.count = count
        self.link: Link | None = None
        self.handles: dict[int, WorkerHandle] = {}
        self.openssh_failed = False
        self.slurm: slurm.SlurmNode | None = None
        self.failures = 0
        self.retry_at = 0.0


# What Master._hosts holds: its host entries, or one Dask cluster.
AnyHost: TypeAlias = "_Host | dask_engine.DaskHost"


def _label_hosts(specs: list[HostSpec], workers_per_host: int | None) -> list[_Host]:
    hosts: list[_Host] = []
    seen: set[str] = set()
    for spec in specs:
        if spec.kind == "slurm":  # a host per node of the allocation
            for node in slurm.allocation_for(spec).node_list():
                host = _Host(
                    spec, node.name, spec.workers or workers_per_host or node.cpus
                )
                host.slurm = node
                hosts.append(host)
                seen.add(node.name)
            continue
        label = spec.kind if spec.is_local else spec.raw
        while label in seen:  # two entries for one host stay apart
            label += "'"
        seen.add(label)
        count = (
            spec.workers
            or workers_per_host
            or (os.cpu_count() or 1 if spec.is_local else None)
        )
        hosts.append(_Host(spec, label, count))
    return hosts


def _close_all(inbox: Inbox, hosts: Sequence[AnyHost]) -> None:
    inbox.close()
    for host in hosts:
        for handle in host.handles.values():
            handle.close()
        if isinstance(host, dask_engine.DaskHost):
            # Its session stays: a closed Master still counts its workers.
            host.link.close()
        elif host.link is not None:
            host.link.close()
            host.link = None
        if isinstance(host, _Host) and host.slurm is not None:
            host.slurm.allocation.release()
