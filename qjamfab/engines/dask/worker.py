"""qjamfab inside a Dask worker: the worker plugin and the functions the
Master submits to it (see engine.py, session.py and link.py for
the Master's side).

This module runs in Dask worker processes, from the bundle the Master's
first plugin installs there (boot.py): Dask workers need nothing of
qjamfab installed. Only session.py and link.py import it here,
once a Master is given a Dask cluster: importing qjamfab never imports
Dask.

`QjamfabPlugin` is registered once per cluster (idempotent: a second
Master, or a new Client, finds the one already there) and lives as long as
its Dask worker process. It owns what our own worker daemons own
(runtime/worker.py): the jobs by hash, and the slice cache by content
hash, a `RefCache` in memory and on the worker's disk, in `qjamfab-cache`
next to the Dask worker's own local directory (in the workspace every Dask
worker of that machine shares, `temporary-directory` in Dask's config or
the cluster's `local_directory`): so the slices outlive the Client, the
Master and the worker process itself (a nanny's restart), and every Dask
worker on a machine reads what one of them received.

`run_task` is one TASK: store the slices that came with it, say what is
still missing (the master then sends it), or run mapfunc over the slices,
combine with the job's reduce and return the encoded value with what the
job printed. A job's `sys.exit` ends the task, not the Dask worker (which
may be someone else's): the Master treats it as a lost worker, as
elsewhere. What a job prints is captured per task: fds 1 and 2 (Python
and C alike) when the Dask worker runs one thread, else Python's
sys.stdout and sys.stderr of the task's own thread.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any, TextIO, cast

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from ... import protocol
from ...runtime import calls
from ...runtime.cache import RefCache
from ...runtime.capture import c_stdio_flush
from ...runtime.pins import CacheLimitError
from ...runtime.task import check_job, error_fields, execute, load_job, task_refs
from ...runtime.worker import tune_malloc

if TYPE_CHECKING:
    from distributed import Worker

PLUGIN_NAME = "qjamfab"
_JOBS_KEPT = 64  # jobs unpickled and kept per Dask worker, latest used
_CAPTURE_RESET = 1 << 20  # the capture file starts over past this size


class QjamfabPlugin(WorkerPlugin):
    """The state qjamfab keeps in one Dask worker process."""

    idempotent = True
    name = PLUGIN_NAME

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        self.lock = threading.Lock()  # the cache serves the worker's threads
        # hash -> the job's bytes, or (mapfunc, reduce) once unpickled
        self.jobs: collections.OrderedDict[str, bytes | tuple] = (
            collections.OrderedDict()
        )
        self.started = time.time()
        self.threads = worker.state.nthreads
        self._cache: RefCache | None = None
        self._capture: IO[bytes] | None = None  # _Capture's, made on first use
        self._streams: tuple[TextIO, TextIO] | None = None
        # As in our own workers: numpy temporaries stay in the heap, not
        # mapped and unmapped on every call (Dask's nanny sets
        # MALLOC_TRIM_THRESHOLD_, which also stops glibc from raising its
        # mmap threshold itself). Measured: the sparse autoencoder's
        # mapfunc computes in 13 ms instead of 23 ms in a Dask worker.
        tune_malloc()
        if self.threads > 1:
            # Several tasks at once: fds 1 and 2 cannot tell them apart.
            self._streams = sys.stdout, sys.stderr
            # (duck-typed: a _ThreadStream passes on what it does not do)
            sys.stdout, sys.stderr = (
                cast(TextIO, _ThreadStream(sys.stdout)),
                cast(TextIO, _ThreadStream(sys.stderr)),
            )

    def teardown(self, worker: Worker) -> None:
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
        if self._cache is not None:
            self._cache.drop_memory()
        if self._capture is not None:
            self._capture.close()

    def cache_directory(self) -> str:
        return os.path.join(
            os.path.dirname(os.path.abspath(self.worker.local_directory)),
            "qjamfab-cache",
        )

    def capture_fd(self) -> int:
        """The file a task's fds 1 and 2 point at (unlinked, private)."""
        if self._capture is None:
            self._capture = tempfile.TemporaryFile(dir=self.worker.local_directory)
        return self._capture.fileno()

    def cache(self) -> RefCache:
        """The slice cache, opened on first use (raises OSError when its
        directory cannot be used, CacheLimitError for a bad
        QJAMFAB_CACHE_LIMIT)."""
        if self._cache is None:
            self._cache = RefCache(self.cache_directory())
        return self._cache

    def refs(self) -> list[str]:
        """The slices in this machine's cache directory, which this worker
        can use without asking (the master places slices where they are)."""
        return sorted(
            name
            for name in os.listdir(self.cache().directory)
            if not name.endswith(".tmp")
        )

    def store(self, slices: Iterable[tuple[str, list]]) -> None:
        """Slices sent by the master: into the cache, sealed."""
        cache = self.cache()
        for ref, parts in slices:
            with self.lock:
                cache.receive(
                    ref,
                    [memoryview(p).nbytes for p in parts],
                    _parts_reader(parts),
                    None,
                )

    def add_job(self, func_hash: str, data: bytes) -> None:
        check_job(data, func_hash)
        self.jobs[func_hash] = data
        self._trim_jobs()

    def job(self, func_hash: str) -> tuple:
        job = self.jobs[func_hash]
        self.jobs.move_to_end(func_hash)
        if isinstance(job, bytes):
            job = self.jobs[func_hash] = load_job(job)  # checked by add_job
        return job

    def _trim_jobs(self) -> None:
        while len(self.jobs) > _JOBS_KEPT:
            self.jobs.popitem(last=False)


