"""What a run reports: its `RunStats`, and the output its workers send
(LOG events, printed with the worker's name before each line)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from .. import text
from ..links.workers import Event, WorkerHandle


@dataclass
class RunStats:
    """What one `Master.run` did."""

    elapsed_s: float = 0.0
    workers: int = 0
    slices: int = 0
    slices_sent: int = 0
    slices_cached: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dataset_bytes_sent: int = 0
    worker_compute_s: dict[str, float] = field(default_factory=dict)
    lost_workers: list[str] = field(default_factory=list)
    rerun_slices: int = 0
    backup_tasks: int = 0
    replica_bytes_sent: int = 0
    damaged_slices: int = 0
    spilled_results: int = 0  # held nodes the master wrote to disk
    tasks: int = 0  # tasks sent: copies and re-runs included
    moved_tasks: int = 0  # queued tasks a worker that ran dry took
    # Of a host's held tasks, those its agent gave a worker there that ran
    # dry (the same task, moved at the host: none sent, none in `tasks`).
    moved_at_hosts: int = 0
    broadcasts_sent: int = 0  # Broadcasts sent to workers lacking them
    broadcast_bytes_sent: int = 0  # their bytes (in bytes_sent too)

    def __repr__(self) -> str:
        compute = ", ".join(
            f"{name} {secs:.3f}s" for name, secs in self.worker_compute_s.items()
        )
        plural = text.plural
        lost = (
            f"; lost {', '.join(self.lost_workers)}, re-ran "
            f"{plural(self.rerun_slices, 'slice')}"
            if self.lost_workers
            else ""
        )
        if self.backup_tasks:
            lost += f"; {plural(self.backup_tasks, 'backup task')}"
        size = text.format_bytes
        if self.broadcasts_sent:
            lost += (
                f"; {plural(self.broadcasts_sent, 'broadcast')} sent "
                f"({size(self.broadcast_bytes_sent)})"
            )
        return (
            f"RunStats({text.format_duration(self.elapsed_s)} on "
            f"{plural(self.workers, 'worker')}: "
            f"{plural(self.slices, 'slice')}, {self.slices_cached} cached, "
            f"{self.slices_sent} sent ({size(self.dataset_bytes_sent)}); "
            f"{size(self.bytes_sent)} sent, "
            f"{size(self.bytes_received)} received; compute: "
            f"{compute or '-'}{lost})"
        )

    # The notebook view: the display layer's renderer, which the Master
    # sets (the run logic sits below display and imports none of it).
    render_html: ClassVar[Callable[..., str] | None] = None  # (RunStats) -> html

    def _repr_html_(self) -> str | None:
        render = RunStats.render_html  # read on the class: not bound to self
        return render(self) if render else None


def print_event_log(event: Event) -> None:
    """Print a LOG event's text, prefixed by its worker (or host agent)."""
    source = event.source
    print_log(
        source.name if isinstance(source, WorkerHandle) else source.label,
        event.head["text"],
    )


def print_log(worker: str, text: str) -> None:
    prefix = f"[{worker}] "
    sys.stdout.write(
        "".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n"))
    )
    sys.stdout.flush()
