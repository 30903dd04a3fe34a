"""Host specs to Fabric Connections: ssh_config, known_hosts policy, keepalive,
rekey setting.

`parse_hosts` turns what the user wrote (``"local"``, ``"local:4"``,
``"user@host:port"``, ssh_config aliases) into `HostSpec` values. `connect`
turns an SSH spec into an open `fabric.Connection` that

- honours an ssh_config file (argument, else ``$QJAMFAB_SSH_CONFIG``, else
  what Fabric loads by default: ``~/.ssh/config`` and ``/etc/ssh/ssh_config``)
  for HostName, User, Port, IdentityFile, ProxyJump/ProxyCommand,
  ConnectTimeout (through Fabric), and for StrictHostKeyChecking,
  UserKnownHostsFile, GlobalKnownHostsFile, HashKnownHosts, IdentitiesOnly
  and ServerAliveInterval (here: Fabric ignores those);
- checks the server's host key against known_hosts instead of Fabric's
  ``AutoAddPolicy``: unknown keys are refused (StrictHostKeyChecking yes,
  the default), saved (accept-new) or accepted (no); a changed key always
  fails;
- sends keepalives every ServerAliveInterval seconds (default 15).

Paramiko and socket exceptions stop here: `connect` raises only qjamfab
`HostError` subclasses, each with ``.host`` set and a first line naming the
host. Importing this module raises paramiko's rekey thresholds to 2**40
(paramiko issue 822: a client-initiated rekey under heavy traffic can time
out; the server still rekeys on its own schedule).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import fabric
import paramiko
import paramiko.packet
from paramiko.ssh_exception import (AuthenticationException,
                                    BadHostKeyException, NoValidConnectionsError,
                                    ProxyCommandFailure, SSHException)

from .errors import (AuthenticationFailed, BadHostSpec, HostError,
                     HostKeyError, HostUnreachable)

__all__ = ["HostSpec", "parse_hosts", "connect", "local_user",
           "QjamfabConnection", "openssh_client", "openssh_command",
           "DEFAULT_KEEPALIVE", "REKEY_LIMIT"]

log = logging.getLogger(__name__)

#: paramiko issue 822 workaround, applied once at import.
REKEY_LIMIT = 2 ** 40
paramiko.packet.Packetizer.REKEY_BYTES = REKEY_LIMIT
paramiko.packet.Packetizer.REKEY_PACKETS = REKEY_LIMIT

#: seconds between keepalive packets unless ssh_config's ServerAliveInterval
DEFAULT_KEEPALIVE = 15

_DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"
_DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"


# --- host specs ------------------------------------------------------------

@dataclass(frozen=True)
class HostSpec:
    """One host entry. `kind` is "local" or "ssh"; `workers` is N for
    ``local:N`` and None otherwise. Duplicate entries are distinct hosts, so
    key per-host state by position, not by HostSpec value."""

    raw: str
    kind: str
    workers: int | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    def __str__(self) -> str:
        return self.raw


_HOW = "write hosts as 'local', 'local:N' or '[user@]host[:port]', comma separated"


def parse_hosts(hosts: None | str | Sequence[str]) -> list[HostSpec]:
    """Parse host entries into HostSpecs (raises BadHostSpec).

    None means ``$QJAMFAB_HOSTS`` (comma separated), or ``["local"]`` when it
    is unset or blank. A string is comma separated; a sequence holds one
    entry per item. Blanks around entries are stripped.
    """
    source = "hosts"
    if hosts is None:
        env = os.environ.get("QJAMFAB_HOSTS", "")
        if not env.strip():
            return [HostSpec("local", "local", None)]
        hosts, source = env, "QJAMFAB_HOSTS"
    if isinstance(hosts, (bytes, bytearray)):
        hosts = hosts.decode()
    if isinstance(hosts, str):
        entries = hosts.split(",")
        if not hosts.strip():
            entries = []
    elif isinstance(hosts, Sequence):
        entries = list(hosts)
        for item in entries:
            if not isinstance(item, str):
                raise BadHostSpec(
                    f"host entry {item!r} in {source} is a "
                    f"{type(item).__name__}, not a string: {_HOW}",
                    host=repr(item))
            if "," in item:
                raise BadHostSpec(
                    f"host entry {item!r} contains a comma: give one host per "
                    f"list item, or pass one comma-separated string",
                    host=item)
    else:
        raise BadHostSpec(
            f"hosts must be None, a string or a list of strings, not "
            f"{type(hosts).__name__}: {_HOW}", host=repr(hosts))
    if not entries:
        raise BadHostSpec(
            f"no hosts given in {source}: {_HOW} (or leave it unset for "
            f"local workers)", host="")
    return [_parse_entry(e, i, source, hosts) for i, e in enumerate(entries, 1)]


def _parse_entry(entry: str, index: int, source: str, whole) -> HostSpec:
    raw = entry.strip()
    if not raw:
        raise BadHostSpec(
            f"host entry {index} in {source} ({whole!r}) is empty: remove the "
            f"extra comma or blank item", host="")
    if any(c.isspace() for c in raw):
        raise BadHostSpec(
            f"host spec {raw!r} contains whitespace: separate hosts with "
            f"commas, as in 'a,b'", host=raw)
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise BadHostSpec(
            f"host spec {raw!r} contains a control character: {_HOW}",
            host=raw)
    head, sep, tail = raw.partition(":")
    if head.lower() == "local":
        if not sep:
            return HostSpec(raw, "local", None)
        if not tail.isdigit() or not tail.isascii():
            raise BadHostSpec(
                f"host spec {raw!r}: the worker count after 'local:' must be "
                f"a positive integer, as in 'local:4'", host=raw)
        n = int(tail)
        if n < 1:
            raise BadHostSpec(
                f"host spec {raw!r} asks for {n} workers: use 'local:N' with "
                f"N >= 1, or plain 'local' for one per core", host=raw)
        return HostSpec(raw, "local", n)
    _split_destination(raw)   # validates
    return HostSpec(raw, "ssh", None)


def _split_destination(raw: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (also ``[v6addr]:port`` and bare v6) into
    (user, host, port). Raises BadHostSpec."""
    if "://" in raw:
        raise BadHostSpec(
            f"host spec {raw!r} looks like a URL: write [user@]host[:port] "
            f"instead", host=raw)
    user, at, hostport = raw.rpartition("@")
    if at and not user:
        raise BadHostSpec(
            f"host spec {raw!r} has an empty user before '@': write "
            f"user@host, or just host", host=raw)
    if at and not hostport:
        raise BadHostSpec(
            f"host spec {raw!r} has no host after '@': write user@host or "
            f"user@host:port", host=raw)
    port_text = None
    if hostport.startswith("["):
        m = re.fullmatch(r"\[([^\[\]]+)\](?::(.*))?", hostport)
        if not m:
            raise BadHostSpec(
                f"host spec {raw!r} has an unclosed or empty '[...]': write "
                f"[address]:port, as in [::1]:2222", host=raw)
        host, port_text = m.group(1), m.group(2)
    elif hostport.count(":") > 1:
        host = hostport          # a bare IPv6 address: no port
    else:
        host, colon, port_text = hostport.partition(":")
        if not colon:
            port_text = None
    if not host:
        raise BadHostSpec(
            f"host spec {raw!r} has no host name: write [user@]host[:port]",
            host=raw)
    if host.startswith("-") or (user and user.startswith("-")):
        raise BadHostSpec(
            f"host spec {raw!r} starts with '-', which SSH tools read as an "
            f"option: write [user@]host[:port]", host=raw)
    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit()) \
                or not 1 <= int(port_text) <= 65535:
            raise BadHostSpec(
                f"host spec {raw!r} has port {port_text!r}, which is not a "
                f"number from 1 to 65535: write [user@]host[:port]", host=raw)
        port = int(port_text)
    return (user or None), host, port


