"""Real Dask clusters for the tests: a distributed.LocalCluster of worker
processes (one thread each unless asked, with nannies) started with its
own scratch directory, and stopped with a check that none of its
processes is left behind."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

try:
    import distributed
except ImportError:  # the tests that need no Dask still run
    distributed = None


def children() -> list[int]:
    """Processes whose parent is this one (the cluster's workers), but
    multiprocessing's resource tracker, which Python keeps until it ends."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if parent == os.getpid() and b"resource_tracker" not in cmdline:
                found.append(int(pid))
    return found


def need_dask() -> None:
    """Skip the calling test when Dask's distributed is not installed."""
    if distributed is None:
        pytest.skip(
            "distributed is not installed: pip install "
            "'qjamfab[dask]' to run the Dask tests"
        )


def start_cluster(tmp_path_factory, **options):
    """A LocalCluster of worker processes, and the children there were
    before it (for stop_cluster's check)."""
    need_dask()
    before = set(children())
    cluster = distributed.LocalCluster(
        processes=True,
        dashboard_address=":0",
        local_directory=str(tmp_path_factory.mktemp("dask")),
        **options,
    )
    return cluster, before


def stop_cluster(cluster, client, before) -> None:
    """Close the Client and the cluster; fail if a process of it stays."""
    client.close()
    cluster.close()
    deadline = time.monotonic() + 10
    while set(children()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = set(children()) - before
    assert not left, f"the cluster left processes behind: {_describe(left)}"


@contextmanager
def cluster_of_two(tmp_path_factory) -> Iterator[tuple]:
    """A cluster of two worker processes, one thread each, and a Client of
    it: (cluster, client), stopped (and checked) at the end."""
    cluster, before = start_cluster(tmp_path_factory, n_workers=2, threads_per_worker=1)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield cluster, client
    finally:
        stop_cluster(cluster, client, before)


def _describe(pids) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
            with open(f"/proc/{pid}/status") as f:
                state = [x for x in f if x.startswith("State")][0].strip()
        except OSError:
            continue
        out.append(f"{pid} ({state}): {cmdline}")
    return out


def pids(client) -> dict[str, int]:
    """Dask worker name -> pid."""
    names = {
        a: str(w["name"])
        for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
    }
    return {names[a]: pid for a, pid in client.run(os.getpid).items()}
