"""The joblib backend "qjamfab" over local workers and real SSH hosts:
joblib.Parallel on the workers, effective_n_jobs, a Master of its own from
$QJAMFAB_HOSTS, errors, nesting, and scikit-learn's n_jobs (GridSearchCV
on load_digits gives the serial search's best params; cross_val_score and
a RandomForest give the serial results).

The SSH hosts run a bare Python (no joblib, scikit-learn or numpy): the
backend needs nothing on them, and scikit-learn goes there with
packages=with_dependencies("scikit-learn")."""

import os
import warnings

import numpy as np
import pytest

joblib = pytest.importorskip("joblib")

from qjamfab import Master, PreflightFailed, RemoteError  # noqa: E402
from qjamfab.links.packages import with_dependencies  # noqa: E402
from tests.conftest import processes_mentioning  # noqa: E402
from tests.gates import touch_when_open  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def bare_hosts(request) -> list[str]:
    """host1 and host2, each running the session's bare Python."""
    ssh = request.getfixturevalue("ssh")
    python = request.getfixturevalue("bare_python")
    return [f"{alias} python={python}" for alias in ssh.aliases[:2]]


@pytest.fixture(params=["local", "ssh"])
def master(request):
    if request.param == "local":
        m = Master("local:2")
    else:
        ssh = request.getfixturevalue("ssh")
        m = Master(bare_hosts(request), workers_per_host=1, ssh_config=ssh.ssh_config)
    with m:
        yield m


def pid_and_square(x):
    return os.getpid(), x * x


def fails_on_2(x):
    if x == 2:
        raise KeyError(f"no {x}")
    return x


def nested_parallel(x):
    inner = joblib.Parallel(n_jobs=-1)(
        joblib.delayed(pid_and_square)(i) for i in range(3)
    )
    return os.getpid(), [pid for pid, _ in inner], [sq for _, sq in inner]


def test_backend_is_registered_on_import():
    from joblib.parallel import BACKENDS

    from qjamfab.frontends.joblib_backend import QjamfabBackend

    assert BACKENDS["qjamfab"] is QjamfabBackend


def test_parallel_runs_on_the_workers(master):
    worker_pids = {s["pid"] for s in master.worker_stats().values()}
    with joblib.parallel_config(backend="qjamfab", master=master):
        out = joblib.Parallel(n_jobs=-1)(
            joblib.delayed(pid_and_square)(x) for x in range(50)
        )
    assert [sq for _, sq in out] == [x * x for x in range(50)]
    assert {pid for pid, _ in out} == worker_pids  # every worker, not us
    assert not master.closed  # a given Master stays open


def test_generator_unordered_yields_results_as_they_finish(master, gate, tmp_path):
    slow = str(tmp_path / "slow")
    quick = [str(tmp_path / f"quick{i}") for i in range(3)]
    with joblib.parallel_config(backend="qjamfab", master=master):
        results = joblib.Parallel(n_jobs=-1, return_as="generator_unordered")(
            joblib.delayed(touch_when_open)(path, gate.path if path == slow else None)
            for path in [slow, *quick]
        )
        first = next(results)
        assert first in quick and not os.path.exists(slow)  # slow still runs
        gate.open()
        assert sorted([first, *results]) == sorted([slow, *quick])


def test_effective_n_jobs_is_the_worker_count(master):
    with joblib.parallel_config(backend="qjamfab", master=master):
        assert joblib.effective_n_jobs(-1) == 2
        assert joblib.effective_n_jobs(None) == 2
        assert joblib.effective_n_jobs(-2) == 1
        assert joblib.effective_n_jobs(8) == 2
        assert joblib.effective_n_jobs(1) == 1
        with pytest.raises(
            ValueError,
            match=r"^n_jobs == 0 in Parallel has "
            "no meaning: give -1 for every worker",
        ):
            joblib.effective_n_jobs(0)


def test_without_master_a_master_from_qjamfab_hosts_closed_after(
    monkeypatch, qjamfab_home
):
    monkeypatch.setenv("QJAMFAB_HOSTS", "local:2")
    with joblib.parallel_config(backend="qjamfab"):
        out = joblib.Parallel(n_jobs=-1)(
            joblib.delayed(pid_and_square)(x) for x in range(10)
        )
        assert [sq for _, sq in out] == [x * x for x in range(10)]
        assert os.getpid() not in {pid for pid, _ in out}
        # The Parallel call is over: its Master and workers are gone.
        assert not processes_mentioning(str(qjamfab_home))
        # The next call opens one again.
        assert joblib.Parallel(n_jobs=-1)(
            joblib.delayed(abs)(-x) for x in range(4)
        ) == [0, 1, 2, 3]
    assert not processes_mentioning(str(qjamfab_home))


def test_master_options_open_that_master(qjamfab_home):
    with joblib.parallel_config(backend="qjamfab", hosts="local:1"):
        assert joblib.effective_n_jobs(-1) == 1
        with joblib.Parallel(n_jobs=-1) as parallel:  # 1 job: runs here
            assert (
                parallel(joblib.delayed(os.getpid)() for _ in range(2))
                == [os.getpid()] * 2
            )
    with joblib.parallel_config(backend="qjamfab", hosts="local", workers_per_host=2):
        pids = joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(8))
        assert os.getpid() not in pids


