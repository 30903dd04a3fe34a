"""A Dask cluster whose workers have nothing of qjamfab installed (only
Dask, numpy and cloudpickle, as a cluster's image would): the Master's
first plugin installs the worker bundle there, by value.

The workers run `python -S` with the site-packages directories on
PYTHONPATH, from a directory of their own: without `site`, the editable
install of this checkout (a .pth file) is not on their path, so qjamfab
cannot be imported there unless the Master brings it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from qjamfab import DataSet, Master
from tests.jobs import constant, inner_product

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def bare_workers(tmp_path):
    """A scheduler here and two Dask worker processes lacking qjamfab."""
    cluster = distributed.LocalCluster(
        n_workers=0,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    )
    client = distributed.Client(cluster, set_as_default=False)
    paths = sysconfig.get_paths()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            dict.fromkeys([paths["purelib"], paths["platlib"]])
        ),
    }
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-S",
                "-m",
                "distributed.cli.dask_worker",
                cluster.scheduler_address,
                "--nthreads=1",
                "--no-nanny",
                "--no-dashboard",
                f"--local-directory={tmp_path / f'w{k}'}",
                f"--name=bare-{k}",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k in range(2)
    ]
    try:
        client.wait_for_workers(2, timeout=60)
        yield client
    finally:
        client.close()
        for proc in workers:
            proc.terminate()
        for proc in workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster.close()


def test_workers_without_qjamfab_serve_a_master(bare_workers):
    client = bare_workers
    # Nothing of ours there before the Master comes.
    assert set(client.run(importlib.util.find_spec, "qjamfab").values()) == {None}
    data = DataSet(np.arange(2000, dtype=np.float64).reshape(200, 10))
    with Master(client) as m:
        assert m.run(constant) == 42 * 2
        expected = float(np.arange(2000, dtype=np.float64).sum())
        assert m.run(inner_product, params=np.ones(10), dataset=data) == expected
        assert m.last_run.dataset_bytes_sent > 0
        assert m.run(inner_product, params=np.ones(10), dataset=data) == expected
        assert m.last_run.dataset_bytes_sent == 0  # cached on the workers
    # A second Master finds the bundle installed and the slices cached.
    with Master(client) as m:
        assert m.run(inner_product, params=np.ones(10), dataset=data) == expected
        assert m.last_run.dataset_bytes_sent == 0
