"""The qjam paper's sparse autoencoder, trained with L-BFGS on qjamfab workers.

The model of the paper's benchmark: 64 visible units (8x8 image patches),
30 hidden units, tanh activations in both layers, weight decay 0.002 and a
KL sparsity penalty with target 0.002 and weight 4, optimised by
scipy's L-BFGS-B with m=10, through `qjamfab.minimize` (or, with
--hand-wired, scipy.optimize.fmin_l_bfgs_b around `Master.run`). Every cost
evaluation is one `Master.run` over the cached patches.

    pip install 'qjamfab[examples]'     # scipy, for its L-BFGS
    python examples/sparse_autoencoder.py [patches] [--iterations N]
    python examples/sparse_autoencoder.py 100000 a b     # on hosts a and b
    QJAMFAB_HOSTS=a,b python examples/sparse_autoencoder.py 100000
    inv run examples/sparse_autoencoder.py --hosts=a,b -- 100000

The cost, for m patches x_i (rows of X) and theta = (W1, W2, b1, b2):

    a2_i = tanh(W1 x_i + b1)                          hidden layer, in (-1, 1)
    a3_i = tanh(W2 a2_i + b2)                         reconstruction
    J    = 1/m sum_i 1/2 |a3_i - x_i|^2
         + lambda/2 (|W1|^2 + |W2|^2)                 weight decay
         + beta sum_j KL(rho || rho_hat_j)            sparsity

KL divergence is defined for a firing probability in (0, 1), and tanh
activations live in (-1, 1): so a hidden unit's activation a is mapped to a
firing rate (a + 1) / 2 and rho_hat_j = 1/m sum_i (a2_ij + 1) / 2, the mean
over ALL patches. A unit is "off" at -1, so the target rho = 0.002 asks each
unit to be near -1 for almost every patch. The gradient follows by backprop;
the sparsity term adds s_j = beta/2 (-rho/rho_hat_j + (1-rho)/(1-rho_hat_j))
to the error reaching hidden unit j (the 1/2 is d(a+1)/2 / da).

Exact on any slicing. rho_hat depends on every patch, so a slice cannot
finish its own cost. `mapfunc` returns sufficient statistics instead, and
they add up across slices (qjamfab's default reduce `+`). Because s is the
same for every patch, the hidden-layer gradient splits as

    sum_i ((W2' d3_i + s) * f'_i) x_i'  =  sum_i ((W2' d3_i) * f'_i) x_i'
                                           + diag(s) sum_i f'_i x_i'

so one pass returns both sums (and sum_i a2_i for rho_hat), and `finish`
adds the sparsity part on the master once rho_hat is known. The result is
the serial cost and gradient (`serial_cost`, the usual two-pass numpy
code) up to floating-point rounding, for any slicing or number of workers.

Data. No image can be downloaded here, so `natural_images` makes natural-
image-like pictures deterministically: Gaussian noise shaped to the 1/f
amplitude spectrum of natural scenes, then whitened with Olshausen and
Field's filter f exp(-(f/f0)^4), as the paper's images were. `sample_patches`
draws 8x8 patches, removes each patch's mean, clips at 3 standard
deviations and scales into [-0.9, 0.9], inside tanh's range.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

VISIBLE = 64  # 8 x 8 patches
HIDDEN = 30
WEIGHT_DECAY = 0.002  # lambda
SPARSITY_TARGET = 0.002  # rho
SPARSITY_WEIGHT = 4.0  # beta
LBFGS_M = 10
BLOCK_ROWS = 512  # patches per step inside mapfunc (cache-sized)


# --- data ----------------------------------------------------------------


def natural_images(count: int = 10, size: int = 512, seed: int = 0) -> np.ndarray:
    """`count` whitened natural-image-like pictures, (count, size, size),
    each scaled to unit variance. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    one_over_f = 1.0 / f  # the amplitude spectrum of natural scenes
    one_over_f[0, 0] = 0.0
    f0 = 0.4 * 0.5  # Olshausen & Field: f0 = 0.4 x Nyquist
    whitening = f * np.exp(-((f / f0) ** 4))
    whitening[0, 0] = 0.0
    images = np.empty((count, size, size))
    for k in range(count):
        noise = np.fft.rfft2(rng.standard_normal((size, size)))
        image = np.fft.irfft2(noise * one_over_f * whitening, s=(size, size))
        images[k] = image / image.std()
    return images


