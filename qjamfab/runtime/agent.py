"""The host agent: one per Master session on a host, the far end of its one
SSH stream.

Run by the master over SSH as `python3 -c <boot agent>` (see
`runtime.boot_code`). Its stdin and stdout are the stream; every frame on
it names a worker (protocol.py), and the agent passes each on between the
stream and that worker's daemon, over the daemon's Unix socket. So a host
costs the master one SSH connection and one channel, and costs the host
one sshd session and one agent, whatever its worker count.

What it does besides passing frames on:

- ATTACH: claims daemons for this session, starts missing ones
  (daemons.py), and forwards each one's HELLO.
- REFS: a slice goes into the host's cache once, and every daemon is told
  it is there: a slice crosses the network once per host.
- TASKS: a run's first tasks for the host's workers in one frame, passed
  on to each as its TASK.
- TASK with `hold`: the result stays here (held.py); the master is told
  "done", gets the results combined unasked once the run's held tasks
  here are done (an offer), or asks for them with COLLECT, which
  combines the named results in the run's fixed tree
  (reduce.ReduceTree) with the job's reduce: one RESULT for the host.
  Each worker runs one held task at a time; the rest wait here, and a
  worker that runs dry takes a sibling's (host_queue.py).
- Liveness: daemons' heartbeats end here; the agent sends one heartbeat
  for the host, naming the workers that are stale: silent and, seen from
  outside their interpreter, not running (stopped or gone). A worker busy
  in C code holding its GIL is not stale.

Writes are queued and flushed when the other end can take them, so the
agent never blocks on a daemon or on the master while the other side
waits on it. Exit when the stream ends: daemons stay up, with their cache.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from collections.abc import Sequence

from .. import protocol
from . import (
    daemons,
    default_base,
    handover,
    manage,
    secure_dir,
    secure_host_dir,
    set_process_name,
    this_runtime,
)
from .cache import RefCache
from .daemons import Daemon, Peer
from .held import HeldResults
from .host_queue import HostQueue
from .lru import JobCache, job_budget
from .packages import AgentPackages
from .pins import CacheLimitError, cache_limit, parse_size
from .probe import host_info
from .shared_params import HostParams
from .spool import Spool, file_reader, shared

_STALE_AFTER_S = 1.5 * protocol.HEARTBEAT_INTERVAL_S
# What a daemon says of a task when it no longer runs or waits to run it.
_ANSWERS = (protocol.RESULT, protocol.ERROR)
_ANSWERED = ("cancelled", "parked")


class _HandedOver(Exception):
    """The agent's work is done: a daemon had the stream, and ended."""


