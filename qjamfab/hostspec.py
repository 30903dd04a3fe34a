"""Host specs: what the user wrote, and where an SSH spec points.

`parse_hosts` turns host entries (``"local"``, ``"local:4"``,
``"user@host:port"``, ssh_config aliases; ``slurm:...`` and ``command:...``
read by hostkinds.py) into `HostSpec` values, raising
`BadHostSpec` for malformed ones. This module also owns, for an SSH spec:

- `split_destination`: ``[user@]host[:port]`` into (user, host, port);
- `destination`: the user from ``user@``, else ``$QJAMFAB_USER``, else
  ``$QJAM_USER``, with the host and port;
- `config_path`: which ssh_config file applies (the argument, else
  ``$QJAMFAB_SSH_CONFIG``, else the clients' defaults);
- `config_option` / `config_yes`: reading an option of a Connection's
  ssh_config, for hosts.py and knownhosts.py;
- `env_setting`: a ``$QJAMFAB_*`` setting, else qjam's ``$QJAM_*``, and
  which of the two it came from (for messages that name it);
- `python_mismatch`: the error for a host (or Dask worker) whose Python is
  not this one's minor version, which cloudpickle needs;
- `add_host_arguments` / `script_hosts`: hosts on a script's command line,
  ``--hosts=a,b`` or after its own arguments (``sum_matrix.py 2000 a b``,
  as qjam's examples took them).

Stdlib only, plus qjamfab's errors: no SSH library is needed to parse specs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BadHostSpec, PreflightFailed
from .hostkinds import (
    command_line,
    is_command,
    is_slurm,
    join_slurm_options,
    slurm_options,
)

if TYPE_CHECKING:
    import fabric

__all__ = [
    "HostSpec",
    "parse_hosts",
    "split_destination",
    "destination",
    "config_path",
    "config_option",
    "config_yes",
    "env_setting",
    "add_host_arguments",
    "number_or_host",
    "script_hosts",
]


# --- host specs ------------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    """One host entry. `kind` is "local", "inproc" (workers as threads of
    this process: inproc.py), "ssh", "slurm" (the nodes of a Slurm
    allocation: slurm.py; `options` are its ``slurm:KEY=VALUE,...``
    settings, asking Slurm for one) or "command" (a command line that
    starts python3 somewhere: command.py; `options` hold it as
    ("command", CMD)); `workers` is N for
    ``local:N`` or a ``workers=N`` setting, else None; `python` and `env`
    are its ``python=PATH`` and ``env.NAME=VALUE`` settings (VALUE may name
    ``{worker}``, the worker's number on the host). Duplicate entries are
    distinct hosts, so key per-host state by position, not by value."""

    raw: str
    kind: str
    workers: int | None = None
    python: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, str], ...] = ()

    def worker_env(self, index: int) -> dict[str, str]:
        """The environment settings of worker `index` of this host."""
        return {k: v.replace("{worker}", str(index)) for k, v in self.env}

    @property
    def is_local(self) -> bool:
        """On this machine: worker processes, or in-process workers."""
        return self.kind in ("local", "inproc")

    @property
    def entry(self) -> str:
        """This spec as an entry `parse_hosts` reads back the same: the host,
        then its settings (``gpu1 workers=4 env.X={worker}``), so a child
        process given it as $QJAMFAB_HOSTS keeps what a hosts file said."""
        words = [self.raw]
        counted = f"{self.kind}:{self.workers}"  # local:N gives its count already
        if self.workers is not None and self.raw.lower() != counted:
            words.append(f"workers={self.workers}")
        if self.python is not None:
            words.append(f"python={self.python}")
        words += [f"env.{name}={value}" for name, value in self.env]
        return " ".join(words)

    def __str__(self) -> str:
        return self.raw


_HOW = (
    "write hosts as 'local', 'local:N', 'slurm[:nodes=N,...]', "
    "'command:CMD' or '[user@]host[:port]', comma separated"
)
_SETTINGS = "workers=N, python=PATH or env.NAME=VALUE"


def parse_hosts(hosts: None | str | Sequence[str]) -> list[HostSpec]:
    """Parse host entries into HostSpecs (raises BadHostSpec).

    None means ``$QJAMFAB_HOSTS`` (comma separated), or ``["local"]`` when it
    is unset or blank. A string is comma separated; a sequence holds one
    entry per item; ``@PATH`` (with a "/", or starting with "~" or ".")
    reads a hosts file, one entry a line (``#`` starts a comment). Blanks
    around entries are stripped. After the host,
    an entry may give its own settings, separated by spaces:
    ``gpu1 workers=4 python=/opt/conda/bin/python
    env.CUDA_VISIBLE_DEVICES={worker}``.
    """
    source = "hosts"
    if hosts is None:
        env = os.environ.get("QJAMFAB_HOSTS", "")
        if not env.strip():
            return [HostSpec("local", "local", None)]
        hosts, source = env, "QJAMFAB_HOSTS"
    if isinstance(hosts, (bytes, bytearray)):
        hosts = hosts.decode()
    if isinstance(hosts, str) and _is_hosts_file(hosts.strip()):
        source = hosts.strip()
        hosts = _read_hosts_file(source[1:])
    if isinstance(hosts, str):
        entries = join_slurm_options(hosts.split(","))
        if not hosts.strip():
            entries = []
    elif isinstance(hosts, Sequence):
        entries = list(hosts)
        for item in entries:
            if not isinstance(item, str):
                raise BadHostSpec(
                    f"host entry {item!r} in {source} is a "
                    f"{type(item).__name__}, not a string: {_HOW}",
                    host=repr(item),
                )
            if "," in item and not (is_slurm(item) or is_command(item)):
                raise BadHostSpec(
                    f"host entry {item!r} contains a comma: give one host per "
                    f"list item, or pass one comma-separated string",
                    host=item,
                )
    else:
        raise BadHostSpec(
            f"hosts must be None, a string or a list of strings, not "
            f"{type(hosts).__name__}: {_HOW}",
            host=repr(hosts),
        )
    if not entries:
        raise BadHostSpec(
            f"no hosts given in {source}: {_HOW} (or leave it unset for local workers)",
            host="",
        )
    return [_parse_entry(e, i, source, hosts) for i, e in enumerate(entries, 1)]


def _parse_entry(entry: str, index: int, source: str, whole: object) -> HostSpec:
    raw = entry.strip()
    if not raw:
        raise BadHostSpec(
            f"host entry {index} in {source} ({whole!r}) is empty: remove the "
            f"extra comma or blank item",
            host="",
        )
    if is_command(raw):  # the rest is a command line, spaces and all
        return HostSpec(
            raw, "command", None, options=command_line(raw, raw.partition(":")[2])
        )
    if any(c.isspace() for c in raw):
        words = raw.split()
        if not all("=" in w for w in words[1:]):
            raise BadHostSpec(
                f"host spec {raw!r} contains whitespace: separate hosts with "
                f"commas, as in 'a,b' (settings after a host are "
                f"{_SETTINGS})",
                host=raw,
            )
        spec = _parse_entry(words[0], index, source, whole)
        return _with_settings(spec, words[1:])
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise BadHostSpec(
            f"host spec {raw!r} contains a control character: {_HOW}", host=raw
        )
    head, sep, tail = raw.partition(":")
    kind = head.lower()
    if kind in ("local", "inproc"):
        if not sep:
            return HostSpec(raw, kind, None)
        if not tail.isdigit() or not tail.isascii():
            raise BadHostSpec(
                f"host spec {raw!r}: the worker count after '{kind}:' must "
                f"be a positive integer, as in '{kind}:4'",
                host=raw,
            )
        n = int(tail)
        if n < 1:
            raise BadHostSpec(
                f"host spec {raw!r} asks for {n} workers: use '{kind}:N' "
                f"with N >= 1, or plain '{kind}' for one per core",
                host=raw,
            )
        return HostSpec(raw, kind, n)
    if kind == "slurm":
        return HostSpec(raw, "slurm", None, options=slurm_options(raw, tail))
    split_destination(raw)  # validates
    return HostSpec(raw, "ssh", None)


def _is_hosts_file(text: str) -> bool:
    """ "@PATH" names a hosts file when PATH looks like one (has a "/",
    starts with "~" or ".", or exists); "@host" stays a spec (and fails:
    an empty user)."""
    path = text[1:]
    return (
        text.startswith("@")
        and bool(path)
        and ("/" in path or path[0] in "~." or os.path.exists(path))
    )


def _read_hosts_file(path: str) -> list[str]:
    """The entries of a hosts file: one a line, # comments, blanks skipped."""
    try:
        with open(os.path.expanduser(path)) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise BadHostSpec(
            f"cannot read hosts file {path!r} ({exc.strerror}): fix the path after '@'",
            host=f"@{path}",
        ) from exc
    entries = [line.split("#", 1)[0].strip() for line in lines]
    return [e for e in entries if e]


def _with_settings(spec: HostSpec, words: list[str]) -> HostSpec:
    """spec with its `key=value` settings applied."""
    workers, python, env = spec.workers, spec.python, dict(spec.env)
    for word in words:
        key, _, value = word.partition("=")
        if key == "workers":
            if not (value.isascii() and value.isdigit() and int(value) > 0):
                raise BadHostSpec(
                    f"host {spec.raw}: workers={value!r} is not a positive "
                    "number of workers: write e.g. workers=8",
                    host=spec.raw,
                )
            workers = int(value)
        elif key == "python" and value:
            python = value
        elif key.startswith("env.") and len(key) > 4:
            env[key[4:]] = value
        else:
            raise BadHostSpec(
                f"host {spec.raw}: unknown setting {word!r}: use {_SETTINGS}",
                host=spec.raw,
            )
    if spec.is_local and python is not None:
        raise BadHostSpec(
            f"host {spec.raw}: python= is for SSH hosts; local workers run this Python",
            host=spec.raw,
        )
    return HostSpec(
        spec.raw, spec.kind, workers, python, tuple(env.items()), spec.options
    )


def split_destination(raw: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (also ``[v6addr]:port`` and bare v6) into
    (user, host, port). Raises BadHostSpec."""
    if "://" in raw:
        raise BadHostSpec(
            f"host spec {raw!r} looks like a URL: write [user@]host[:port] instead",
            host=raw,
        )
    user, at, hostport = raw.rpartition("@")
    if at and not user:
        raise BadHostSpec(
            f"host spec {raw!r} has an empty user before '@': write "
            f"user@host, or just host",
            host=raw,
        )
    if at and not hostport:
        raise BadHostSpec(
            f"host spec {raw!r} has no host after '@': write user@host or "
            f"user@host:port",
            host=raw,
        )
    port_text = None
    if hostport.startswith("["):
        m = re.fullmatch(r"\[([^\[\]]+)\](?::(.*))?", hostport)
        if not m:
            raise BadHostSpec(
                f"host spec {raw!r} has an unclosed or empty '[...]': write "
                f"[address]:port, as in [::1]:2222",
                host=raw,
            )
        host, port_text = m.group(1), m.group(2)
    elif hostport.count(":") > 1:
        host = hostport  # a bare IPv6 address: no port
    else:
        host, colon, port_text = hostport.partition(":")
        if not colon:
            port_text = None
    if not host:
        raise BadHostSpec(
            f"host spec {raw!r} has no host name: write [user@]host[:port]", host=raw
        )
    if host.startswith("-") or (user and user.startswith("-")):
        raise BadHostSpec(
            f"host spec {raw!r} starts with '-', which SSH tools read as an "
            f"option: write [user@]host[:port]",
            host=raw,
        )
    port = None
    if port_text is not None:
        if (
            not (port_text.isascii() and port_text.isdigit())
            or not 1 <= int(port_text) <= 65535
        ):
            raise BadHostSpec(
                f"host spec {raw!r} has port {port_text!r}, which is not a "
                f"number from 1 to 65535: write [user@]host[:port]",
                host=raw,
            )
        port = int(port_text)
    return (user or None), host, port


# --- hosts on a script's command line ----------------------------------------


class _LeadingHost(str):
    """A word given where a script's optional number goes: its first host."""


def add_host_arguments(parser: argparse.ArgumentParser) -> None:
    """A script's hosts: ``--hosts=a,b``, or after its own positional
    arguments (``script.py 2000 a b``, as qjam's examples took them). Add
    them after the script's own positionals; read them with script_hosts."""
    parser.add_argument(
        "--hosts",
        help="hosts, comma separated: local, local:N, [user@]host[:port], "
        "or @FILE (default: $QJAMFAB_HOSTS, else local workers)",
    )
    parser.add_argument(
        "host", nargs="*", help="hosts, as for --hosts, one per argument"
    )


def number_or_host(convert: Callable[[str], object]) -> Callable[[str], object]:
    """The argparse type of a script's optional number that may be left out
    before its hosts (``sum_matrix.py host1 host2``): a number goes through
    `convert` (whose errors stand); any other word is the first host."""

    def parse(text: str) -> object:
        try:
            float(text)
        except ValueError:
            return _LeadingHost(text)
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "number")
    return parse


def script_hosts(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> str | list[str] | None:
    """The hosts add_host_arguments read, for Master(hosts): None when none
    was given (then $QJAMFAB_HOSTS, else local workers). An argument of
    number_or_host that was a host joins them, and gets its default back.
    A bad host is a usage error (exit status 2)."""
    hosts: list[str] = []
    for name, value in vars(args).items():
        if isinstance(value, _LeadingHost):
            hosts.append(str(value))
            setattr(args, name, parser.get_default(name))
    hosts += args.host
    if hosts and args.hosts:
        parser.error(
            f"hosts given twice, with --hosts={args.hosts} and as arguments "
            f"({' '.join(hosts)}): give them one way"
        )
    chosen: str | list[str] | None = args.hosts or hosts or None
    if chosen is not None:
        try:
            parse_hosts(chosen)
        except BadHostSpec as exc:
            parser.error(str(exc))
    return chosen


# --- where an SSH spec points ----------------------------------------------


def config_path(ssh_config: str | None) -> str | None:
    """The ssh_config file to use: the argument, else $QJAMFAB_SSH_CONFIG,
    else None (the clients' defaults)."""
    return ssh_config or os.environ.get("QJAMFAB_SSH_CONFIG") or None


def destination(spec: HostSpec) -> tuple[str | None, str, int | None]:
    """(user, host, port) of an SSH spec; the user from ``user@``, else
    $QJAMFAB_USER, else $QJAM_USER, else None (ssh_config decides)."""
    user, host, port = split_destination(spec.raw)
    return user or env_setting("USER")[0], host, port


def env_setting(name: str) -> tuple[str | None, str]:
    """($QJAMFAB_<name>, else qjam's $QJAM_<name>; the variable it came
    from). Unset or empty: (None, "QJAMFAB_<name>"), the one to suggest."""
    for variable in (f"QJAMFAB_{name}", f"QJAM_{name}"):
        value = os.environ.get(variable)
        if value:
            return value, variable
    return None, f"QJAMFAB_{name}"


def python_mismatch(
    who: str, info: dict, host: str, fix: str | None = None
) -> PreflightFailed | None:
    """None when `info["python"]` (a hello's or probe's [major, minor,
    micro]) is this Python's minor version, else the error saying `who`
    runs another (and `info["executable"]` when given) and what to do:
    `fix`, where {python} stands for "python<major>.<minor>"; by default
    setting QJAMFAB_REMOTE_PYTHON to one there."""
    ours = sys.version_info[:2]
    if tuple(info["python"][:2]) == ours:
        return None
    python = f"python{ours[0]}.{ours[1]}"
    if fix is None:
        fix = f"set {env_setting('REMOTE_PYTHON')[1]} to a {{python}} there"
    executable = f" ({info['executable']})" if info.get("executable") else ""
    return PreflightFailed(
        f"{who} runs Python {'.'.join(map(str, info['python']))}{executable}, "
        f"the master {ours[0]}.{ours[1]}: cloudpickle needs the same minor "
        f"version; {fix.format(python=python)}",
        host=host,
    )


# --- ssh_config options ----------------------------------------------------


def config_option(
    conn: fabric.Connection, name: str, default: str | None = None
) -> str | None:
    """Option `name` (lower case) of a Fabric Connection's ssh_config, as a
    string (the first value of a list), else `default`."""
    value = conn.ssh_config.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else str(value)


def config_yes(value: str | None) -> bool:
    """Whether an ssh_config value says yes (yes, true or on)."""
    return (value or "").strip().lower() in ("yes", "true", "on")
