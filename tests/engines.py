"""The engines the behaviour suites run on, behind one fixture (`engine`
in tests/conftest.py): one host whose agent and workers are threads of
this process (`inproc`), local worker
processes (`local`), one SSH host of the `ssh` fixture (`ssh`: host1, so a
host of several workers has its agent) and a real Dask LocalCluster of two
worker processes (`dask`). An `Engine` makes Masters of that kind and
says what differs between kinds: worker names, how a job kills its
worker, where the slice cache lives."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from qjamfab import Master

ENGINES = ["inproc", "local", "ssh", "dask"]


class Engine:
    """Masters of one engine kind, and what differs by kind."""

    def __init__(self, kind: str, fixture: Callable[[str], object]):
        self.kind = kind
        self._fixture = fixture  # request.getfixturevalue: ssh, dask_cluster

    def __repr__(self) -> str:
        return f"Engine({self.kind})"

    @property
    def prefix(self) -> str:
        """What the names of this engine's workers start with."""
        return {"ssh": "host1-"}.get(self.kind, f"{self.kind}-")

    def master(self, workers: int = 2, **options) -> Master:
        """A Master of `workers` workers on this engine (Dask: the
        cluster's two)."""
        if self.kind == "ssh":
            ssh = self._fixture("ssh")
            return Master(
                ["host1"],
                workers_per_host=workers,
                ssh_config=ssh.ssh_config,
                **options,
            )
        if self.kind == "dask":
            assert workers == 2, "Dask decides how many workers: two here"
            _, client = self._fixture("dask_cluster")
            client.wait_for_workers(2, timeout=60)
            return Master(client, **options)
        return Master(f"{self.kind}:{workers}", **options)

    def cache_dir(self) -> str | None:
        """The slice cache on disk of this engine's workers (None: Dask's,
        which its workers place)."""
        if self.kind == "ssh":
            return os.path.join(self._fixture("ssh").homes["host1"], "cache")
        if self.kind == "dask":
            return None
        return os.path.join(os.environ["QJAMFAB_HOME"], "cache")


def die(kind: str, status: int | None = None) -> None:
    """From inside a job: end its worker with exit `status`, or by SIGKILL
    when None (an inproc worker: as if its process had; a Dask one, whose
    process is the Dask worker's, by sys.exit, with 9 for SIGKILL)."""
    if kind == "inproc":
        from qjamfab.engines import inproc  # a job's import: where it runs

        inproc.die(9 if status is None else status)
    if kind == "dask":
        sys.exit(9 if status is None else status)
    if status is None:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(status)
