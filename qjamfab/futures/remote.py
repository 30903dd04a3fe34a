"""What the joblib backend (joblib_backend.py) submits for each batch, run
on a worker.

This module is never imported on a worker: executor.py registers it with
`cloudpickle.register_pickle_by_value`, so `call_batch` travels by value
inside the calls (runtime/calls.py runs them). So it uses only the
standard library, and joblib where the host has it.
"""

from __future__ import annotations


def call_batch(calls: list) -> list:
    """A joblib batch on a worker: each (fn, args, kwargs) in turn, their
    results in order; the first to raise fails the batch, as in joblib's
    BatchedCalls. Where joblib is installed, a Parallel inside a call runs
    sequentially: the workers are one per core already."""
    try:
        from joblib import parallel_config
    except ImportError:  # then no call here can start a Parallel either
        return [fn(*args, **kwargs) for fn, args, kwargs in calls]
    with parallel_config(backend="sequential"):
        return [fn(*args, **kwargs) for fn, args, kwargs in calls]