# --- ssh_config helpers ----------------------------------------------------

def local_user() -> str:
    """The name of the user running this process."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:   # pragma: no cover - uid without a passwd entry
        import getpass
        return getpass.getuser()


def _expand_path(path: str, host: str, port: int, user: str) -> str:
    """~ and the common ssh_config %-tokens of a file path."""
    def token(m):
        t = m.group(1)
        return {"%": "%", "d": os.path.expanduser("~"), "u": local_user(),
                "h": host, "p": str(port), "r": user}.get(t, m.group(0))
    return os.path.expanduser(re.sub(r"%(.)", token, path))


def _config_files(value: str | None, default: str, conn) -> list[str]:
    """Expand a (possibly multi-file) known-hosts option into paths;
    "none" means no file."""
    text = value if value else default
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    out = []
    for w in words:
        if w.lower() == "none":
            continue
        out.append(_expand_path(w, conn.host, conn.port, conn.user))
    return out


def _option(conn, name: str, default: str | None = None) -> str | None:
    value = conn.ssh_config.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else str(value)


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "on")


# --- known_hosts -----------------------------------------------------------

class _KnownHosts:
    """The known_hosts lines that can vouch for a host, with file and line
    numbers for messages. Hashed names and * ? ! patterns are understood;
    @cert-authority lines are skipped; @revoked keys always fail."""

    def __init__(self, files: list[str]):
        self.files = files
        self.entries = []   # (path, lineno, marker, [names], keytype, blob)
        for path in files:
            try:
                with open(path, "r", errors="replace") as f:
                    lines = f.readlines()
            except OSError:
                continue   # missing or unreadable: as OpenSSH, not an error
            for lineno, line in enumerate(lines, 1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                marker = None
                if fields[0].startswith("@"):
                    marker, fields = fields[0].lower(), fields[1:]
                if len(fields) < 3:
                    continue
                try:
                    blob = base64.b64decode(fields[2], validate=True)
                except (ValueError, TypeError):
                    continue
                self.entries.append((path, lineno, marker,
                                     fields[0].split(","), fields[1], blob))

    @staticmethod
    def _matches(name: str, patterns: list[str]) -> bool:
        name = name.lower()
        hit = False
        for pat in patterns:
            if pat.startswith("|1|"):
                try:
                    if paramiko.HostKeys.hash_host(name, pat) == pat:
                        hit = True
                except Exception:
                    pass
                continue
            neg = pat.startswith("!")
            if neg:
                pat = pat[1:]
            rx = re.escape(pat.lower()).replace(r"\*", ".*").replace(r"\?", ".")
            if re.fullmatch(rx, name):
                if neg:
                    return False
                hit = True
        return hit

    def lookup(self, name: str):
        return [e for e in self.entries if self._matches(name, e[3])]

    def key_types(self, name: str) -> list[str]:
        return [e[4] for e in self.lookup(name) if e[2] is None]


def _fingerprint(key) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_save_lock = threading.Lock()


def _append_known_host(path: str, name: str, key, hashed: bool) -> None:
    stored = paramiko.HostKeys.hash_host(name) if hashed else name
    line = f"{stored} {key.get_name()} {key.get_base64()}\n"
    with _save_lock:
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            if f.tell() > 0:
                with open(path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        line = "\n" + line
            f.write(line)


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Checks every server key (paramiko itself is given no known keys, so it
    always asks us)."""

    def __init__(self, label: str, conn, mode: str, known: _KnownHosts,
                 user_files: list[str], hashed: bool):
        self.label = label
        self.conn = conn
        self.mode = mode
        self.known = known
        self.user_files = user_files
        self.hashed = hashed

    def missing_host_key(self, client, hostname, key):
        offered = key.asbytes()
        entries = self.known.lookup(hostname)
        for path, lineno, marker, _, _, blob in entries:
            if marker == "@revoked" and blob == offered:
                raise HostKeyError(
                    f"{self.label}: the host key of {hostname} is marked "
                    f"@revoked in {path}:{lineno}: refusing to connect; ask "
                    f"the host's administrator for its current key",
                    host=self.label)
        plain = [e for e in entries if e[2] is None]
        if any(e[5] == offered for e in plain):
            return
        fp = _fingerprint(key)
        if plain:
            path, lineno = plain[0][0], plain[0][1]
            where = ", ".join(f"{e[0]}:{e[1]}" for e in plain)
            raise HostKeyError(
                f"{self.label}: the host key of {hostname} has CHANGED "
                f"(possible man-in-the-middle attack): it offered "
                f"{key.get_name()} {fp}, which does not match {where}; if the "
                f"change is expected, remove the old line with "
                f"`ssh-keygen -R '{hostname}' -f {path}` and connect again\n"
                f"Offending known_hosts line: {path}:{lineno}",
                host=self.label)
        mode = self.mode
        if mode in ("no", "off", "false"):
            return
        if mode == "accept-new":
            if self.user_files:
                target = self.user_files[0]
                try:
                    _append_known_host(target, hostname, key, self.hashed)
                    log.warning("%s: added %s key %s for %s to %s",
                                self.label, key.get_name(), fp, hostname,
                                target)
                except OSError as e:
                    log.warning("%s: could not save the host key of %s to "
                                "%s: %s", self.label, hostname, target, e)
            return
        files = ", ".join(self.known.files) or "(none)"
        target = self.user_files[0] if self.user_files else "~/.ssh/known_hosts"
        host, port = self.conn.host, self.conn.port
        scan = (f"ssh-keyscan -p {port} {host}" if port != 22
                else f"ssh-keyscan {host}")
        raise HostKeyError(
            f"{self.label}: the host key of {hostname} is not in known_hosts, "
            f"refusing to connect: after checking that {fp} is its "
            f"{key.get_name()} fingerprint, run `{scan} >> {target}`, or set "
            f"`StrictHostKeyChecking accept-new` for this host in ssh_config\n"
            f"Offered key: {key.get_name()} {fp}\n"
            f"Known-hosts files read: {files}\n"
            f"StrictHostKeyChecking: {mode}", host=self.label)


