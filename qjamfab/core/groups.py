"""A run's groups of slices: each one's slices, the copy that won it,
which still lack a value, which were given up for one task per slice, and
how many of each one's slices the progress bar shows already.

Every slice of a run counts once: a group is delivered by the first copy
to win it, and a group whose slices run again one by one (its copies lost)
is replaced, so a late copy of it can no longer win.
"""

from __future__ import annotations

from .copies import TaskCopy


class Groups:
    def __init__(self) -> None:
        self.slices: dict[int, list[int]] = {}  # group id -> its slices
        self.won: dict[int, TaskCopy] = {}  # group -> winning copy
        self.replaced: set[int] = set()  # groups re-run slice by slice
        self.undelivered: set[int] = set()  # groups without a value
        self.shown: dict[int, int] = {}  # group -> slices on the bar

    def add(self, group: int, slices: list[int]) -> None:
        self.slices[group] = slices
        self.undelivered.add(group)

    def win(self, task: TaskCopy) -> bool:
        """Whether the finished copy wins its group (no other copy did,
        and its slices do not run apart now)."""
        if task.group in self.won or task.group in self.replaced:
            return False
        self.won[task.group] = task
        return True

    def unwin(self, task: TaskCopy) -> None:
        """The copy's value is gone (its host or worker with it)."""
        if self.won.get(task.group) is task:
            del self.won[task.group]

    def progressed(self, group: int, done: int) -> int:
        """A copy reports `done` slices of its group: how many more the
        bar shows (the first copy's count; none once delivered)."""
        shown = self.shown.get(group, 0)
        if group not in self.undelivered or done <= shown:
            return 0
        self.shown[group] = done
        return done - shown

    def delivered(self, tasks: list[TaskCopy]) -> int:
        """The copies' values are in: how many of their slices the bar
        showed already."""
        for task in tasks:
            self.undelivered.discard(task.group)
        return sum(self.shown.pop(t.group, 0) for t in tasks)

    def replace_within(self, slices: list[int]) -> int:
        """Give up the undelivered groups, not won, made only of `slices`
        (they run again one task per slice): how many of their slices the
        bar showed, to take back."""
        lost = set(slices)
        shown = 0
        for group in [
            g
            for g in self.slices
            if g in self.undelivered
            and g not in self.won
            and set(self.slices[g]) <= lost
        ]:
            self.undelivered.discard(group)
            self.replaced.add(group)
            shown += self.shown.pop(group, 0)
        return shown
