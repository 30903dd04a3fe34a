"""The default reduce and reduce_all."""

from __future__ import annotations

import ast
import collections
import dataclasses
import operator
import pathlib
import sys

import numpy as np
import pytest

from qjamfab import DataSet, Master, ReduceError
from qjamfab import reduce as reduce_mod
from qjamfab.reduce import (
    ReduceMismatch,
    ReduceTree,
    default_reduce,
    reduce_all,
    reduce_in_place,
)


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


@pytest.mark.parametrize("a, b", [(None, None), (None, 1), (np.ones(2), None)])
def test_a_none_result_asks_for_the_missing_return(a, b):
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce(a, b)
    first = str(exc.value).splitlines()[0]
    assert first.startswith("cannot combine results of type ")
    assert first.endswith(
        " with +: did mapfunc forget to return its value? (a result is None)"
    ), first
    assert "NoneType" in first


def test_a_none_inside_a_result_is_named_by_its_path():
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce([1, None], [2, 3])
    assert str(exc.value).splitlines()[0] == (
        "cannot combine result[1] of type NoneType and int with +: a result holds "
        "None there: return a value that adds, or give run() a reduce function"
    )


def test_numpy_shape_mismatch():
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce(np.ones(3), np.ones(2))
    assert str(exc.value).splitlines()[0] == (
        "cannot combine results of shapes (3,) and (2,) with +: return arrays "
        "of one shape, or give run() a reduce function"
    )


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


# --- pytrees: dicts, dataclasses, named tuples, nested -------------------------


@dataclasses.dataclass
class Grads:
    w: np.ndarray
    b: float
    count: int = 0


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: np.ndarray


Layer = collections.namedtuple("Layer", "W b")


def noisy(seed, shape):
    # Floats whose sum depends on the order it is taken in.
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, shape)


def test_dicts_add_key_by_key_in_the_first_ones_order():
    a = {"W1": noisy(1, (3, 4)), "b1": noisy(2, 4), "n": 2}
    b = {"n": 5, "b1": noisy(3, 4), "W1": noisy(4, (3, 4))}
    out = default_reduce(a, b)
    assert list(out) == ["W1", "b1", "n"] and type(out) is dict
    assert out["W1"].tobytes() == (a["W1"] + b["W1"]).tobytes()
    assert out["b1"].tobytes() == (a["b1"] + b["b1"]).tobytes()
    assert out["n"] == 7
    assert a["n"] == 2 and out is not a  # a untouched


def test_dict_subclasses_keep_their_type():
    a = collections.OrderedDict(x=1.5, y=2)
    out = default_reduce(a, collections.OrderedDict(y=3, x=1.0))
    assert out == {"x": 2.5, "y": 5} and type(out) is collections.OrderedDict
    d = collections.defaultdict(list, {"k": 1})
    out = default_reduce(d, {"k": 2})
    assert out == {"k": 3} and out.default_factory is list


def test_dataclasses_add_field_by_field():
    a, b = Grads(noisy(5, 6), 0.25, 1), Grads(noisy(6, 6), 0.5, 2)
    out = default_reduce(a, b)
    assert type(out) is Grads and out is not a
    assert out.w.tobytes() == (a.w + b.w).tobytes()
    assert (out.b, out.count) == (0.75, 3) and (a.b, a.count) == (0.25, 1)
    frozen = default_reduce(Frozen(np.ones(2)), Frozen(np.ones(2)))
    assert type(frozen) is Frozen and np.array_equal(frozen.x, [2.0, 2.0])


def test_nested_pytrees_combine_leaf_by_leaf():
    def tree(seed):
        return {
            "layers": [Layer(noisy(seed, (2, 3)), noisy(seed + 1, 3))] * 2,
            "stats": Grads(noisy(seed + 2, 2), 1.0, 1),
            "pair": (seed, {"loss": float(seed)}),
        }

    a, b = tree(10), tree(20)
    out = default_reduce(a, b)
    for mine, x, y in zip(out["layers"], a["layers"], b["layers"]):
        assert type(mine) is Layer and mine.W.tobytes() == (x.W + y.W).tobytes()
    assert out["stats"].w.tobytes() == (a["stats"].w + b["stats"].w).tobytes()
    assert out["pair"] == (30, {"loss": 30.0})


def test_a_shape_mismatch_names_its_path():
    a = {"W1": np.ones((30, 64)), "b1": np.ones(64)}
    b = {"W1": np.ones((64, 30)), "b1": np.ones(64)}
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce(a, b)
    first, second = str(exc.value).splitlines()
    assert first == (
        'cannot combine result["W1"] of shapes (30, 64) and (64, 30) with +: '
        "return arrays of one shape, or give run() a reduce function"
    )
    assert second.startswith("ValueError: operands could not be broadcast")


@pytest.mark.parametrize(
    "a, b, path",
    [
        ({"x": [Layer(1, 2)]}, {"x": [Layer(1, "s")]}, 'result["x"][0].b'),
        (Grads(np.ones(1), 1.0), Grads(np.ones(1), None), "result.b"),
        ({3: (1, [2])}, {3: (1, ["a"])}, "result[3][1][0]"),
    ],
)
def test_a_type_mismatch_names_its_path(a, b, path):
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce(a, b)
    assert str(exc.value).startswith(f"cannot combine {path} of type "), exc.value


