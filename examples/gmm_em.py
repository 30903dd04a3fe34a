"""EM for a Gaussian mixture: E-step sums on the workers, M-step on the master.

The data: `samples` points in `--dims` dimensions drawn from a mixture of
`--components` Gaussians with random means and full covariances (seeded,
so a second run finds its slices in the workers' cache). Every EM iteration
is one `Master.run`: each slice computes its points' responsibilities under
the current mixture and returns a dict of their sufficient statistics (per
component: the sum of responsibilities, of responsibility-weighted points
and of their outer products) and its log-likelihood, which qjamfab's
default reduce adds key by key; the master makes the next weights, means
and full covariances from the sums (the M-step, unregularised).

EM never lowers the likelihood: the log-likelihood printed per iteration
must not decrease (allowing for rounding), and the script checks it. It
stops when an iteration gains less than --tol per sample, or after
--max-iter iterations. With scikit-learn installed, it also checks that
GaussianMixture(covariance_type="full", reg_covar=0), started from the same
mixture with the same tol, ends at the same one, to 1e-8. --plot FILE.png
trains again on 1, 2 and 4 workers and plots the negative log-likelihood
against wall time.

    pip install 'qjamfab[examples]'     # matplotlib, for --plot
    python examples/gmm_em.py [samples] [--components K] [--plot gmm.png]
    python examples/gmm_em.py 1000000 a b        # on hosts a and b
    QJAMFAB_HOSTS=a,b python examples/gmm_em.py 1000000
    inv run examples/gmm_em.py --hosts=a,b -- 1000000
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

from qjamfab import DataSet, Master
from qjamfab.hostspec import add_host_arguments, number_or_host, script_hosts

# A step may lower the log-likelihood by this much, relative, from rounding.
ROUNDING = 1e-10
CHECK_TOLERANCE = 1e-8  # largest difference from scikit-learn's mixture


def make_data(samples: int, components: int, dims: int, seed: int = 0):
    """(points, starting mixture): a mixture's samples, and uniform weights,
    distinct points as means and the data's covariance for each."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-5, 5, size=(components, dims))
    factors = rng.normal(size=(components, dims, dims)) / np.sqrt(dims)
    which = rng.choice(components, size=samples, p=rng.dirichlet([5.0] * components))
    noise = rng.normal(size=(samples, dims))
    X = means[which] + np.einsum("nij,nj->ni", factors[which], noise)
    start = (
        np.full(components, 1 / components),
        X[rng.choice(samples, size=components, replace=False)],
        np.array([np.cov(X, rowvar=False).reshape(dims, dims)] * components),
    )
    return X, start


def precision_factors(covariances: np.ndarray) -> np.ndarray:
    """P with P P' = inverse(covariance), per component (as scikit-learn's
    precisions_cholesky_): the workers then need no inversion."""
    factors = np.linalg.cholesky(covariances)  # L L' = covariance
    return np.array([np.linalg.inv(L).T for L in factors])


def e_step_params(mixture: tuple) -> tuple:
    """What e_step needs of a mixture (weights, means, covariances)."""
    weights, means, covariances = mixture
    return np.log(weights), means, precision_factors(covariances)


def e_step(params, points: np.ndarray) -> dict:
    """One slice's sufficient statistics and log-likelihood under the
    mixture params = (log weights, means, precision factors)."""
    log_weights, means, precisions = params
    dims = points.shape[1]
    log_density = np.empty((len(points), len(means)))
    for j, (mean, P) in enumerate(zip(means, precisions)):
        y = (points - mean) @ P
        log_density[:, j] = np.log(np.diag(P)).sum() - 0.5 * (
            dims * np.log(2 * np.pi) + (y**2).sum(axis=1)
        )
    joint = log_density + log_weights
    top = joint.max(axis=1, keepdims=True)
    log_evidence = top[:, 0] + np.log(np.exp(joint - top).sum(axis=1))
    resp = np.exp(joint - log_evidence[:, None])  # responsibilities
    return {
        "loglik": float(log_evidence.sum()),
        "weight": resp.sum(axis=0),
        "x": resp.T @ points,
        "xx": np.array([(points * r[:, None]).T @ points for r in resp.T]),
    }


def m_step(stats: dict, samples: int):
    """The mixture that maximises the expected log-likelihood: (weights,
    means, covariances)."""
    weight = stats["weight"]
    means = stats["x"] / weight[:, None]
    covariances = stats["xx"] / weight[:, None, None] - np.einsum(
        "ki,kj->kij", means, means
    )
    return weight / samples, means, covariances


