"""The default reduce and reduce_all."""

from __future__ import annotations

import ast
import collections
import operator
import pathlib
import sys

import numpy as np
import pytest

from qjamfab import reduce as reduce_mod
from qjamfab.reduce import ReduceMismatch, default_reduce, reduce_all


def test_numbers():
    assert default_reduce(40, 2) == 42
    assert default_reduce(1.5, 2.25) == 3.75
    assert reduce_all([1, 2, 3, 6, 7, 9]) == 28


def test_lists_add_element_wise_and_keep_type():
    out = default_reduce([1, 2, 3], [10, 20, 30])
    assert out == [11, 22, 33] and type(out) is list
    out = default_reduce((1, 2.5), (3, 0.5))
    assert out == (4, 3.0) and type(out) is tuple


def test_nested_tuples_recurse():
    a = ((1, [2, 3]), 4)
    b = ((10, [20, 30]), 40)
    assert default_reduce(a, b) == ((11, [22, 33]), 44)


def test_named_tuples_keep_their_type():
    Pair = collections.namedtuple("Pair", "count total")
    out = default_reduce(Pair(1, 2.0), Pair(3, 4.0))
    assert out == Pair(4, 6.0) and type(out) is Pair


def test_numpy_arrays_use_plus():
    a, b = np.arange(3.0), np.ones(3)
    np.testing.assert_array_equal(default_reduce(a, b), [1.0, 2.0, 3.0])
    pair = default_reduce((np.ones((2, 2)), 1), (np.ones((2, 2)), 2))
    np.testing.assert_array_equal(pair[0], 2 * np.ones((2, 2)))
    assert pair[1] == 3


def test_mismatched_lengths():
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce([1, 2, 3], [1, 2])
    assert str(exc.value) == (
        "cannot combine results of lengths 3 and 2: return "
        "equal-length lists/tuples, or give run() a reduce function"
    )
    with pytest.raises(ReduceMismatch, match="lengths 1 and 2"):
        default_reduce(([1], 2), ([1, 2], 3))
    assert issubclass(ReduceMismatch, TypeError)


def test_incompatible_types():
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce(1, "x")
    assert str(exc.value).splitlines()[0] == (
        "cannot combine results of type int and str with +: return results that "
        "add, or give run() a reduce function"
    )
    assert "TypeError" in str(exc.value).splitlines()[1]
    with pytest.raises(ReduceMismatch, match="type list and int"):
        default_reduce([1], 1)


@pytest.mark.parametrize(
    "a, b", [(None, None), (None, 1), (np.ones(2), None), ([1, None], [2, 3])]
)
def test_a_none_result_asks_for_the_missing_return(a, b):
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce(a, b)
    first = str(exc.value).splitlines()[0]
    assert first.startswith("cannot combine results of type ")
    assert first.endswith(
        " with +: did mapfunc forget to return its value? (a result is None)"
    ), first
    assert "NoneType" in first


def test_numpy_shape_mismatch():
    with pytest.raises(ReduceMismatch, match="type ndarray and ndarray with +"):
        default_reduce(np.ones(3), np.ones(2))


def test_reduce_all_with_custom_reduce():
    assert reduce_all([1, 2, 3]) == 6
    assert reduce_all([[1, 2], [3, 4], [5, 6]]) == [9, 12]
    assert reduce_all([2, 3, 4], operator.mul) == 24
    assert reduce_all(["a", "b", "c"], lambda a, b: b + a) == "cba"  # left to right
    assert reduce_all([7]) == 7
    with pytest.raises(ValueError, match="at least one value"):
        reduce_all([])


def test_reduce_module_is_stdlib_only():
    tree = ast.parse(pathlib.Path(reduce_mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "reduce.py must not import from its package"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
