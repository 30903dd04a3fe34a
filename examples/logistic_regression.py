"""Logistic regression trained with qjamfab.minimize: scikit-learn's answer, on workers.

The data: `samples` rows of `--features` standard normal features and
0/1 labels drawn from a logistic model (seeded, so a second run finds its
slices in the workers' cache). The loss is scikit-learn's for
LogisticRegression(C=C) with its default L2 penalty,

    C * sum_i log(1 + exp(-s_i (x_i . w + b)))  +  1/2 |w|^2

(s_i = +1 or -1 for label 1 or 0; the intercept b is not penalised).
`qjamfab.minimize` runs scipy's L-BFGS-B on the master; every evaluation
is one `Master.run` in which each slice returns its sum of log-losses and
its gradient, and `finish` scales the sum by C and adds the penalty, once.

With scikit-learn installed, it checks that LogisticRegression(C=C,
solver="lbfgs", tol=1e-10) finds the same coefficients and intercept, to
1e-6. --plot FILE.png trains again on 1, 2 and 4 workers and plots the loss
against wall time.

    pip install 'qjamfab[examples]'     # scipy, for L-BFGS-B; matplotlib
    python examples/logistic_regression.py [samples] [--plot logreg.png]
    python examples/logistic_regression.py 1000000 a b   # on hosts a and b
    QJAMFAB_HOSTS=a,b python examples/logistic_regression.py 1000000
    inv run examples/logistic_regression.py --hosts=a,b -- 1000000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
from _shared import (
    Curve,
    add_plot_argument,
    curves_by_workers,
    positive_int,
    positive_number,
    require_matplotlib,
    save_plot,
)

from qjamfab import DataSet, Master, minimize
from qjamfab.hostspec import add_host_arguments, number_or_host, script_hosts

CHECK_TOLERANCE = 1e-6  # largest difference from scikit-learn's coefficients
# Tight enough that both optimisers stop within rounding of the optimum:
# the check compares optima, not where two stopping rules happened to stop.
OPTIONS = {"maxiter": 10_000, "gtol": 1e-10, "ftol": 1e-15}


def make_data(samples: int, features: int, seed: int = 0):
    """(X, y): standardised features and labels of a logistic model."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(samples, features))
    w, b = rng.normal(size=features), 0.5
    y = (rng.random(samples) < 1 / (1 + np.exp(-(X @ w + b)))).astype(float)
    return X, y


def log_loss(theta: np.ndarray, rows: np.ndarray) -> tuple[float, np.ndarray]:
    """One slice's sum of log-losses, and its gradient in theta = (w, b).
    The rows hold the features, then the label."""
    X, y = rows[:, :-1], rows[:, -1]
    z = X @ theta[:-1] + theta[-1]
    loss = float((np.logaddexp(0, z) - y * z).sum())  # log(1 + e^z) - y z
    error = np.exp(-np.logaddexp(0, -z)) - y  # sigmoid(z) - y, without overflow
    return loss, np.append(X.T @ error, error.sum())


def penalised(C: float) -> Callable:
    """minimize's finish: C times the summed log-loss, plus 1/2 |w|^2."""

    def finish(total: tuple[float, np.ndarray], theta: np.ndarray):
        loss, grad = total
        w = np.append(theta[:-1], 0.0)  # the intercept is not penalised
        return C * loss + 0.5 * w @ w, C * grad + w

    return finish


def train(
    master: Master,
    dataset: DataSet,
    features: int,
    C: float,
    on_iteration: Callable[[int, float], None] | None = None,
):
    """L-BFGS-B from zero: (scipy's OptimizeResult, loss curve)."""
    started = time.perf_counter()
    curve: Curve = []

    def callback(intermediate_result) -> None:
        curve.append((time.perf_counter() - started, intermediate_result.fun))
        if on_iteration is not None:
            on_iteration(len(curve), intermediate_result.fun)

    result = minimize(
        log_loss,
        np.zeros(features + 1),
        dataset,
        master=master,
        finish=penalised(C),
        callback=callback,
        progress=False,  # each iteration is printed instead
        options=OPTIONS,
    )
    return result, curve


def compare_with_sklearn(X, y, theta: np.ndarray, C: float) -> bool:
    """True unless scikit-learn is installed and finds another optimum."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        print("scikit-learn is not installed: no comparison with its model")
        return True
    model = LogisticRegression(C=C, solver="lbfgs", tol=1e-10, max_iter=10_000)
    model.fit(X, y)
    theirs = np.append(model.coef_.ravel(), model.intercept_)
    diff = float(np.abs(theirs - theta).max())
    same = diff <= CHECK_TOLERANCE
    print(
        f"scikit-learn LogisticRegression: {int(model.n_iter_[0])} iterations; "
        f"coefficients {'the same' if same else 'DIFFERENT'}: largest "
        f"difference {diff:.3g} (tolerance {CHECK_TOLERANCE:g})"
    )
    return same


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Hosts: --hosts=a,b, or after the arguments (as qjam's examples "
        "took them); else $QJAMFAB_HOSTS, else local workers.",
    )
    parser.add_argument(
        "samples",
        nargs="?",
        type=number_or_host(positive_int),
        default=100_000,
        help="how many rows (default 100000)",
    )
    parser.add_argument("--features", type=positive_int, default=20)
    parser.add_argument(
        "--C",
        type=positive_number,
        default=1.0,
        help="scikit-learn's C: the inverse of the L2 penalty's strength",
    )
    add_plot_argument(parser)
    add_host_arguments(parser)
    args = parser.parse_intermixed_args()  # hosts may follow options
    hosts = script_hosts(parser, args)
    try:  # before any work: minimize needs it
        import scipy.optimize  # noqa: F401
    except ImportError:
        sys.exit(
            f"{parser.prog} needs scipy, which is not installed here: "
            "pip install 'qjamfab[examples]' (or pip install scipy)"
        )
    if args.plot:
        require_matplotlib(parser.prog)

    X, y = make_data(args.samples, args.features)
    dataset = DataSet(np.column_stack([X, y]))
    print(
        f"logistic regression: {args.samples} samples, {args.features} "
        f"features, C={args.C:g}"
    )
    with Master(hosts) as master:
        started = time.perf_counter()
        result, _ = train(
            master,
            dataset,
            args.features,
            args.C,
            lambda i, loss: print(f"iteration {i}: loss {loss:.10g}"),
        )
        elapsed = time.perf_counter() - started
        theta = result.x
        accuracy = float((((X @ theta[:-1] + theta[-1]) > 0) == y).mean())
        print(
            f"L-BFGS-B: {result.message} after {result.nit} iterations, "
            f"{result.nfev} evaluations in {elapsed:.2f} s: loss {result.fun:.10g}, "
            f"training accuracy {accuracy:.3f}"
        )
        print(master.last_run)
    ok = compare_with_sklearn(X, y, theta, args.C) and bool(result.success)
    if args.plot:
        curves = curves_by_workers(
            hosts,
            lambda m: m.run(
                log_loss, params=np.zeros(args.features + 1), dataset=dataset
            ),
            lambda m: train(m, dataset, args.features, args.C)[1],
        )
        save_plot(
            args.plot,
            curves,
            f"Logistic regression (L-BFGS-B): {args.samples} samples, "
            f"{args.features} features",
            "loss (C * log-loss + L2 penalty)",
        )
        print(f"plot of the loss against wall time on 1, 2, 4 workers: {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