def _parts_reader(parts: list) -> protocol.FrameReader:
    """A FrameReader over payload parts already in memory, so the cache
    stores them as it stores a stream's REFS payload."""
    views = collections.deque(memoryview(p).cast("B") for p in parts)

    def readinto(buffer: memoryview) -> int:
        while views and not len(views[0]):
            views.popleft()
        if not views:
            return 0
        n = min(len(buffer), len(views[0]))
        buffer[:n] = views[0][:n]
        views[0] = views[0][n:]
        return n

    return protocol.FrameReader(readinto)


def _ours(worker: Worker) -> QjamfabPlugin | None:
    """The worker's qjamfab plugin, None when it has none. (distributed
    types a worker's plugins as WorkerPlugin: the one under PLUGIN_NAME is
    a QjamfabPlugin, registered by session.py.)"""
    return cast("QjamfabPlugin | None", worker.plugins.get(PLUGIN_NAME))


def _plugin() -> QjamfabPlugin:
    plugin = _ours(get_worker())
    if plugin is None:
        raise RuntimeError(
            "qjamfab's worker plugin is not on this Dask worker: create a "
            "new Master, which registers it"
        )
    return plugin


def hello(dask_worker: Worker) -> dict:
    """What the Master checks and keeps of a Dask worker (Client.run)."""
    plugin = _ours(dask_worker)
    out = {
        "version": protocol.VERSION,
        "python": list(sys.version_info[:3]),
        "pid": os.getpid(),
        "name": str(dask_worker.name),
        "address": dask_worker.address,
        "threads": dask_worker.state.nthreads,
        "error": None,
        "refs": [],
    }
    if plugin is None:
        out["error"] = "qjamfab's worker plugin is not on it"
        return out
    try:
        out["refs"] = plugin.refs()
    except CacheLimitError as exc:
        out["error"] = f"{exc} (in the Dask workers' environment)"
    except OSError as exc:
        why = str(exc).split("; ")[0]  # what to do differs on Dask
        out["error"] = (
            f"its slice cache {plugin.cache_directory()} cannot be used "
            f"({why}): give the Dask workers a local directory of your own "
            "(--local-directory, or the cluster's local_directory=)"
        )
    return out


def clear(dask_worker: Worker) -> dict:
    """CLEAR: empty this worker's jobs and cache, memory and disk."""
    plugin = cast(QjamfabPlugin, dask_worker.plugins[PLUGIN_NAME])  # see _ours
    plugin.jobs.clear()
    with plugin.lock:
        return plugin.cache().clear()


def stats(dask_worker: Worker) -> dict:
    """STATS: the cache's entries and bytes, and who this worker is."""
    plugin = cast(QjamfabPlugin, dask_worker.plugins[PLUGIN_NAME])  # see _ours
    with plugin.lock:
        out = plugin.cache().stats()
    out.update(
        pid=os.getpid(),
        name=str(dask_worker.name),
        address=dask_worker.address,
        uptime_s=time.time() - plugin.started,
    )
    return out


def store(slices: list[tuple[str, list]]) -> None:
    """REFS outside a task (a replica): keep them."""
    _plugin().store(slices)


