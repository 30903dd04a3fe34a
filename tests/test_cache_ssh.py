"""Over real sshd hosts: worker daemons that hold slices in memory find
their cache files damaged or truncated on disk, drop them, and the run
returns the right result from slices sent again, with the same daemons
alive (no SIGBUS, nothing blamed on the job)."""

import os
import time

import numpy as np
import pytest

from qjamfab import DataSet, Master

pytestmark = pytest.mark.timeout(120)


def _total(params, rows):
    return int(rows.sum())


def _damage(files: list[str]) -> None:
    time.sleep(0.02)  # mtimes move by the kernel's clock tick
    for i, path in enumerate(files):
        if i % 2:  # a flipped byte inside the array
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) - 1000)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0x10]))
        else:  # the daemon maps this file: reading past the end kills
            os.truncate(path, os.path.getsize(path) // 2)


def test_damaged_and_truncated_files_on_hosts_are_sent_again(ssh):
    opts = dict(workers_per_host=1, ssh_config=ssh.ssh_config)
    data = np.arange(400_000, dtype=np.int64)
    dataset = DataSet(data, slice_size=50_000)
    aliases = ssh.aliases[:2]
    with Master(aliases, **opts) as m:
        m.clear_cache()
        assert m.run(_total, dataset=dataset) == int(data.sum())
        pids = {name: s["pid"] for name, s in m.worker_stats().items()}
        files = [
            os.path.join(ssh.homes[a], "cache", n)
            for a in aliases
            for n in os.listdir(os.path.join(ssh.homes[a], "cache"))
            if not n.endswith(".tmp")
        ]
        assert len(files) == 8
        _damage(files)
        # The daemons still hold every slice in memory, mapped from these
        # files (a later session's daemons are fresh, and read them anew).
        assert m.run(_total, dataset=dataset) == int(data.sum())
        assert m.last_run.slices_sent == 8
        assert m.last_run.damaged_slices == 8
        assert {n: s["pid"] for n, s in m.worker_stats().items()} == pids
        assert sum(s["damaged"] for s in m.worker_stats().values()) == 8
        assert m.run(_total, dataset=dataset) == int(data.sum())
        assert m.last_run.slices_sent == 0


@pytest.mark.parametrize("order", ["C", "F"])
def test_slices_sealed_with_the_masters_digests_pass_the_next_sessions_check(
    ssh, order
):
    """A C-ordered array's slices over 8 MiB travel with the master's
    digests of their blocks and are sealed with them, unhashed on the host
    (an F-ordered array's are not contiguous: hashed there). Either way
    the next session's fresh daemons check the files and use them."""
    opts = dict(workers_per_host=1, ssh_config=ssh.ssh_config)
    data = np.array(np.arange(3 << 20, dtype=np.float64).reshape(-1, 8), order=order)
    dataset = DataSet(data, slice_size=len(data) // 2)  # 12 MiB a slice
    aliases = ssh.aliases[:2]
    with Master(aliases, **opts) as m:
        m.clear_cache()
        assert m.run(_total, dataset=dataset) == int(data.sum())
        assert m.last_run.slices_sent >= 2
    with Master(aliases, **opts) as m:
        assert m.run(_total, dataset=dataset) == int(data.sum())
        assert m.last_run.damaged_slices == 0
        assert sum(s["damaged"] for s in m.worker_stats().values()) == 0
