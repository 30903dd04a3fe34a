"""Connecting to SSH hosts: an SSH host spec to an open Fabric Connection.

`connect` turns an SSH spec (hostspec.py) into an open `fabric.Connection`
that

- honours an ssh_config file (argument, else ``$QJAMFAB_SSH_CONFIG``, else
  what Fabric loads by default: ``~/.ssh/config`` and ``/etc/ssh/ssh_config``)
  for HostName, User, Port, IdentityFile, ProxyJump/ProxyCommand,
  ConnectTimeout (through Fabric), and for IdentitiesOnly and
  ServerAliveInterval (here: Fabric ignores those);
- checks the server's host key against known_hosts instead of Fabric's
  ``AutoAddPolicy``, with the policy knownhosts.py builds from
  StrictHostKeyChecking, UserKnownHostsFile, GlobalKnownHostsFile and
  HashKnownHosts;
- sends keepalives every ServerAliveInterval seconds (default 15), sets
  TCP_NODELAY, and puts AES-GCM ciphers and the host-key types known_hosts
  has for the host first.

Connecting is where paramiko and socket exceptions become qjamfab errors, for
connections: `connect` raises only qjamfab `HostError` subclasses, each with
``.host`` set and a first line naming the host (`_map_error`). Errors on a
worker's stream, once connected, are mapped where it is read and written
(links/transport.py, channel.py). Importing this
module raises paramiko's rekey thresholds to 2**40 (paramiko issue 822: a
client-initiated rekey under heavy traffic can time out; the server still
rekeys on its own schedule).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import fabric
import paramiko
import paramiko.packet
from paramiko.ssh_exception import (
    AuthenticationException,
    BadHostKeyException,
    NoValidConnectionsError,
    ProxyCommandFailure,
    SSHException,
)

from ...errors import (
    AuthenticationFailed,
    BadHostSpec,
    HostError,
    HostKeyError,
    HostUnreachable,
)
from ...hostspec import (
    HostSpec,
    config_option,
    config_path,
    config_yes,
    destination,
    env_setting,
    parse_hosts,
)
from . import knownhosts

__all__ = [
    "connect",
    "QjamfabConnection",
    "DEFAULT_KEEPALIVE",
    "REKEY_LIMIT",
]


#: paramiko issue 822 workaround, applied once at import.
REKEY_LIMIT = 2**40
paramiko.packet.Packetizer.REKEY_BYTES = REKEY_LIMIT
paramiko.packet.Packetizer.REKEY_PACKETS = REKEY_LIMIT


class _HandshakeNoise(logging.Filter):
    """paramiko logs the error that ends a handshake, traceback and all,
    from its transport's thread (on stderr in a script without logging
    set up), then raises it to `connect`, which says it as a qjamfab
    error: drop those records, once said is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread()
        return not (
            record.levelno >= logging.ERROR
            and isinstance(thread, paramiko.Transport)
            and not thread.is_authenticated()
        )


logging.getLogger("paramiko.transport").addFilter(_HandshakeNoise())

#: seconds between keepalive packets unless ssh_config's ServerAliveInterval
DEFAULT_KEEPALIVE = 15


# --- transport ------------------------------------------------------------

_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _prefer_fast_ciphers(transport: paramiko.Transport) -> None:
    """AES-GCM first: no separate per-packet HMAC, measured 1.4-1.7x the
    throughput of paramiko's default aes128-ctr + HMAC here."""
    opts = transport.get_security_options()
    ciphers = list(opts.ciphers)
    first = [c for c in _FAST_CIPHERS if c in ciphers]
    opts.ciphers = first + [c for c in ciphers if c not in first]


def _transport_factory(
    preferred: list[str],
) -> Callable[..., paramiko.Transport]:
    """A Transport whose host-key algorithm list puts the types known_hosts
    has for this host first (as OpenSSH does), so a host known by its RSA key
    is not reported as changed when it also has an ed25519 key."""
    wanted: set[str] = set()
    for t in preferred:
        wanted.add(t)
        if t == "ssh-rsa":
            wanted.update(("rsa-sha2-512", "rsa-sha2-256"))

    def factory(sock: object, **kwargs: Any) -> paramiko.Transport:
        t = paramiko.Transport(sock, **kwargs)
        _prefer_fast_ciphers(t)
        if wanted:
            opts = t.get_security_options()
            types = list(opts.key_types)
            first = [
                k
                for k in types
                if k in wanted or k.replace("-cert-v01@openssh.com", "") in wanted
            ]
            if first:
                opts.key_types = first + [k for k in types if k not in first]
        return t

    return factory


# --- connect ---------------------------------------------------------------


