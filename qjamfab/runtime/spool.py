"""Frames through a directory both ends of a stream see (the home
directory a cluster shares): for a stream that holds back what it cannot
send in one message of its own.

`srun` carries a step's stdin and stdout in messages of at most 1024
bytes over TCP with Nagle's algorithm on, and the far end delays its ACK:
a frame of more than one such message waits about 44 ms each way (params
of 26 KB and their gradient: 88 ms per run). So over such a stream a
frame bigger than `SPOOL_OVER` bytes is written to a file in the
session's spool directory (0700, the file 0600) and a small SPOOL frame
naming it goes in its place, in order. The reader opens the file, removes
it and reads the frame from it as from the stream. Slices and packages
stay on the stream: they are big enough to stream whole.

Both ends check the directory is shared (`shared`) before either spools:
the master writes a token there and the agent reads it back.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import socket

from .. import protocol
from ..errors import ProtocolError
from . import pid_alive

SPOOL_OVER = 1000  # bytes; srun forwards up to 1024 at once
_STREAMED = (protocol.REFS, protocol.PACKAGES)  # big: they stream whole
_TOKEN = "token"


def new_dir(root: str, session: str) -> tuple[str, str]:
    """A new spool directory under `root` for this process, and its token.
    Those that processes of this machine that ended left there (a Master
    killed by SIGKILL) are removed first; its name says whose it is."""
    host = socket.gethostname()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(root):
            made_on, _, rest = name.partition(":")
            pid = rest.partition(":")[0]
            if made_on == host and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    # host:pid:session-n (no host name has a colon)
    name = f"{host}:{os.getpid()}:{session}-{secrets.token_hex(4)}"
    directory = os.path.join(root, name)
    return directory, make(directory)


def make(directory: str) -> str:
    """A new spool directory (0700) with a fresh token in it: the token."""
    os.makedirs(directory, mode=0o700)
    token = secrets.token_hex(16)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with open(os.open(os.path.join(directory, _TOKEN), flags, 0o600), "w") as f:
        f.write(token)
    return token


def shared(directory: str, token: str) -> bool:
    """Whether this end sees the spool directory the other end made (its
    token in it), and it is this user's alone."""
    try:
        st = os.stat(directory)
        with open(os.path.join(directory, _TOKEN)) as f:
            found = f.read()
    except OSError:
        return False
    private = st.st_uid == os.getuid() and not st.st_mode & 0o077
    return private and secrets.compare_digest(found, token)


class Spool:
    """One end's frames through the spool directory."""

    def __init__(self, directory: str, prefix: str):
        self.directory = directory
        self.prefix = prefix  # each end's files apart from the other's
        self.names = itertools.count(1)

    def out(self, buffers: list) -> list:
        """A frame's buffers to write on the stream: a SPOOL frame instead
        when the frame is big and not one that streams whole."""
        if (
            protocol.frame_size(buffers) <= SPOOL_OVER
            or protocol.frame_kind(buffers) in _STREAMED
        ):
            return buffers
        name = f"{self.prefix}{next(self.names)}"
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                protocol.write_all(lambda views: os.writev(fd, views), buffers)
            finally:
                os.close(fd)
        except OSError:  # no room, or the directory gone: the slow way
            with contextlib.suppress(OSError):
                os.unlink(path)
            return buffers
        return protocol.frame(protocol.SPOOL, {"name": name})

    def take(self, head: dict) -> int:
        """The open file of a SPOOL frame's frame, removed from the
        directory (the caller closes it). ProtocolError when it is not
        there."""
        name = head.get("name")
        if not isinstance(name, str) or os.sep in name or name.startswith("."):
            raise ProtocolError(
                f"a SPOOL frame naming {name!r}, not a spooled frame: the "
                f"peer is not a qjamfab peer of protocol version {protocol.VERSION}"
            )
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
            os.unlink(path)
        except OSError as exc:
            raise ProtocolError(
                f"a frame the other end spooled is not in {self.directory} "
                f"({exc.strerror}): the directory is not shared as it was; "
                "restart the Master"
            ) from exc
        return fd


def file_reader(fd: int) -> protocol.FrameReader:
    """A reader of the frame in a spooled file (`take`'s)."""
    return protocol.FrameReader(lambda view: os.readv(fd, [view]))


def read_frame(fd: int) -> tuple:
    """The one frame in a spooled file: (kind, worker, head, parts)."""
    return file_reader(fd).read()
