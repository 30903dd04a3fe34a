"""DataSet factory and types: lists, arrays, .npy and text-matrix files.

A dataset is cut into slices once; each slice has a ref, the sha256 of its
content (content_refs.py), so equal data has equal refs in any process on
any machine and a worker's cache can be keyed by it. This module runs on
the master only.

Datasets assume their data is not modified after refs are computed: refs are
memoized per dataset object.
"""

from __future__ import annotations

import builtins
import copy
import io
import mmap
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, cast, overload

import numpy as np

from qjamfab.data.content_refs import content_ref, text_rows_ref
from qjamfab.errors import BadDataSet

# With slice_size=None a built-in dataset is cut into this many slices per
# worker: enough to rebalance when a worker is lost, few enough that
# per-slice overhead stays small.
SLICES_PER_WORKER = 4

_SCAN_BLOCK = 1 << 20  # bytes read at a time when scanning a text matrix


class BaseDataSet(ABC):
    """A dataset cut into a fixed number of slices.

    Subclasses implement chunks() and slice(i); they need not call
    __init__. Everything else (indexing, refs, for_workers) is provided.
    """

    @abstractmethod
    def chunks(self) -> int:
        """How many slices the data is cut into."""

    @abstractmethod
    def slice(self, index: int) -> Any:
        """Slice number index, 0 <= index < chunks()."""

    @property
    def n_items(self) -> int | None:
        """Items the slices are cut from; None when the subclass cannot say."""
        return None

    def for_workers(self, n_workers: int) -> BaseDataSet:
        """The dataset the Master cuts for n_workers; custom ones keep theirs."""
        _check_workers(n_workers)
        return self

    def ref(self, index: int) -> str:
        """Content hash of slice index (memoized)."""
        index = self._index(index)
        refs = self._ref_memo()
        ref = refs[index]
        if ref is None:
            ref = refs[index] = self._compute_ref(index)
        return ref

    def refs(self) -> list[str]:
        """Content hashes of every slice, in order (memoized)."""
        memo = self._ref_memo()
        if None in memo:  # hashed once; later runs just copy the list
            for i, ref in enumerate(memo):
                if ref is None:
                    memo[i] = self._compute_ref(i)
        return cast("list[str]", list(memo))  # every slice is hashed now

    def release(self, index: int) -> None:  # noqa: B027 (a hook, not abstract)
        """The master is done with slice index for now (after hashing or
        sending it). Memory-mapped datasets drop its pages from the
        master's memory; others keep nothing extra."""

    def _compute_ref(self, index: int) -> str:
        return content_ref(self.slice(index))

    def _ref_memo(self) -> list[str | None]:
        # Stored lazily because subclasses need not call __init__.
        memo = self.__dict__.get("_qjamfab_refs")
        if memo is None:
            memo = self.__dict__["_qjamfab_refs"] = [None] * len(self)
        return memo

    def __len__(self) -> int:
        n = self.chunks()
        name = type(self).__name__
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise BadDataSet(
                f"{name}.chunks() returned {n!r} ({type(n).__name__}): return "
                f"the number of slices as a positive int"
            )
        if n < 1:
            raise BadDataSet(
                f"{name}.chunks() returned {n}: a dataset needs at least one "
                f"slice; return a positive int"
            )
        return int(n)

    def _index(self, index: int) -> int:
        n = len(self)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"slice index {index} out of range for {n} slices")
        return i

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: builtins.slice) -> list[Any]: ...

    # `builtins.`: in this class, plain `slice` names the method.
    def __getitem__(self, index: int | builtins.slice) -> Any:
        if isinstance(index, slice):
            return [self.slice(i) for i in range(*index.indices(len(self)))]
        return self.slice(self._index(index))

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self.slice(i)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.chunks()} slices>"


def _check_workers(n_workers: int) -> None:
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive int, got {n_workers!r}")


def _check_slice_size(slice_size: int | None) -> int | None:
    if slice_size is None:
        return None
    if (
        isinstance(slice_size, bool)
        or not isinstance(slice_size, (int, np.integer))
        or slice_size < 1
    ):
        raise BadDataSet(
            f"slice_size must be a positive int or None, got {slice_size!r}: "
            f"give the number of items per slice, or None to let qjamfab choose"
        )
    return int(slice_size)


