"""Calls held until the test lets them end: `held` and `touch_when_open`
run on a worker and return once the file of a `Gate` exists, which the
test creates when it has seen what it must see while the call runs (the
`gate` fixture in tests/conftest.py). Certain where a sleeping call is
only likely still running, and no test waits out the rest of a sleep."""

import os
import time

#: a held call ends after this long even if its gate stays shut, so that a
#: test that fails before opening it holds no worker for long
HOLD_AT_MOST_S = 60.0


def held(x, gate=None):
    """x, once the file `gate` exists (at once without one)."""
    deadline = time.monotonic() + HOLD_AT_MOST_S
    while gate is not None and not os.path.exists(gate):
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return x


def touch_when_open(path, gate=None):
    """Creates the file `path` once `gate` exists (at once without one)."""
    held(None, gate)
    with open(path, "w"):
        pass
    return path


class Gate:
    """The file held calls wait for: `open()` lets them end."""

    def __init__(self, path: str):
        self.path = path

    def open(self) -> None:
        with open(self.path, "w"):
            pass