def _hostkey_name(host: str, port: int) -> str:
    return host if int(port) == 22 else f"[{host}]:{port}"


_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _prefer_fast_ciphers(transport: paramiko.Transport) -> None:
    """AES-GCM first: no separate per-packet HMAC, measured 1.4-1.7x the
    throughput of paramiko's default aes128-ctr + HMAC here."""
    opts = transport.get_security_options()
    ciphers = list(opts.ciphers)
    first = [c for c in _FAST_CIPHERS if c in ciphers]
    opts.ciphers = first + [c for c in ciphers if c not in first]


def _transport_factory(preferred: list[str]):
    """A Transport whose host-key algorithm list puts the types known_hosts
    has for this host first (as OpenSSH does), so a host known by its RSA key
    is not reported as changed when it also has an ed25519 key."""
    wanted = set()
    for t in preferred:
        wanted.add(t)
        if t == "ssh-rsa":
            wanted.update(("rsa-sha2-512", "rsa-sha2-256"))

    def factory(sock, **kwargs):
        t = paramiko.Transport(sock, **kwargs)
        _prefer_fast_ciphers(t)
        if wanted:
            opts = t.get_security_options()
            types = list(opts.key_types)
            first = [k for k in types if k in wanted
                     or k.replace("-cert-v01@openssh.com", "") in wanted]
            if first:
                opts.key_types = first + [k for k in types if k not in first]
        return t
    return factory


