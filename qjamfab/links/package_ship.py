"""Shipping distributions to a host over its agent stream, and saying what
an upload did.

`ship(link, dists)` runs right after a host's HELLO and before ATTACH: the
platform is checked (packages.check_platform), the agent says which
hashes it lacks, only those travel, one zip each, and the agent installs
them under `<base>/packages/<hash>/` (runtime/packages.py); a second
session sends nothing. `describe` is one line for what an upload did,
for the log and `inv bootstrap`. Which distributions, and their zips, are
packages.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .. import protocol
from ..errors import PreflightFailed, WorkerLost
from .answers import await_answer
from .handshake import HANDSHAKE_TIMEOUT_S
from .packages import Distribution, check_platform
from .workers import Event, Link

log = logging.getLogger("qjamfab")

INSTALL_TIMEOUT_S = 300.0  # for a host to unpack and check what it got


def ship(link: Link, dists: Sequence[Distribution]) -> dict:
    """Make `dists` importable on the host of `link` (an agent stream that
    has said HELLO, before ATTACH): send what it lacks, have the agent and
    its daemons put them on sys.path. What happened: {"sent", "cached",
    "on_host": [names], "bytes": sent}. The link is closed when it fails."""
    try:
        check_platform(
            dists, link.info, link.label, link.info.get("executable") or link.python
        )
        link.send(
            protocol.PACKAGES,
            {
                "offer": [
                    {"hash": d.hash, "name": d.name, "version": d.version}
                    for d in dists
                ]
            },
            worker=protocol.AGENT,
        )
        answer = _answer(link, 30.0, "say which packages it has")
        if answer.get("error"):
            raise PreflightFailed(
                f"{link.label} cannot keep packages under "
                f"{link.info.get('base')}/packages: {answer['error']}",
                host=link.label,
            )
        sent = 0
        report: dict = {"sent": [], "cached": [], "on_host": [], "bytes": 0}
        for dist in dists:
            if dist.hash in answer["missing"]:
                sent += _send(link, dist)
                report["sent"].append(str(dist))
            elif dist.hash in answer["on_host"]:
                report["on_host"].append(str(dist))
            else:
                report["cached"].append(str(dist))
        report["bytes"] = sent
        link.send(
            protocol.PACKAGES,
            {"use": [d.hash for d in dists if d.hash not in answer["on_host"]]},
            worker=protocol.AGENT,
        )
        answer = _answer(link, INSTALL_TIMEOUT_S, "install the packages")
        by_hash = {d.hash: d for d in dists}
        for digest, why in answer["failed"].items():
            dist = by_hash[digest]
            raise PreflightFailed(
                f"{link.label}: {dist} could not be installed under "
                f"{link.info.get('base')}/packages ({why}): free disk space "
                f"or fix permissions there, and retry",
                host=link.label,
            )
    except BaseException:
        link.close()
        raise
    report["host"] = link.label
    log.info("%s", describe(report))
    return report


def _send(link: Link, dist: Distribution) -> int:
    """Send one distribution's zip to the agent; the bytes sent."""
    return link.send(
        protocol.PACKAGES,
        {"install": dist.hash, "name": dist.name},
        [dist.zip()],
        worker=protocol.AGENT,
    )


def _answer(link: Link, timeout: float, doing: str) -> dict:
    """The agent's next PACKAGES frame (also when a blocked send read it
    into the inbox)."""

    def is_answer(event: Event) -> bool:
        return event.source is link and event.kind == protocol.PACKAGES

    def read() -> list[Event]:
        # Each read waits up to `timeout`: a stall ends the link.
        if not link.alive:
            _, tail = link.transport.exit_report(None)
            said = tail.strip().splitlines()[-1] if tail.strip() else "it said nothing"
            raise WorkerLost(
                f"{link.label}: the agent did not {doing} in "
                f"{timeout:g} s or ended ({said}): check the host's "
                f"disk space and load, and retry"
            )
        return link.read_events()

    def take(event: Event) -> bool:  # another's event, for the run to see
        if link.pending is not None:
            link.pending.append(event)
        return False

    link.transport.set_read_timeout(timeout)
    try:
        pending = link.pending if link.pending is not None else []
        for event in list(pending):
            if is_answer(event):
                pending.remove(event)
                return event.head
        answer = await_answer(read, is_answer, take=take)
        assert answer is not None  # never gives up: read() raises
        return answer.head
    finally:
        if link.alive:
            link.transport.set_read_timeout(HANDSHAKE_TIMEOUT_S)


def describe(report: dict) -> str:
    """One line for what a package upload did on a host."""
    said = [
        f"{label} {', '.join(report[what])}"
        for what, label in (
            ("sent", "uploaded"),
            ("cached", "already there:"),
            ("on_host", "the host's own:"),
        )
        if report.get(what)
    ]
    return f"packages on {report.get('host')}: " + (
        "; ".join(said) or report.get("note", "none")
    )
