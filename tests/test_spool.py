"""Big frames through a directory both ends see (runtime/spool.py), for a
stream that holds them back (srun): the spool itself; a host's link that
spools both ways once its agent sees the directory, and does not when the
agent cannot trust it; a spooled frame that is gone is the link's loss,
saying why. The end-to-end cases run a `command:` host (this machine's
python3 over a pipe) told to spool, as a Slurm node is; test_slurm.py
runs the real one."""

import os
import stat
import sys

import numpy as np
import pytest

from qjamfab import DataSet, Master, protocol
from qjamfab.engines import cluster
from qjamfab.engines.command import CommandHost, command_host
from qjamfab.errors import ProtocolError
from qjamfab.hostspec import parse_hosts
from qjamfab.links.workers import LOST
from qjamfab.runtime import spool
from tests.test_held import _reads_from
from tests.test_workers import _peer, read_events

pytestmark = pytest.mark.timeout(90)
HOST = f"command:{sys.executable}"
PARAMS = np.arange(8192, dtype=np.float64)  # 64 KiB: over srun's 1024 bytes


def test_big_frames_go_through_the_directory_and_small_ones_stay(tmp_path):
    directory = str(tmp_path / "spool")
    token = spool.make(directory)
    assert spool.shared(directory, token)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    out = spool.Spool(directory, "m-")
    small = protocol.frame(protocol.TASK, {"task": 1})
    assert out.out(small) is small
    refs = protocol.frame(protocol.REFS, {"ref": "r"}, [bytes(5000)])
    assert out.out(refs) is refs  # slices stream whole
    big = protocol.frame(protocol.RESULT, {"task": 2}, [bytes(range(256)) * 20])
    kind, _, head, parts = protocol.FrameReader(
        _reads_from(b"".join(bytes(b) for b in out.out(big)))
    ).read()
    assert kind == protocol.SPOOL
    fd = out.take(head)
    try:
        assert sorted(os.listdir(directory)) == ["token"]  # taken: removed
        kind, _, head, parts = spool.read_frame(fd)
    finally:
        os.close(fd)
    assert (kind, head) == (protocol.RESULT, {"task": 2})
    assert bytes(parts[0]) == bytes(range(256)) * 20


def test_a_directory_this_end_cannot_trust_is_not_shared(tmp_path):
    directory = str(tmp_path / "spool")
    token = spool.make(directory)
    assert not spool.shared(directory, "0" * 32)  # another's token
    assert not spool.shared(str(tmp_path / "elsewhere"), token)  # not seen
    os.chmod(directory, 0o755)  # others could read the frames
    assert not spool.shared(directory, token)


def test_a_frame_that_cannot_be_written_there_stays_on_the_stream(
    tmp_path, monkeypatch
):
    """The directory gone, or no room on the disk: the frame goes the
    slow way, on the stream, and no part of it is left behind."""
    big = protocol.frame(protocol.RESULT, {"task": 2}, [bytes(5000)])
    gone = spool.Spool(str(tmp_path / "gone"), "m-")
    assert gone.out(big) is big
    directory = str(tmp_path / "spool")
    spool.make(directory)
    full = spool.Spool(directory, "m-")

    def no_room(fd, views):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool.os, "writev", no_room)
    assert full.out(big) is big
    assert os.listdir(directory) == ["token"]


@pytest.mark.parametrize("name", ["../token", ".hidden", 7, None])
def test_a_spool_frame_that_names_no_spooled_frame_is_refused(tmp_path, name):
    directory = str(tmp_path / "spool")
    spool.make(directory)
    with pytest.raises(ProtocolError) as info:
        spool.Spool(directory, "m-").take({"name": name})
    assert str(info.value).startswith(
        f"a SPOOL frame naming {name!r}, not a spooled frame: the peer is not "
        f"a qjamfab peer of protocol version {protocol.VERSION}"
    )