def run_task(
    blob: bytes, slices: list[tuple[str, list]] | None, *params_buffers: object
) -> dict:
    """One TASK: `blob` pickles (head, the params' main part, the job's
    bytes or None); `slices` are the ones the master sent with it, and
    `params_buffers` the params' out-of-band parts.

    Returns {"blocked": {refs, func}} when something is still missing,
    else {"log": text} and one of {"result": parts, "compute_s"},
    {"error": {phase, type, message, traceback}} or {"exit": status}.
    """
    head, params_main, func = pickle.loads(blob)
    params = [params_main, *params_buffers]
    if head.get("calls"):  # inline calls: their payload is the params
        return _run_calls(params)
    try:
        plugin = _plugin()
        if func is not None:
            plugin.add_job(head["func"], func)
        if slices:
            plugin.store(slices)
        cache = plugin.cache()
        with plugin.lock:
            missing = cache.missing(task_refs(head))
        missing_func = head["func"] not in plugin.jobs
    except Exception as exc:
        return {"log": "", "error": error_fields("setting up the task", exc)}
    if missing or missing_func:
        return {"blocked": {"refs": missing, "func": missing_func}}
    with _Capture(plugin) as capture:
        reply = _run(plugin, cache, head, params)
    reply["log"] = capture.text
    return reply


def _run_calls(parts: list) -> dict:
    """A TASK of inline calls (runtime/calls.py), as run_task replies."""
    with _Capture(_plugin()) as capture:
        try:
            compute_s, payload = calls.execute(parts)
            reply: dict = {"result": [payload], "compute_s": compute_s, "slices": 0}
        except Exception as exc:
            reply = {"error": calls.load_error(exc)}
    reply["log"] = capture.text
    return reply


def _run(
    plugin: QjamfabPlugin, cache: RefCache, head: dict, params_parts: list
) -> dict:
    """mapfunc over the task's slices, combined: the task core
    (runtime/task.py) our own workers run."""

    def piece(ref: str) -> object:
        with plugin.lock:
            return cache.get(ref)

    try:
        outcome = execute(head, lambda: plugin.job(head["func"]), params_parts, piece)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)  # as Python does on exit
        return {"exit": status}
    if outcome.error is not None:
        return {"error": outcome.error}
    return {
        "result": outcome.payload,
        "compute_s": outcome.compute_s,
        "slices": outcome.slices,
    }


class _ThreadStream:
    """sys.stdout or sys.stderr of a Dask worker with several threads:
    what a thread writes while it runs a qjamfab task goes to that task's
    buffer, anything else to the stream it replaces."""

    _buffers = threading.local()

    def __init__(self, inner: TextIO):
        self._inner = inner

    @classmethod
    def begin(cls) -> io.StringIO:
        cls._buffers.current = io.StringIO()
        return cls._buffers.current

    @classmethod
    def end(cls) -> None:
        cls._buffers.current = None

    def write(self, text: str) -> int:
        buffer = getattr(self._buffers, "current", None)
        if buffer is None:
            return self._inner.write(text)
        return buffer.write(text)

    def flush(self) -> None:
        if getattr(self._buffers, "current", None) is None:
            self._inner.flush()

    def __getattr__(self, name: str) -> Any:  # the wrapped stream's
        return getattr(self._inner, name)


class _Capture:
    """What a task prints, as text (`.text` after the block): fds 1 and 2
    point at the plugin's capture file meanwhile (one thread), or the
    task's thread writes Python's streams to a buffer (several)."""

    def __init__(self, plugin: QjamfabPlugin):
        self._plugin = plugin
        self.text = ""

    def __enter__(self) -> _Capture:
        if self._plugin.threads > 1:
            self._buffer = _ThreadStream.begin()
            return self
        _flush_all()
        fd = self._plugin.capture_fd()
        self._start = os.lseek(fd, 0, os.SEEK_END)
        if self._start > _CAPTURE_RESET:
            os.ftruncate(fd, 0)
            self._start = os.lseek(fd, 0, os.SEEK_SET)
        self._saved = os.dup(1), os.dup(2)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._plugin.threads > 1:
            _ThreadStream.end()
            self.text = self._buffer.getvalue()
            return
        _flush_all()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        fd = self._plugin.capture_fd()
        end = os.lseek(fd, 0, os.SEEK_CUR)
        self.text = os.pread(fd, end - self._start, self._start).decode(
            "utf-8", "replace"
        )


def _flush_all() -> None:
    """Python's streams and C stdio's buffers (a C extension's printf)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    c_stdio_flush()
