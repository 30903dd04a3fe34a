"""`minimize`: scipy.optimize.minimize over a loss summed on the workers.

Every evaluation of the loss and its gradient at theta is one `Master.run`
of `fun(theta, slice) -> (loss, grad)` over the dataset's slices, summed
in the run's fixed tree (so an evaluation's bits do not depend on how the
slices were spread, nor on lost workers); scipy proposes the next theta on
the master. scipy is an optional extra, imported when minimize is called.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import display, text
from ..data.dataset import BaseDataSet, DataSet
from ..errors import BadJob, MissingDependency

if TYPE_CHECKING:
    from scipy.optimize import OptimizeResult

    from ..master import Master

log = logging.getLogger("qjamfab")

LossAndGrad = tuple[float, np.ndarray]


def minimize(
    fun: Callable[[np.ndarray, Any], Any],
    x0: Any,
    dataset: Any,
    *,
    master: Master,
    method: str = "L-BFGS-B",
    finish: Callable[[Any, np.ndarray], LossAndGrad] | None = None,
    callback: Callable[..., Any] | None = None,
    progress: bool | None = None,
    **scipy_options: Any,
) -> OptimizeResult:
    """Minimise the sum over the dataset's slices of `fun(theta, slice)`,
    which returns (loss, gradient at theta), with
    `scipy.optimize.minimize(..., method=method, jac=True, **scipy_options)`;
    each evaluation is one `master.run`. Returns scipy's `OptimizeResult`.

    `finish(total, theta) -> (loss, grad)`, if given, makes the loss from
    what the slices' results add up to (then fun may return any result the
    default reduce adds): for a loss that is not a plain sum, such as a mean
    or a penalty on theta counted once. `callback` is scipy's (called
    per iteration, with the OptimizeResult so far if its parameter is named
    `intermediate_result`, else with theta). Each iteration is logged at
    INFO on the "qjamfab" logger, and shown on a progress line: `progress`
    None shows it in a terminal once the optimisation has lasted a second,
    True in a notebook too, False never.
    """
    try:
        import scipy.optimize
    except ImportError as exc:
        raise MissingDependency(
            "qjamfab.minimize needs scipy, which is not installed: "
            "pip install 'qjamfab[scipy]' (or scipy itself)"
        ) from exc
    if "jac" in scipy_options:
        raise TypeError(
            "minimize takes no jac=: fun returns the gradient with the loss, "
            "(loss, gradient); drop jac"
        )
    if not isinstance(dataset, BaseDataSet):
        dataset = DataSet(dataset)  # sliced and hashed once, not per run
    x0 = np.asarray(x0, dtype=float)
    options = scipy_options.get("options") or {}
    started = time.monotonic()
    iterations = 0
    evaluations = 0

    def evaluate(theta: np.ndarray) -> LossAndGrad:
        nonlocal evaluations
        evaluations += 1
        total = master.run(fun, params=theta, dataset=dataset, progress=False)
        made_by = "fun"
        if finish is not None:
            total, made_by = finish(total, theta), "finish"
        return _loss_and_grad(total, x0.size, made_by)

    def on_iteration(intermediate_result: OptimizeResult) -> None:
        nonlocal iterations
        iterations += 1
        loss = float(intermediate_result.fun)
        secs = time.monotonic() - started
        log.info(
            "minimize: iteration %d, loss %.10g (%d evaluations, %s)",
            iterations,
            loss,
            evaluations,
            text.format_duration(secs),
        )
        bar.describe(f"minimize: loss {loss:.6g}")
        bar.advance()
        if callback is None:
            return
        if "intermediate_result" in inspect.signature(callback).parameters:
            callback(intermediate_result=intermediate_result)
        else:
            callback(np.copy(intermediate_result.x))

    with display.RunProgress(
        options.get("maxiter", 0),
        enabled=progress,
        unit="iterations",
        description="minimize",
    ) as bar:
        return scipy.optimize.minimize(
            evaluate,
            x0,
            method=method,
            jac=True,
            callback=on_iteration,
            **scipy_options,
        )


def _loss_and_grad(value: Any, size: int, made_by: str) -> LossAndGrad:
    """(loss, grad) as scipy takes them, or an error saying what was wrong."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise BadJob(
            f"{made_by} must return (loss, gradient), not a "
            f"{type(value).__name__}: return a pair of a number and an array "
            "of theta's size"
        )
    loss, grad = value
    grad = np.asarray(grad, dtype=float)
    if np.ndim(loss) != 0 or grad.size != size:
        raise BadJob(
            f"{made_by} returned a loss of shape {np.shape(loss)} and a gradient "
            f"of {grad.size} values for theta of {size}: return a number and an "
            "array of theta's size"
        )
    return float(loss), grad.ravel()
