"""The examples, run as a user runs them: `python examples/X.py args` on two
local workers, checking what they print."""

import collections
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(150)


def run_example(name, *args, path_first=None):
    env = dict(os.environ)  # holds this test's own QJAMFAB_HOME
    env["QJAMFAB_HOSTS"] = "local:2"
    # The examples import qjamfab: make this checkout importable whether or
    # not the package is installed.
    env["PYTHONPATH"] = os.pathsep.join(
        ([str(path_first)] if path_first else [])
        + [str(ROOT)]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc


def describe(proc):
    return (
        f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout}"
        f"\n--- stderr ---\n{proc.stderr}"
    )


def test_sum_matrix():
    n = 50
    proc = run_example("sum_matrix.py", n)
    assert proc.returncode == 0, describe(proc)
    expected = re.search(r"^expected sum: (\d+)$", proc.stdout, re.M)
    computed = re.search(r"^computed sum: (\d+)$", proc.stdout, re.M)
    assert expected and computed, describe(proc)
    assert (
        int(expected.group(1))
        == int(computed.group(1))
        == n * n * (n * n + 1) // 2
        == 2500 * 2501 // 2
    )
    assert "on 2 workers" in proc.stdout, describe(proc)


def test_sum_matrix_again_finds_its_slices_in_the_cache():
    """The matrix is seeded: a second run (the same QJAMFAB_HOME) sends no
    slice, rather than leaving a new matrix's slices in the cache."""
    first = run_example("sum_matrix.py", 50)
    assert first.returncode == 0, describe(first)
    again = run_example("sum_matrix.py", 50)
    assert again.returncode == 0, describe(again)
    assert re.search(r": (\d+) slices, \1 cached, 0 sent", again.stdout), describe(
        again
    )


def test_newton_sqrt():
    proc = run_example("newton_sqrt.py", 123456789)
    assert proc.returncode == 0, describe(proc)
    final = re.search(
        r"^sqrt\(123456789\.0\) ~= (\S+) \(math\.sqrt: (\S+)\)$", proc.stdout, re.M
    )
    assert final, describe(proc)
    value = float(final.group(1))
    assert math.isclose(value, 11111.111060555555, rel_tol=1e-12)
    assert float(final.group(2)) == math.sqrt(123456789)
    iterations = re.findall(r"^iteration (\d+): ", proc.stdout, re.M)
    assert iterations and len(iterations) < 60


def parse_counts(stdout):
    counts = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"(\S) +(\d+) +(\d+\.\d)%", line)
        if m:
            counts[m.group(1)] = int(m.group(2))
    summary = re.search(r"^(\d+) letters in (\d+) lines$", stdout, re.M)
    assert summary, stdout
    return counts, int(summary.group(1)), int(summary.group(2))


def test_char_count_sample():
    text = (EXAMPLES / "sample.txt").read_text(encoding="utf-8")
    letters = sum(1 for c in text if c.isalpha())
    expected = collections.Counter(c for c in text.lower() if c.isalpha())
    proc = run_example("char_count.py")
    assert proc.returncode == 0, describe(proc)
    counts, total, lines = parse_counts(proc.stdout)
    assert sum(counts.values()) == total == letters, describe(proc)
    assert lines == len(text.splitlines())
    assert counts == dict(expected)
    # printed most common first
    printed = [int(n) for n in re.findall(r"^\S +(\d+) ", proc.stdout, re.M)]
    assert printed == sorted(printed, reverse=True)


def test_char_count_known_file(tmp_path):
    path = tmp_path / "known.txt"
    path.write_text("aaa bb\nC c! 42\n\nzz Z\nÉé?\n", encoding="utf-8")
    proc = run_example("char_count.py", path)
    assert proc.returncode == 0, describe(proc)
    counts, total, lines = parse_counts(proc.stdout)
    assert counts == {"a": 3, "b": 2, "c": 2, "z": 3, "é": 2}, describe(proc)
    assert total == 12
    assert lines == 5


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_help(name):
    proc = run_example(name, "--help")
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith(f"usage: {name} [-h]"), describe(proc)
    assert proc.stderr == "", describe(proc)


