"""qjamfab.minimize: scipy's minimize over a loss summed on the workers."""

import logging
import os
import sys

import numpy as np
import pytest

import qjamfab
from qjamfab import BadJob, DataSet, Master, MissingDependency, QjamfabError

pytestmark = pytest.mark.timeout(120)

TIGHT = {"options": {"gtol": 1e-12, "ftol": 1e-15, "maxiter": 500}}


def regression_data(rows=600, features=5, seed=3):
    """[X | y] of a seeded least-squares problem, one row per sample."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, features)) * [1.0, 3.0, 0.5, 2.0, 1.0][:features]
    y = X @ rng.standard_normal(features) + 0.1 * rng.standard_normal(rows)
    return np.hstack([X, y[:, None]])


def least_squares(theta, rows):
    X, y = rows[:, :-1], rows[:, -1]
    r = X @ theta - y
    return 0.5 * (r @ r), X.T @ r


def test_gives_scipys_answer_on_one_machine():
    from scipy.optimize import OptimizeResult
    from scipy.optimize import minimize as scipy_minimize

    data = regression_data()
    x0 = np.zeros(5)
    serial = scipy_minimize(
        lambda t: least_squares(t, data), x0, jac=True, method="L-BFGS-B", **TIGHT
    )
    with Master("local:2") as m:
        res = qjamfab.minimize(
            least_squares, x0, DataSet(data, slice_size=50), master=m, **TIGHT
        )
    assert isinstance(res, OptimizeResult) and res.success, res
    np.testing.assert_allclose(res.x, serial.x, rtol=0, atol=1e-8)
    assert abs(res.fun - serial.fun) <= 1e-8 * max(1.0, abs(serial.fun))
    exact = np.linalg.lstsq(data[:, :-1], data[:, -1], rcond=None)[0]
    np.testing.assert_allclose(res.x, exact, rtol=0, atol=1e-8)


def test_finish_makes_the_loss_from_the_sum(caplog):
    """A penalty on theta, counted once: finish adds it to the sum."""
    from scipy.optimize import minimize as scipy_minimize

    data, lam = regression_data(rows=200, features=3), 5.0

    def ridge(total, theta):
        loss, grad = total
        return loss + 0.5 * lam * theta @ theta, grad + lam * theta

    def whole(theta):
        return ridge(least_squares(theta, data), theta)

    x0 = np.ones(3)
    serial = scipy_minimize(whole, x0, jac=True, method="L-BFGS-B", **TIGHT)
    seen = []
    with Master("inproc:2") as m, caplog.at_level(logging.INFO, logger="qjamfab"):
        res = qjamfab.minimize(
            least_squares,
            x0,
            data,  # not a DataSet: minimize makes one
            master=m,
            finish=ridge,
            callback=lambda theta: seen.append(theta),
            **TIGHT,
        )
    np.testing.assert_allclose(res.x, serial.x, rtol=0, atol=1e-8)
    # Progress: a logged line and a callback per iteration.
    lines = [r.getMessage() for r in caplog.records if "minimize:" in r.getMessage()]
    assert len(lines) == len(seen) == res.nit > 0
    assert lines[0].startswith("minimize: iteration 1, loss "), lines[0]
    assert f"iteration {res.nit}, loss {res.fun:.10g} (" in lines[-1], lines[-1]
    np.testing.assert_array_equal(seen[-1], res.x)


def test_a_callback_of_intermediate_result_gets_scipys_result_and_can_stop():
    data = regression_data(rows=100, features=3)
    losses = []

    def callback(intermediate_result):
        losses.append(intermediate_result.fun)
        if len(losses) == 2:
            raise StopIteration

    with Master("inproc:2") as m:
        res = qjamfab.minimize(
            least_squares, np.zeros(3), data, master=m, callback=callback
        )
    assert len(losses) == 2 and res.nit == 2 and res.fun == losses[-1]


def test_survives_a_worker_lost_mid_optimisation(tmp_path):
    """A worker dies in the optimisation's fourth evaluation or so: every
    evaluation still sums every slice, to the same bits, so the whole
    optimisation is the one without the loss."""
    marks = str(tmp_path)

    def dies_once(theta, rows):
        import os

        import qjamfab.engines.inproc

        with open(os.path.join(marks, "calls"), "a") as f:
            f.write(".")
        late = os.path.getsize(os.path.join(marks, "calls")) > 3 * 12
        if late:
            try:  # O_EXCL: of two workers late at once, one dies
                died = os.path.join(marks, "died")
                os.close(os.open(died, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                qjamfab.engines.inproc.die()
        return least_squares(theta, rows)

    data = DataSet(regression_data(rows=240), slice_size=20)  # 12 slices
    with Master("inproc:2") as m:
        clean = qjamfab.minimize(least_squares, np.zeros(5), data, master=m, **TIGHT)
    with Master("inproc:2") as m:
        res = qjamfab.minimize(dies_once, np.zeros(5), data, master=m, **TIGHT)
    assert os.path.exists(os.path.join(marks, "died"))
    assert res.success and res.x.tobytes() == clean.x.tobytes()
    assert (res.nit, res.nfev) == (clean.nit, clean.nfev)


@pytest.mark.parametrize(
    "returned, message",
    [
        (
            "1.5",
            "fun must return (loss, gradient), not a float: return a pair of a "
            "number and an array of theta's size",
        ),
        (
            "(1.0, np.ones(2))",
            "fun returned a loss of shape () and a gradient of 2 values for theta "
            "of 3: return a number and an array of theta's size",
        ),
    ],
)
def test_a_bad_result_of_fun_says_what_to_return(returned, message):
    bad = eval(f"lambda theta, rows: {returned}")
    with Master("inproc:1") as m:
        with pytest.raises(BadJob) as exc:
            qjamfab.minimize(bad, np.zeros(3), [1, 2], master=m)
    assert str(exc.value) == message


def test_jac_is_refused_since_fun_gives_the_gradient():
    with pytest.raises(TypeError) as exc:
        qjamfab.minimize(least_squares, np.zeros(2), [1], master=None, jac=True)
    assert str(exc.value) == (
        "minimize takes no jac=: fun returns the gradient with the loss, "
        "(loss, gradient); drop jac"
    )


def test_without_scipy_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy fails
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(MissingDependency) as exc:
        qjamfab.minimize(least_squares, np.zeros(2), [1], master=None)
    assert str(exc.value) == (
        "qjamfab.minimize needs scipy, which is not installed: "
        "pip install 'qjamfab[scipy]' (or scipy itself)"
    )
    assert isinstance(exc.value, ImportError) and isinstance(exc.value, QjamfabError)
