"""What a run takes from its Master: its settings (`RunSettings`, the
clock included) and its progress bar (`Progress`, made by the display
layer; the run logic imports none of it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Progress(Protocol):
    """A run's progress bar (the display layer's RunProgress)."""

    def advance(self, n: int) -> None:
        """Count `n` more slices or tasks done (negative: taken back)."""

    def close(self) -> None:
        """The run ended: take the bar down."""


ProgressFactory = Callable[[int, str], Progress]  # (total, unit) -> bar


class NoProgress:
    """No progress bar (a Run given none)."""

    def __init__(self, total: int, unit: str):
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RunSettings:
    """What a run takes from its Master's settings."""

    heartbeat_timeout: float
    straggler_factor: float
    replicas: int
    split: bool
    # The run's only time source: the engines' heartbeats (last_seen) are
    # read against it too.
    clock: Callable[[], float] = field(default=time.monotonic)
