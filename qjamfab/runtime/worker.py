"""The worker: its message loop and heartbeats, and its entry point.

Runs as `python -c ... worker.main()` from a runtime bundle (see
runtime/__init__.py), in one of two modes:

- `--pipe`: the protocol runs over the process's stdin and stdout; the
  worker ends when stdin closes. Local workers of a Master use this.
- `--socket PATH`: a daemon listening on a Unix socket (0600 in a 0700
  directory), serving one connection at a time (its host's agent, see
  agent.py) and keeping its cache between them; it ends after
  `--idle-timeout` seconds without one.

Before any user code runs, the protocol moves off fds 0 and 1, and fds 1 and
2 point at a capture file (capture.py), so nothing a job prints (from Python
or C) can corrupt a frame. The worker's own messages and tracebacks go to
the stderr it was started with (a daemon's `log/worker-N.daemon`), never
into the capture. A daemon's exit status is recorded by its keeper
(keeper.py).

A daemon's socket takes any client of the same user, so a daemon trusts no
input: a client that does not say "serve" within _CLAIM_WAIT_S is dropped
(others are served meanwhile); a frame that breaks the protocol (bad header,
a head that is not a small JSON dict, a kind or head a worker does not
take, a part bigger than what fits) ends that connection only, logged, and
the daemon goes back to accepting. In `--pipe` mode the stream is the
worker's only client: bad input ends the worker, saying why on its stderr.
How a worker is reached (its channel, the frames it takes, the daemon's
socket) is serving.py's.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

from .. import protocol
from ..errors import ProtocolError
from . import calls, default_base, secure_dir, secure_host_dir, set_process_name
from .cache import CacheEntryLost, RefCache
from .capture import Capture
from .keeper import keep
from .lru import JobCache, job_budget
from .packages import use_in_daemon
from .pins import CacheLimitError
from .serving import Channel, DaemonLog, HandOver, check_head, fd_channel, serve_socket
from .shared_params import open_params
from .task import check_job, error_fields, execute, load_job, task_refs

if TYPE_CHECKING:
    from types import FrameType


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def tune_malloc() -> None:
    """Keep freed memory up to 32 MiB blocks in the heap (glibc only).

    glibc serves blocks over 128 KiB with mmap and returns them on free, so
    numpy temporaries of that size cost fresh page faults on every call; it
    raises that threshold itself after the first large free, which a worker
    holding its slices may never do. Measured: mapfunc of the sparse
    autoencoder 20% slower without this than in a plain process."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


