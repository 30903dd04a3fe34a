"""Where a run's params go: once per host, not once per worker.

Small params travel with each worker's first TASK of the run. Big ones
(runtime/shared_params.SHARE_MIN_BYTES and up) go once to a host whose
agent serves several of the run's workers (a PARAMS frame to the agent,
which writes them into shared memory for its workers), and once into
shared memory on this machine for local workers; each worker then gets a
PARAMS frame naming where they are, and its TASKs carry none.
QJAMFAB_SHARE_PARAMS=0 sends them with each worker's first TASK, as small
ones go.
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import protocol
from ..hostspec import env_setting
from ..links.workers import Link, WorkerHandle
from ..runtime.shared_params import SHARE_MIN_BYTES, HostParams


def sharing_enabled() -> bool:
    value, _ = env_setting("SHARE_PARAMS")
    return value not in ("0", "no", "false", "off")


class ParamsPlacement:
    """One run's params on their way to its workers."""

    def __init__(self, run_id: int, parts: Sequence, links: Sequence[Link]):
        self.run_id = run_id
        self.parts = parts
        big = sum(memoryview(p).nbytes for p in parts) >= SHARE_MIN_BYTES
        share = big and sharing_enabled()
        # Agents serving one worker hand it the stream: nothing to share.
        self.hosts = {
            x for x in links if share and x.agent and list(links).count(x) > 1
        }
        self.local = share and sum(x.local for x in links) > 1
        self.sent: set[Link] = set()  # hosts that have them
        self.here: HostParams | None = None  # this machine's copy

    def before_first_task(self, handle: WorkerHandle) -> bool:
        """Send what `handle` needs before its first TASK of the run;
        whether that TASK must carry the params itself."""
        link = handle.link
        if link in self.hosts:
            if link not in self.sent:
                link.send(
                    protocol.PARAMS,
                    {"run": self.run_id},
                    self.parts,
                    worker=protocol.AGENT,
                )
                self.sent.add(link)
            return False
        if self.local and link.local:
            if self.here is None:
                self.here = HostParams.from_parts(self.run_id, self.parts)
            frame = self.here.for_worker(handle, self.run_id)
            if frame is not None:
                handle.send(protocol.PARAMS, *frame)
            return False
        return True

    def close(self) -> None:
        """The run is over: workers keep what they mapped; this machine
        lets go of its copy."""
        if self.here is not None:
            self.here.close()