# --- connect ---------------------------------------------------------------

class QjamfabConnection(fabric.Connection):
    """A fabric.Connection whose close() also closes its ProxyJump gateway
    chain (Fabric leaves gateway connections open)."""

    def close(self):
        super().close()
        if isinstance(self.gateway, fabric.Connection):
            self.gateway.close()


def _config_path(ssh_config: str | None) -> str | None:
    """The ssh_config file to use: the argument, else $QJAMFAB_SSH_CONFIG,
    else None (the clients' defaults)."""
    return ssh_config or os.environ.get("QJAMFAB_SSH_CONFIG") or None


def _destination(spec: HostSpec) -> tuple[str | None, str, int | None]:
    """(user, host, port) of an SSH spec; the user from ``user@``, else
    $QJAMFAB_USER, else $QJAM_USER, else None (ssh_config decides)."""
    user, host, port = _split_destination(spec.raw)
    user = user or os.environ.get("QJAMFAB_USER") or os.environ.get(
        "QJAM_USER") or None
    return user, host, port


def _fabric_config(ssh_config: str | None, label: str) -> fabric.Config:
    path = _config_path(ssh_config)
    origin = ("the ssh_config argument" if ssh_config
              else "QJAMFAB_SSH_CONFIG" if path else "the default ssh_config")
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise BadHostSpec(
                f"{label}: ssh_config file {path} (from {origin}) does not "
                f"exist: fix the path, or unset it to use ~/.ssh/config",
                host=label)
    try:
        # in_stream=False: qjamfab runs nothing interactive, and Invoke's
        # default of forwarding our stdin breaks under pytest and daemons
        return fabric.Config(runtime_ssh_path=path,
                             overrides={"run": {"in_stream": False}})
    except (SSHException, OSError, ValueError) as e:
        raise BadHostSpec(
            f"{label}: cannot read ssh_config ({path or '~/.ssh/config'}, "
            f"from {origin}): {e}", host=label) from e


