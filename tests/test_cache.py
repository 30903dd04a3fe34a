"""The worker's slice cache on its own: a REFS payload goes from the stream
into its cache file (splice from a pipe, or through the reader's buffer
from a socket), and comes back as arrays mapped from that file, aligned
and writable; a file that is not what was written under its ref is never
used; the cache keeps to its size limit, least recently used out first."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from qjamfab import protocol
from qjamfab.data import content_refs
from qjamfab.runtime import cache as cache_module
from qjamfab.runtime import cache_disk, pins, sealed
from qjamfab.runtime.cache import CacheEntryLost, RefCache
from qjamfab.runtime.pins import CacheLimitError, parse_size

pytestmark = pytest.mark.timeout(30)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stream(kind: str):
    """(read fd, write fd) of a pipe or a socket pair."""
    if kind == "pipe":
        return os.pipe()
    a, b = socket.socketpair()
    return a.detach(), b.detach()


def _receive(tmp_path, kind: str, value, ref: str = "r1", extra=b""):
    """Send `value` as a REFS frame (then `extra` bytes) and receive it."""
    read_fd, write_fd = _stream(kind)
    frame = protocol.frame(protocol.REFS, {"ref": ref}, protocol.encode(value))

    def write():
        protocol.write_all(lambda v: os.writev(write_fd, v), [*frame, extra])
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
def test_a_slice_goes_to_disk_and_comes_back_mapped_and_aligned(
    tmp_path, kind, monkeypatch
):
    spliced = []
    real_splice = os.splice
    monkeypatch.setattr(
        os, "splice", lambda *a: spliced.append(real_splice(*a)) or spliced[-1]
    )
    value = {
        "a": np.arange(300_001, dtype=np.float64),
        "b": np.arange(7, dtype=np.int8),
        "n": 3,
    }
    refs, rest = _receive(tmp_path, kind, value, extra=b"next frame")
    # From a pipe the kernel moves the bytes; a socket goes by the buffer.
    assert (sum(spliced) > 2_000_000) == (kind == "pipe")
    assert rest == b"next frame"  # not one byte too many was taken
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


def test_without_room_on_disk_the_slice_stays_in_memory(tmp_path, monkeypatch):
    real = shutil.disk_usage

    def full(path):
        return real(path)._replace(free=0)

    monkeypatch.setattr(cache_disk.shutil, "disk_usage", full)
    refs, _ = _receive(tmp_path, "pipe", np.arange(1000))
    np.testing.assert_array_equal(refs.get("r1"), np.arange(1000))
    assert os.listdir(tmp_path / "cache") == []
    assert refs.stats() == {
        "entries": 0,
        "bytes": 0,
        "in_memory": 1,
        "limit_bytes": refs.limit,
        "damaged": 0,
    }


def test_entries_of_an_older_layout_and_dead_writers_are_dropped(tmp_path):
    import subprocess

    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "oldref").write_bytes(b"\0\0\0\1" + bytes(16))
    ended = subprocess.Popen(["true"])
    ended.wait()
    (directory / f"deadref.{pins.holder(ended.pid)}.tmp").write_bytes(
        b"QJC2"
    )  # crashed
    being_written = f"newref.{pins.holder()}.tmp"
    (directory / being_written).write_bytes(b"")
    refs = RefCache(str(directory))
    assert refs.missing(["oldref"]) == ["oldref"]
    assert sorted(os.listdir(directory)) == [being_written]


def _send(refs: RefCache, value, ref: str, blocks=None) -> None:
    """Receive `value` into an existing cache, as a worker does; `blocks`:
    the REFS head's digests of its parts' blocks, as a master sends them."""
    read_fd, write_fd = os.pipe()
    head = {"ref": ref} if blocks is None else {"ref": ref, "blocks": blocks}
    frame = protocol.frame(protocol.REFS, head, protocol.encode(value))
    writer = threading.Thread(
        target=lambda: (
            protocol.write_all(lambda v: os.writev(write_fd, v), frame),
            os.close(write_fd),
        )
    )
    writer.start()
    try:
        reader = protocol.FrameReader(lambda v: os.readv(read_fd, [v]))
        _, _, head, lengths = reader.read_head()
        refs.receive(ref, lengths, reader, read_fd, blocks=head.get("blocks"))
    finally:
        writer.join()
        os.close(read_fd)


def _flip(path, offset: int) -> None:
    """Change one byte in place, a little later than the file was written
    (mtime moves by the kernel's clock tick)."""
    time.sleep(0.02)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _last_part_offset(path) -> int:
    """Where the last (array) part of a cache file starts."""
    size = os.path.getsize(path)
    return size - 64 * 4  # well inside an array of 8 KiB


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


ARRAY = np.arange(1024, dtype=np.float64)  # 8 KiB: a part of its own


@pytest.mark.parametrize("held", ["on disk only", "in memory too"])
def test_a_flipped_byte_is_found_dropped_and_reported(cache_dir, capfd, held):
    writer = RefCache(cache_dir)
    _send(writer, ARRAY, "r1")
    path = os.path.join(cache_dir, "r1")
    # "in memory too": the worker that wrote it maps the file and uses it
    # again; "on disk only": a restarted worker, or another on the host.
    refs = writer if held == "in memory too" else RefCache(cache_dir)
    _flip(path, _last_part_offset(path))
    assert refs.missing(["r1"]) == ["r1"]
    assert not os.path.exists(path)
    assert refs.take_damaged() == ["r1"] and refs.take_damaged() == []
    assert refs.stats()["damaged"] == 1 and refs.stats()["in_memory"] == 0
    err = capfd.readouterr().err
    assert "cache entry r1 is damaged" in err and "send the slice again" in err
    # The master sends it again: back to normal.
    _send(refs, ARRAY, "r1")
    assert refs.missing(["r1"]) == []
    np.testing.assert_array_equal(refs.get("r1"), ARRAY)


def test_a_slice_of_several_hash_blocks_verifies_and_a_middle_one_fails(cache_dir):
    big = np.arange(20 << 17, dtype=np.float64)  # 20 MiB: three blocks
    _send(RefCache(cache_dir), big, "r1")
    refs = RefCache(cache_dir)
    assert refs.missing(["r1"]) == []
    np.testing.assert_array_equal(refs.get("r1"), big)
    _flip(os.path.join(cache_dir, "r1"), 12 << 20)  # in the second block
    assert RefCache(cache_dir).missing(["r1"]) == ["r1"]


BIG = np.arange(20 << 17, dtype=np.float64)  # 20 MiB: three hash blocks


def _master_blocks(value) -> list:
    """The REFS head's "blocks" a master sends with this array slice: its
    ref's block digests for the buffer part, nothing for the main stream."""
    digests = content_refs.block_digests(content_refs.content_ref(value))
    assert digests is not None and len(digests) == 3
    return [None, [d.hex() for d in digests]]


def test_the_masters_block_digests_seal_the_file_without_hashing_it_again(
    cache_dir, tmp_path, monkeypatch
):
    hashed = []
    real = sealed._digest
    monkeypatch.setattr(sealed, "_digest", lambda b: hashed.append(len(b)) or real(b))
    _send(RefCache(cache_dir), BIG, "r1", _master_blocks(BIG))
    main_stream = hashed  # only the payload's small first part was hashed here
    assert len(main_stream) == 1 and main_stream[0] < 4096
    hashed_here = str(tmp_path / "hashed-here")
    _send(RefCache(hashed_here), BIG, "r1")
    with open(os.path.join(cache_dir, "r1"), "rb") as a:
        with open(os.path.join(hashed_here, "r1"), "rb") as b:
            assert a.read() == b.read()  # the same seal, byte for byte
    refs = RefCache(cache_dir)
    assert refs.missing(["r1"]) == []
    np.testing.assert_array_equal(refs.get("r1"), BIG)


def test_a_wrong_block_digest_from_the_sender_fails_the_next_check(cache_dir):
    blocks = _master_blocks(BIG)
    blocks[1][1] = "00" * 32
    _send(RefCache(cache_dir), BIG, "r1", blocks)
    assert RefCache(cache_dir).missing(["r1"]) == ["r1"]  # damaged: sent again


@pytest.mark.parametrize(
    "bad",
    [
        "not a list",
        [None],  # not one entry per part
        [None, ["00" * 32]],  # too few digests for three blocks
        [None, ["zz" * 32] * 3],  # not hex
        [None, ["00" * 31] * 3],  # not sha256 digests
        [None, [1, 2, 3]],
    ],
)
def test_block_digests_that_do_not_fit_the_parts_are_ignored_and_hashed(cache_dir, bad):
    _send(RefCache(cache_dir), BIG, "r1", bad)
    refs = RefCache(cache_dir)
    assert refs.missing(["r1"]) == []
    np.testing.assert_array_equal(refs.get("r1"), BIG)


def test_a_damaged_header_or_pickle_stream_is_found_too(cache_dir):
    _send(RefCache(cache_dir), ARRAY, "r1")
    path = os.path.join(cache_dir, "r1")
    for offset in (5, 20, 64 + 3):  # count, seal, the pickle main stream
        _send(RefCache(cache_dir), ARRAY, "r1")
        _flip(path, offset)
        refs = RefCache(cache_dir)
        assert refs.missing(["r1"]) == ["r1"], offset
        assert refs.take_damaged() == ["r1"]


@pytest.mark.parametrize("held", ["on disk only", "in memory too"])
def test_a_truncated_file_is_dropped_without_touching_its_mapping(cache_dir, held):
    writer = RefCache(cache_dir)
    big = np.arange(3 << 20, dtype=np.uint8)  # 3 MiB
    _send(writer, big, "r1")
    refs = writer if held == "in memory too" else RefCache(cache_dir)
    path = os.path.join(cache_dir, "r1")
    os.truncate(path, 1 << 20)
    # Reading the mapped pages past the new end would be a SIGBUS: this
    # process would die here.
    assert refs.missing(["r1"]) == ["r1"]
    assert refs.take_damaged() == ["r1"]
    with pytest.raises(CacheEntryLost, match="^slice r1 left this worker"):
        refs.get("r1")


def test_a_file_shorter_than_its_header_is_damaged(cache_dir):
    _send(RefCache(cache_dir), ARRAY, "r1")
    os.truncate(os.path.join(cache_dir, "r1"), 6)
    refs = RefCache(cache_dir)
    assert refs.missing(["r1"]) == ["r1"] and refs.take_damaged() == ["r1"]


@pytest.mark.parametrize("held", ["on disk only", "in memory too"])
def test_another_slices_file_under_this_name_is_damaged(cache_dir, held):
    writer = RefCache(cache_dir)
    _send(writer, ARRAY, "r1")
    _send(writer, ARRAY + 1, "r2")
    refs = writer if held == "in memory too" else RefCache(cache_dir)
    shutil.copyfile(os.path.join(cache_dir, "r2"), os.path.join(cache_dir, "r1.copy"))
    os.replace(os.path.join(cache_dir, "r1.copy"), os.path.join(cache_dir, "r1"))
    assert refs.missing(["r1", "r2"]) == ["r1"]
    assert refs.take_damaged() == ["r1"]
    np.testing.assert_array_equal(refs.get("r2"), ARRAY + 1)


def test_a_fresh_copy_of_the_same_ref_written_by_another_worker_is_used(cache_dir):
    refs = RefCache(cache_dir)
    _send(refs, ARRAY, "r1")
    first = refs.get("r1")
    time.sleep(0.02)
    _send(RefCache(cache_dir), ARRAY, "r1")  # a new inode under the name
    assert refs.missing(["r1"]) == [] and refs.take_damaged() == []
    again = refs.get("r1")
    np.testing.assert_array_equal(again, ARRAY)
    assert again.ctypes.data != first.ctypes.data  # the new file's mapping


def test_a_symlink_in_place_of_an_entry_is_not_followed(cache_dir, tmp_path):
    refs = RefCache(cache_dir)
    elsewhere = RefCache(str(tmp_path / "elsewhere"))
    _send(elsewhere, ARRAY, "r1")  # a valid entry, reached by a symlink
    os.symlink(tmp_path / "elsewhere" / "r1", os.path.join(cache_dir, "r1"))
    assert refs.missing(["r1"]) == ["r1"]
    assert not os.path.lexists(os.path.join(cache_dir, "r1"))
    assert os.path.exists(tmp_path / "elsewhere" / "r1")
    # A new worker's tidy-up removes such a link before anything reads it.
    os.symlink(tmp_path / "elsewhere" / "r1", os.path.join(cache_dir, "r2"))
    RefCache(cache_dir)
    assert not os.path.lexists(os.path.join(cache_dir, "r2"))


def test_a_change_found_in_the_middle_of_a_task_raises_not_a_wrong_value(cache_dir):
    refs = RefCache(cache_dir)
    _send(refs, ARRAY, "r1")
    _send(refs, ARRAY, "r2")
    assert refs.missing(["r1", "r2"]) == []
    refs.get("r1")  # the task's first slice
    _flip(
        os.path.join(cache_dir, "r2"), _last_part_offset(os.path.join(cache_dir, "r2"))
    )  # changed while mapfunc ran on r1
    with pytest.raises(CacheEntryLost):
        refs.get("r2")
    assert refs.take_damaged() == ["r2"]


def test_a_file_removed_during_a_task_serves_that_use_then_is_fetched_again(cache_dir):
    refs = RefCache(cache_dir)
    _send(refs, ARRAY, "r1")
    _send(refs, ARRAY, "r2")
    assert refs.missing(["r1", "r2"]) == []
    refs.get("r1")
    os.unlink(os.path.join(cache_dir, "r2"))  # another worker evicted it
    np.testing.assert_array_equal(refs.get("r2"), ARRAY)
    assert refs.missing(["r2"]) == ["r2"] and refs.take_damaged() == []


def test_a_checked_slice_costs_one_stat_per_task(cache_dir, monkeypatch):
    refs = RefCache(cache_dir)
    _send(refs, ARRAY, "r1")
    _send(refs, ARRAY, "r2")
    calls = []
    real = os.lstat
    monkeypatch.setattr(cache_module.os, "lstat", lambda p: calls.append(p) or real(p))
    assert refs.missing(["r1", "r2"]) == []
    assert len(calls) == 2
    refs.get("r1")  # trusts the stat missing() just made
    assert len(calls) == 2
    refs.get("r2")  # after user code ran on r1: stat again
    assert len(calls) == 3
    refs.get("r1")
    assert len(calls) == 4


def test_a_local_run_over_damaged_cache_files_gives_the_right_result():
    from qjamfab import DataSet, Master

    data = np.arange(40_000, dtype=np.int64)
    dataset = DataSet(data, slice_size=10_000)
    with Master("local:1") as m:
        assert m.run(lambda p, rows: int(rows.sum()), dataset=dataset) == int(
            data.sum()
        )
    cache = os.path.join(os.environ["QJAMFAB_HOME"], "cache")
    names = [n for n in os.listdir(cache) if not n.endswith(".tmp")]
    assert len(names) == 4
    time.sleep(0.02)
    for name in names:  # an exponent-like byte of an element of each
        _flip(
            os.path.join(cache, name), _last_part_offset(os.path.join(cache, name)) + 7
        )
    with Master("local:1") as m:
        assert m.run(lambda p, rows: int(rows.sum()), dataset=dataset) == int(
            data.sum()
        )
        assert m.last_run.slices_sent == 4


# The size limit.

ENTRY = np.zeros(1 << 14, dtype=np.uint8)  # 16 KiB; a file of 16.5 KiB


def _entry_bytes(cache_dir) -> int:
    return os.path.getsize(os.path.join(cache_dir, "e0"))


def _age(cache_dir, name: str, seconds: float) -> None:
    """Make an entry look last used `seconds` ago (atime and mtime)."""
    when = time.time() - seconds
    os.utime(os.path.join(cache_dir, name), (when, when))


def _files(cache_dir) -> list[str]:
    return sorted(os.listdir(cache_dir))


def _three_old_entries(cache_dir) -> int:
    """e0, e1, e2 on disk, last used 1000, 900 and 800 s ago; one entry's
    size."""
    writer = RefCache(cache_dir)
    for i in range(3):
        _send(writer, ENTRY + i, f"e{i}")
    for i, age in enumerate((1000, 900, 800)):
        _age(cache_dir, f"e{i}", age)
    return _entry_bytes(cache_dir)


def test_the_least_recently_used_entry_leaves_first(cache_dir):
    size = _three_old_entries(cache_dir)
    refs = RefCache(cache_dir, limit=3 * size)
    _send(refs, ENTRY + 3, "e3")
    assert _files(cache_dir) == ["e1", "e2", "e3"]
    # Using e1 makes it the most recently used of the old ones: e2 goes.
    assert refs.missing(["e1"]) == []
    refs.pin([])
    _send(refs, ENTRY + 4, "e4")
    assert _files(cache_dir) == ["e1", "e3", "e4"]
    assert refs.stats()["bytes"] <= refs.limit


def test_a_use_marks_an_entry_used_and_leaves_its_mtime(cache_dir, monkeypatch):
    refs = RefCache(cache_dir)
    _send(refs, ARRAY, "r1")
    path = os.path.join(cache_dir, "r1")
    written = os.stat(path)
    os.utime(
        path, ns=(written.st_mtime_ns - 1000 * 10**9, written.st_mtime_ns)
    )  # last used 1000 s before
    monkeypatch.setattr(cache_module, "_TOUCH_S", 0.0)
    assert refs.missing(["r1"]) == []  # in memory: a stat, and a touch
    used = os.stat(path)
    assert used.st_atime > time.time() - 60
    assert used.st_mtime_ns == written.st_mtime_ns  # still the same file


def test_an_evicted_entry_leaves_this_workers_memory_too(cache_dir):
    size = _three_old_entries(cache_dir)
    refs = RefCache(cache_dir, limit=3 * size)
    assert refs.missing(["e0"]) == []
    _age(cache_dir, "e0", 2000)  # and nobody used it since
    refs.pin([])
    _send(refs, ENTRY + 3, "e3")
    assert "e0" not in _files(cache_dir)
    assert refs.missing(["e0"]) == ["e0"]
    assert refs.stats()["in_memory"] == 1  # e3


def test_pinned_entries_are_never_evicted(cache_dir):
    size = _three_old_entries(cache_dir)
    refs = RefCache(cache_dir, limit=2 * size)
    # The worker waits for e3 to run a task over e0 and e3.
    assert refs.missing(["e0", "e3"]) == ["e3"]
    _age(cache_dir, "e0", 1000)
    _send(refs, ENTRY + 3, "e3")
    assert _files(cache_dir) == ["e0", "e3"]


def test_entries_used_just_now_leave_at_once_when_over_the_limit(cache_dir):
    """No grace period: the limit holds right after the write."""
    writer = RefCache(cache_dir)
    for i in range(3):
        _send(writer, ENTRY + i, f"e{i}")  # all used just now
    size = _entry_bytes(cache_dir)
    refs = RefCache(cache_dir, limit=2 * size)
    _send(refs, ENTRY + 3, "e3")
    assert _files(cache_dir) == ["e2", "e3"]
    assert refs.stats()["bytes"] <= refs.limit


@contextlib.contextmanager
def _pinned_elsewhere(cache_dir, *refs: str):
    """Another process whose cache object pins refs while in the block."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    code = (
        "import sys; from qjamfab.runtime.cache import RefCache; "
        "RefCache(sys.argv[1]).pin(sys.argv[2:]); print('pinned', flush=True); "
        "sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, cache_dir, *refs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    ) as child:
        assert child.stdout.readline() == "pinned\n"
        try:
            yield child
        finally:
            child.stdin.close()
            child.wait(timeout=20)


def test_entries_another_process_pins_stay_and_it_is_said_once(cache_dir, capfd):
    size = _three_old_entries(cache_dir)
    refs = RefCache(cache_dir, limit=2 * size)
    with _pinned_elsewhere(cache_dir, "e0", "e1"):
        _send(refs, ENTRY + 3, "e3")
        assert _files(cache_dir) == ["e0", "e1", "e3"]  # e2 out, still over
        _send(refs, ENTRY + 4, "e4")  # e3 out, still over
        assert _files(cache_dir) == ["e0", "e1", "e4"]
        said = capfd.readouterr().err
        assert said.count("qjamfab: the slices that tasks on this host need") == 1
        assert said.splitlines()[0] == (
            f"qjamfab: the slices that tasks on this host need right now "
            f"({3 * size} bytes) exceed the cache limit ({2 * size} bytes), so "
            "the cache holds more than its limit while they run: raise "
            "QJAMFAB_CACHE_LIMIT (or Master(cache_limit=...)) above "
            f"{3 * size} bytes"
        )
        record = pins.pinned_over_limit(cache_dir)
        assert (record["pinned"], record["limit"]) == (3 * size, 2 * size)
    # That process has ended: its pins with it.
    _send(refs, ENTRY + 5, "e5")
    assert _files(cache_dir) == ["e4", "e5"]
    assert "need right now" not in capfd.readouterr().err
    # Cleared, the cache says it again the next time.
    refs.clear()
    assert pins.pinned_over_limit(cache_dir) is None


def test_a_worker_drops_its_mappings_of_files_another_evicted(cache_dir):
    """A mapping keeps its file's disk space: held, an evicted file would
    take the disk past the limit."""
    size = _three_old_entries(cache_dir)
    holder = RefCache(cache_dir)
    assert holder.missing(["e0", "e1", "e2"]) == []
    holder.pin([])
    assert holder.stats()["in_memory"] == 3
    _send(RefCache(cache_dir, limit=2 * size), ENTRY + 3, "e3")  # e0, e1 out
    assert _files(cache_dir) == ["e2", "e3"]
    assert holder.missing(["e3"]) == []  # its next task
    assert holder.stats()["in_memory"] == 2  # e2, e3


def test_the_pins_of_a_process_that_died_are_dropped(cache_dir):
    size = _three_old_entries(cache_dir)
    with subprocess.Popen([sys.executable, "-c", "pass"]) as child:
        pass  # its pid is unused now
    stale = os.path.join(pins.pins_dir(cache_dir), f"pin.{pins.holder(child.pid)}.0")
    with open(stale, "w") as f:
        f.write("e0\ne1")
    refs = RefCache(cache_dir, limit=2 * size)
    _send(refs, ENTRY + 3, "e3")
    assert _files(cache_dir) == ["e2", "e3"]
    assert not os.path.exists(stale)


def _pin_of_another_host(cache_dir, *refs: str) -> str:
    """A pin file as a worker of another machine sharing the cache writes
    it (its pid may well be alive here: it means nothing)."""
    writer = RefCache(cache_dir)
    writer.pin(refs)
    pin_dir = pins.pins_dir(cache_dir)
    (mine,) = [n for n in os.listdir(pin_dir) if n.startswith("pin.")]
    path = os.path.join(pin_dir, f"pin.0ther0host00-{os.getpid()}.0")
    shutil.copy(os.path.join(pin_dir, mine), path)
    writer.pin([])
    return path


def test_another_hosts_pins_hold_until_they_are_stale(cache_dir):
    """Across machines a pid means nothing: another host's pin counts while
    its writer keeps it fresh, and lapses PIN_STALE_S after it stopped."""
    size = _three_old_entries(cache_dir)
    pin = _pin_of_another_host(cache_dir, "e0", "e1")
    written = os.stat(pin).st_mtime
    now = [written + pins.PIN_STALE_S - 1]
    refs = RefCache(cache_dir, limit=3 * size, clock=lambda: now[0])
    _send(refs, ENTRY + 3, "e3")
    assert _files(cache_dir) == ["e0", "e1", "e3"]  # e2 out, e0 and e1 kept
    now[0] = written + pins.PIN_STALE_S + 1
    _send(refs, ENTRY + 4, "e4")
    assert _files(cache_dir) == ["e1", "e3", "e4"]  # e0 out: the pin lapsed
    assert not os.path.exists(pin)


def test_a_pin_file_is_kept_fresh_and_written_again_when_removed(cache_dir):
    size = _three_old_entries(cache_dir)
    refs = RefCache(cache_dir)
    refs.pin(["e0", "e1"])
    pin_dir = pins.pins_dir(cache_dir)
    (pin,) = [n for n in os.listdir(pin_dir) if n.startswith("pin.")]
    assert pin.startswith(f"pin.{pins.holder()}.")
    path = os.path.join(pin_dir, pin)
    os.utime(path, (1, 1))
    refs.refresh_pin()
    assert time.time() - os.stat(path).st_mtime < pins.PIN_STALE_S
    os.unlink(path)  # another host found it stale
    refs.refresh_pin()
    _send(RefCache(cache_dir, limit=3 * size), ENTRY + 3, "e3")
    assert _files(cache_dir) == ["e0", "e1", "e3"]  # still pinned


@pytest.mark.parametrize("fs, synced", [("nfs4", True), ("ext4", False)])
def test_a_slice_is_synced_before_its_name_shows_on_a_network_filesystem(
    cache_dir, monkeypatch, fs, synced
):
    """Another machine may open it the moment it is renamed in; on a local
    disk the seal covers a crash (a torn file is found and sent again)."""
    monkeypatch.setattr(cache_disk, "fs_type", lambda path: fs)
    calls = []
    fsync = os.fsync
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)),
    )
    _send(RefCache(cache_dir), ENTRY, "e0")
    assert _files(cache_dir) == ["e0"]
    path = os.path.join(cache_dir, "e0")
    assert calls == ([f"{path}.{pins.holder()}.tmp"] if synced else [])


def test_another_hosts_slice_on_its_way_in_stays_until_stale(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    arriving = directory / f"ref.0ther0host00-{os.getpid()}.tmp"
    arriving.write_bytes(b"")
    written = os.stat(arriving).st_mtime
    RefCache(str(directory), clock=lambda: written + 1)
    assert os.listdir(directory) == [arriving.name]
    RefCache(str(directory), clock=lambda: written + pins.PIN_STALE_S + 1)
    assert os.listdir(directory) == []


@pytest.mark.parametrize(
    "pinned, limit, victims, after",
    [
        ((), 50, ["a", "b"], 40),  # least recently used first, until it fits
        (("a",), 50, ["b", "c"], 40),  # a pinned one is passed over
        (("a", "b", "c"), 50, ["d"], 60),  # the pinned alone: over the limit
        (("a", "b", "c", "d"), 50, [], 80),
        ((), 80, [], 80),  # within the limit: nothing goes
    ],
)
def test_the_eviction_plan(pinned, limit, victims, after):
    entries = [(3.0, "c", 20), (1.0, "a", 20), (2.0, "b", 20), (4.0, "d", 20)]
    assert pins.plan_eviction(entries, limit, pinned) == (victims, after)


def test_a_slice_bigger_than_the_limit_stays_in_memory(cache_dir, capfd):
    refs = RefCache(cache_dir, limit="10K")
    _send(refs, ENTRY, "big")
    assert _files(cache_dir) == []
    np.testing.assert_array_equal(refs.get("big"), ENTRY)
    assert refs.missing(["big"]) == []
    assert "bigger than the cache limit" in capfd.readouterr().err
    zero = RefCache(cache_dir, limit=0)
    _send(zero, ARRAY, "r1")
    assert _files(cache_dir) == [] and zero.missing(["r1"]) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20G", 20 << 30),
        ("500M", 500 << 20),
        ("1.5G", 3 << 29),
        ("1000000", 1_000_000),
        ("64k", 64 << 10),
        ("2 GiB", 2 << 30),
        ("1TB", 1 << 40),
        (" 0 ", 0),
    ],
)
def test_cache_limit_values(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["20 gigs", "-1", "1.5.G", "G", "2P", "1e9"])
def test_a_bad_cache_limit_says_what_to_write(cache_dir, monkeypatch, text):
    monkeypatch.setenv("QJAMFAB_CACHE_LIMIT", text)
    with pytest.raises(CacheLimitError) as info:
        RefCache(cache_dir)
    assert str(info.value).splitlines()[0] == (
        f"QJAMFAB_CACHE_LIMIT={text!r} is not a size: write bytes, or a "
        "number with K, M, G or T (powers of 1024), e.g. "
        "QJAMFAB_CACHE_LIMIT=20G, 500M or 1.5G"
    )


def test_the_limit_comes_from_the_argument_then_the_environment_then_disk(
    cache_dir, monkeypatch
):
    monkeypatch.delenv("QJAMFAB_CACHE_LIMIT", raising=False)
    default = RefCache(cache_dir).stats()["limit_bytes"]
    total = shutil.disk_usage(cache_dir).total
    assert default == min(total // 4, 64 << 30)
    monkeypatch.setenv("QJAMFAB_CACHE_LIMIT", "1.5G")
    assert RefCache(cache_dir).stats()["limit_bytes"] == 3 << 29
    assert RefCache(cache_dir, limit="500M").limit == 500 << 20
    assert RefCache(cache_dir, limit=12345).limit == 12345
    with pytest.raises(CacheLimitError, match="^cache limit 'lots' is not a"):
        RefCache(cache_dir, limit="lots")