def em(
    master: Master,
    dataset: DataSet,
    start: tuple,
    samples: int,
    max_iter: int,
    tol: float,
    on_iteration: Callable[[int, float], None] | None = None,
) -> tuple[tuple, list[float], Curve]:
    """EM iterations: (mixture, log-likelihood of each iteration's starting
    mixture, negative log-likelihood curve)."""
    started = time.perf_counter()
    mixture = start
    logliks: list[float] = []
    curve: Curve = []
    for iteration in range(1, max_iter + 1):
        params = e_step_params(mixture)
        stats = master.run(e_step, params=params, dataset=dataset)
        logliks.append(stats["loglik"])
        curve.append((time.perf_counter() - started, -stats["loglik"]))
        if on_iteration is not None:
            on_iteration(iteration, stats["loglik"])
        mixture = m_step(stats, samples)
        # As scikit-learn's: the last M-step is made before the check.
        if len(logliks) > 1 and logliks[-1] - logliks[-2] < tol * samples:
            break
    return mixture, logliks, curve


def first_decrease(logliks: list[float]) -> int | None:
    """The first iteration whose log-likelihood is below the one before
    by more than rounding, or None."""
    for i in range(1, len(logliks)):
        if logliks[i] < logliks[i - 1] - ROUNDING * abs(logliks[i - 1]):
            return i + 1
    return None


def compare_with_sklearn(X, start: tuple, mixture: tuple, tol: float, max_iter: int):
    """True unless scikit-learn is installed and its EM, from the same
    mixture with the same stopping rule, ends at another one."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        print("scikit-learn is not installed: no comparison with its GaussianMixture")
        return True
    weights, means, covariances = start
    gm = GaussianMixture(
        len(weights),
        covariance_type="full",
        reg_covar=0,  # ours is not regularised either
        tol=tol,
        max_iter=max_iter,
        weights_init=weights,
        means_init=means,
        precisions_init=np.linalg.inv(covariances),
    ).fit(X)
    theirs = np.concatenate([gm.weights_, gm.means_.ravel(), gm.covariances_.ravel()])
    ours = np.concatenate([part.ravel() for part in mixture])
    diff = float(np.abs(theirs - ours).max())
    same = diff <= CHECK_TOLERANCE
    print(
        f"scikit-learn GaussianMixture: {gm.n_iter_} iterations; weights, means "
        f"and covariances {'the same' if same else 'DIFFERENT'}: largest "
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
        help="how many points (default 100000)",
    )
    parser.add_argument("--components", type=positive_int, default=4)
    parser.add_argument("--dims", type=positive_int, default=3)
    parser.add_argument("--max-iter", type=positive_int, default=500)
    parser.add_argument(
        "--tol",
        type=positive_number,
        default=1e-5,
        help="stop when an iteration gains less log-likelihood per sample "
        "(default 1e-5)",
    )
    add_plot_argument(parser)
    add_host_arguments(parser)
    args = parser.parse_intermixed_args()  # hosts may follow options
    hosts = script_hosts(parser, args)
    if args.samples <= args.components * args.dims:
        parser.error(
            f"{args.samples} samples are too few for {args.components} full "
            f"covariances in {args.dims} dimensions: give more than "
            f"{args.components * args.dims}"
        )
    if args.plot:
        require_matplotlib(parser.prog)

    X, start = make_data(args.samples, args.components, args.dims)
    dataset = DataSet(X)
    print(
        f"Gaussian mixture: {args.samples} points in {args.dims} dimensions, "
        f"{args.components} components with full covariances"
    )

    def fit(master: Master, show: Callable[[int, float], None] | None = None):
        try:
            return em(
                master, dataset, start, args.samples, args.max_iter, args.tol, show
            )
        except np.linalg.LinAlgError:
            sys.exit(
                "gmm_em.py: a component's covariance became singular (it "
                "holds too few points): ask for fewer --components"
            )

    with Master(hosts) as master:
        started = time.perf_counter()
        mixture, logliks, _ = fit(
            master, lambda i, ll: print(f"iteration {i}: log-likelihood {ll:.10g}")
        )
        elapsed = time.perf_counter() - started
        print(
            f"{len(logliks)} iterations in {elapsed:.2f} s: log-likelihood "
            f"{logliks[-1]:.10g}, {logliks[-1] / args.samples:.6f} per sample"
        )
        for weight, mean in sorted(zip(mixture[0], mixture[1].tolist()), reverse=True):
            print(f"  weight {weight:.3f}, mean {np.round(mean, 3).tolist()}")
        print(master.last_run)
    fell = first_decrease(logliks)
    if fell is None:
        print(f"log-likelihood non-decreasing over the {len(logliks)} iterations")
    else:
        print(
            f"log-likelihood DECREASED at iteration {fell}: "
            f"{logliks[fell - 2]:.10g} -> {logliks[fell - 1]:.10g}"
        )
    same = compare_with_sklearn(X, start, mixture, args.tol, args.max_iter)
    if args.plot:
        curves = curves_by_workers(
            hosts,
            lambda m: m.run(e_step, params=e_step_params(start), dataset=dataset),
            lambda m: fit(m)[2],
        )
        save_plot(
            args.plot,
            curves,
            f"EM for a Gaussian mixture: {args.samples} points, "
            f"{args.components} components",
            "negative log-likelihood",
        )
        print(
            "plot of the negative log-likelihood against wall time on 1, 2, 4 "
            f"workers: {args.plot}"
        )
    return 0 if fell is None and same else 1


if __name__ == "__main__":
    sys.exit(main())
