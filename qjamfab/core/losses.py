"""A run's losses: which workers it lost, how, and when the job is to blame.

`Losses` keeps, for one run, each lost worker with how it ended and the
slices it was running. It raises `WorkerLost` as soon as the job itself is
the cause (one slice killed two workers, or the job made two workers exit)
and words the error for a run left without workers. Re-planning what a
loss leaves to run stays with the Run (run.py).
"""

from __future__ import annotations

from .. import text
from ..errors import WorkerLost


class Losses:
    """The workers one run lost, and what that says about its job."""

    def __init__(self, over_dataset: bool):
        self.over_dataset = over_dataset
        # Each lost worker: (name, how, the slices it was running).
        self.lost: list[tuple[str, str, list[int]]] = []
        self.kills: dict[int, list[str]] = {}  # slice -> workers it killed
        self.exits = 0  # workers whose process exited while running the job

    def record(
        self,
        name: str,
        detail: str,
        running: list[int],
        died: bool,
        status: int | None,
        tail: str,
    ) -> None:
        """Worker `name` was lost (`detail`: how) running `running`.
        `died`: its process ended, so those slices may be the cause.
        Raises WorkerLost when the job is to blame."""
        self.lost.append((name, detail, running))
        # Only the task it was running can have killed it, and only if it
        # died: a host that went silent says nothing about the slice.
        for i in running if died else ():
            self.kills.setdefault(i, []).append(name)
            if len(self.kills[i]) >= 2:
                raise WorkerLost(
                    f"{self.names([i])} killed workers "
                    f"{' and '.join(self.kills[i])} (last: {detail}): fix "
                    f"mapfunc for this input; the workers are restarted for "
                    f"the next run{text.stderr_tail(name, tail)}",
                    worker=name,
                    exit_status=status,
                    stderr_tail=tail,
                )
        # A process that exited (not killed by a signal) while running the
        # job was ended by the job: twice in a run, on any slices, is the
        # job's doing, not bad luck, and would take every worker down.
        if died and running and status is not None and status >= 0:
            self.exits += 1
            if self.exits >= 2:
                raise WorkerLost(
                    f"the job ended {self.exits} workers by exiting while "
                    f"running mapfunc ({self.said()}): mapfunc (or "
                    f"what it calls) exits its process, with sys.exit, "
                    f"os._exit or exit(): fix mapfunc so it returns or "
                    f"raises; the workers are restarted for the next run"
                    f"{text.stderr_tail(name, tail)}",
                    worker=name,
                    exit_status=status,
                    stderr_tail=tail,
                )

    def none_left(
        self, name: str, detail: str, slices: list[int], status: int | None, tail: str
    ) -> WorkerLost:
        """The error of a run that lost its last worker with `slices` to run."""
        what = (
            f"worker {name} was lost ({detail}) running {self.names(slices)}"
            if len(self.lost) <= 1
            else f"workers were lost ({self.said()}) with "
            f"{self.names(slices)} still to run"
        )
        return WorkerLost(
            f"{what}, and no worker is left: they are "
            f"restarted for the next run; check the job and the hosts"
            f"{text.stderr_tail(name, tail)}",
            worker=name,
            exit_status=status,
            stderr_tail=tail,
        )

    def said(self) -> str:
        """Each worker lost in this run, how, and what it was running."""
        return "; ".join(
            f"{name}: {how}" + (f", {self.names(s)}" if s else "")
            for name, how, s in self.lost
        )

    def names(self, slices: list[int]) -> str:
        """The slices as the run's messages name them ("dataset slices 1, 2")."""
        if not self.over_dataset:
            return "mapfunc(params, None)"
        return f"dataset slice{'s' if len(slices) > 1 else ''} " + ", ".join(
            map(str, slices)
        )
