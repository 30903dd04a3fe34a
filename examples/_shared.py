"""What the machine-learning examples share: their sizes' argument type,
their --plot option, which trains again on 1, 2 and 4 workers, and the plot
of a loss against wall time.

Not an example itself: kmeans.py, logistic_regression.py and gmm_em.py
import it (Python puts a script's own folder first on its path). It runs on
the master only; no function of it travels to the workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from qjamfab import Master
from qjamfab.hostspec import parse_hosts

WORKER_COUNTS = (1, 2, 4)

# (seconds since training started, loss) after each iteration
Curve = list[tuple[float, float]]


def positive_int(text: str) -> int:
    """argparse type of a size: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def positive_number(text: str) -> float:
    """argparse type of a setting such as a tolerance: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def plot_path(text: str) -> str:
    """argparse type of --plot: a file in a folder that exists (checked
    before training, not after)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(
            f"cannot save {text}: there is no folder {folder}: give a file in "
            "an existing folder"
        )
    return text


def add_plot_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plot",
        type=plot_path,
        metavar="FILE.png",
        help="train again on 1, 2 and 4 workers (after an untimed iteration "
        "that sends them the data) and save a plot of the loss against wall "
        "time (needs matplotlib)",
    )


def require_matplotlib(script: str) -> None:
    """Exit with what to install, before any work, if --plot cannot plot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit(
            f"{script} --plot needs matplotlib, which is not installed here: "
            "pip install 'qjamfab[examples]' (or pip install matplotlib)"
        )


def hosts_for(hosts: str | list[str] | None, workers: int) -> list[str]:
    """The given hosts (None: $QJAMFAB_HOSTS, else local) cut down to
    `workers` workers in all, spread over the first hosts in turn."""
    specs = parse_hosts(hosts)[:workers]
    return [
        dataclasses.replace(
            spec, workers=workers // len(specs) + (i < workers % len(specs))
        ).entry
        for i, spec in enumerate(specs)
    ]


def curves_by_workers(
    hosts: str | list[str] | None,
    warm_up: Callable[[Master], object],
    train: Callable[[Master], Curve],
) -> dict[int, Curve]:
    """train(master) on a Master of 1, 2 and 4 workers of the hosts. Each
    Master does warm_up(master) first, untimed: one run of the training's
    job, so that the curves compare iterations, not how long sending the
    slices took (or whether an earlier run left them in the workers'
    cache), nor the workers' first steps."""
    curves = {}
    for count in WORKER_COUNTS:
        chosen = hosts_for(hosts, count)
        with Master(chosen) as master:
            warm_up(master)
            curves[count] = curve = train(master)
            print(
                f"--plot: {len(curve)} iterations in {curve[-1][0]:.2f} s on "
                f"{', '.join(master.workers)} ({', '.join(chosen)})"
            )
    return curves


def save_plot(path: str, curves: dict[int, Curve], title: str, ylabel: str) -> None:
    """One line per worker count: the loss after each iteration against
    the wall time it was reached at."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for count, curve in curves.items():
        seconds, losses = zip(*curve)
        label = f"{count} worker{'s' * (count != 1)}: {seconds[-1]:.2f} s"
        ax.plot(seconds, losses, marker=".", label=label)
    ax.set(title=title, xlabel="wall time since training started (s)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