@pytest.mark.parametrize(
    "name, arg, error",
    [
        (
            "sum_matrix.py",
            "1.5",
            "argument n: '1.5' is not a positive integer: "
            "give the matrix's size, e.g. 1000",
        ),
        (
            "sum_matrix.py",
            "0",
            "argument n: '0' is not a positive integer: give "
            "the matrix's size, e.g. 1000",
        ),
        (
            "newton_sqrt.py",
            "-4",
            "argument a: '-4' is not a positive number: "
            "give the number whose square root to find, "
            "e.g. 2",
        ),
        (
            "newton_sqrt.py",
            "inf",
            "argument a: 'inf' is not a positive number: "
            "give the number whose square root to find, "
            "e.g. 2",
        ),
        (
            "sparse_autoencoder.py",
            "1.5",
            "argument patches: invalid int value: '1.5'",
        ),
        (
            "char_count.py",
            "no-such-file.txt",
            "argument path: cannot read no-such-file.txt: No such file or "
            "directory: give a UTF-8 text file",
        ),
    ],
)
def test_examples_say_what_is_wrong_with_an_argument(name, arg, error):
    proc = run_example(name, "--", arg)
    assert proc.returncode == 2, describe(proc)
    # the usage (one line or more), then the error
    assert proc.stderr.startswith(f"usage: {name} "), describe(proc)
    assert proc.stderr.splitlines()[-1] == f"{name}: error: {error}", describe(proc)
    assert proc.stdout == "", describe(proc)


@pytest.mark.parametrize(
    "name, args, workers",
    [
        # as qjam's examples took hosts: after the script's own arguments
        ("sum_matrix.py", [50, "local:3"], 3),
        ("sum_matrix.py", [50, "local:1", "local:2"], 3),
        # the number left out: the first word is a host (n is 1000)
        ("sum_matrix.py", ["local:1"], 1),
        ("sum_matrix.py", ["--hosts=local:1,local:3", 50], 4),
        ("newton_sqrt.py", [123456789, "local:3"], 3),
        ("char_count.py", [EXAMPLES / "sample.txt", "local:3"], 3),
    ],
)
def test_examples_take_hosts_after_their_arguments(name, args, workers):
    proc = run_example(name, *args)  # $QJAMFAB_HOSTS is local:2
    assert proc.returncode == 0, describe(proc)
    if name == "char_count.py":  # it prints no RunStats: the count is right
        assert re.search(r"^\d+ letters in \d+ lines$", proc.stdout, re.M)
    else:
        assert re.search(rf"\bon {workers} workers?:", proc.stdout), describe(proc)
    if args == ["local:1"]:
        assert f"expected sum: {10**6 * (10**6 + 1) // 2}" in proc.stdout


@pytest.mark.parametrize(
    "args, error",
    [
        (
            ["50", "a,b"],
            "host entry 'a,b' contains a comma: give one host per list item",
        ),
        (
            ["--hosts=local:1", "50", "local:2"],
            "hosts given twice, with --hosts=local:1 and as arguments (local:2): "
            "give them one way",
        ),
    ],
)
def test_examples_say_what_is_wrong_with_the_hosts(args, error):
    proc = run_example("sum_matrix.py", *args)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.splitlines()[-1].startswith(f"sum_matrix.py: error: {error}")
    assert proc.stdout == "", describe(proc)


def test_sparse_autoencoder_without_scipy_says_to_install_the_extra(tmp_path):
    fake = tmp_path / "scipy"  # shadows the installed scipy: not importable
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'scipy'\", name='scipy')\n"
    )
    proc = run_example("sparse_autoencoder.py", 100, path_first=tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert proc.stderr == (
        "sparse_autoencoder.py needs scipy, which is not installed here: "
        "pip install 'qjamfab[examples]' (or pip install scipy)\n"
    ), describe(proc)
    assert proc.stdout == "", describe(proc)  # nothing done before


def test_the_examples_extra_has_what_the_examples_import():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("scipy") for req in extras["examples"])


def test_char_count_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    proc = run_example("char_count.py", path)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.splitlines()[-1] == (
        f"char_count.py: error: argument path: {path} is empty: give a file "
        f"with some text"
    ), describe(proc)


def test_docstrings_give_inv_run_arguments_after_double_dash():
    """`inv run SCRIPT --hosts=a,b 2000` fails (Invoke takes 2000 for a
    task name): the usage lines the examples show must work as typed."""
    for path in EXAMPLES.glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:2] != ["inv", "run"]:
                continue
            options = words[3 : words.index("--")] if "--" in words else words[3:]
            assert all(w.startswith("-") for w in options), (path.name, line)