def test_a_raising_task_is_reraised_with_its_remote_traceback(master):
    with joblib.parallel_config(backend="qjamfab", master=master):
        with pytest.raises(KeyError, match="no 2") as info:
            joblib.Parallel(n_jobs=-1)(joblib.delayed(fails_on_2)(x) for x in range(6))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    assert "in fails_on_2" in cause.remote_traceback
    # The Master is fine afterwards.
    assert list(master.map(abs, [-1, -2])) == [1, 2]


def test_nested_parallel_runs_sequentially_on_the_worker(local2):
    with joblib.parallel_config(backend="qjamfab", master=local2):
        out = joblib.Parallel(n_jobs=-1)(
            joblib.delayed(nested_parallel)(x) for x in range(2)
        )
    for outer_pid, inner_pids, squares in out:
        assert inner_pids == [outer_pid] * 3 and squares == [0, 1, 4]


@pytest.fixture
def local2():
    with Master("local:2") as m:
        yield m


def test_bad_backend_options_are_refused(local2):
    with pytest.raises(
        TypeError,
        match=r"^master= must be a qjamfab Master, "
        "not str: pass master=Master",
    ):
        joblib.parallel_config(backend="qjamfab", master="local:2")
    with pytest.raises(
        ValueError,
        match=r"^give either master= or Master "
        r"options \(workers_per_host\), not both",
    ):
        joblib.parallel_config(backend="qjamfab", master=local2, workers_per_host=2)
    with pytest.raises(
        TypeError,
        match=r"^the qjamfab joblib backend got an "
        r"unknown option 'hostz': give master=, or Master's "
        r"own options \(.*hosts.*\)$",
    ):
        joblib.parallel_config(backend="qjamfab", hostz="a")
    closed = Master("local:1")
    closed.close()
    with joblib.parallel_config(backend="qjamfab", master=closed):
        with pytest.raises(
            ValueError,
            match=r"^the Master given to the "
            "qjamfab joblib backend is closed: pass an open "
            "Master",
        ):
            joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(1) for _ in "ab")


# --- scikit-learn -------------------------------------------------------------

sklearn = pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X[::2], y[::2]  # 899 samples: a search of seconds


def _grid_search(X, y, n_jobs):
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    search = GridSearchCV(
        SVC(), {"C": [1, 10], "gamma": [1e-4, 1e-3, 1e-2]}, cv=3, n_jobs=n_jobs
    )
    # scikit-learn sends the warning filters with each task, and pytest's
    # name its own classes: a bare host cannot import pytest.
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        return search.fit(X, y)


@pytest.fixture(params=["local", "ssh"])
def sklearn_master(request):
    """local:2, or two bare SSH hosts that get scikit-learn (and numpy,
    scipy, joblib ...) from this machine with with_dependencies."""
    if request.param == "local":
        m = Master("local:2")
    else:
        ssh = request.getfixturevalue("ssh")
        m = Master(
            bare_hosts(request),
            workers_per_host=1,
            ssh_config=ssh.ssh_config,
            packages=with_dependencies("scikit-learn"),
        )
    with m:
        yield m


def test_scikit_learn_on_bare_hosts_says_to_ship_it(request, digits):
    ssh = request.getfixturevalue("ssh")
    X, y = digits
    hosts = bare_hosts(request)
    with Master(hosts, workers_per_host=1, ssh_config=ssh.ssh_config) as m:
        with joblib.parallel_config(backend="qjamfab", master=m):
            with pytest.raises(
                PreflightFailed,
                match=r"^host\d lacks the Python module 'sklearn', which the job "
                r"needs \(worker host\d-0\): install it for .* there, ship it from "
                r"here with Master\(\.\.\., "
                r"packages=with_dependencies\('scikit-learn'\)\)",
            ):
                _grid_search(X, y, n_jobs=-1)


def test_grid_search_gives_the_serial_best_params(sklearn_master, digits, tasks):
    master = sklearn_master
    X, y = digits
    serial = _grid_search(X, y, n_jobs=None)
    with joblib.parallel_config(backend="qjamfab", master=master):
        parallel = _grid_search(X, y, n_jobs=-1)
    assert parallel.best_params_ == serial.best_params_
    assert np.array_equal(
        parallel.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"]
    )
    assert tasks  # it ran on the workers


def test_cross_val_score_and_random_forest(local2, digits, tasks):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    X, y = digits
    serial = cross_val_score(SVC(gamma=1e-3), X, y, cv=3)
    forest = RandomForestClassifier(n_estimators=8, random_state=0).fit(X, y)
    with joblib.parallel_config(backend="qjamfab", master=local2):
        assert np.array_equal(
            cross_val_score(SVC(gamma=1e-3), X, y, cv=3, n_jobs=-1), serial
        )
        after_cv = len(tasks)
        remote = RandomForestClassifier(n_estimators=8, random_state=0, n_jobs=-1).fit(
            X, y
        )
    assert after_cv  # ran on the workers
    assert len(tasks) > after_cv  # the forest did too
    assert np.array_equal(remote.predict_proba(X), forest.predict_proba(X))