def _prepare(conn: fabric.Connection, label: str,
             connect_timeout: float) -> None:
    """Host-key policy, identity files and timeouts on a not-yet-open
    Connection, and on its ProxyJump gateways."""
    cfg_timeout = _option(conn, "connecttimeout")
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
        existing = [os.path.expanduser(f) for f in files
                    if os.path.exists(os.path.expanduser(f))]
        if existing:
            kwargs["key_filename"] = existing
        else:
            kwargs.pop("key_filename", None)
    if _yes(_option(conn, "identitiesonly")):
        kwargs.setdefault("look_for_keys", False)

    user_files = _config_files(_option(conn, "userknownhostsfile"),
                               _DEFAULT_USER_KNOWN_HOSTS, conn)
    global_files = _config_files(_option(conn, "globalknownhostsfile"),
                                 _DEFAULT_GLOBAL_KNOWN_HOSTS, conn)
    known = _KnownHosts(global_files + user_files)
    mode = (_option(conn, "stricthostkeychecking", "yes") or "yes").lower()
    policy = _HostKeyPolicy(label, conn, mode, known, user_files,
                            _yes(_option(conn, "hashknownhosts")))
    # Fabric set AutoAddPolicy and loaded nothing: paramiko now asks us
    # about every key.
    conn.client.set_missing_host_key_policy(policy)
    name = _hostkey_name(conn.host, conn.port)
    kwargs["transport_factory"] = _transport_factory(known.key_types(name))

    if isinstance(conn.gateway, fabric.Connection):
        _prepare(conn.gateway, f"{label} (via jump host {conn.gateway.host})",
                 connect_timeout)


def _set_nodelay(conn: fabric.Connection) -> None:
    """Frames are written as a few sends; with Nagle's algorithm the last one
    waits for a delayed ACK (40 ms measured). Send at once instead."""
    transport = conn.transport
    if transport is not None and isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set_keepalive(conn: fabric.Connection) -> None:
    value = _option(conn, "serveraliveinterval")
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
    return bool(t is not None and t.is_active() and t.host_key is not None
                and not t.is_authenticated())


def connect(spec: HostSpec | str, *, ssh_config: str | None = None,
            connect_timeout: float = 10.0) -> fabric.Connection:
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
            f"start local workers instead", host=label)
    user, host, port = _destination(spec)
    config = _fabric_config(ssh_config, label)
    try:
        conn = QjamfabConnection(host, user=user, port=port, config=config)
    except (SSHException, ValueError, OSError) as e:
        raise BadHostSpec(f"{label}: cannot set up a connection from "
                          f"ssh_config: {e}", host=label) from e
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
        timed_out = bool(timeout) and not in_auth and (
            time.monotonic() - started >= 0.95 * timeout)
        raise _map_error(e, label, where, conn, in_auth, timeout,
                         timed_out) from e


SSH_CLIENTS = ("auto", "openssh", "paramiko")


def openssh_client(choice: str | None = None) -> str | None:
    """The OpenSSH client that worker streams go through, or None for
    paramiko. `choice` (else ``$QJAMFAB_SSH_CLIENT``, else "auto"): "auto"
    is `ssh` from PATH when there is one, "openssh" requires it, "paramiko"
    never uses it. C encryption moves frames faster than paramiko."""
    choice = (choice or os.environ.get("QJAMFAB_SSH_CLIENT") or "auto").lower()
    if choice not in SSH_CLIENTS:
        raise BadHostSpec(
            f"ssh client {choice!r} is not a choice: use openssh, paramiko "
            "or auto (openssh when installed)")
    ssh = shutil.which("ssh") if choice != "paramiko" else None
    if ssh is None and choice == "openssh":
        raise BadHostSpec(
            "the openssh client was asked for, but no ssh is on PATH: "
            "install openssh-client, or use auto")
    return ssh