def test_different_keys_name_them():
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce({"W1": 1, "b1": 2}, {"W1": 1, "b2": 2})
    assert str(exc.value) == (
        "cannot combine results of different keys ('b1' only in one, 'b2' only "
        "in the other): return dicts with the same keys, or give run() a reduce "
        "function"
    )
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce({"g": {"a": 1}}, {"g": {"a": 1, "b": 2}})
    assert str(exc.value).startswith(
        """cannot combine result["g"] of different keys ('b' only in the other)"""
    )


def test_different_dataclasses_do_not_combine():
    with pytest.raises(ReduceMismatch) as exc:
        default_reduce(Grads(np.ones(1), 1.0), Frozen(np.ones(1)))
    assert str(exc.value).startswith(
        "cannot combine results of type Grads and Frozen with +: return results "
        "that add, or give run() a reduce function"
    )


def test_what_defines_plus_keeps_adding_with_plus():
    # A Counter is a dict that adds its own way: keys of either side.
    out = default_reduce(collections.Counter("ab"), collections.Counter("bc"))
    assert out == collections.Counter(a=1, b=2, c=1)
    assert type(out) is collections.Counter

    @dataclasses.dataclass
    class Interval:
        lo: float
        hi: float

        def __add__(self, other):
            return Interval(min(self.lo, other.lo), max(self.hi, other.hi))

    assert default_reduce(Interval(0, 1), Interval(-1, 0.5)) == Interval(-1, 1)

    class Bag(dict):
        def __add__(self, other):
            return Bag({**self, **other})

    assert default_reduce(Bag(a=1), Bag(b=2)) == {"a": 1, "b": 2}


def test_sparse_matrices_add_with_plus():
    sparse = pytest.importorskip("scipy.sparse")
    a = sparse.csr_matrix(np.eye(3))
    out = default_reduce({"g": a}, {"g": sparse.csr_matrix(np.ones((3, 3)))})
    assert sparse.issparse(out["g"])
    assert np.array_equal(out["g"].toarray(), np.eye(3) + 1)


def test_in_place_adds_reach_pytree_leaves_with_the_same_bits():
    def tree(seed):
        return {"W": noisy(seed, (4, 5)), "g": Grads(noisy(seed + 1, 5), 1.0, 1)}

    a, b = tree(1), tree(2)
    expected = default_reduce(tree(1), tree(2))
    out = reduce_in_place(a, b)
    assert out["W"] is a["W"] and out["g"].w is a["g"].w  # added into a's leaves
    assert out["W"].tobytes() == expected["W"].tobytes()
    assert out["g"].w.tobytes() == expected["g"].w.tobytes()
    assert out["g"].count == 2


def test_a_leaf_held_twice_is_not_added_into():
    """Unpickling a result that holds one array twice gives one array in
    two places: adding into it would add b twice."""
    g = np.ones(3)
    a = {"x": g, "y": (g, 1)}
    out = reduce_in_place(a, {"x": np.full(3, 2.0), "y": (np.full(3, 5.0), 1)})
    assert np.array_equal(out["x"], [3.0] * 3)
    assert np.array_equal(out["y"][0], [6.0] * 3)
    assert np.array_equal(g, [1.0] * 3)


def test_leaves_walk_pytrees_in_order():
    tree = {"a": [1, Layer(2, 3)], "b": Grads(4, 5, 6), "c": collections.Counter("x")}
    assert list(reduce_mod.leaves(tree)) == [1, 2, 3, 4, 5, 6, collections.Counter("x")]


# --- through a Master -------------------------------------------------------------


def pytree_of_slice(params, rows):
    import numpy as np

    seed = int(np.asarray(rows).ravel()[0])
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-6, 6)
    return {
        "W1": rng.standard_normal((3, 4)) * scale,
        "stats": Grads(rng.standard_normal(4) * scale, float(seed) / 3, 1),
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hosts", ["inproc:2", "local:2"])
def test_a_run_reduces_pytrees_to_the_bits_of_the_tree(hosts):
    data = DataSet(np.arange(11.0).reshape(11, 1), slice_size=1)
    tree = ReduceTree(11)
    for i in range(11):
        tree.add(i, 1, pytree_of_slice(None, [float(i)]))
    expected = tree.result()
    with Master(hosts) as m:
        out = m.run(pytree_of_slice, dataset=data)
    assert list(out) == ["W1", "stats"] and isinstance(out["stats"], Grads)
    assert out["W1"].tobytes() == expected["W1"].tobytes()
    assert out["stats"].w.tobytes() == expected["stats"].w.tobytes()
    assert (out["stats"].b, out["stats"].count) == (expected["stats"].b, 11)
    # Left to right would differ in the last bits: the test can tell.
    folded = reduce_all([pytree_of_slice(None, [float(i)]) for i in range(11)])
    assert folded["W1"].tobytes() != expected["W1"].tobytes()


def test_a_run_names_the_path_of_a_mismatch():
    def shapes(params, rows):
        import numpy as np

        n = 2 if 0 in rows else 3
        return {"W1": np.ones((n, 4))}

    with Master("inproc:2") as m:
        with pytest.raises(ReduceError) as exc:
            m.run(shapes, dataset=DataSet(list(range(4)), slice_size=1))
    assert str(exc.value).startswith(
        'cannot combine result["W1"] of shapes (2, 4) and (3, 4) with +: return '
        "arrays of one shape, or give run() a reduce function"
    ), exc.value