def test_a_spooled_frame_that_is_gone_loses_the_link_saying_why(tmp_path):
    directory = str(tmp_path / "spool")
    spool.make(directory)
    handle = _peer(
        "w",
        'send(protocol.SPOOL, {"name": "a1-1"}); sys.stdin.buffer.read()',
    )
    handle.link.spool = spool.Spool(directory, "m-")
    try:
        events = read_events([handle], 10)
    finally:
        handle.link.close()
    assert [kind for _, kind, _, _ in events] == [LOST]
    reason = events[0].head["reason"]
    assert reason.startswith(
        f"a frame the other end spooled is not in {directory} (No such file or "
        "directory): the directory is not shared as it was; restart the Master"
    ), reason


def scale(params, xs):
    return params * float(sum(xs))


class _Counted:
    """How many frames the master spooled out and read back."""

    def __init__(self, monkeypatch):
        self.out = self.read = 0
        real_out, real_read = spool.Spool.out, spool.read_frame

        def out(self_, buffers):
            sent = real_out(self_, buffers)
            self.out += sent is not buffers
            return sent

        def read_frame(fd):
            self.read += 1
            return real_read(fd)

        monkeypatch.setattr(spool.Spool, "out", out)
        monkeypatch.setattr(spool, "read_frame", read_frame)


@pytest.fixture
def spooling_host(monkeypatch):
    monkeypatch.setattr(CommandHost, "spools", True)
    yield HOST
    for result in cluster.stop_workers([command_host(s) for s in parse_hosts(HOST)]):
        assert result.ok, result.error


def test_a_host_that_sees_the_directory_spools_both_ways(
    spooling_host, monkeypatch, qjamfab_home
):
    counted = _Counted(monkeypatch)
    data = DataSet(list(range(8)), slice_size=1)
    with Master([spooling_host], workers_per_host=2) as m:
        for run in range(3):
            total = m.run(scale, params=PARAMS + run, dataset=data)
            assert np.array_equal(total, (PARAMS + run) * 28.0)
        # Params out, the host's combined result back, each run.
        assert counted.out >= 3 and counted.read >= 3
        assert m.last_run.bytes_sent > PARAMS.nbytes  # counted as sent
        assert m.last_run.bytes_received > PARAMS.nbytes
        assert os.listdir(qjamfab_home / "spool")  # this Master's
    assert not os.listdir(qjamfab_home / "spool")  # removed as it closed


def test_a_host_that_cannot_trust_the_directory_keeps_to_the_stream(
    spooling_host, monkeypatch
):
    make = spool.make

    def readable_by_all(directory):
        token = make(directory)
        os.chmod(directory, 0o755)
        return token

    monkeypatch.setattr(spool, "make", readable_by_all)
    counted = _Counted(monkeypatch)
    data = DataSet(list(range(8)), slice_size=1)
    with Master([spooling_host], workers_per_host=2) as m:
        total = m.run(scale, params=PARAMS, dataset=data)
        assert np.array_equal(total, PARAMS * 28.0)
    assert (counted.out, counted.read) == (0, 0)


def test_a_new_directory_clears_those_of_ended_processes_here(tmp_path):
    """A Master killed by SIGKILL leaves its spool directory: the next one
    made on this machine removes it, and no other (a live process's, or
    another machine's in a shared home)."""
    import socket
    import subprocess

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = socket.gethostname()
    root = tmp_path / "spool"
    gone = int(ended.stdout)
    left = f"{host}:{gone}:s1-aa"
    # A live process's here; another machine's whose name starts as ours.
    keep = [f"{host}:{os.getpid()}:s2-bb", f"{host}-gpu:{gone}:s3-cc"]
    for name in [left, *keep]:
        spool.make(str(root / name))
    directory, token = spool.new_dir(str(root), "s4")
    assert spool.shared(directory, token)
    assert os.path.basename(directory).startswith(f"{host}:{os.getpid()}:s4-")
    assert sorted(os.listdir(root)) == sorted([*keep, os.path.basename(directory)])