def openssh_command(ssh: str, spec: HostSpec, command: str, *,
                    ssh_config: str | None = None) -> list[str]:
    """argv running `command` on an SSH host with the OpenSSH client `ssh`.

    It reads the same ssh_config as `connect` and must find the host key in
    known_hosts (BatchMode: it never prompts); `connect` has checked the
    host first, with the policy of that ssh_config.
    """
    user, host, port = _destination(spec)
    path = _config_path(ssh_config)
    argv = [ssh] + (["-F", os.path.expanduser(path)] if path else [])
    argv += ["-T", "-x", "-a", "-e", "none", "-o", "BatchMode=yes",
             "-o", "ConnectTimeout=10",
             # AES-GCM first: with AES-NI it is the fastest cipher
             "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]
    argv += (["-l", user] if user else []) + (["-p", str(port)] if port else [])
    return argv + ["--", host, command]


def _map_error(e: BaseException, label: str, where: str, conn, in_auth: bool,
               timeout: float | None, timed_out: bool = False) -> HostError:
    if isinstance(e, BadHostKeyException):
        return HostKeyError(
            f"{label}: the host key of {where} does not match known_hosts "
            f"(possible man-in-the-middle attack): {e}", host=label)
    if isinstance(e, AuthenticationException) or (
            in_auth and isinstance(e, SSHException)):
        return AuthenticationFailed(
            f"{label}: SSH authentication failed for user {conn.user!r} at "
            f"{conn.host}:{conn.port}: check the user (user@host, "
            f"QJAMFAB_USER or User in ssh_config) and the key (IdentityFile "
            f"in ssh_config, or install yours with `ssh-copy-id "
            f"-p {conn.port} {conn.user}@{conn.host}`)\n"
            f"paramiko said: {e}", host=label)
    if isinstance(e, socket.gaierror):
        return HostUnreachable(
            f"{label}: cannot resolve host name {conn.host!r}: check the "
            f"spelling, or its HostName in ssh_config ({e})", host=label)
    if isinstance(e, (NoValidConnectionsError, ConnectionRefusedError)):
        return HostUnreachable(
            f"{label}: connection refused by {conn.host}:{conn.port}: is sshd "
            f"running there, and is the port right? ({e})", host=label)
    if isinstance(e, (socket.timeout, TimeoutError)):
        return HostUnreachable(
            f"{label}: timed out connecting to {conn.host}:{conn.port} after "
            f"{timeout:g}s: is the host up and the port reachable? (raise "
            f"ConnectTimeout in ssh_config if it is slow)"
            if timeout else
            f"{label}: timed out connecting to {conn.host}:{conn.port}",
            host=label)
    if isinstance(e, ProxyCommandFailure):
        return HostUnreachable(
            f"{label}: the ProxyCommand for {where} failed: {e}", host=label)
    if isinstance(e, EOFError):
        return HostUnreachable(
            f"{label}: {where} closed the connection during the SSH "
            f"handshake", host=label)
    if isinstance(e, SSHException):
        text = str(e) or type(e).__name__
        if "banner" in text.lower() or timed_out:
            # paramiko reports a stalled handshake as a banner error or,
            # when its own wait ends first, as 'No existing session'
            return HostUnreachable(
                f"{label}: timed out after {timeout or 0:g}s waiting for the "
                f"SSH handshake with {where}: it accepted TCP but did not "
                f"answer (host overloaded or stopped?) ({text})", host=label)
        return HostUnreachable(
            f"{label}: SSH connection to {where} failed: {text}", host=label)
    if isinstance(e, OSError):
        reason = e.strerror or str(e) or type(e).__name__
        return HostUnreachable(
            f"{label}: cannot connect to {conn.host}:{conn.port}: {reason}",
            host=label)
    return HostUnreachable(
        f"{label}: connection to {where} failed: {type(e).__name__}: {e}",
        host=label)
