"""Lloyd's k-means on the workers: each slice sums its points by nearest centroid.

The data: `points` points in `--dims` dimensions around `--clusters`
random centres (seeded, so a second run finds its slices in the workers'
cache); the starting centroids are drawn from them by k-means++ seeding.
Every iteration is one `Master.run`: each slice assigns its points to the
nearest centroid and returns a dict of, per cluster, the sum and the
count of its points, and their inertia (squared distance to their
centroid); qjamfab's default reduce adds the dicts key by key, and the
master divides sums by counts for the new centroids. It stops when the
centroids no longer change (no point changed cluster), as scikit-learn's
KMeans does with tol=0, or after --max-iter iterations.

With scikit-learn installed, it checks that KMeans(init=the same starting
centroids, n_init=1, algorithm="lloyd", tol=0) finds the same centroids, to
1e-8. --plot FILE.png trains again on 1, 2 and 4 workers and plots the
inertia against wall time.

    pip install 'qjamfab[examples]'     # matplotlib, for --plot
    python examples/kmeans.py [points] [--clusters K] [--plot kmeans.png]
    python examples/kmeans.py 1000000 a b        # on hosts a and b
    QJAMFAB_HOSTS=a,b python examples/kmeans.py 1000000
    inv run examples/kmeans.py --hosts=a,b -- 1000000
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
    require_matplotlib,
    save_plot,
)

from qjamfab import DataSet, Master
from qjamfab.hostspec import add_host_arguments, number_or_host, script_hosts

CHECK_TOLERANCE = 1e-8  # largest difference from scikit-learn's centroids
SEEDING_SAMPLE = 10_000  # points the starting centroids are drawn from


def make_data(points: int, clusters: int, dims: int, seed: int = 0):
    """(points, starting centroids): blobs of unit variance around random
    centres, and k-means++ centroids to start from."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-6, 6, size=(clusters, dims))
    X = centres[rng.integers(clusters, size=points)] + rng.normal(size=(points, dims))
    return X, kmeans_plus_plus(X[:SEEDING_SAMPLE], clusters, rng)


def kmeans_plus_plus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k points of X, each drawn with a probability proportional to its
    squared distance to the nearest one drawn before (Arthur and
    Vassilvitskii's seeding): spread out, so Lloyd's iterations are few."""
    chosen = [X[rng.integers(len(X))]]
    nearest = ((X - chosen[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        chosen.append(X[rng.choice(len(X), p=nearest / nearest.sum())])
        nearest = np.minimum(nearest, ((X - chosen[-1]) ** 2).sum(axis=1))
    return np.array(chosen)


def cluster_sums(centroids: np.ndarray, points: np.ndarray) -> dict:
    """One slice's part of an iteration: per cluster, the sum and count of
    its nearest points, and their squared distances to the centroids."""
    k = len(centroids)
    distances = (
        (points**2).sum(axis=1)[:, None]
        - 2 * points @ centroids.T
        + (centroids**2).sum(axis=1)
    )
    labels = distances.argmin(axis=1)
    members = labels[:, None] == np.arange(k)  # one-hot, (points, k)
    return {
        "sums": members.T.astype(float) @ points,
        "counts": np.bincount(labels, minlength=k),
        "inertia": float(((points - centroids[labels]) ** 2).sum()),
    }


def lloyd(
    master: Master,
    dataset: DataSet,
    centroids: np.ndarray,
    max_iter: int,
    on_iteration: Callable[[int, dict, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, int, bool, Curve]:
    """Lloyd's iterations: (centroids, iterations, converged, inertia curve).
    The inertia of an iteration is that of the centroids it started from."""
    started = time.perf_counter()
    curve: Curve = []
    for iteration in range(1, max_iter + 1):
        stats = master.run(cluster_sums, params=centroids, dataset=dataset)
        curve.append((time.perf_counter() - started, stats["inertia"]))
        counts = stats["counts"][:, None]
        # An empty cluster keeps its centroid.
        new = np.where(counts > 0, stats["sums"] / np.maximum(counts, 1), centroids)
        if on_iteration is not None:
            on_iteration(iteration, stats, new - centroids)
        if np.array_equal(new, centroids):
            return centroids, iteration, True, curve
        centroids = new
    return centroids, max_iter, False, curve


def show_iteration(iteration: int, stats: dict, moves: np.ndarray) -> None:
    empty = int((stats["counts"] == 0).sum())
    print(
        f"iteration {iteration}: inertia {stats['inertia']:.6f}, centroids moved "
        f"by up to {np.sqrt((moves**2).sum(axis=1)).max():.3g}"
        + (f", {empty} empty clusters kept their centroids" if empty else "")
    )


def compare_with_sklearn(X, start, centroids, max_iter: int) -> bool:
    """True unless scikit-learn is installed and finds other centroids."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        print("scikit-learn is not installed: no comparison with its KMeans")
        return True
    km = KMeans(
        len(start), init=start, n_init=1, algorithm="lloyd", tol=0, max_iter=max_iter
    ).fit(X)
    diff = float(np.abs(km.cluster_centers_ - centroids).max())
    same = diff <= CHECK_TOLERANCE
    print(
        f"scikit-learn KMeans: {km.n_iter_} iterations, inertia {km.inertia_:.6f}; "
        f"centroids {'the same' if same else 'DIFFERENT'}: largest difference "
        f"{diff:.3g} (tolerance {CHECK_TOLERANCE:g})"
    )
    return same


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Hosts: --hosts=a,b, or after the arguments (as qjam's examples "
        "took them); else $QJAMFAB_HOSTS, else local workers.",
    )
    parser.add_argument(
        "points",
        nargs="?",
        type=number_or_host(positive_int),
        default=100_000,
        help="how many points (default 100000)",
    )
    parser.add_argument("--clusters", type=positive_int, default=8, help="k")
    parser.add_argument("--dims", type=positive_int, default=10)
    parser.add_argument("--max-iter", type=positive_int, default=300)
    add_plot_argument(parser)
    add_host_arguments(parser)
    args = parser.parse_intermixed_args()  # hosts may follow options
    hosts = script_hosts(parser, args)
    if args.clusters > args.points:
        parser.error(
            f"--clusters={args.clusters} is more than the {args.points} points: "
            "ask for fewer clusters or more points"
        )
    if args.plot:
        require_matplotlib(parser.prog)

    X, start = make_data(args.points, args.clusters, args.dims)
    dataset = DataSet(X)
    print(
        f"k-means: {args.points} points in {args.dims} dimensions, "
        f"{args.clusters} clusters"
    )
    with Master(hosts) as master:
        started = time.perf_counter()
        centroids, iterations, converged, curve = lloyd(
            master, dataset, start, args.max_iter, show_iteration
        )
        elapsed = time.perf_counter() - started
        print(
            f"{'converged' if converged else 'stopped, not converged,'} after "
            f"{iterations} iterations in {elapsed:.2f} s: inertia {curve[-1][1]:.6f}"
        )
        print(master.last_run)
    ok = compare_with_sklearn(X, start, centroids, args.max_iter)
    if args.plot:
        curves = curves_by_workers(
            hosts,
            lambda m: m.run(cluster_sums, params=start, dataset=dataset),
            lambda m: lloyd(m, dataset, start, args.max_iter)[3],
        )
        save_plot(
            args.plot,
            curves,
            f"Lloyd's k-means: {args.points} points, {args.clusters} clusters",
            "inertia",
        )
        print(f"plot of inertia against wall time on 1, 2, 4 workers: {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
