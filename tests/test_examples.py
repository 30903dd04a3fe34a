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


# _shared.py is what the machine-learning examples import, not an example.
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", SCRIPTS)
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
        ("kmeans.py", [500, "--clusters", 3, "local:3"], 3),
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
    assert any(req.startswith("matplotlib") for req in extras["examples"])
    # the tests run the examples' --plot
    assert any(req.startswith("matplotlib") for req in extras["test"])


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


# --- the machine-learning examples -------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plot_args(tmp_path):
    """--plot FILE when matplotlib is here (the test extra has it), else
    nothing: the example's check still runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], None
    path = tmp_path / "plot.png"
    return ["--plot", path], path


def check_plot(proc, path):
    """The PNG --plot wrote: a picture with a line per worker count."""
    if path is None:
        return
    assert re.search(rf"on 1, 2, 4 workers: {re.escape(str(path))}$", proc.stdout, re.M)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), data[:16]
    width, height = (
        int.from_bytes(data[16:20], "big"),
        int.from_bytes(data[20:24], "big"),
    )
    assert (width, height) == (700, 450)
    # trained again on 1, 2 and 4 of the local workers
    runs = re.findall(
        r"^--plot: \d+ iterations in \S+ s on (.*) \((.*)\)$", proc.stdout, re.M
    )
    assert runs == [
        ("local-0", "local:2 workers=1"),
        ("local-0, local-1", "local:2"),
        ("local-0, local-1, local-2, local-3", "local:2 workers=4"),
    ], describe(proc)


def found(pattern, proc):
    match = re.search(pattern, proc.stdout, re.M)
    assert match, f"no line matching {pattern!r}\n" + describe(proc)
    return match


def test_kmeans_finds_scikit_learns_centroids(tmp_path):
    pytest.importorskip("sklearn")
    extra, png = plot_args(tmp_path)
    proc = run_example("kmeans.py", 2000, "--dims", 3, "--clusters", 8, *extra)
    assert proc.returncode == 0, describe(proc)
    assert "on 2 workers" in proc.stdout, describe(proc)
    inertias = [
        float(x)
        for x in re.findall(r"^iteration \d+: inertia (\S+),", proc.stdout, re.M)
    ]
    # Lloyd's steps never raise the inertia
    assert inertias == sorted(inertias, reverse=True), describe(proc)
    ours = found(r"^converged after (\d+) iterations in \S+ s: inertia (\S+)$", proc)
    theirs = found(
        r"^scikit-learn KMeans: (\d+) iterations, inertia (\S+); centroids the "
        r"same: largest difference (\S+) \(tolerance 1e-08\)$",
        proc,
    )
    assert ours[1] == theirs[1] == str(len(inertias)), describe(proc)
    assert math.isclose(float(ours[2]), float(theirs[2]), rel_tol=1e-10)
    assert float(theirs[3]) <= 1e-8
    check_plot(proc, png)


def test_logistic_regression_finds_scikit_learns_coefficients(tmp_path):
    pytest.importorskip("sklearn")
    extra, png = plot_args(tmp_path)
    proc = run_example("logistic_regression.py", 2000, "--features", 5, *extra)
    assert proc.returncode == 0, describe(proc)
    assert "on 2 workers" in proc.stdout, describe(proc)
    losses = [
        float(x) for x in re.findall(r"^iteration \d+: loss (\S+)$", proc.stdout, re.M)
    ]
    assert losses and losses == sorted(losses, reverse=True), describe(proc)
    final = found(
        r"^L-BFGS-B: .* after (\d+) iterations, \d+ evaluations in \S+ s: "
        r"loss (\S+), training accuracy (\S+)$",
        proc,
    )
    assert int(final[1]) == len(losses)
    assert float(final[2]) == losses[-1]
    assert float(final[3]) > 0.8
    same = found(
        r"^scikit-learn LogisticRegression: \d+ iterations; coefficients the same: "
        r"largest difference (\S+) \(tolerance 1e-06\)$",
        proc,
    )
    assert float(same[1]) <= 1e-6
    check_plot(proc, png)


def test_gmm_em_log_likelihood_never_falls(tmp_path):
    pytest.importorskip("sklearn")
    extra, png = plot_args(tmp_path)
    proc = run_example("gmm_em.py", 3000, *extra)
    assert proc.returncode == 0, describe(proc)
    assert "on 2 workers" in proc.stdout, describe(proc)
    logliks = [
        float(x)
        for x in re.findall(r"^iteration \d+: log-likelihood (\S+)$", proc.stdout, re.M)
    ]
    assert len(logliks) > 5, describe(proc)
    rises = [b - a for a, b in zip(logliks, logliks[1:])]
    assert all(rise >= -1e-10 * abs(ll) for rise, ll in zip(rises, logliks)), rises
    assert logliks[-1] > logliks[0] + 1000  # it learned something
    found(rf"^log-likelihood non-decreasing over the {len(logliks)} iterations$", proc)
    same = found(
        r"^scikit-learn GaussianMixture: (\d+) iterations; weights, means and "
        r"covariances the same: largest difference (\S+) \(tolerance 1e-08\)$",
        proc,
    )
    assert int(same[1]) == len(logliks)
    assert float(same[2]) <= 1e-8
    check_plot(proc, png)


ML_EXAMPLES = ["kmeans.py", "logistic_regression.py", "gmm_em.py"]


@pytest.mark.parametrize("name", ML_EXAMPLES)
def test_plot_without_matplotlib_says_to_install_it(tmp_path, name):
    fake = tmp_path / "matplotlib"  # shadows the installed one: not importable
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", "
        "name='matplotlib')\n"
    )
    proc = run_example(name, 100, "--plot", tmp_path / "x.png", path_first=tmp_path)
    assert proc.returncode == 1, describe(proc)
    assert proc.stderr == (
        f"{name} --plot needs matplotlib, which is not installed here: "
        "pip install 'qjamfab[examples]' (or pip install matplotlib)\n"
    ), describe(proc)
    assert proc.stdout == "", describe(proc)  # nothing done before
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "name, args, error",
    [
        (
            "kmeans.py",
            ["--plot", "no-such-folder/k.png"],
            "argument --plot: cannot save no-such-folder/k.png: there is no "
            f"folder {ROOT / 'no-such-folder'}: give a file in an existing folder",
        ),
        ("kmeans.py", ["0"], "argument points: '0' is not a positive integer"),
        (
            "kmeans.py",
            ["5", "--clusters", "6"],
            "--clusters=6 is more than the 5 points: ask for fewer clusters or "
            "more points",
        ),
        (
            "logistic_regression.py",
            ["--C", "-1"],
            "argument --C: '-1' is not a positive number",
        ),
        (
            "gmm_em.py",
            ["--tol", "nan"],
            "argument --tol: 'nan' is not a positive number",
        ),
        (
            "gmm_em.py",
            ["12", "--components", "4"],
            "12 samples are too few for 4 full covariances in 3 dimensions: "
            "give more than 12",
        ),
    ],
)
def test_ml_examples_say_what_is_wrong_with_an_argument(name, args, error):
    proc = run_example(name, *args)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.splitlines()[-1] == f"{name}: error: {error}", describe(proc)
    assert proc.stdout == "", describe(proc)


def test_plots_spread_their_workers_over_the_hosts(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from _shared import hosts_for

    assert hosts_for(["a", "b"], 1) == ["a workers=1"]
    assert hosts_for(["a", "b"], 2) == ["a workers=1", "b workers=1"]
    assert hosts_for("a,b,c", 4) == ["a workers=2", "b workers=1", "c workers=1"]
    assert hosts_for(["a workers=8 env.X={worker}"], 4) == [
        "a workers=4 env.X={worker}"
    ]
    monkeypatch.setenv("QJAMFAB_HOSTS", "local:2")
    assert hosts_for(None, 4) == ["local:2 workers=4"]