class Agent:
    """A host's agent over the master's stream (`master_in`, `master_out`).
    Where its daemons come from is `start_daemons` (processes, here;
    threads, for the in-process engine)."""

    hands_over = True  # a host of one worker: its daemon takes the stream

    def __init__(self, base: str, master_in: int, master_out: int):
        self.base = base
        reader = os.fdopen(master_in, "rb", buffering=0, closefd=False)
        self.master = Peer(master_in, master_out, reader.readinto)
        os.set_blocking(master_out, False)
        self.cache = RefCache(os.path.join(base, "cache"))
        self.daemons: dict[int, Daemon] = {}
        self.funcs: JobCache[bytes] = JobCache(job_budget())  # for COLLECT
        self.results = HeldResults(self.funcs)  # the run's, held here
        self.queue = HostQueue()  # the run's held tasks waiting here
        self.beat_at = 0.0
        self.avoid: set[int] = set()  # slots whose daemon froze
        self.packages = AgentPackages(base)  # shipped: runtime/packages.py
        self.params: HostParams | None = None  # the run's, from PARAMS
        self.spool: Spool | None = None  # big frames through files (spool.py)

    # --- to the master --------------------------------------------------

    def tell(
        self,
        kind: int,
        head: dict,
        payload: Sequence = (),
        worker: int = protocol.AGENT,
    ) -> None:
        if self.results.untold():  # before anything after them, in order
            self.tell_done()
        self.to_master(protocol.frame(kind, head, payload, worker))

    def tell_done(self) -> None:
        """The held tasks done since the last call, in one frame (with
        their results, when offered): the master reads one frame per host,
        not one per worker."""
        frame = self.results.frame()
        if frame is not None:
            self.to_master(frame)

    def to_master(self, frame: list) -> None:
        self.master.queue(frame if self.spool is None else self.spool.out(frame))

    def hello(self) -> dict:
        return {
            "version": protocol.VERSION,
            "agent": True,
            "base": self.base,
            "runtime": this_runtime(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **host_info(),
        }

    # --- attaching --------------------------------------------------------

    def attach(self, head: dict) -> None:
        """Claim a daemon for each worker index asked for, starting those
        missing, and forward their HELLOs; then answer ATTACH."""
        if head.get("cache_limit") is not None:
            self.cache.limit = cache_limit(self.cache.directory, head["cache_limit"])
        count = head.get("count") or manage.recorded_count(self.base)
        indices = list(head.get("workers") or range(count))
        for k in indices:
            if k in self.daemons:
                # The master gave up on it (silent, e.g. stopped): drop it,
                # and do not take its slot again.
                self.avoid.add(self.daemons[k].slot)
                self.daemons.pop(k).close()
            if self.params is not None:
                self.params.told.discard(k)  # a new daemon has not got them
        idle = float(head.get("idle_timeout", 3600.0))
        template = head.get("env") or {}
        if template.get("QJAMFAB_JOB_CACHE"):  # the host's setting (env.NAME=)
            try:
                self.funcs.budget = parse_size(
                    template["QJAMFAB_JOB_CACHE"], "QJAMFAB_JOB_CACHE"
                )
            except CacheLimitError:
                pass  # its daemons do not start, and say why
        attached, failed = self.start_daemons(
            indices, idle, template, head.get("session")
        )
        for daemon, hello in attached:
            self.daemons[daemon.index] = daemon
            self.tell(protocol.HELLO, hello, worker=daemon.index)
        self.packages.tell_daemons(self.daemons.values())
        # A stream that holds big frames back (srun): they go through the
        # spool directory, if this host sees the master's (spool.py).
        spool: dict = head.get("spool") or {}
        spooling = bool(spool) and shared(spool["dir"], spool["token"])
        # One worker has nothing to combine or share with: the daemon takes
        # the stream itself (two fewer hops per frame), and the agent only
        # waits to say how it ended.
        direct = (
            self.hands_over
            and not spooling  # its daemon would have to spool too
            and bool(head.get("direct"))
            and count == 1
            and not failed
            and len(self.daemons) == 1
        )
        self.tell(
            protocol.ATTACH,
            {
                "workers": sorted(self.daemons),
                "failed": failed,
                "count": count,
                "direct": direct,
                "spool": spooling,
            },
        )
        if spooling:
            self.spool = Spool(spool["dir"], f"a{os.getpid()}-")
        if direct:
            self.hand_over(next(iter(self.daemons.values())))

    def start_daemons(
        self, indices: list[int], idle: float, template: dict, session: str | None
    ) -> tuple[list[tuple[Daemon, dict]], dict[int, str]]:
        """Claim, start and connect the daemons of these worker indices
        (daemons.py): each with its HELLO, and why the others failed."""
        return daemons.attach(
            self.base,
            indices,
            self.avoid,
            idle,
            template,
            self.packages.conflicts,
            session,
        )

    def hand_over(self, daemon: Daemon) -> None:
        """Give the daemon the master's stream and beat for it until its
        connection ends (handover.py); a GONE frame then says how it
        ended, and the agent exits."""
        handover.give_stream(self.master, daemon, self.base, self.tell)
        self.gone(daemon, "its daemon ended")
        try:
            self.master.flush()
        except OSError:
            pass  # the master hung up first: nobody to tell
        raise _HandedOver

    # --- frames from the master -------------------------------------------

    def from_master(self) -> None:
        kind, worker, head, lengths = self.master.reader.read_head()
        if kind == protocol.SPOOL and self.spool is not None:
            self.from_spool(self.spool.take(head))
            return
        if kind == protocol.REFS and lengths:
            parts = self.cache.receive(
                head["ref"],
                lengths,
                self.master.reader,
                self.master.read_fd,
                load=False,
                blocks=head.get("blocks"),
            )
            # A Broadcast is for every worker here, a slice for the one asking.
            everyone = self.daemons if head.get("broadcast") else None
            self._stored(head["ref"], worker, parts, everyone)
            return
        if kind == protocol.PACKAGES and worker == protocol.AGENT:
            self.packages.handle(self, head, lengths)
            return
        if kind == protocol.PARAMS and worker == protocol.AGENT:
            self.params_in(head["run"], lengths)
            return
        parts = [self.master.reader.read_part(n) for n in lengths]
        if worker == protocol.AGENT:
            if kind == protocol.ATTACH:
                self.attach(head)
            elif kind == protocol.COLLECT:
                self.collect(head)
            elif kind == protocol.TASKS:
                self.tasks_in(head, parts)
            elif kind == protocol.FUNC:  # for every worker here
                self.job_in(head["hash"], parts)
            return
        if kind == protocol.FUNC:
            self.job_in(head["hash"], parts)
            daemon = self.daemons.get(worker)
            if daemon is not None:
                daemon.jobs.add(head["hash"])
        elif kind == protocol.TASK:
            self.task_in(worker, head)
        elif kind == protocol.CANCEL:
            if head["task"] in self.results.held:
                # Done already: COLLECT says whether it counts (its "done"
                # may be on its way); the next run drops what none took.
                return
            waited_for = self.queue.cancel(head["task"])
            if waited_for is not None:  # never started: answered here
                self.results.ended(head["task"])
                state = {"task": head["task"], "run": head["run"], "state": "cancelled"}
                self.tell(protocol.STATE, state, worker=waited_for)
                return
            worker = self.queue.route(head["task"], worker)
        self.to_daemon(kind, worker, head, parts)

    def tasks_in(self, head: dict, parts: list) -> None:
        """A run's first tasks for this host's workers, in one frame: each
        goes on as its worker's TASK, with the params where it says."""
        common = {key: value for key, value in head.items() if key != "tasks"}
        for worker, task, slices, refs, params in head["tasks"]:
            one = {**common, "task": task, "slices": slices, "refs": refs}
            one["params"] = params
            self.task_in(worker, one)
            self.to_daemon(protocol.TASK, worker, one, parts if params else [])

    def task_in(self, worker: int, head: dict) -> None:
        """A TASK on its way to a worker: a new run forgets what the last
        one left here; a held task's result will stay here."""
        held = self.results.task(head)
        if self.params is not None and self.params.run != head["run"]:
            self.params.close()  # an earlier run's
            self.params = None
        if held:
            self.queue.new_task(head)
            if self.funcs.get(head["func"]) is None:
                # Dropped here since the master sent it: COLLECT will
                # need it, so ask as a worker lacking it does.
                state = {"task": head["task"], "state": "blocked", "refs": []}
                self.tell(protocol.STATE, {**state, "func": True}, worker=worker)

    def job_in(self, job_hash: str, parts: list) -> None:
        """A job, kept for COLLECT and for the workers here without it."""
        job = bytes(parts[0])
        func = self.results.func  # the current run's
        in_flight = () if func is None else (func,)
        self.funcs.put(job_hash, job, len(job), pinned=in_flight)

    def to_daemon(self, kind: int, worker: int, head: dict, parts: list) -> None:
        """Pass a frame on to worker's daemon; before a TASK, its job if it
        has not had it from here, and the run's params where they are on
        this host."""
        daemon = self.daemons.get(worker)
        if daemon is None or daemon.closed or daemon.broken:
            return
        if kind == protocol.TASK:
            if head["run"] != daemon.run:  # it drops an earlier run's queued
                daemon.run, daemon.tasks = head["run"], []
            if head.get("hold"):
                if daemon.tasks and not head["params"]:
                    self.queue.wait(worker, head)  # one at a time
                    return
                self.queue.passed(worker, head)
            daemon.tasks.append(head["task"])
            func = head["func"]
            job = None if func in daemon.jobs else self.funcs.get(func)
            if job is not None:  # else it has it, or asks the master
                daemon.queue(protocol.frame(protocol.FUNC, {"hash": func}, [job]))
                daemon.jobs.add(func)
            if self.params is not None:
                params = self.params.for_worker(worker, head["run"])
                if params is not None:
                    daemon.queue(protocol.frame(protocol.PARAMS, *params))
        daemon.queue(protocol.frame(kind, head, parts))

    def params_in(self, run: int, lengths: list[int]) -> None:
        """A run's params, once for the host: into shared memory, where
        each daemon maps them, else kept here and passed on to each."""
        if self.params is not None:
            self.params.close()
        self.params = HostParams.receive(
            run, lengths, self.master.reader, self.master.read_fd
        )

    def from_spool(self, fd: int) -> None:
        """The frame a SPOOL frame names, read from its file as from the
        master's stream (which it stands in for meanwhile)."""
        stream = self.master.reader, self.master.read_fd
        self.master.reader, self.master.read_fd = file_reader(fd), fd
        try:
            self.from_master()
        finally:
            self.master.reader, self.master.read_fd = stream
            os.close(fd)

    def _stored(
        self, ref: str, worker: int, parts: list | None, everyone: dict | None
    ) -> None:
        """Tell every daemon the slice is in the cache; when it stayed off
        the disk (no room: `parts`), send it on to its worker, or to
        `everyone` (a Broadcast's daemons: all)."""
        if parts is not None:
            head, to = {"ref": ref, "memory": True}, everyone or (worker,)
        else:
            key = self.cache.file_key(ref)
            if key is None:  # removed already (a clear): workers ask for it
                return
            # Sealed here: no need to hash.
            head, to, parts = {"ref": ref, "stored": list(key)}, self.daemons, []
        for k in to:
            daemon = self.daemons.get(k)
            if daemon is not None and not daemon.closed:
                daemon.queue(protocol.frame(protocol.REFS, head, parts))

    def collect(self, head: dict) -> None:
        """Combine held results (held.py): one RESULT, or an ERROR."""
        self.tell(*self.results.collect(head))

    # --- frames from daemons ----------------------------------------------

    def from_daemon(self, daemon: Daemon) -> None:
        try:
            kind, _, head, parts = daemon.reader.read()
        except (EOFError, OSError, protocol.ProtocolError) as exc:
            self.gone(daemon, daemon.broken or str(exc) or type(exc).__name__)
            return
        daemon.last_seen = time.monotonic()
        if kind == protocol.HEARTBEAT:
            return
        if kind == protocol.STATS:
            jobs = {"agent_jobs": len(self.funcs), "agent_job_bytes": self.funcs.bytes}
            head = {**head, **jobs}
        if kind in _ANSWERS or head.get("state") in _ANSWERED:
            try:
                daemon.tasks.remove(head["task"])
            except (KeyError, ValueError):
                pass  # a task of an earlier session's, or none
            if not daemon.tasks:
                self.next_task(daemon)
        if kind == protocol.RESULT and self.results.result(daemon.index, head, parts):
            return  # held here: noted
        if kind == protocol.ERROR or head.get("state") == "cancelled":
            self.results.ended(head.get("task"))
        self.tell(kind, head, parts, worker=daemon.index)

    def next_task(self, daemon: Daemon) -> None:
        """The daemon ran dry: its next held task waiting here, else a
        sibling's (host_queue.py); the master is told of a move first."""
        if daemon.run != self.queue.run or daemon.closed or daemon.broken:
            return  # no task of the run yet (nor its params), or its end next
        if not self.queue.waits():
            return  # one task per worker (a trivial run): nothing to give
        live = {k for k, d in self.daemons.items() if not d.closed and not d.broken}
        # cache_limit 0: a slice lives in one worker; the master moves tasks.
        task = self.queue.next_for(daemon.index, live if self.cache.limit else set())
        if task is None:
            return
        head, source = task
        if source != daemon.index:
            self.results.move(head["task"], source, daemon.index)
        self.to_daemon(protocol.TASK, daemon.index, head, [])

    def gone(self, daemon: Daemon, reason: str) -> None:
        """The daemon's connection ended: say how, with its own exit
        status when it died (its keeper records it, keeper.py)."""
        daemon.close()
        del self.daemons[daemon.index]
        for task in self.queue.drop(daemon.index):
            self.results.ended(task)  # the master runs it again
        status, tail = daemon.ended(self.base)
        # The task it was running: the master's own view may be behind
        # (notes of tasks done wait here a while, held.py).
        running = daemon.tasks[0] if daemon.tasks else None
        end = {"reason": reason, "tail": tail, "status": status, "task": running}
        self.tell(protocol.GONE, end, worker=daemon.index)

    # --- the loop ---------------------------------------------------------

    def beat(self) -> None:
        now = time.monotonic()
        if now < self.beat_at:
            return
        self.beat_at = now + protocol.HEARTBEAT_INTERVAL_S
        stale = [
            d.index
            for d in self.daemons.values()
            if now - d.last_seen > _STALE_AFTER_S and not d.running()
        ]
        self.tell(protocol.HEARTBEAT, {"stale": stale})

    def serve(self) -> None:
        self.tell(protocol.HELLO, self.hello())
        while True:
            if self.results.due():
                self.tell_done()
            self.master.flush()
            for daemon in self.daemons.values():
                daemon.send_queued()
            poller = select.poll()
            poller.register(self.master.read_fd, select.POLLIN)
            if self.master.out:
                poller.register(self.master.write_fd, select.POLLOUT)
            by_fd = {}
            for daemon in self.daemons.values():
                by_fd[daemon.read_fd] = daemon
                poller.register(
                    daemon.read_fd,
                    select.POLLIN
                    | (select.POLLOUT if daemon.out and not daemon.broken else 0),
                )
            due = self.beat_at
            if self.results.done:
                due = min(due, self.results.notes_due)
            wait = max(0.0, due - time.monotonic())
            for fd, events in poller.poll(wait * 1000):
                if fd == self.master.read_fd and events & (
                    select.POLLIN | select.POLLHUP | select.POLLERR
                ):
                    try:
                        while True:
                            self.from_master()
                            if not self.master.reader.buffered():
                                break
                    except EOFError:
                        return  # the master hung up
                elif fd in by_fd and events & (
                    select.POLLIN | select.POLLHUP | select.POLLERR
                ):
                    daemon = by_fd[fd]
                    if not daemon.closed:
                        self.from_daemon(daemon)
                        while not daemon.closed and daemon.reader.buffered():
                            self.from_daemon(daemon)
            self.beat()


def main() -> None:
    set_process_name("qjamfab-agent")
    os.umask(0o077)
    base = default_base()
    try:
        for sub in ("", "cache"):
            secure_dir(os.path.join(base, sub) if sub else base)
        secure_host_dir(base)
    except OSError as exc:
        sys.exit(str(exc))  # its first line says what to do
    master_in, master_out = os.dup(0), os.dup(1)
    # Nothing else may write to the stream: stray prints go to stderr.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    agent = Agent(base, master_in, master_out)
    try:
        agent.serve()
    except _HandedOver:
        pass
    finally:
        for daemon in list(agent.daemons.values()):
            daemon.close()
