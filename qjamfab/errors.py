"""Every error qjamfab raises: one hierarchy under QjamfabError.

Each message's first line says what happened and what to do; detail (a
remote traceback, a stderr tail) follows on later lines. Foreign exceptions
(the OS's, paramiko's, Dask's) are mapped into this hierarchy by one table,
foreign.py's, at the link boundary; connecting over SSH by hosts.py; what
cannot be pickled where it is encoded (serialize.py, dataset.py).
"""

from __future__ import annotations


class QjamfabError(Exception):
    """Base class of every qjamfab error."""


class ConfigError(QjamfabError, ValueError):
    """An argument of the Master (or a setting it reads) that it cannot use:
    raised by its constructor, before anything starts (a ValueError too)."""


# --- hosts and connections -------------------------------------------------


class HostError(QjamfabError):
    """Something is wrong with one host; `host` names it."""

    def __init__(self, message: str, host: str | None = None):
        super().__init__(message)
        self.host = host


class BadHostSpec(HostError):
    """A host string that cannot be parsed."""


class HostUnreachable(HostError):
    """The host refused, timed out or could not be resolved."""


class AuthenticationFailed(HostError):
    """SSH authentication failed for the host."""


class HostKeyError(HostError):
    """The host's key is unknown or has changed."""


class PreflightFailed(HostError):
    """The host lacks what a worker needs (python, versions, disk)."""


# --- workers and the wire --------------------------------------------------


class ProtocolError(QjamfabError):
    """A peer sent something the protocol does not allow."""


class WorkerLost(QjamfabError):
    """A worker died or stopped answering. `worker` names it."""

    def __init__(
        self,
        message: str,
        worker: str | None = None,
        exit_status: int | None = None,
        stderr_tail: str = "",
    ):
        super().__init__(message)
        self.worker = worker
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


class RemoteError(QjamfabError):
    """User code raised on a worker. Carries the remote traceback text."""

    def __init__(
        self,
        message: str,
        worker: str | None = None,
        remote_type: str = "",
        remote_traceback: str = "",
    ):
        super().__init__(message)
        self.worker = worker
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


# --- what the user submitted -----------------------------------------------


class JobError(QjamfabError):
    """The job, its params, its dataset or its results are unusable."""


class BadJob(JobError):
    """The job is not a module with mapfunc, nor a callable."""


class BadParams(JobError):
    """params cannot be pickled."""


class BadDataSet(JobError):
    """The dataset cannot be sliced, is empty, or a slice cannot be pickled."""


class ReduceError(JobError):
    """Results that the reduce cannot combine."""


class BadPackage(QjamfabError, ValueError):
    """A name in `packages=` that this master cannot ship: not installed
    here, a module's name rather than its distribution's, an editable
    install, or something the runtime ships already (packages.py)."""


class MissingDependency(QjamfabError, ImportError):
    """An optional extra that a call needs is not installed (also an
    ImportError): `qjamfab.minimize` without scipy."""


# --- the Executor (futures/executor.py) ---------------------------------------------


class ExecutorShutdown(QjamfabError, RuntimeError):
    """submit() or map() after shutdown() or close() (a RuntimeError, as
    concurrent.futures raises)."""


def describe_exit(status: int | None) -> str:
    """How a process ended, as a message says it: "exit status 3", or the
    signal by name ("killed by SIGKILL") for a negative status."""
    if status is None:
        return "exit status unknown"
    if status < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
