"""What a worker's ERROR means for the user: the error a run raises for a
job that failed there, with the fix in its first line and the remote
traceback (source lines included) after it."""

from __future__ import annotations

import re

from .. import text
from ..errors import BadJob, PreflightFailed, QjamfabError, ReduceError, RemoteError
from ..links.workers import WorkerHandle

_NEEDED_BY = {
    "loading the job": "the job",
    "loading params": "the params",
    "loading a slice": "a dataset slice",
}


def remote_error(handle: WorkerHandle, where: str, head: dict) -> QjamfabError:
    """The error for an ERROR `head` from `handle`, which was running
    `where` (e.g. "dataset slices 0, 1")."""
    trace = text.with_source_lines(head["traceback"].rstrip())
    if head["type"] == "ReduceMismatch":
        return _mismatch(head, f"on worker {handle.name}, {where}", trace)
    if head["type"] == "ModuleNotFoundError":
        module = re.search(r"No module named '([^']+)'", head["message"])
        from ..links.packages import suggestion

        ship = module and suggestion(module[1])
        return PreflightFailed(
            f"{handle.host} lacks the Python module "
            f"{module[1] if module else head['message']!r}, which "
            f"{_NEEDED_BY.get(head['phase'], 'the job')} needs (worker "
            f"{handle.name}): {handle.link.install_advice(ship or None)}\n{trace}",
            host=handle.host,
        )
    if head["phase"] == "loading the job":
        return BadJob(
            f"worker {handle.name} cannot load the job ({head['type']}: "
            f"{head['message']}): make what it uses importable there, "
            f"or define it in your script\n{trace}"
        )
    return RemoteError(
        f"{head['phase']} raised {head['type']}: {head['message']} "
        f"(worker {handle.name}, {where}); fix the job and run again\n"
        f"--- remote traceback ---\n{trace}",
        worker=handle.name,
        remote_type=head["type"],
        remote_traceback=head["traceback"],
    )


def collect_error(host: str, head: dict) -> ReduceError:
    """The error for an ERROR `head` from `host`'s agent, which was
    combining its workers' results (COLLECT)."""
    trace = head["traceback"].rstrip()
    if head["type"] == "ReduceMismatch":  # the default reduce, as anywhere
        return _mismatch(head, f"combining on {host}", trace)
    return ReduceError(
        f"{head['phase']} on {host} raised {head['type']}: {head['message']}: "
        f"fix reduce(a, b) so it combines two results\n{trace}"
    )


def _mismatch(head: dict, where: str, trace: str) -> ReduceError:
    """Results the default reduce cannot combine: its own message first."""
    return ReduceError(f"{head['message']}\n({where})\n{trace}")
