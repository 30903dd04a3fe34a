"""The known_hosts policy: which server host keys qjamfab accepts.

Instead of Fabric's ``AutoAddPolicy``, a server's host key is checked against
the known_hosts files that ssh_config names (UserKnownHostsFile and
GlobalKnownHostsFile, with ``~`` and %-tokens expanded; OpenSSH's defaults
otherwise). Unknown keys are refused (StrictHostKeyChecking yes, the
default), saved (accept-new, hashed when HashKnownHosts says so) or accepted
(no); a changed or @revoked key always fails, with a `HostKeyError` naming
the host, the offered fingerprint and the offending line.

`host_key_policy` builds, for a not-yet-open Connection, the paramiko policy
and the host-key types known_hosts has for the host (so that they can be
offered first, as OpenSSH does); hosts.py installs both.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pwd
import re
import shlex
import threading
from typing import TYPE_CHECKING

import paramiko

from ...errors import HostKeyError
from ...hostspec import config_option, config_yes

if TYPE_CHECKING:
    import fabric

__all__ = ["local_user", "host_key_policy"]

# The logger these messages have always had (its name shows on stderr).
log = logging.getLogger("qjamfab.hosts")

_DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"
_DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"


# --- known-hosts file options ----------------------------------------------


def local_user() -> str:
    """The name of the user running this process."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # pragma: no cover - uid without a passwd entry
        import getpass

        return getpass.getuser()


def _expand_path(path: str, host: str, port: int, user: str) -> str:
    """~ and the common ssh_config %-tokens of a file path."""

    def token(m: re.Match[str]) -> str:
        t = m.group(1)
        return {
            "%": "%",
            "d": os.path.expanduser("~"),
            "u": local_user(),
            "h": host,
            "p": str(port),
            "r": user,
        }.get(t, m.group(0))

    return os.path.expanduser(re.sub(r"%(.)", token, path))


def _config_files(
    value: str | None, default: str, conn: fabric.Connection
) -> list[str]:
    """Expand a (possibly multi-file) known-hosts option into paths;
    "none" means no file."""
    text = value if value else default
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    out: list[str] = []
    for w in words:
        if w.lower() == "none":
            continue
        out.append(_expand_path(w, conn.host, conn.port, conn.user))
    return out


# --- known_hosts -----------------------------------------------------------


# A known_hosts line: (path, lineno, marker, [names], keytype, blob).
_Entry = tuple[str, int, str | None, list[str], str, bytes]


class _KnownHosts:
    """The known_hosts lines that can vouch for a host, with file and line
    numbers for messages. Hashed names and * ? ! patterns are understood;
    @cert-authority lines are skipped; @revoked keys always fail."""

    def __init__(self, files: list[str]):
        self.files = files
        self.entries: list[_Entry] = []
        for path in files:
            try:
                with open(path, errors="replace") as f:
                    lines = f.readlines()
            except OSError:
                continue  # missing or unreadable: as OpenSSH, not an error
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
                self.entries.append(
                    (path, lineno, marker, fields[0].split(","), fields[1], blob)
                )

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

    def lookup(self, name: str) -> list[_Entry]:
        return [e for e in self.entries if self._matches(name, e[3])]

    def key_types(self, name: str) -> list[str]:
        return [e[4] for e in self.lookup(name) if e[2] is None]


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_save_lock = threading.Lock()


def _append_known_host(path: str, name: str, key: paramiko.PKey, hashed: bool) -> None:
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

    def __init__(
        self,
        label: str,
        conn: fabric.Connection,
        mode: str,
        known: _KnownHosts,
        user_files: list[str],
        hashed: bool,
    ):
        self.label = label
        self.conn = conn
        self.mode = mode
        self.known = known
        self.user_files = user_files
        self.hashed = hashed

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        offered = key.asbytes()
        entries = self.known.lookup(hostname)
        for path, lineno, marker, _, _, blob in entries:
            if marker == "@revoked" and blob == offered:
                raise HostKeyError(
                    f"{self.label}: the host key of {hostname} is marked "
                    f"@revoked in {path}:{lineno}: refusing to connect; ask "
                    f"the host's administrator for its current key",
                    host=self.label,
                )
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
                host=self.label,
            )
        mode = self.mode
        if mode in ("no", "off", "false"):
            return
        if mode == "accept-new":
            if self.user_files:
                target = self.user_files[0]
                try:
                    _append_known_host(target, hostname, key, self.hashed)
                    log.warning(
                        "%s: added %s key %s for %s to %s",
                        self.label,
                        key.get_name(),
                        fp,
                        hostname,
                        target,
                    )
                except OSError as e:
                    log.warning(
                        "%s: could not save the host key of %s to %s: %s",
                        self.label,
                        hostname,
                        target,
                        e,
                    )
            return
        files = ", ".join(self.known.files) or "(none)"
        target = self.user_files[0] if self.user_files else "~/.ssh/known_hosts"
        host, port = self.conn.host, self.conn.port
        scan = f"ssh-keyscan -p {port} {host}" if port != 22 else f"ssh-keyscan {host}"
        folder = os.path.dirname(os.path.expanduser(target))
        if folder and not os.path.isdir(folder):  # else >> would fail
            scan = f"mkdir -m 700 -p {folder} && {scan}"
        raise HostKeyError(
            f"{self.label}: the host key of {hostname} is not in known_hosts, "
            f"refusing to connect: after checking that {fp} is its "
            f"{key.get_name()} fingerprint, run `{scan} >> {target}`, or set "
            f"`StrictHostKeyChecking accept-new` for this host in ssh_config\n"
            f"Offered key: {key.get_name()} {fp}\n"
            f"Known-hosts files read: {files}\n"
            f"StrictHostKeyChecking: {mode}",
            host=self.label,
        )


def _hostkey_name(host: str, port: int) -> str:
    return host if int(port) == 22 else f"[{host}]:{port}"


def host_key_policy(
    conn: fabric.Connection, label: str
) -> tuple[_HostKeyPolicy, list[str]]:
    """The host-key policy for a not-yet-open Connection (from its
    ssh_config's known-hosts files, StrictHostKeyChecking and
    HashKnownHosts), and the key types known_hosts has for its host, to be
    preferred in key exchange."""
    user_files = _config_files(
        config_option(conn, "userknownhostsfile"), _DEFAULT_USER_KNOWN_HOSTS, conn
    )
    global_files = _config_files(
        config_option(conn, "globalknownhostsfile"), _DEFAULT_GLOBAL_KNOWN_HOSTS, conn
    )
    known = _KnownHosts(global_files + user_files)
    mode = (config_option(conn, "stricthostkeychecking", "yes") or "yes").lower()
    policy = _HostKeyPolicy(
        label,
        conn,
        mode,
        known,
        user_files,
        config_yes(config_option(conn, "hashknownhosts")),
    )
    name = _hostkey_name(conn.host, conn.port)
    return policy, known.key_types(name)
