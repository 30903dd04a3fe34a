"""qjamfab: iterative, data-parallel Python on machines you reach with SSH.

    from qjamfab import Master, DataSet
    with Master("local:2") as m:
        total = m.run(lambda p, xs: p * sum(xs), params=3,
                      dataset=DataSet(list(range(100))))

The public names live in private-ish modules and are re-exported here.
"""

from .data.broadcast import Broadcast
from .data.dataset import (
    ArrayDataSet,
    BaseDataSet,
    DataSet,
    ListDataSet,
    NpyFileDataSet,
    TextMatrixDataSet,
)
from .errors import (
    AuthenticationFailed,
    BadDataSet,
    BadHostSpec,
    BadJob,
    BadPackage,
    BadParams,
    ConfigError,
    ExecutorShutdown,
    HostError,
    HostKeyError,
    HostUnreachable,
    JobError,
    MissingDependency,
    PreflightFailed,
    ProtocolError,
    QjamfabError,
    ReduceError,
    RemoteError,
    WorkerLost,
)
from .frontends.minimize import minimize
from .master import Master, RunStats
from .version import __version__ as __version__

__all__ = [
    "Master",
    "RunStats",
    "minimize",
    "Broadcast",
    "DataSet",
    "BaseDataSet",
    "ListDataSet",
    "ArrayDataSet",
    "NpyFileDataSet",
    "TextMatrixDataSet",
    "QjamfabError",
    "ConfigError",
    "HostError",
    "BadHostSpec",
    "HostUnreachable",
    "AuthenticationFailed",
    "HostKeyError",
    "PreflightFailed",
    "ProtocolError",
    "WorkerLost",
    "RemoteError",
    "JobError",
    "BadJob",
    "BadParams",
    "BadDataSet",
    "ReduceError",
    "ExecutorShutdown",
    "BadPackage",
    "MissingDependency",
]


def _register_joblib_backend() -> None:
    """joblib's backend "qjamfab", when joblib is installed (an extra)."""
    import importlib.util

    if importlib.util.find_spec("joblib") is None:
        return
    try:
        from .frontends import joblib_backend

        joblib_backend.register()
    except Exception as exc:  # a broken joblib must not break qjamfab
        import warnings

        warnings.warn(
            f"qjamfab: the joblib backend is not available "
            f"({type(exc).__name__}: {exc}); reinstall joblib "
            f"(pip install 'qjamfab[joblib]')",
            stacklevel=2,
        )


_register_joblib_backend()