class Worker:
    def __init__(
        self,
        name: str,
        base: str,
        cache: RefCache,
        capture: Capture,
        jobs_budget: int | None = None,
    ):
        """`jobs_budget`: bytes of jobs kept (default: lru.job_budget)."""
        self.name = name
        self.base = base
        self.capture = capture
        self.cache = cache
        # function hash -> (mapfunc, reduce), or its bytes until first used
        self.jobs: JobCache[tuple | bytes] = JobCache(
            job_budget() if jobs_budget is None else jobs_budget
        )
        self.started = time.time()
        # Tasks not yet run, in order: [head, params parts, refs asked
        # for (False until blocked once)]
        self.pending: list[list] = []
        self.run_id: int | None = None
        self.run_params: list = []  # the params parts of run_id
        self.params_error: OSError | None = None  # why they are not here
        # Big results of run_id waiting for the master's FETCH: task id ->
        # (RESULT head, payload). The master pulls them one at a time, in
        # the order its tree combines them, so it never holds them all.
        self.parked: dict[int, tuple[dict, list]] = {}
        self.busy = False  # running user code
        # In a process of its own (not as a thread: qjamfab.inproc), a
        # worker whose master hangs up mid-task ends, and beats while alive.
        self.exit_on_hangup = True
        self.heartbeats = True

    def hello(self) -> dict:
        import cloudpickle

        return {
            "version": protocol.VERSION,
            "name": self.name,
            "pid": os.getpid(),
            "python": list(sys.version_info[:3]),
            "cloudpickle": cloudpickle.__version__,
            "cores": os.cpu_count(),
            "base": self.base,
            "host": socket.gethostname(),
            "log": self.capture.path,
        }

    def serve(self, channel: Channel) -> None:
        """Answer frames until the master closes the connection; a frame
        that breaks the protocol raises ProtocolError."""
        self.capture.channel = channel
        self.pending = []
        self.parked.clear()  # an earlier session's: nobody will fetch them
        channel.send(protocol.HELLO, self.hello())
        stop = threading.Event()
        threading.Thread(
            target=self._heartbeat, args=(channel, stop), daemon=True
        ).start()
        try:
            while True:
                # Frames that arrived while a task ran come first: one may
                # cancel the next task.
                if (
                    self.pending
                    and not channel.input_waiting()
                    and self._run_next(channel)
                ):
                    continue
                if not self.pending:
                    self.cache.pin(())  # no task in flight here
                try:
                    kind, _, head, lengths = channel.reader.read_head()
                    if kind == protocol.REFS:  # straight into the cache
                        check_head(kind, head, lengths)
                        self._take_slice(channel, head, lengths)
                        continue
                    parts = [channel.reader.read_part(n) for n in lengths]
                except (EOFError, OSError):
                    return
                check_head(kind, head, parts)
                self.handle(channel, kind, head, parts)
        finally:
            stop.set()
            channel.close()
            self.capture.channel = None
            self.cache.pin(())

    def _take_slice(self, channel: Channel, head: dict, lengths: list) -> None:
        ref = head["ref"]
        try:
            if lengths:
                # Stored, not unpickled: a slice this Python cannot load (a
                # module it lacks) is the task's error, at its first use.
                parts = self.cache.receive(
                    ref,
                    lengths,
                    channel.reader,
                    channel.read_fd,
                    load=False,
                    to_disk=not head.get("memory"),
                    blocks=head.get("blocks"),
                )
                if parts is None:  # sealed just now: no need to hash again
                    key = self.cache.file_key(ref)
                    if key is not None:  # else removed already (a clear)
                        self.cache.trust(ref, key)
                else:
                    self.cache.keep_in_memory(ref, parts)
            else:  # the agent stored and sealed it for us
                self.cache.trust(ref, head["stored"])
        except (EOFError, OSError, ProtocolError):
            raise
        except Exception as exc:  # a payload that is no slice, a bad key
            raise ProtocolError(
                f"a REFS frame for {ref} that is not a slice "
                f"({type(exc).__name__}: {exc}): the peer is not a qjamfab "
                f"master of protocol version {protocol.VERSION}"
            ) from exc

    def handle(self, channel: Channel, kind: int, head: dict, parts: list) -> None:
        if kind == protocol.FUNC:
            job = bytes(parts[0])
            in_flight = {task[0]["func"] for task in self.pending}
            self.jobs.put(head["hash"], job, len(job), pinned=in_flight)
        elif kind == protocol.TASK:
            self._begin_run(head["run"])
            if head["params"]:
                self.run_params = parts
            # A TASK of inline calls carries its own payload (calls.py).
            own = parts if head.get("calls") else self.run_params
            self.pending.append([head, own, False])
        elif kind == protocol.PARAMS:
            self._begin_run(head["run"])
            self.run_params = parts
            if "path" in head:
                self.run_params = self._map_params(head["path"])
        elif kind == protocol.CLEAR:
            self.jobs.clear()
            channel.send(protocol.CLEAR, self.cache.clear())
            return
        elif kind == protocol.STATS:
            stats = self.cache.stats()
            stats.update(
                pid=os.getpid(),
                name=self.name,
                uptime_s=time.time() - self.started,
                jobs=len(self.jobs),
                job_bytes=self.jobs.bytes,
            )
            channel.send(protocol.STATS, stats)
            return
        elif kind == protocol.ATTACH:  # the agent hands over the stream
            channel.send(protocol.STATE, {"state": "ready"})
            raise HandOver()
        elif kind == protocol.PACKAGES:  # shipped packages, from the agent
            use_in_daemon(self.base, self.name, head)
        elif kind == protocol.FETCH:
            parked = self.parked.pop(head["task"], None)
            if parked is None:
                raise ProtocolError(
                    f"a FETCH for task {head['task']!r}, which is not parked "
                    f"here: the peer is not a qjamfab master of protocol "
                    f"version {protocol.VERSION}"
                )
            channel.send(protocol.RESULT, *parked)
        elif kind == protocol.CANCEL:
            self.parked.pop(head["task"], None)  # another copy won
            queued = [p for p in self.pending if p[0]["task"] == head["task"]]
            for entry in queued:
                self.pending.remove(entry)
                channel.send(protocol.STATE, {**_reply(entry[0]), "state": "cancelled"})

    def _begin_run(self, run: int) -> None:
        if run != self.run_id:
            # A new run: whatever an interrupted earlier run left waiting
            # for data will never get it.
            self.run_id = run
            self.pending.clear()
            self.parked.clear()

    def _map_params(self, path: str) -> list:
        """The run's params, shared on this host; or, when they cannot be
        mapped, an empty list: its tasks fail saying why (`_run`)."""
        self.params_error = None
        try:
            return open_params(path)
        except (OSError, ValueError) as exc:
            self.params_error = OSError(
                f"the run's params, written once for this host at {path}, "
                f"cannot be mapped here ({type(exc).__name__}: {exc}); set "
                "QJAMFAB_SHARE_PARAMS=0 on the master to send them to each "
                "worker instead"
            )
            return []

    def _run_calls(self, channel: Channel, head: dict, parts: list) -> None:
        """Run a TASK of inline calls (calls.py) and send its one RESULT
        (or ERROR)."""
        reply = {"task": head["task"], "run": head["run"]}
        self.capture.begin()
        self.busy = True
        try:
            compute_s, payload = calls.execute(parts)
        except Exception as exc:
            channel.send(protocol.ERROR, {**reply, **calls.load_error(exc)})
            return
        finally:
            self.busy = False
            self.capture.end()
        channel.send(
            protocol.RESULT,
            {**reply, "compute_s": compute_s, "calls": head["calls"]},
            [payload],
        )

    def _run_next(self, channel: Channel) -> bool:
        """Run the first queued task if it has all it needs (True), else
        report once what it lacks (False)."""
        if not self.pending:
            return False
        head, params_parts, asked = self.pending[0]
        if head.get("calls"):  # inline calls: no job, no slices
            self.pending.pop(0)
            self._run_calls(channel, head, params_parts)
            return True
        missing_func = head["func"] not in self.jobs
        try:
            missing_refs = self.cache.missing(task_refs(head))
        except Exception as exc:
            # A slice this Python cannot unpickle (a module it lacks):
            # the task's error, not the daemon's end.
            self.pending.pop(0)
            channel.send(
                protocol.ERROR, {**_reply(head), **error_fields("loading a slice", exc)}
            )
            return True
        if missing_func or missing_refs:
            # Asked once per ref: again only for one that went missing since
            # (found damaged, or evicted), else the task would wait forever.
            new = [r for r in missing_refs if asked is False or r not in asked]
            if asked is False or new:
                channel.send(
                    protocol.STATE,
                    {
                        **_reply(head),
                        "state": "blocked",
                        "refs": new,
                        "func": missing_func and asked is False,
                        "damaged": self.cache.take_damaged(),
                    },
                )
            self.pending[0][2] = set(missing_refs)
            return False
        self.pending.pop(0)
        self._run(channel, head, params_parts)
        return True

    def _job(self, func_hash: str) -> tuple:
        job = self.jobs.get(func_hash)
        if job is None:  # _run_next saw it, and only a FUNC evicts
            raise KeyError(f"job {func_hash} is not held here")
        if isinstance(job, bytes):
            check_job(job, func_hash)
            loaded = load_job(job)
            self.jobs.put(func_hash, loaded, len(job))  # sized by its bytes
            return loaded
        return job

    def _heartbeat(self, channel: Channel, stop: threading.Event) -> None:
        """Tell the master we are alive; and if the master hangs up while a
        task runs, end this process: nobody wants that result, and a
        daemon stuck in it would turn the next Master away."""
        hangup = select.poll()
        hangup.register(channel.read_fd, 0)  # POLLHUP and POLLERR only
        while not stop.wait(protocol.HEARTBEAT_INTERVAL_S):
            if self.busy and self.exit_on_hangup and hangup.poll(0):
                os._exit(0)
            try:
                if self.heartbeats:
                    channel.send(protocol.HEARTBEAT, {})
            except OSError:
                return

    def _run(self, channel: Channel, head: dict, params_parts: list) -> None:
        if not params_parts and self.params_error is not None:
            fields = error_fields("loading params", self.params_error)
            channel.send(protocol.ERROR, {**_reply(head), **fields})
            return
        self.capture.begin()
        self.busy = True

        def progress(done: int) -> None:  # for progress bars
            channel.send(
                protocol.STATE, {**_reply(head), "state": "progress", "done": done}
            )

        try:
            outcome = execute(
                head,
                lambda: self._job(head["func"]),
                params_parts,
                self.cache.get,
                progress,
                passes=(CacheEntryLost,),
            )
        except CacheEntryLost:
            # A slice damaged or removed under this task: not the job's
            # fault. Queued again as never asked, it reports the refs now
            # missing and the master sends them.
            self.busy = False
            self.capture.end()
            self.pending.insert(0, [head, params_parts, False])
            return
        self.busy = False
        self.capture.end()
        if outcome.error is not None:
            channel.send(protocol.ERROR, {**_reply(head), **outcome.error})
            return
        done = {
            **_reply(head),
            "compute_s": outcome.compute_s,
            "slices": outcome.slices,
        }
        payload = outcome.payload
        size = protocol.frame_size(payload)
        park = head.get("park")
        if park is not None and size >= park:
            self.parked[head["task"]] = (done, payload)
            channel.send(protocol.STATE, {**done, "state": "parked", "bytes": size})
        else:
            channel.send(protocol.RESULT, done, payload)