class QjamfabConnection(fabric.Connection):
    """A fabric.Connection whose close() also closes its ProxyJump gateway
    chain (Fabric leaves gateway connections open)."""

    def close(self) -> None:
        super().close()
        if isinstance(self.gateway, fabric.Connection):
            self.gateway.close()


def _fabric_config(ssh_config: str | None, label: str) -> fabric.Config:
    path = config_path(ssh_config)
    origin = (
        "the ssh_config argument"
        if ssh_config
        else "QJAMFAB_SSH_CONFIG"
        if path
        else "the default ssh_config"
    )
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise BadHostSpec(
                f"{label}: ssh_config file {path} (from {origin}) does not "
                f"exist: fix the path, or unset it to use ~/.ssh/config",
                host=label,
            )
    try:
        # in_stream=False: qjamfab runs nothing interactive, and Invoke's
        # default of forwarding our stdin breaks under pytest and daemons
        return fabric.Config(
            runtime_ssh_path=path, overrides={"run": {"in_stream": False}}
        )
    except (SSHException, OSError, ValueError) as e:
        raise BadHostSpec(
            f"{label}: cannot read ssh_config ({path or '~/.ssh/config'}, "
            f"from {origin}): {e}",
            host=label,
        ) from e


def _prepare(conn: fabric.Connection, label: str, connect_timeout: float) -> None:
    """Host-key policy, identity files and timeouts on a not-yet-open
    Connection, and on its ProxyJump gateways."""
    cfg_timeout = config_option(conn, "connecttimeout")
    timeout = connect_timeout
    if cfg_timeout is not None:
        try:
            timeout = float(cfg_timeout)
        except ValueError:
            pass
    conn.connect_timeout = timeout if timeout and timeout > 0 else None
    # Fabric may hand out its Config's own dict: copy before changing it
    kwargs = {k: conn.connect_kwargs[k] for k in conn.connect_kwargs}
    conn.connect_kwargs = kwargs
    if conn.connect_timeout:
        kwargs.setdefault("banner_timeout", conn.connect_timeout)

    # IdentityFile: skip missing files as OpenSSH does (paramiko raises)
    files = kwargs.get("key_filename")
    if files:
        if isinstance(files, str):
            files = [files]
        existing = [
            os.path.expanduser(f)
            for f in files
            if os.path.exists(os.path.expanduser(f))
        ]
        if existing:
            kwargs["key_filename"] = existing
        else:
            kwargs.pop("key_filename", None)
    if config_yes(config_option(conn, "identitiesonly")):
        kwargs.setdefault("look_for_keys", False)

    policy, preferred = knownhosts.host_key_policy(conn, label)
    # Fabric set AutoAddPolicy and loaded nothing: paramiko now asks us
    # about every key.
    conn.client.set_missing_host_key_policy(policy)
    kwargs["transport_factory"] = _transport_factory(preferred)

    if isinstance(conn.gateway, fabric.Connection):
        _prepare(
            conn.gateway,
            f"{label} (via jump host {conn.gateway.host})",
            connect_timeout,
        )


def _set_nodelay(conn: fabric.Connection) -> None:
    """Frames are written as a few sends; with Nagle's algorithm the last one
    waits for a delayed ACK (40 ms measured). Send at once instead."""
    transport = conn.transport
    if transport is not None and isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set_keepalive(conn: fabric.Connection) -> None:
    value = config_option(conn, "serveraliveinterval")
    try:
        interval = int(value) if value is not None else DEFAULT_KEEPALIVE
    except ValueError:
        interval = DEFAULT_KEEPALIVE
    if conn.transport is not None:
        conn.transport.set_keepalive(max(interval, 0))
    if isinstance(conn.gateway, fabric.Connection):
        _set_keepalive(conn.gateway)


def _close_quietly(conn: fabric.Connection) -> None:
    try:
        conn.close()
    except Exception:
        pass
    try:
        conn.client.close()
    except Exception:
        pass
    gw = conn.gateway
    if isinstance(gw, fabric.Connection):
        _close_quietly(gw)


def _reached_auth(conn: fabric.Connection) -> bool:
    """True when the failure came after key exchange and host-key check,
    i.e. during authentication."""
    t = conn.client.get_transport()
    return bool(
        t is not None
        and t.is_active()
        and t.host_key is not None
        and not t.is_authenticated()
    )