def sample_patches(
    n: int, patch: int = 8, seed: int = 0, images: np.ndarray | None = None
) -> np.ndarray:
    """n patches (rows) of patch x patch pixels, C-contiguous float64 in
    [-0.9, 0.9]: mean removed per patch, clipped at 3 standard deviations."""
    if images is None:
        images = natural_images(seed=seed)
    rng = np.random.default_rng(seed + 1)
    count, height, width = images.shape
    k = rng.integers(0, count, n)
    r = rng.integers(0, height - patch + 1, n)
    c = rng.integers(0, width - patch + 1, n)
    d = np.arange(patch)
    rows = (r[:, None] + d[None, :])[:, :, None]  # n x patch x 1
    cols = (c[:, None] + d[None, :])[:, None, :]  # n x 1 x patch
    X = images[k[:, None, None], rows, cols].reshape(n, patch * patch)
    X -= X.mean(axis=1, keepdims=True)
    limit = 3 * X.std()
    return np.ascontiguousarray(np.clip(X, -limit, limit) / limit * 0.9)


# --- parameters ------------------------------------------------------------


def theta_size(visible: int = VISIBLE, hidden: int = HIDDEN) -> int:
    return 2 * hidden * visible + hidden + visible


def initial_theta(
    visible: int = VISIBLE, hidden: int = HIDDEN, seed: int = 0
) -> np.ndarray:
    """Uniform weights in +-sqrt(6 / (fan_in + fan_out + 1)), zero biases."""
    r = np.sqrt(6.0 / (visible + hidden + 1))
    rng = np.random.default_rng(seed)
    W1 = rng.uniform(-r, r, (hidden, visible))
    W2 = rng.uniform(-r, r, (visible, hidden))
    return np.concatenate([W1.ravel(), W2.ravel(), np.zeros(hidden), np.zeros(visible)])


def unpack(theta: np.ndarray, visible: int, hidden: int):
    """(W1 hidden x visible, W2 visible x hidden, b1, b2), views of theta."""
    hv = hidden * visible
    W1 = theta[:hv].reshape(hidden, visible)
    W2 = theta[hv : 2 * hv].reshape(visible, hidden)
    b1 = theta[2 * hv : 2 * hv + hidden]
    b2 = theta[2 * hv + hidden :]
    return W1, W2, b1, b2


def _kl(rho: float, rho_hat: np.ndarray) -> np.ndarray:
    return rho * np.log(rho / rho_hat) + (1 - rho) * np.log((1 - rho) / (1 - rho_hat))


def _sparsity_delta(rho: float, beta: float, rho_hat: np.ndarray) -> np.ndarray:
    # d(beta KL(rho || rho_hat_j)) / d rho_hat_j, times d rho_hat / d a = 1/2
    # (the 1/m of the mean is applied with the rest of the gradient).
    return 0.5 * beta * (-rho / rho_hat + (1 - rho) / (1 - rho_hat))


# --- serial: the usual numpy code --------------------------------------------


def serial_cost(
    theta: np.ndarray,
    X: np.ndarray,
    hidden: int = HIDDEN,
    lam: float = WEIGHT_DECAY,
    rho: float = SPARSITY_TARGET,
    beta: float = SPARSITY_WEIGHT,
) -> tuple[float, np.ndarray]:
    """Cost and gradient over all patches X (rows), in one process."""
    m, visible = X.shape
    W1, W2, b1, b2 = unpack(theta, visible, hidden)
    A2 = np.tanh(X @ W1.T + b1)
    rho_hat = ((A2 + 1) / 2).mean(axis=0)
    A3 = np.tanh(A2 @ W2.T + b2)
    diff = A3 - X
    cost = (
        0.5 * (diff.ravel() @ diff.ravel()) / m
        + 0.5 * lam * (W1.ravel() @ W1.ravel() + W2.ravel() @ W2.ravel())
        + beta * _kl(rho, rho_hat).sum()
    )
    D3 = diff * (1 - A3 * A3)
    D2 = (D3 @ W2 + _sparsity_delta(rho, beta, rho_hat)) * (1 - A2 * A2)
    grad = np.concatenate(
        [
            (D2.T @ X / m + lam * W1).ravel(),
            (D3.T @ A2 / m + lam * W2).ravel(),
            D2.sum(axis=0) / m,
            D3.sum(axis=0) / m,
        ]
    )
    return float(cost), grad


