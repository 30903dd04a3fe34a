"""A host's agent on a paramiko SSH exec channel (`SSHChannelTransport`),
and the one-off commands and uploads the lifecycle tasks run over a
connection (`ssh_exec`, `sftp_upload`). paramiko's errors on a channel
become qjamfab errors here, by foreign.py's table (connecting is
hosts.py's)."""

from __future__ import annotations

import posixpath
import threading
import time
from typing import TYPE_CHECKING

import paramiko

from ...errors import HostError, HostUnreachable, WorkerLost
from ...links.foreign import mapped
from ...links.transport import STDERR_TAIL, Transport, tail

if TYPE_CHECKING:
    import fabric

_SSH_ERRORS = (paramiko.SSHException, OSError, EOFError)
_WINDOW = 64 << 20  # a large window keeps bulk slices streaming
_SEND_CHUNK = 32 << 10  # paramiko sends at most one packet per call
_WATCH_S = 0.25  # how often a send under way is held to its deadline


def _open_channel(conn: fabric.Connection, command: str, what: str) -> paramiko.Channel:
    doing = f"opening an SSH channel to {conn.host} for {what}"
    with mapped(doing, host=conn.host):
        transport = conn.client.get_transport()
        if transport is None:
            raise HostUnreachable(
                f"{doing} failed: the connection is closed: check that the "
                "host is up and retry",
                host=conn.host,
            )
        channel = transport.open_session(window_size=_WINDOW, timeout=30)
        channel.exec_command(command)
    return channel


def ssh_exec(
    conn: fabric.Connection,
    command: str,
    stdin: bytes = b"",
    timeout: float = 120.0,
) -> tuple[int, str, str]:
    """Run command on the host: (exit status, stdout, stderr)."""
    channel = _open_channel(conn, command, "a command")
    try:
        with mapped(f"running a command on {conn.host}", host=conn.host):
            channel.settimeout(timeout)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            out = bytearray()
            while chunk := channel.recv(1 << 16):
                out += chunk
            err = bytearray()
            while chunk := channel.recv_stderr(1 << 16):
                err += chunk
            status = channel.recv_exit_status()
    finally:
        channel.close()
    return status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def sftp_upload(
    conn: fabric.Connection, files: dict[str, bytes], staging: str, target: str
) -> None:
    """Write files under staging/ over SFTP, then rename staging to target."""
    with mapped(
        f"uploading the runtime to {conn.host}",
        host=conn.host,
        advice="check free disk space there and retry",
    ):
        sftp = conn.client.open_sftp()
        try:
            made: set[str] = set()
            for path, content in files.items():
                directory = posixpath.dirname(posixpath.join(staging, path))
                for i in range(len(staging), len(directory) + 1):
                    if (i == len(directory) or directory[i] == "/") and directory[
                        :i
                    ] not in made:
                        sftp.mkdir(directory[:i], mode=0o700)
                        made.add(directory[:i])
                with sftp.open(posixpath.join(staging, path), "wb") as f:
                    f.write(content)
            try:
                sftp.posix_rename(staging, target)
            except OSError:  # another master installed it first
                pass
        finally:
            sftp.close()


class SSHChannelTransport(Transport):
    """A host's agent on an SSH exec channel of `conn`, a connection this
    transport owns: closing one closes the other."""

    def __init__(self, name: str, conn: fabric.Connection, command: str):
        self.name = name
        self.host = conn.host
        self.conn = conn
        try:
            self.channel = _open_channel(conn, command, f"the agent of {name}")
        except HostError:
            conn.close()
            raise
        self._stderr = bytearray()  # its tail, for exit_report
        # A send the far end stops taking (a cut link) blocks inside
        # paramiko whatever the channel's timeout: its socket write retries
        # until the connection closes. So a watchdog closes the connection
        # when a send has taken longer than the read timeout, and that send
        # then fails as the host lost.
        self._send_started: float | None = None
        self._cut = False
        self._closed = threading.Event()
        threading.Thread(
            target=self._watch_sends, name=f"qjamfab-send-deadline-{name}", daemon=True
        ).start()

    def fileno(self) -> int:
        # paramiko's fileno() turns readable for stderr too (a login
        # shell's warning, say): see has_input.
        return self.channel.fileno()

    def has_input(self) -> bool:
        self._take_stderr()
        return (
            self.channel.recv_ready()
            or self.channel.eof_received
            or self.channel.closed
        )

    def _take_stderr(self) -> None:
        """Move what the far end wrote to stderr into our tail of it, so
        that it stops making the channel look readable."""
        try:
            while self.channel.recv_stderr_ready():
                self._stderr += self.channel.recv_stderr(1 << 16)
        except _SSH_ERRORS:
            return
        del self._stderr[:-STDERR_TAIL]

    def set_read_timeout(self, seconds: float) -> None:
        self.channel.settimeout(seconds)

    def readinto(self, view: memoryview) -> int:
        try:
            data = self.channel.recv(len(view))
        except TimeoutError as exc:
            raise TimeoutError(
                f"worker {self.name} sent nothing for {self.channel.gettimeout():g} s"
            ) from exc
        except _SSH_ERRORS:
            return 0
        view[: len(data)] = data
        return len(data)

    def wait_writable(self) -> bool:
        deadline = time.monotonic() + (self.channel.gettimeout() or 3600)
        while time.monotonic() < deadline:
            if self.channel.closed:
                return False  # the next send says so
            if self.channel.send_ready():
                return False
            if self.channel.recv_ready():
                return True
            time.sleep(0.001)
        raise self._took_nothing()

    def writev(self, views: list) -> int:
        if not self.channel.send_ready() and not self.channel.closed:
            return 0  # its window is full: see wait_writable
        self._send_started = time.monotonic()
        try:
            with mapped(
                f"sending to worker {self.name} on the SSH channel to {self.host}",
                worker=self.name,
            ):
                sent = self.channel.send(bytes(views[0][:_SEND_CHUNK]))
        except WorkerLost as lost:
            if self._cut or isinstance(lost.__cause__, TimeoutError):
                raise self._took_nothing() from None
            raise
        finally:
            self._send_started = None
        if self._cut:  # closed as the send ended: what it sent may be lost
            raise self._took_nothing()
        if not sent:
            raise WorkerLost(
                f"worker {self.name}: the SSH channel to {self.host} is closed",
                worker=self.name,
            )
        return sent

    def _watch_sends(self) -> None:
        while not self._closed.wait(_WATCH_S):
            started, limit = self._send_started, self.channel.gettimeout()
            if started is not None and time.monotonic() - started > (limit or 3600):
                self._cut = True
                self.channel.get_transport().close()  # the send fails now
                return

    def close(self) -> None:
        self._closed.set()
        try:
            self.channel.close()
        except _SSH_ERRORS:
            pass
        try:
            self.conn.close()
        except Exception:  # closing an already broken connection
            pass

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        status = None
        if self.channel.status_event.wait(2):
            status = self.channel.recv_exit_status()
        self._take_stderr()
        return status, tail(self._stderr.decode("utf-8", "replace"))