def _reply(task_head: dict) -> dict:
    """The head every answer about a task starts with: the task and its
    run (the master drops what names an earlier run)."""
    return {"task": task_head["task"], "run": task_head["run"]}


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qjamfab-worker")
    parser.add_argument("--name", required=True)
    parser.add_argument("--base", default=None)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pipe", action="store_true")
    mode.add_argument("--socket")
    parser.add_argument("--idle-timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)

    os.umask(0o077)
    # "qjamfab-local-0"; a daemon, "worker-3", is "qjamfab-w3".
    daemon = args.name.startswith("worker-")
    set_process_name("qjamfab-" + ("w" + args.name[7:] if daemon else args.name))
    if args.socket:
        # A daemon's own exit status is known only to its parent: a small
        # keeper process, forked before anything starts, records it.
        child = os.fork()
        if child:
            set_process_name("qjamfab-keeper")
            keep(child, args.socket[: -len(".sock")] + ".exit")
    tune_malloc()
    base = os.path.expanduser(args.base or default_base())
    try:
        secure_dir(base)
        logs = secure_host_dir(base)  # pid-named files: this host's own
        cache = RefCache(os.path.join(base, "cache"))
        jobs_budget = job_budget()
    except (OSError, CacheLimitError) as exc:
        sys.exit(str(exc))  # its first line says what to do
    # Ctrl-C at the master's terminal is the master's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    log = DaemonLog(os.dup(2))
    sys.excepthook = log.exception
    threading.excepthook = log.thread_exception
    protocol_in, protocol_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    capture = Capture(os.path.join(logs, f"{args.name}-{os.getpid()}.out"))
    worker = Worker(args.name, base, cache, capture, jobs_budget)
    # clear-cache reaches an idle daemon's memory this way.
    signal.signal(signal.SIGUSR1, lambda *_: worker.cache.drop_memory())
    if args.pipe:
        try:
            worker.serve(fd_channel(protocol_in, protocol_out))
        except ConnectionError:
            pass  # the master hung up as we wrote to it
        except ProtocolError as exc:
            log.write(
                f"qjamfab worker {args.name} stopped: its master's "
                f"stream broke the protocol ({exc}); start the Master "
                "again"
            )
            sys.exit(1)
    else:
        serve_socket(worker, args.socket, args.idle_timeout, log)
    capture.end()
    os.unlink(capture.path)