# --- distributed: sufficient statistics per slice -----------------------------


def stats_size(visible: int, hidden: int) -> int:
    return 2 + hidden + visible * hidden + visible + 2 * hidden * visible + 2 * hidden


def mapfunc(params, X):
    """Sufficient statistics of a slice of patches, as one flat vector:
    [m, sum 1/2|a3-x|^2, sum a2 (h), sum d3 a2' (v x h), sum d3 (v),
     sum [(W2'd3)*f'; f'] x' (2h x v), sum [(W2'd3)*f'; f'] (2h)].

    Works through the slice BLOCK_ROWS patches at a time, so that the
    temporaries stay in the core's cache: the whole-slice version is bound
    by memory bandwidth, which two cores share.
    """
    theta, hidden = params
    m, visible = X.shape
    W1, W2, b1, b2 = unpack(theta, visible, hidden)
    h, v = hidden, visible
    out = np.zeros(stats_size(v, h))
    ends = np.cumsum([2, h, v * h, v, 2 * h * v, 2 * h])
    head, a_sum, gW2, gb2, G, g_sum = np.split(out, ends[:-1])
    for start in range(0, m, BLOCK_ROWS):
        x = X[start : start + BLOCK_ROWS]
        A2 = np.tanh(x @ W1.T + b1)
        A3 = np.tanh(A2 @ W2.T + b2)
        diff = A3 - x
        D3 = diff * (1 - A3 * A3)
        fprime = 1 - A2 * A2
        P = np.concatenate([(D3 @ W2) * fprime, fprime], axis=1)  # n x 2h
        head[0] += len(x)
        head[1] += 0.5 * (diff.ravel() @ diff.ravel())
        a_sum += A2.sum(axis=0)
        gW2 += (D3.T @ A2).ravel()
        gb2 += D3.sum(axis=0)
        G += (P.T @ x).ravel()
        g_sum += P.sum(axis=0)
    return out


def finish(
    stats: np.ndarray,
    theta: np.ndarray,
    visible: int,
    hidden: int = HIDDEN,
    lam: float = WEIGHT_DECAY,
    rho: float = SPARSITY_TARGET,
    beta: float = SPARSITY_WEIGHT,
) -> tuple[float, np.ndarray]:
    """Cost and gradient from the statistics of all slices added up."""
    h, v = hidden, visible
    W1, W2, _, _ = unpack(theta, v, h)
    pos = 0

    def take(n):
        nonlocal pos
        pos += n
        return stats[pos - n : pos]

    m, sq = take(2)
    a_sum = take(h)
    gW2 = take(v * h).reshape(v, h)
    gb2 = take(v)
    G = take(2 * h * v).reshape(2 * h, v)
    g_sum = take(2 * h)
    rho_hat = (a_sum / m + 1) / 2
    s = _sparsity_delta(rho, beta, rho_hat)
    cost = (
        sq / m
        + 0.5 * lam * (W1.ravel() @ W1.ravel() + W2.ravel() @ W2.ravel())
        + beta * _kl(rho, rho_hat).sum()
    )
    grad = np.concatenate(
        [
            ((G[:h] + s[:, None] * G[h:]) / m + lam * W1).ravel(),
            (gW2 / m + lam * W2).ravel(),
            (g_sum[:h] + s * g_sum[h:]) / m,
            gb2 / m,
        ]
    )
    return float(cost), grad


def serial_stats_cost(
    theta: np.ndarray, X: np.ndarray, hidden: int = HIDDEN, **model
) -> tuple[float, np.ndarray]:
    """The distributed code in one process, without qjamfab: mapfunc over
    all of X, then finish. (The faster serial baseline of the benchmark.)"""
    return finish(mapfunc((theta, hidden), X), theta, X.shape[1], hidden, **model)


class DistributedCost:
    """cost(theta) -> (cost, gradient): one `Master.run` per call.

    Keeps per-call timings: `calls`, `seconds` (wall time of each call),
    `run_seconds` (of the Master.run inside it) and `compute_seconds` (the
    busiest worker's compute time in that run).
    """

    def __init__(
        self, master, dataset, visible: int = VISIBLE, hidden: int = HIDDEN, **model
    ):
        self.master = master
        self.dataset = dataset
        self.visible = visible
        self.hidden = hidden
        self.model = model
        self.seconds: list[float] = []
        self.run_seconds: list[float] = []
        self.compute_seconds: list[float] = []

    @property
    def calls(self) -> int:
        return len(self.seconds)

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        stats = self.master.run(
            mapfunc, params=(theta, self.hidden), dataset=self.dataset
        )
        run = self.master.last_run
        cost, grad = finish(stats, theta, self.visible, self.hidden, **self.model)
        self.seconds.append(time.perf_counter() - started)
        self.run_seconds.append(run.elapsed_s)
        self.compute_seconds.append(max(run.worker_compute_s.values(), default=0.0))
        return cost, grad


