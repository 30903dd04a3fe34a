"""A host of one worker: its agent hands the daemon the master's stream.

The daemon then reads and writes the stream itself (two fewer hops per
frame), and the agent only beats for it, from outside its interpreter,
until the daemon's connection ends.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable

from .. import protocol
from . import manage, stream_lock, write_locked
from .daemons import Daemon, Peer


def give_stream(
    master: Peer, daemon: Daemon, base: str, tell: Callable[..., None]
) -> None:
    """Give the daemon the master's stream (SCM_RIGHTS, once it says it
    is ready for it), then beat for it until its connection ends. Frames
    it sends before it is ready go to the master with `tell`."""
    while master.out:  # the ATTACH answer first, whole
        master.flush()
        if master.out:
            select.select([], [master.write_fd], [], 1.0)
    daemon.queue(protocol.frame(protocol.ATTACH, {}))
    while daemon.out:
        daemon.flush()
    while True:  # its heartbeats may come first
        kind, _, head, parts = daemon.reader.read()
        if kind == protocol.STATE and head.get("state") == "ready":
            break
        if kind != protocol.HEARTBEAT:
            tell(kind, head, parts, worker=daemon.index)
    daemon.sock.setblocking(True)
    socket.send_fds(daemon.sock, [b"s"], [master.read_fd, master.write_fd])
    os.close(master.read_fd)
    os.set_blocking(master.write_fd, True)
    lock = stream_lock(manage.socket_path(base, daemon.slot))
    try:
        _beat_for(daemon, lock, master.write_fd)
    finally:
        os.close(lock)


def _beat_for(daemon: Daemon, lock: int, write_fd: int) -> None:
    """Until the daemon's connection ends: its heartbeats, from outside
    its interpreter, while its process runs (stopped or gone: none).
    A C call holding its GIL stops its own thread, not these."""
    beat = protocol.frame(protocol.HEARTBEAT, {}, worker=daemon.index)
    beating = True
    while True:
        if select.select([daemon.sock], [], [], protocol.HEARTBEAT_INTERVAL_S)[0]:
            try:
                if not daemon.sock.recv(4096):
                    return
            except OSError:
                return
        elif beating and daemon.running():
            try:
                write_locked(lock, lambda v: os.writev(write_fd, v), beat)
            except OSError:
                beating = False  # the master hung up: the daemon ends next