def _even_bounds(n: int, k: int) -> list[int]:
    # Exactly k slices whose sizes differ by at most one.
    return [i * n // k for i in range(k + 1)]


class _CutDataSet(BaseDataSet):
    """A built-in dataset: n items cut at bounds into contiguous runs."""

    def __init__(self, n_items: int, slice_size: int | None, emptiness: str):
        if n_items < 1:
            raise BadDataSet(
                f"dataset is empty: {emptiness}; give it at least one item"
            )
        size = _check_slice_size(slice_size)
        self._n = n_items
        # With slice_size=None the Master re-cuts it per worker count.
        self._auto = size is None
        if size is None:
            self._bounds = _even_bounds(n_items, min(n_items, SLICES_PER_WORKER))
        else:
            self._bounds = [*range(0, n_items, size), n_items]
        self._by_workers: dict[int, BaseDataSet] = {}

    @abstractmethod
    def _take(self, start: int, stop: int) -> Any:
        """Items start:stop as one slice."""

    @property
    def n_items(self) -> int:
        return self._n

    def chunks(self) -> int:
        return len(self._bounds) - 1

    def slice(self, index: int) -> Any:
        return self._take(self._bounds[index], self._bounds[index + 1])

    def for_workers(self, n_workers: int) -> BaseDataSet:
        _check_workers(n_workers)
        if not self._auto:
            return self
        # Memoized so refs are hashed once per dataset per worker count.
        cut = self._by_workers.get(n_workers)
        if cut is None:
            bounds = _even_bounds(self._n, min(self._n, SLICES_PER_WORKER * n_workers))
            cut = self if bounds == self._bounds else self._recut(bounds)
            self._by_workers[n_workers] = cut
        return cut

    def _recut(self, bounds: list[int]) -> BaseDataSet:
        # A shallow copy shares the data (array, memmap, row offsets).
        twin = copy.copy(self)
        twin._bounds = bounds
        twin._auto = False
        twin._by_workers = {}
        twin.__dict__.pop("_qjamfab_refs", None)
        return twin

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self._n} items in {self.chunks()} slices>"


class ListDataSet(_CutDataSet):
    """A list, tuple or range; each slice is a list."""

    def __init__(self, seq: Sequence[Any], slice_size: int | None = None):
        if not isinstance(seq, (list, tuple, range)):
            raise BadDataSet(
                f"ListDataSet takes a list, tuple or range, not "
                f"{_a(type(seq).__name__)}: convert it with list(...)"
            )
        self._seq = seq
        super().__init__(len(seq), slice_size, f"the {type(seq).__name__} has no items")

    def _take(self, start: int, stop: int) -> list[Any]:
        return list(self._seq[start:stop])


class ArrayDataSet(_CutDataSet):
    """A numpy array cut into row blocks, or column blocks (row_major=False).

    Slices are plain, C-contiguous ndarrays; row blocks of a C-contiguous
    array are views, not copies.
    """

    def __init__(
        self, array: np.ndarray, slice_size: int | None = None, row_major: bool = True
    ):
        # asarray drops subclasses (memmap, matrix) without copying data.
        array = np.asarray(array)
        if array.ndim == 0:
            raise BadDataSet(
                "cannot slice a 0-d array: give an array with at least one "
                "dimension, e.g. np.atleast_1d(x)"
            )
        if not row_major and array.ndim < 2:
            raise BadDataSet(
                "row_major=False needs an array with at least 2 dimensions: "
                "use row_major=True for a 1-d array"
            )
        self._array = array
        self.row_major = row_major
        axis = "rows" if row_major else "columns"
        n = array.shape[0] if row_major else array.shape[1]
        super().__init__(n, slice_size, f"the {array.shape} array has no {axis}")

    def _take(self, start: int, stop: int) -> np.ndarray:
        block = (
            self._array[start:stop] if self.row_major else self._array[:, start:stop]
        )
        return np.ascontiguousarray(block)


