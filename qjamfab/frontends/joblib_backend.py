"""The joblib backend "qjamfab": `joblib.Parallel` and scikit-learn's
`n_jobs` on a Master's workers.

This module owns the adapter between joblib's documented backend API
(`ParallelBackendBase`, `register_parallel_backend`, as joblib's own loky
and Dask backends use it) and the Master's Executor (futures/executor.py):

    import joblib
    from qjamfab import Master

    with Master(["a", "b"]) as m, joblib.parallel_config(backend="qjamfab",
                                                         master=m):
        joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)
        GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)

`qjamfab/__init__.py` registers the backend when joblib is installed
(`pip install 'qjamfab[joblib]'`); this module imports joblib, so import
it only then.

- Each batch joblib dispatches is one `Master.submit` of
  `futures_remote.call_batch` over the batch's plain (function, args,
  kwargs) calls, taken out of joblib's `BatchedCalls`: a host needs no
  joblib, only what the calls use (scikit-learn for its estimators: ship
  it with `packages=with_dependencies("scikit-learn")`). Batches are sized
  by joblib's `AutoBatchingMixin`, as for loky and Dask: batches grow
  until one takes at least 0.2 s.
- `effective_n_jobs` is the worker count: `n_jobs=-1` (and `None`,
  scikit-learn's default, under this backend as under Dask's) means every
  worker, `-2` all but one, a positive n at most the workers. When that
  comes to 1, joblib runs the calls in this process, as it does for any
  backend.
- Without `master=`, the backend opens a `Master(**options)` (the options
  are Master's: `hosts=`, `workers_per_host=`, `ssh_config=`, ...; no
  hosts means $QJAMFAB_HOSTS, else local workers) when joblib first needs
  it, and closes it when joblib terminates the backend, at the end of each
  `Parallel` call (or `with Parallel(...)` block). A `master=` you give
  stays open: it is yours.
- Nested `Parallel` calls (a `Parallel` inside a task) run sequentially
  on the worker: the workers are already one per core.
- When a task raises, joblib re-raises it (the remote traceback is its
  `__cause__`, see futures/executor.py) and `abort_everything` cancels the batches
  not yet started.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

try:
    from joblib import register_parallel_backend
    from joblib.parallel import (
        AutoBatchingMixin,
        BatchedCalls,
        ParallelBackendBase,
        SequentialBackend,
    )
except ImportError as exc:  # pragma: no cover - only without joblib
    raise ImportError(
        "qjamfab's joblib backend needs joblib, which is not installed: "
        "pip install 'qjamfab[joblib]'"
    ) from exc

from ..futures import remote as futures_remote
from ..master import Master

NAME = "qjamfab"


def _master_options() -> set[str]:
    params = inspect.signature(Master.__init__).parameters
    return {name for name in params if name != "self"}


class QjamfabBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase over a Master (see the module docstring).

    `QjamfabBackend(master=None, **master_options)`: the Master to use, or
    the options of the Master it opens itself.
    """

    supports_retrieve_callback = True
    default_n_jobs = -1
    uses_threads = False
    supports_sharedmem = False

    def __init__(
        self,
        master: Master | None = None,
        *,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **master_options: Any,
    ):
        super().__init__(
            nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads
        )
        if master is not None and not isinstance(master, Master):
            raise TypeError(
                f"master= must be a qjamfab Master, not "
                f"{type(master).__name__}: pass master=Master(...), or "
                "leave it out to use $QJAMFAB_HOSTS"
            )
        if master is not None and master_options:
            raise ValueError(
                f"give either master= or Master options "
                f"({', '.join(sorted(master_options))}), not both: the "
                "options are for the Master the backend opens itself"
            )
        unknown = sorted(set(master_options) - _master_options())
        if unknown:
            raise TypeError(
                f"the qjamfab joblib backend got an unknown option "
                f"{unknown[0]!r}: give master=, or Master's own options "
                f"({', '.join(sorted(_master_options()))})"
            )
        self._given = master
        self._options = master_options
        self._owned: Master | None = None
        self._lock = threading.Lock()
        self._pending: set[Future] = set()

    @property
    def master(self) -> Master:
        """The Master the tasks run on (opened now if the backend owns it)."""
        if self._given is not None:
            if self._given.closed:
                raise ValueError(
                    "the Master given to the qjamfab joblib backend is "
                    "closed: pass an open Master as master=, or leave it "
                    "out to have the backend open one"
                )
            return self._given
        with self._lock:
            if self._owned is None:
                self._owned = Master(**self._options)
            return self._owned

    # --- ParallelBackendBase ------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """The worker count (-1 or None: all; -2: all but one; n: at most n)."""
        if n_jobs == 0:
            raise ValueError(
                "n_jobs == 0 in Parallel has no meaning: give -1 for every "
                "worker, or a positive number"
            )
        workers = len(self.master.workers)
        if n_jobs is None or n_jobs < 0:
            return max(workers + 1 + (n_jobs or -1), 1)
        return min(n_jobs, workers)

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def submit(
        self, func: Callable[[], Any], callback: Callable[[Future], Any] | None = None
    ) -> Future:
        if isinstance(func, BatchedCalls):  # joblib's wrapper stays here
            future = self.master.submit(futures_remote.call_batch, func.items)
        else:
            future = self.master.submit(func)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    # joblib < 1.5 calls apply_async.
    apply_async = submit

    def retrieve_result_callback(self, out: Future) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed: cancel the batches that have not started."""
        for future in list(self._pending):
            future.cancel()

    def terminate(self) -> None:
        """The Parallel call is over: close the Master if we opened it."""
        with self._lock:
            owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()
        self._pending.clear()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """Parallel inside a task: sequential, on that worker."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def register() -> None:
    """Make `backend="qjamfab"` known to joblib (done on `import qjamfab`)."""
    register_parallel_backend(NAME, QjamfabBackend)