def connect(
    spec: HostSpec | str,
    *,
    ssh_config: str | None = None,
    connect_timeout: float = 10.0,
) -> fabric.Connection:
    """An open, host-key-checked Fabric Connection to an SSH host spec.

    User: ``user@`` in the spec, else ``$QJAMFAB_USER``, else
    ``$QJAM_USER``, else ssh_config's User, else the local user.
    ConnectTimeout from ssh_config wins over `connect_timeout`.

    Raises BadHostSpec (a local spec, a bad spec or ssh_config),
    HostUnreachable, AuthenticationFailed or HostKeyError.
    """
    if isinstance(spec, str):
        spec = parse_hosts([spec])[0]
    label = spec.raw
    if spec.is_local:
        raise BadHostSpec(
            f"{label}: is a local host spec and needs no SSH connection: "
            f"start local workers instead",
            host=label,
        )
    user, host, port = destination(spec)
    config = _fabric_config(ssh_config, label)
    try:
        conn = QjamfabConnection(host, user=user, port=port, config=config)
    except (SSHException, ValueError, OSError) as e:
        raise BadHostSpec(
            f"{label}: cannot set up a connection from ssh_config: {e}", host=label
        ) from e
    where = f"{conn.user}@{conn.host}:{conn.port}"
    _prepare(conn, label, connect_timeout)
    started = time.monotonic()
    try:
        conn.open()
        _set_keepalive(conn)
        _set_nodelay(conn)
        return conn
    except HostError:
        _close_quietly(conn)
        raise
    except BaseException as e:
        in_auth = _reached_auth(conn)
        _close_quietly(conn)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        timeout = conn.connect_timeout
        timed_out = (
            bool(timeout)
            and not in_auth
            and (time.monotonic() - started >= 0.95 * timeout)
        )
        raise _map_error(e, label, where, conn, in_auth, timeout, timed_out) from e


def _map_error(
    e: BaseException,
    label: str,
    where: str,
    conn: fabric.Connection,
    in_auth: bool,
    timeout: float | None,
    timed_out: bool = False,
) -> HostError:
    if isinstance(e, BadHostKeyException):
        return HostKeyError(
            f"{label}: the host key of {where} does not match known_hosts "
            f"(possible man-in-the-middle attack): {e}",
            host=label,
        )
    if isinstance(e, AuthenticationException) or (
        in_auth and isinstance(e, SSHException)
    ):
        return AuthenticationFailed(
            f"{label}: SSH authentication failed for user {conn.user!r} at "
            f"{conn.host}:{conn.port}: check the user (user@host, "
            f"{env_setting('USER')[1]} or User in ssh_config) and the key "
            f"(IdentityFile in ssh_config, or install yours with `ssh-copy-id "
            f"-p {conn.port} {conn.user}@{conn.host}`)\n"
            f"paramiko said: {e}",
            host=label,
        )
    if isinstance(e, socket.gaierror):
        return HostUnreachable(
            f"{label}: cannot resolve host name {conn.host!r}: check the "
            f"spelling, or its HostName in ssh_config ({e})",
            host=label,
        )
    if isinstance(e, (NoValidConnectionsError, ConnectionRefusedError)):
        return HostUnreachable(
            f"{label}: connection refused by {conn.host}:{conn.port}: is sshd "
            f"running there, and is the port right? ({e})",
            host=label,
        )
    if isinstance(e, (socket.timeout, TimeoutError)):
        return HostUnreachable(
            f"{label}: timed out connecting to {conn.host}:{conn.port} after "
            f"{timeout:g}s: is the host up and the port reachable? (raise "
            f"ConnectTimeout in ssh_config if it is slow)"
            if timeout
            else f"{label}: timed out connecting to {conn.host}:{conn.port}",
            host=label,
        )
    if isinstance(e, ProxyCommandFailure):
        return HostUnreachable(
            f"{label}: the ProxyCommand for {where} failed: {e}", host=label
        )
    if isinstance(e, EOFError) or (
        # paramiko's banner error when the far end hung up at once
        isinstance(e, SSHException)
        and isinstance(e.__context__, (EOFError, ConnectionError))
    ):
        return HostUnreachable(
            f"{label}: {where} closed the connection during the SSH handshake: "
            f"check that sshd listens on port {conn.port} there (and its log)",
            host=label,
        )
    if isinstance(e, SSHException):
        text = str(e) or type(e).__name__
        if "banner" in text.lower() or timed_out:
            # paramiko reports a stalled handshake as a banner error or,
            # when its own wait ends first, as 'No existing session'
            return HostUnreachable(
                f"{label}: timed out after {timeout or 0:g}s waiting for the "
                f"SSH handshake with {where}: it accepted TCP but did not "
                f"answer (host overloaded or stopped?) ({text})",
                host=label,
            )
        return HostUnreachable(
            f"{label}: SSH connection to {where} failed: {text}", host=label
        )
    if isinstance(e, OSError):
        reason = e.strerror or str(e) or type(e).__name__
        return HostUnreachable(
            f"{label}: cannot connect to {conn.host}:{conn.port}: {reason}", host=label
        )
    return HostUnreachable(
        f"{label}: connection to {where} failed: {type(e).__name__}: {e}", host=label
    )