class NpyFileDataSet(ArrayDataSet):
    """A .npy file, memory-mapped read-only so the master never loads it whole."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        slice_size: int | None = None,
        row_major: bool = True,
    ):
        self.path = _existing_file(path)
        try:
            array = np.load(self.path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise BadDataSet(
                f"cannot memory-map {self.path} as a .npy file: save it with "
                f"np.save (numeric dtype), or pass another kind of path\n{exc}"
            ) from exc
        super().__init__(array, slice_size, row_major)

    def _compute_ref(self, index: int) -> str:
        ref = super()._compute_ref(index)
        self.release(index)
        return ref

    def release(self, index: int) -> None:
        # The pages stay in the page cache; only this process's resident
        # set drops them, so a 1 GiB file never sits whole in the master.
        base: object = self._array
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "_mmap", None) or getattr(base, "base", None)
        if base is not None and hasattr(base, "madvise"):
            base.madvise(mmap.MADV_DONTNEED)


class TextMatrixDataSet(_CutDataSet):
    """A whitespace-separated numeric matrix in a text file, one row per line.

    The file is scanned once for row offsets; slices are row blocks read by
    byte range and parsed into 2-d float64 arrays. Blank lines are skipped;
    '#' is not a comment. A bad token is reported when its slice is read.
    """

    def __init__(self, path: str | os.PathLike[str], slice_size: int | None = None):
        self.path = _existing_file(path)
        self._starts, self._size = _scan_rows(self.path)
        super().__init__(len(self._starts), slice_size, f"{self.path} has no rows")
        self._n_cols = len(self._read(*self._byte_range(0, 1)).split())

    def _byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """Bytes of rows start:stop, up to the next row (blank lines included)."""
        end = int(self._starts[stop]) if stop < self._n else self._size
        return int(self._starts[start]), end

    def _read(self, begin: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(begin)
            return f.read(end - begin)

    def _compute_ref(self, index: int) -> str:
        # Parsing is a pure function of the bytes, so hash those: cheaper.
        return text_rows_ref(
            self._read(*self._byte_range(self._bounds[index], self._bounds[index + 1]))
        )

    def _take(self, start: int, stop: int) -> np.ndarray:
        begin, end = self._byte_range(start, stop)
        raw = self._read(begin, end)
        try:
            block = np.loadtxt(
                io.BytesIO(raw), dtype=np.float64, comments=None, ndmin=2
            )
        except ValueError as exc:
            raise self._diagnose(begin, raw, str(exc)) from exc
        if block.shape[1] != self._n_cols:
            raise self._diagnose(begin, raw, f"{block.shape[1]} columns")
        return block

    def _diagnose(self, offset: int, raw: bytes, detail: str) -> BadDataSet:
        """A BadDataSet naming the first bad line of raw, which starts at offset."""
        line_no = _line_number(self.path, offset)
        first_no = _line_number(self.path, int(self._starts[0]))
        for k, line in enumerate(raw.split(b"\n")):
            tokens = line.split()
            for tok in tokens:
                if not _is_number(tok):
                    return BadDataSet(
                        f"{self.path}: line {line_no + k} has a non-numeric value "
                        f"{tok.decode('latin-1')!r}: a text matrix holds only "
                        f"whitespace-separated numbers, one row per line"
                    )
            if tokens and len(tokens) != self._n_cols:
                return BadDataSet(
                    f"{self.path}: line {line_no + k} has {len(tokens)} numbers but "
                    f"line {first_no} has {self._n_cols}: every row needs the same "
                    f"number of columns"
                )
        return BadDataSet(
            f"{self.path}: cannot parse the rows from line {line_no}: a text "
            "matrix holds only whitespace-separated numbers, one row per "
            f"line\n{detail}"
        )


def _is_number(token: bytes) -> bool:
    # float() accepts '1_0' but np.loadtxt does not.
    if b"_" in token:
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line holding byte offset (error path only)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(_SCAN_BLOCK, offset))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count + 1


def _scan_rows(path: str) -> tuple[np.ndarray, int]:
    """Byte offsets of the non-blank lines of path, and the file's size.

    Reads fixed-size binary blocks and finds newlines with numpy, so a file
    larger than memory never becomes a list of Python strings.
    """
    found: list[np.ndarray] = []
    pos = 0  # file offset of the current block
    line_start = 0  # offset where the line in progress began
    line_has_data = False  # has the line in progress a non-blank byte so far
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):
            b = np.frombuffer(block, dtype=np.uint8)
            # Non-whitespace bytes (whitespace is 9-13 and space), counted
            # in int32 (fine for a 1 MiB block, and several times faster).
            data = (b != 32) & ((b < 9) | (b > 13))
            data_so_far = np.cumsum(data, dtype=np.int32)
            newlines = np.flatnonzero(b == 10)
            if newlines.size:
                at_nl = data_so_far[newlines]
                has_data = np.diff(at_nl, prepend=0) > 0
                has_data[0] |= line_has_data
                starts = np.concatenate(([line_start], pos + newlines[:-1] + 1))
                found.append(starts[has_data])
                line_start = pos + int(newlines[-1]) + 1
                line_has_data = bool(data_so_far[-1] > at_nl[-1])
            else:
                line_has_data |= bool(data_so_far[-1] > 0)
            pos += len(block)
    if line_has_data:  # a last line without a trailing newline
        found.append(np.array([line_start]))
    starts = np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)
    return starts, pos


def _existing_file(path: str | os.PathLike[str]) -> str:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise BadDataSet(
            f"dataset path {p} does not exist: give the path of an existing "
            f".npy or text-matrix file"
        )
    if not os.path.isfile(p):
        raise BadDataSet(
            f"dataset path {p} is not a regular file: give the path of a .npy "
            f"or text-matrix file"
        )
    return p


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def DataSet(
    obj: Any, slice_size: int | None = None, *, row_major: bool = True
) -> BaseDataSet:
    """The dataset for obj: a list/tuple/range, a numpy array, a .npy or
    text-matrix path, or a BaseDataSet (returned as is, after checking
    that its chunks() is a positive int)."""
    if isinstance(obj, BaseDataSet):
        len(obj)  # raises BadDataSet now if chunks() is not a positive int
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if isinstance(path, str) and path.lower().endswith(".npy"):
            return NpyFileDataSet(path, slice_size, row_major)
        if row_major is False:
            raise BadDataSet(
                "row_major=False is not supported for a text matrix: convert it "
                "to a .npy file, or slice it by rows"
            )
        return TextMatrixDataSet(path, slice_size)
    if isinstance(obj, (list, tuple, range)):
        return ListDataSet(obj, slice_size)
    if isinstance(obj, np.ndarray):
        return ArrayDataSet(obj, slice_size, row_major)
    raise BadDataSet(
        f"cannot slice {_a(type(obj).__name__)}: pass a list, tuple, numpy "
        f"array, a .npy or text-matrix path, or a BaseDataSet subclass"
    )
