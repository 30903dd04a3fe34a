"""The OpenSSH client's command line, for worker streams.

`openssh_client` picks the client (``$QJAMFAB_SSH_CLIENT``: auto, openssh or
paramiko); `openssh_command` is the argv that runs a command on an SSH host
spec through it, with the same destination and ssh_config file as
`hosts.connect` (hostspec.py resolves both). `OpenSSHTransport` runs it
as a host agent's stream (a ProcessTransport: links/transport.py maps its
failures).
"""

from __future__ import annotations

import os
import shutil

from ...errors import BadHostSpec
from ...hostspec import HostSpec, config_path, destination
from ...links.transport import ProcessTransport

__all__ = ["SSH_CLIENTS", "openssh_client", "openssh_command"]


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
            "or auto (openssh when installed)"
        )
    ssh = shutil.which("ssh") if choice != "paramiko" else None
    if ssh is None and choice == "openssh":
        raise BadHostSpec(
            "the openssh client was asked for, but no ssh is on PATH: "
            "install openssh-client, or use auto"
        )
    return ssh


def openssh_command(
    ssh: str, spec: HostSpec, command: str, *, ssh_config: str | None = None
) -> list[str]:
    """argv running `command` on an SSH host with the OpenSSH client `ssh`.

    It reads the same ssh_config as `connect` and must find the host key in
    known_hosts (BatchMode: it never prompts); `connect` has checked the
    host first, with the policy of that ssh_config.
    """
    user, host, port = destination(spec)
    path = config_path(ssh_config)
    argv = [ssh] + (["-F", os.path.expanduser(path)] if path else [])
    argv += [
        "-T",
        "-x",
        "-a",
        "-e",
        "none",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=10",
        # AES-GCM first: with AES-NI it is the fastest cipher
        "-o",
        "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
    ]
    argv += (["-l", user] if user else []) + (["-p", str(port)] if port else [])
    return argv + ["--", host, command]


OPENSSH_FAILED = 255  # ssh's exit status for its own errors


class OpenSSHTransport(ProcessTransport):
    """A host's agent, run by the system's OpenSSH client
    (`openssh.openssh_command`): one connection per host."""

    _what = "the OpenSSH client"

    # Its agent releases the host's daemons as it ends, for the next
    # session to attach (a loaded host may take a while); a silent host
    # would make ssh wait for its keepalive timeout, so not longer.
    _close_wait_s = 1.0
