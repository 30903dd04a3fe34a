"""A full disk fails nothing (issue 11 item 8): a slice the disk fills up
under while it arrives is kept in memory, the stream still in step; a job
that prints on a full disk succeeds, its dropped output counted. On small
tmpfs mounts (root only: skipped elsewhere)."""

import contextlib
import errno
import os
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from qjamfab import protocol
from qjamfab.runtime import host_dir, secure_dir
from qjamfab.runtime.cache import RefCache
from tests.daemon_client import Daemon, job, result_value, task_head

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of `size` mounted at path (0700, ours) for the block."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path, mode=0o700, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode:
            subprocess.run(["umount", "-l", str(path)])


def fill(directory) -> None:
    """Write a file in directory until its disk is full."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        with pytest.raises(OSError) as full:
            while True:
                f.write(bytes(MiB))
        assert full.value.errno == errno.ENOSPC
        with contextlib.suppress(OSError):
            while True:  # the last pages
                f.write(bytes(4096))


def wait_for_landed(directory, nbytes: int) -> None:
    """Until a slice being written in directory holds nbytes."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for name in os.listdir(directory):
            if (
                name.endswith(".tmp")
                and os.stat(os.path.join(directory, name)).st_blocks * 512 >= nbytes
            ):
                return
        time.sleep(0.01)
    raise AssertionError("the slice did not start landing")


def _slice_frame(value, ref: str) -> bytes:
    return b"".join(
        bytes(b)
        for b in protocol.frame(protocol.REFS, {"ref": ref}, protocol.encode(value))
    )


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_disk_full_mid_slice_keeps_it_in_memory(tmp_path, kind, capsys):
    value = np.arange(3 * MiB, dtype=np.float64)  # 24 MiB
    data = _slice_frame(value, "r1")
    after = b"".join(protocol.frame(protocol.HEARTBEAT, {"next": 1}))
    with tmpfs(tmp_path / "disk", "48m") as disk:
        cache_dir = disk / "cache"
        refs = RefCache(str(cache_dir), limit="1G")  # room when it starts
        if kind == "pipe":  # spliced into the file
            read_fd, write_fd = os.pipe()
        else:  # through the reader's buffer
            a, b = socket.socketpair()
            read_fd, write_fd = a.detach(), b.detach()

        def write():
            try:
                protocol.write_all(lambda v: os.writev(write_fd, v), [data[: 10 * MiB]])
                wait_for_landed(cache_dir, 8 * MiB)
                fill(disk)
                protocol.write_all(
                    lambda v: os.writev(write_fd, v), [data[10 * MiB :], after]
                )
            finally:
                os.close(write_fd)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            reader = protocol.FrameReader(lambda v: os.readv(read_fd, [v]))
            _, _, head, lengths = reader.read_head()
            refs.receive(head["ref"], lengths, reader, read_fd)
            # Every byte of the slice and none after it were taken.
            assert reader.read()[2] == {"next": 1}
        finally:
            writer.join(20)
            os.close(read_fd)
        np.testing.assert_array_equal(refs.get("r1"), value)
        assert refs.stats()["in_memory"] == 1
        assert os.listdir(cache_dir) == []  # no half-written file left
    err = capsys.readouterr().err
    assert (
        f"the disk of {cache_dir} filled up while slice r1 arrived "
        "(No space left on device): kept in memory only" in err
    )


def test_a_daemon_keeps_a_slice_the_disk_filled_up_under(qjamfab_home):
    base = str(qjamfab_home)
    secure_dir(base)
    value = np.arange(3 * MiB, dtype=np.float64)
    data = _slice_frame(value, "r1")
    with tmpfs(os.path.join(base, "cache"), "48m") as cache_dir:
        daemon = Daemon(base, env={"QJAMFAB_CACHE_LIMIT": "1G"})
        try:
            client = daemon.connect()
            client.send_raw(data[: 10 * MiB])
            wait_for_landed(cache_dir, 8 * MiB)
            fill(cache_dir)
            client.send_raw(data[10 * MiB :])
            func, job_bytes = job(lambda _, x: float(x.sum()))
            client.send(protocol.FUNC, {"hash": func}, [job_bytes])
            client.send(
                protocol.TASK, task_head(1, func, refs=["r1"]), protocol.encode(None)
            )
            kind, head, parts = client.next()
            assert kind == protocol.RESULT, head
            assert result_value(parts) == float(value.sum())
            assert "filled up while slice r1 arrived" in "".join(client.logs)
            assert [n for n in os.listdir(cache_dir) if n != "filler"] == []
            client.close()
        finally:
            daemon.stop()


def test_a_job_that_prints_on_a_full_disk_succeeds(qjamfab_home, tmp_path):
    base = str(qjamfab_home)
    secure_dir(base)
    with tmpfs(host_dir(base), "2m") as log_dir:
        daemon = Daemon(base, stderr_path=str(tmp_path / "daemon.err"))
        try:
            fill(log_dir)

            def chatty(params, _):
                import sys

                for _ in range(200):
                    print("x" * 1000)
                    print("y" * 1000, file=sys.stderr)
                return params

            func, job_bytes = job(chatty)
            client = daemon.connect()
            client.send(protocol.FUNC, {"hash": func}, [job_bytes])
            client.send(protocol.TASK, task_head(1, func), protocol.encode(7))
            kind, head, parts = client.next()
            assert kind == protocol.RESULT, head
            assert result_value(parts) == 7
            logs = "".join(client.logs)
            assert (
                "bytes of output were dropped: the disk of "
                f"{log_dir} is full; free space there" in logs
            )
            client.close()
            assert daemon.alive()
        finally:
            daemon.stop()