def train(cost, theta0: np.ndarray, iterations: int):
    """L-BFGS (m=10) for `iterations` iterations and cost evaluations at
    most (scipy may finish the iteration it is in): (theta, cost, scipy's
    info dict)."""
    from scipy.optimize import fmin_l_bfgs_b

    return fmin_l_bfgs_b(cost, theta0, m=LBFGS_M, maxiter=iterations, maxfun=iterations)


def slice_stats(theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """mapfunc as `qjamfab.minimize` calls it: fun(theta, slice)."""
    return mapfunc((theta, HIDDEN), X)


def train_with_minimize(
    master, dataset, theta0: np.ndarray, iterations: int, visible: int = VISIBLE
):
    """What `train` does, through qjamfab.minimize: (theta, cost, info)."""
    import qjamfab

    result = qjamfab.minimize(
        slice_stats,
        theta0,
        dataset,
        master=master,
        finish=lambda stats, theta: finish(stats, theta, visible),
        options={"maxcor": LBFGS_M, "maxiter": iterations, "maxfun": iterations},
    )
    return result.x, float(result.fun), {"nit": result.nit, "funcalls": result.nfev}


def main(argv: list[str] | None = None) -> int:
    from qjamfab import DataSet, Master
    from qjamfab.hostspec import add_host_arguments, number_or_host, script_hosts

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Hosts: --hosts=a,b, or after the arguments (as qjam's examples "
        "took them); else $QJAMFAB_HOSTS, else local workers.",
    )
    parser.add_argument("patches", nargs="?", type=number_or_host(int), default=10_000)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument(
        "--hand-wired",
        action="store_true",
        help="train with fmin_l_bfgs_b around Master.run, not qjamfab.minimize",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="also train with the serial code and compare",
    )
    add_host_arguments(parser)
    args = parser.parse_args(argv)
    hosts = script_hosts(parser, args)
    try:  # before any work: train() needs it at the end
        import scipy.optimize  # noqa: F401
    except ImportError:
        sys.exit(
            "sparse_autoencoder.py needs scipy, which is not installed here: "
            "pip install 'qjamfab[examples]' (or pip install scipy)"
        )

    X = sample_patches(args.patches)
    theta0 = initial_theta()
    print(f"{args.patches} patches of 8x8, {HIDDEN} hidden units")
    with Master(hosts) as master:
        dataset = DataSet(X)
        cost = DistributedCost(master, dataset)
        c0, g0 = cost(theta0)
        s0, sg0 = serial_cost(theta0, X)
        same = np.isclose(c0, s0, rtol=1e-10) and np.allclose(
            g0, sg0, rtol=1e-8, atol=1e-12
        )
        print(
            f"initial cost {c0:.6f} (serial {s0:.6f}): "
            f"{'equal' if same else 'DIFFERENT'}"
        )
        started = time.perf_counter()
        if args.hand_wired:
            theta, final, info = train(cost, theta0, args.iterations)
        else:
            theta, final, info = train_with_minimize(
                master, dataset, theta0, args.iterations
            )
        elapsed = time.perf_counter() - started
        print(
            f"final cost {final:.6f} after {info['nit']} iterations, "
            f"{info['funcalls']} evaluations on {len(master.workers)} "
            f"workers: {elapsed:.2f} s, "
            f"{elapsed / info['funcalls'] * 1e3:.1f} ms per evaluation"
        )
        print(master.last_run)
    if args.serial:
        started = time.perf_counter()
        _, serial_final, sinfo = train(
            lambda t: serial_cost(t, X), theta0, args.iterations
        )
        elapsed = time.perf_counter() - started
        print(
            f"serial: final cost {serial_final:.6f}, {elapsed:.2f} s, "
            f"{elapsed / sinfo['funcalls'] * 1e3:.1f} ms per evaluation"
        )
    return 0 if same and final < c0 else 1


if __name__ == "__main__":
    sys.exit(main())
