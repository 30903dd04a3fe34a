"""Datasets: slicing, content refs, for_workers, and every BadDataSet message."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from qjamfab.data import dataset as ds_mod
from qjamfab.data.content_refs import content_ref
from qjamfab.data.dataset import (
    SLICES_PER_WORKER,
    ArrayDataSet,
    BaseDataSet,
    DataSet,
    ListDataSet,
    NpyFileDataSet,
    TextMatrixDataSet,
)
from qjamfab.errors import BadDataSet

REPO = pathlib.Path(__file__).resolve().parents[1]


def first_line(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value).splitlines()[0]


class Squares(BaseDataSet):
    """A custom dataset the way qjam users wrote them: no __init__ call."""

    def __init__(self, n: int):
        self.n = n

    def chunks(self) -> int:
        return self.n

    def slice(self, index: int) -> list[int]:
        return [index * index]


class BadChunks(BaseDataSet):
    def __init__(self, value: object):
        self.value = value

    def chunks(self):
        return self.value

    def slice(self, index: int):
        return index


# --- the original qjam facts --------------------------------------------------


def test_list_dataset_default_is_four_slices_of_thirty():
    d = ListDataSet(range(120))
    assert len(d) == d.chunks() == 4
    assert [len(s) for s in d] == [30, 30, 30, 30]
    assert d[0] == list(range(30)) and d[3] == list(range(90, 120))
    assert all(type(s) is list for s in d)


def test_list_dataset_slice_size_five_is_24_slices():
    d = ListDataSet(range(120), slice_size=5)
    assert len(d) == 24
    assert d[23] == [115, 116, 117, 118, 119]


def test_equal_data_equal_refs_different_data_different_refs():
    a = ListDataSet(range(120))
    assert a.refs() == ListDataSet(list(range(120))).refs()
    assert a.refs() == ListDataSet(tuple(range(120))).refs()
    assert len(set(a.refs())) == 4
    assert ListDataSet(range(1, 121)).refs() != a.refs()
    assert a.ref(0) != ListDataSet(range(1, 121)).ref(0)
    assert all(len(r) == 64 and int(r, 16) >= 0 for r in a.refs())


def test_refs_do_not_depend_on_shared_subobjects():
    s = "ab"
    built = "".join(["a", "b"])
    assert ListDataSet([s, s]).refs() == ListDataSet([s, built]).refs()


def test_cyclic_slice_still_gets_a_ref():
    loop: list = [1]
    loop.append(loop)
    assert len(ListDataSet([loop]).ref(0)) == 64


SUBPROCESS_REFS = """
import json, numpy as np
from qjamfab.data.dataset import DataSet
print(json.dumps([
    DataSet(range(120)).refs(),
    DataSet(["alpha", "beta", "gamma", "delta"], 2).refs(),
    DataSet(np.arange(24, dtype=np.float32).reshape(6, 4)).refs(),
    DataSet([{"k": 1, "j": (2.5, None)}]).refs(),
]))
"""


def test_refs_are_equal_across_processes():
    here = json.loads(
        json.dumps(
            [
                DataSet(range(120)).refs(),
                DataSet(["alpha", "beta", "gamma", "delta"], 2).refs(),
                DataSet(np.arange(24, dtype=np.float32).reshape(6, 4)).refs(),
                DataSet([{"k": 1, "j": (2.5, None)}]).refs(),
            ]
        )
    )
    env = dict(
        os.environ,
        PYTHONHASHSEED="12345",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_REFS],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout) == here


# --- indexing -------------------------------------------------------------------


def test_len_index_negative_and_python_slices():
    d = ListDataSet(range(10), slice_size=3)
    assert len(d) == 4
    assert d[0] == [0, 1, 2]
    assert d[-1] == [9]
    assert d[-4] == d[0]
    assert d[1:3] == [[3, 4, 5], [6, 7, 8]]
    assert d[::-2] == [[9], [3, 4, 5]]
    assert d[np.int64(1)] == [3, 4, 5]
    assert list(d) == d[:]
    for bad in (4, -5):
        with pytest.raises(IndexError, match="out of range for 4 slices"):
            d[bad]
    with pytest.raises(IndexError):
        d.ref(4)
    assert d.ref(-1) == d.refs()[3]


def test_refs_are_memoized_once_per_object(monkeypatch):
    d = ListDataSet(range(12), slice_size=4)
    calls = []
    real = ds_mod.content_ref
    monkeypatch.setattr(ds_mod, "content_ref", lambda obj: calls.append(1) or real(obj))
    first = d.refs()
    assert d.refs() == first and d.ref(1) == first[1]
    assert len(calls) == 3


def test_n_items_and_repr():
    assert ListDataSet(range(7)).n_items == 7
    assert ArrayDataSet(np.zeros((5, 3))).n_items == 5
    assert ArrayDataSet(np.zeros((5, 3)), row_major=False).n_items == 3
    assert Squares(3).n_items is None
    assert "ListDataSet" in repr(ListDataSet(range(7))) and "Squares" in repr(
        Squares(2)
    )


# --- arrays ---------------------------------------------------------------------


def test_array_row_blocks_are_contiguous_views():
    a = np.arange(40.0).reshape(10, 4)
    d = DataSet(a, 3)
    assert isinstance(d, ArrayDataSet) and len(d) == 4
    for s in d:
        assert type(s) is np.ndarray and s.flags.c_contiguous
        assert np.shares_memory(s, a)
    np.testing.assert_array_equal(np.vstack(list(d)), a)
    assert d[-1].shape == (1, 4)


def test_array_column_blocks():
    a = np.arange(30).reshape(3, 10)
    d = DataSet(a, 4, row_major=False)
    assert len(d) == 3
    for s in d:
        assert type(s) is np.ndarray and s.flags.c_contiguous
    np.testing.assert_array_equal(np.hstack(list(d)), a)
    np.testing.assert_array_equal(d[1], a[:, 4:8])


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_subclasses_and_noncontiguous_input_give_plain_contiguous_slices():
    m = np.matrix([[1, 2], [3, 4], [5, 6]])
    for s in DataSet(m, 2):
        assert type(s) is np.ndarray
    f = np.asfortranarray(np.arange(12.0).reshape(4, 3))
    d = DataSet(f, 2)
    assert all(s.flags.c_contiguous for s in d)
    np.testing.assert_array_equal(np.vstack(list(d)), f)
    assert d.refs() == DataSet(np.ascontiguousarray(f), 2).refs()


def test_array_refs_depend_on_dtype_shape_and_bytes():
    a = np.arange(12, dtype=np.int64)
    same = np.arange(12, dtype=np.int64)
    assert DataSet(a).refs() == DataSet(same).refs()
    ref = content_ref(a)
    assert ref == content_ref(same)
    assert ref != content_ref(a.view(np.float64))  # same bytes, other dtype
    assert ref != content_ref(a.reshape(3, 4))  # same bytes, other shape
    assert ref != content_ref(a.astype(">i8"))  # other byte order
    assert ref != content_ref(a.tolist())  # list, not array
    rec1 = np.zeros(2, dtype=[("a", "<i4"), ("b", "<i4")])
    rec2 = np.zeros(2, dtype=[("x", "<i4"), ("y", "<i4")])
    assert content_ref(rec1) != content_ref(rec2)
    assert content_ref(a[::2]) == content_ref(np.ascontiguousarray(a[::2]))
    dates = np.array(["2020-01-01", "2020-01-02"], dtype="M8[D]")
    assert content_ref(dates) == content_ref(dates.copy())


def test_large_arrays_hash_the_digests_of_their_blocks():
    import hashlib

    block = 8 << 20
    a = np.arange(3 * block // 8 + 5, dtype=np.float64)  # 3 blocks and a bit
    raw = a.view(np.uint8)
    expected = hashlib.sha256(
        b"qjamfab-ndarray\0"
        + b"'<f8'(3145733,)\0"
        + b"blocks\0"
        + b"".join(
            hashlib.sha256(raw[i : i + block]).digest()
            for i in range(0, len(raw), block)
        )
    )
    assert content_ref(a) == expected.hexdigest()
    changed = a.copy()
    changed[-1] += 1  # in the last, short block
    assert content_ref(changed) != content_ref(a)
    assert content_ref(a[::-1]) != content_ref(a)


def test_object_arrays_hash_by_value_not_pointer():
    a = np.array([[1, "x"], [2, "y"]], dtype=object)
    b = np.array([[1, "x"], [2, "y"]], dtype=object)
    assert DataSet(a).refs() == DataSet(b).refs()


# --- .npy files -----------------------------------------------------------------


def test_npy_file_is_memory_mapped_and_slices_are_plain_views(tmp_path):
    a = np.arange(60, dtype=np.float32).reshape(15, 4)
    path = tmp_path / "x.npy"
    np.save(path, a)
    for d in (DataSet(path, 4), DataSet(str(path), 4)):
        assert isinstance(d, NpyFileDataSet) and len(d) == 4
        for s in d:
            assert type(s) is np.ndarray and not isinstance(s, np.memmap)
            assert s.flags.c_contiguous and not s.flags.owndata
            assert not s.flags.writeable
        np.testing.assert_array_equal(np.vstack(list(d)), a)
    # Same content as an in-memory array: same refs.
    assert DataSet(path, 4).refs() == DataSet(a, 4).refs()


def test_npy_file_column_major(tmp_path):
    a = np.arange(24.0).reshape(2, 12)
    np.save(tmp_path / "c.npy", a)
    d = DataSet(tmp_path / "c.npy", 5, row_major=False)
    assert len(d) == 3 and d[2].shape == (2, 2)
    assert all(type(s) is np.ndarray and s.flags.c_contiguous for s in d)
    np.testing.assert_array_equal(np.hstack(list(d)), a)


# --- text matrices --------------------------------------------------------------


@pytest.fixture
def matrix_file(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(11, 3))
    path = tmp_path / "m.txt"
    np.savetxt(path, a)
    return path


@pytest.mark.parametrize("slice_size", [None, 1, 2, 3, 4, 5, 7, 10, 11, 50])
def test_text_matrix_matches_loadtxt(matrix_file, slice_size):
    d = DataSet(matrix_file, slice_size)
    assert isinstance(d, TextMatrixDataSet) and d.n_items == 11
    for s in d:
        assert s.dtype == np.float64 and s.ndim == 2 and s.shape[1] == 3
    np.testing.assert_array_equal(np.vstack(list(d)), np.loadtxt(matrix_file))


def test_text_matrix_blank_lines_crlf_and_no_trailing_newline(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_bytes(b"\n  \n1 2 3\r\n\n4 5 6\n 7\t8  9 \n\n10 11 1.5e3")
    d = DataSet(path, 2)
    assert d.n_items == 4 and len(d) == 2
    np.testing.assert_array_equal(np.vstack(list(d)), np.loadtxt(path))


def test_text_matrix_trailing_blank_lines_ignored(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1 2\n3 4\n5 6\n\n   \n\n")
    d = DataSet(path, 2)
    assert d.n_items == 3 and len(d) == 2
    np.testing.assert_array_equal(np.vstack(list(d)), np.loadtxt(path))


def test_text_matrix_single_column_is_2d(tmp_path):
    path = tmp_path / "col.txt"
    path.write_text("1\n2\n3\n")
    d = DataSet(path, 2)
    assert d[0].shape == (2, 1)
    np.testing.assert_array_equal(np.vstack(list(d)), np.loadtxt(path, ndmin=2))


def test_text_matrix_scan_across_block_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_mod, "_SCAN_BLOCK", 5)
    path = tmp_path / "b.txt"
    path.write_text("1.25 2\n\n   \n33 4\n5 66.5\n  \n7 8\n \n")
    d = DataSet(path, 1)
    assert d.n_items == 4
    np.testing.assert_array_equal(np.vstack(list(d)), np.loadtxt(path))


def test_text_matrix_refs_hash_bytes(tmp_path, matrix_file):
    copy = tmp_path / "copy.txt"
    copy.write_bytes(matrix_file.read_bytes())
    assert DataSet(matrix_file, 3).refs() == DataSet(copy, 3).refs()
    other = tmp_path / "other.txt"
    other.write_bytes(matrix_file.read_bytes().replace(b"e", b"E", 1))
    assert DataSet(matrix_file, 3).ref(0) != DataSet(other, 3).ref(0)


# --- for_workers ----------------------------------------------------------------


def test_for_workers_recuts_auto_datasets_and_memoizes():
    d = ListDataSet(range(120))
    assert d.for_workers(1) is d
    three = d.for_workers(3)
    assert three is d.for_workers(3)
    assert len(three) == SLICES_PER_WORKER * 3 == 12
    assert [len(s) for s in three] == [10] * 12
    assert sum(three[:], []) == list(range(120))
    assert three.for_workers(5) is three
    assert three.refs() != d.refs() and len(d.refs()) == 4
    assert len(d.for_workers(100)) == 120


def test_for_workers_sizes_differ_by_at_most_one():
    d = ListDataSet(range(10))
    cut = d.for_workers(2)
    assert len(cut) == 8
    assert sorted({len(s) for s in cut}) == [1, 2]
    assert sum(cut[:], []) == list(range(10))


def test_for_workers_on_arrays_and_files(tmp_path, matrix_file):
    a = np.arange(50.0).reshape(25, 2)
    cut = DataSet(a).for_workers(2)
    assert len(cut) == 8
    np.testing.assert_array_equal(np.vstack(list(cut)), a)
    np.save(tmp_path / "a.npy", a)
    npy = DataSet(tmp_path / "a.npy")
    assert isinstance(npy.for_workers(2), NpyFileDataSet)
    assert npy.for_workers(2).refs() == cut.refs()
    text = DataSet(matrix_file).for_workers(2)
    assert len(text) == 8
    np.testing.assert_array_equal(np.vstack(list(text)), np.loadtxt(matrix_file))


def test_for_workers_keeps_explicit_and_custom_slicing():
    fixed = ListDataSet(range(120), slice_size=5)
    assert fixed.for_workers(3) is fixed
    custom = Squares(3)
    assert custom.for_workers(8) is custom
    with pytest.raises(ValueError, match="n_workers must be a positive int"):
        ListDataSet(range(3)).for_workers(0)


# --- custom datasets and the factory --------------------------------------------


def test_custom_subclass_without_super_init():
    d = Squares(4)
    assert DataSet(d) is d
    assert d[:] == [[0], [1], [4], [9]] and d[-1] == [9]
    assert d.refs() == ListDataSet([0, 1, 4, 9], 1).refs()


def test_factory_dispatch(tmp_path, matrix_file):
    assert isinstance(DataSet([1, 2]), ListDataSet)
    assert isinstance(DataSet((1, 2)), ListDataSet)
    assert isinstance(DataSet(range(3)), ListDataSet)
    assert isinstance(DataSet(np.ones(3)), ArrayDataSet)
    assert isinstance(DataSet(str(matrix_file)), TextMatrixDataSet)
    assert isinstance(DataSet(matrix_file), TextMatrixDataSet)


# --- every error ----------------------------------------------------------------


def test_error_unsliceable_types():
    with pytest.raises(BadDataSet) as exc:
        DataSet({"a": 1})
    assert first_line(exc) == (
        "cannot slice a dict: pass a list, tuple, numpy array, "
        "a .npy or text-matrix path, or a BaseDataSet subclass"
    )
    with pytest.raises(BadDataSet, match="^cannot slice an int: pass a list"):
        DataSet(3)
    with pytest.raises(
        BadDataSet, match="ListDataSet takes a list, tuple or range, not a set"
    ):
        ListDataSet({1, 2})


@pytest.mark.parametrize(
    "empty, what",
    [
        ([], "the list has no items"),
        ((), "the tuple has no items"),
        (range(0), "the range has no items"),
        (np.zeros((0, 3)), "the (0, 3) array has no rows"),
    ],
)
def test_error_empty_dataset(empty, what):
    with pytest.raises(BadDataSet) as exc:
        DataSet(empty)
    assert first_line(exc) == f"dataset is empty: {what}; give it at least one item"
    with pytest.raises(
        BadDataSet, match=r"^dataset is empty: the \(2, 0\) array has no columns"
    ):
        DataSet(np.zeros((2, 0)), row_major=False)


def test_error_empty_files(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros(0))
    with pytest.raises(
        BadDataSet, match="^dataset is empty: .*give it at least one item"
    ):
        DataSet(tmp_path / "e.npy")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(
        BadDataSet,
        match="^dataset is empty: .*blank.txt has no rows; give it at least one item",
    ):
        DataSet(tmp_path / "blank.txt")
    (tmp_path / "nothing.txt").write_bytes(b"")
    with pytest.raises(BadDataSet, match="^dataset is empty"):
        DataSet(tmp_path / "nothing.txt")


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "3"])
def test_error_bad_slice_size(size):
    with pytest.raises(BadDataSet) as exc:
        DataSet([1, 2, 3], size)
    assert first_line(exc) == (
        f"slice_size must be a positive int or None, got {size!r}: give the number "
        f"of items per slice, or None to let qjamfab choose"
    )


def test_slice_size_accepts_numpy_int():
    assert len(DataSet(range(10), np.int32(5))) == 2


def test_error_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(BadDataSet) as exc:
        DataSet(missing)
    assert first_line(exc) == (
        f"dataset path {missing} does not exist: give the path "
        f"of an existing .npy or text-matrix file"
    )
    with pytest.raises(BadDataSet, match="does not exist"):
        DataSet(str(tmp_path / "nope.txt"))
    with pytest.raises(BadDataSet, match="is not a regular file"):
        DataSet(tmp_path)


def test_error_non_numeric_token_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("1 2\n\n3 4\n5 oops\n7 8\n")
    d = DataSet(path, 2)  # scanning does not parse
    assert len(d) == 2 and len(d.refs()) == 2
    np.testing.assert_array_equal(d[0], [[1, 2], [3, 4]])
    with pytest.raises(BadDataSet) as exc:
        d[1]
    assert first_line(exc) == (
        f"{path}: line 4 has a non-numeric value 'oops': a text "
        f"matrix holds only whitespace-separated numbers, one "
        f"row per line"
    )


def test_error_comment_and_underscore_tokens(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("1 2 # note\n")
    with pytest.raises(BadDataSet, match="line 1 has a non-numeric value '#'"):
        DataSet(path)[0]
    path.write_text("1 2\n1_0 3\n")
    with pytest.raises(BadDataSet, match="line 2 has a non-numeric value '1_0'"):
        DataSet(path, 2)[0]


def test_error_ragged_rows_name_the_line(tmp_path):
    path = tmp_path / "ragged.txt"
    path.write_text("\n1 2 3\n4 5 6\n7 8\n")
    d = DataSet(path, 2)
    d[0]
    with pytest.raises(BadDataSet) as exc:
        d[1]
    assert first_line(exc) == (
        f"{path}: line 4 has 2 numbers but line 2 has 3: every "
        f"row needs the same number of columns"
    )
    path.write_text("1 2 3\n4 5\n")
    with pytest.raises(BadDataSet, match="line 2 has 2 numbers but line 1 has 3"):
        DataSet(path, 2)[0]  # np.loadtxt itself rejects this block
    with pytest.raises(BadDataSet, match="line 2 has 2 numbers but line 1 has 3"):
        DataSet(path, 1)[1]  # a consistent block of the wrong width


def test_error_zero_d_and_1d_column_major():
    with pytest.raises(BadDataSet) as exc:
        DataSet(np.array(3.0))
    assert first_line(exc).startswith("cannot slice a 0-d array: ")
    with pytest.raises(
        BadDataSet, match="^row_major=False needs an array with at least 2"
    ):
        DataSet(np.arange(3), row_major=False)


def test_error_text_matrix_column_major(matrix_file):
    with pytest.raises(
        BadDataSet, match="^row_major=False is not supported for a text matrix"
    ):
        DataSet(matrix_file, row_major=False)


def test_error_bad_npy_file(tmp_path):
    path = tmp_path / "fake.npy"
    path.write_text("1 2 3\n")
    with pytest.raises(BadDataSet, match=f"^cannot memory-map {path} as a .npy file"):
        DataSet(path)
    np.save(tmp_path / "obj.npy", np.array([1, "x"], dtype=object))
    with pytest.raises(BadDataSet, match="^cannot memory-map"):
        DataSet(tmp_path / "obj.npy")
    np.save(tmp_path / "zero.npy", np.float64(1.0))
    with pytest.raises(BadDataSet, match="^cannot slice a 0-d array"):
        DataSet(tmp_path / "zero.npy")


@pytest.mark.parametrize(
    "value, message",
    [
        (
            0,
            "BadChunks.chunks() returned 0: a dataset needs at least one slice; "
            "return a positive int",
        ),
        (
            -2,
            "BadChunks.chunks() returned -2: a dataset needs at least one slice; "
            "return a positive int",
        ),
        (
            "3",
            "BadChunks.chunks() returned '3' (str): return the number of slices as "
            "a positive int",
        ),
        (
            2.0,
            "BadChunks.chunks() returned 2.0 (float): return the number of slices as "
            "a positive int",
        ),
        (
            None,
            "BadChunks.chunks() returned None (NoneType): return the number of "
            "slices as a positive int",
        ),
    ],
)
def test_error_custom_chunks(value, message):
    with pytest.raises(BadDataSet) as exc:
        DataSet(BadChunks(value))
    assert first_line(exc) == message
    with pytest.raises(BadDataSet):
        len(BadChunks(value))


def test_error_unpicklable_slice():
    import threading

    d = ListDataSet([threading.Lock()])
    with pytest.raises(
        BadDataSet, match=r"^a list slice cannot be pickled \(.*\): keep slices"
    ):
        d.refs()
