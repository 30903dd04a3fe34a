"""The worker's slice cache on its own: a REFS payload goes from the stream
into its cache file (splice from a pipe, or through the reader's buffer
from a socket), and comes back as arrays mapped from that file, aligned
and writable."""
import os
import shutil
import socket
import threading

import numpy as np
import pytest

from qjamfab import protocol
from qjamfab.runtime import cache as cache_module
from qjamfab.runtime.cache import RefCache

pytestmark = pytest.mark.timeout(30)


def _stream(kind: str):
    """(read fd, write fd) of a pipe or a socket pair."""
    if kind == "pipe":
        return os.pipe()
    a, b = socket.socketpair()
    return a.detach(), b.detach()


def _receive(tmp_path, kind: str, value, ref: str = "r1", extra=b""):
    """Send `value` as a REFS frame (then `extra` bytes) and receive it."""
    read_fd, write_fd = _stream(kind)
    frame = protocol.frame(protocol.REFS, {"ref": ref},
                           protocol.encode(value))

    def write():
        protocol.write_all(lambda v: os.writev(write_fd, v),
                           [*frame, extra])
        os.close(write_fd)
    writer = threading.Thread(target=write)
    writer.start()
    reader = protocol.FrameReader(lambda v: os.readv(read_fd, [v]))
    try:
        kind_, _, head, lengths = reader.read_head()
        assert (kind_, head) == (protocol.REFS, {"ref": ref})
        refs = RefCache(str(tmp_path / "cache"))
        refs.receive(ref, lengths, reader, read_fd)
        rest = bytes(reader.read_part(len(extra)))
        assert not reader.buffered() and os.read(read_fd, 1) == b""
        return refs, rest
    finally:
        writer.join()
        os.close(read_fd)


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_slice_goes_to_disk_and_comes_back_mapped_and_aligned(tmp_path,
                                                                  kind,
                                                                  monkeypatch):
    spliced = []
    real_splice = os.splice
    monkeypatch.setattr(os, "splice", lambda *a: spliced.append(
        real_splice(*a)) or spliced[-1])
    value = {"a": np.arange(300_001, dtype=np.float64),
             "b": np.arange(7, dtype=np.int8), "n": 3}
    refs, rest = _receive(tmp_path, kind, value, extra=b"next frame")
    # From a pipe the kernel moves the bytes; a socket goes by the buffer.
    assert (sum(spliced) > 2_000_000) == (kind == "pipe")
    assert rest == b"next frame"   # not one byte too many was taken
    got = refs.get("r1")
    np.testing.assert_array_equal(got["a"], value["a"])
    np.testing.assert_array_equal(got["b"], value["b"])
    assert got["n"] == 3
    for arr in (got["a"], got["b"]):
        assert arr.ctypes.data % 64 == 0 and arr.flags.writeable
    # A new cache (a restarted worker) reads the same file.
    again = RefCache(str(tmp_path / "cache")).get("r1")
    np.testing.assert_array_equal(again["a"], value["a"])
    # Writing into the slice changes neither the file nor other readers.
    got["a"][0] = -1.0
    assert RefCache(str(tmp_path / "cache")).get("r1")["a"][0] == 0.0


def test_without_room_on_disk_the_slice_stays_in_memory(tmp_path,
                                                        monkeypatch):
    real = shutil.disk_usage

    def full(path):
        return real(path)._replace(free=0)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", full)
    refs, _ = _receive(tmp_path, "pipe", np.arange(1000))
    np.testing.assert_array_equal(refs.get("r1"), np.arange(1000))
    assert os.listdir(tmp_path / "cache") == []
    assert refs.stats() == {"entries": 0, "bytes": 0, "in_memory": 1}


def test_entries_of_an_older_layout_and_dead_writers_are_dropped(tmp_path):
    import subprocess
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "oldref").write_bytes(b"\0\0\0\1" + bytes(16))
    ended = subprocess.Popen(["true"])
    ended.wait()
    (directory / f"deadref.{ended.pid}.tmp").write_bytes(b"QJC2")  # crashed
    being_written = f"newref.{os.getpid()}.tmp"
    (directory / being_written).write_bytes(b"")
    refs = RefCache(str(directory))
    assert refs.missing(["oldref"]) == ["oldref"]
    assert sorted(os.listdir(directory)) == [being_written]
