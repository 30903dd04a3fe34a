"""Host entries whose kind has its own text after ``KIND:``: the
``slurm:KEY=VALUE,...`` options Slurm is asked for (engines/slurm.py turns
them into salloc's), and the command line of a ``command:CMD`` host
(engines/command.py runs it). hostspec.py's `parse_hosts` calls these; a
comma inside such an entry is part of it, not a separator.

Stdlib only, plus qjamfab's errors.
"""

from __future__ import annotations

import re
import shlex

from .errors import BadHostSpec

__all__ = [
    "ARGS",
    "SLURM_OPTIONS",
    "command_line",
    "is_command",
    "is_slurm",
    "join_slurm_options",
    "slurm_options",
]

# What a "slurm:" spec may ask of Slurm (slurm.py turns them into salloc's).
SLURM_OPTIONS = (
    "nodes",
    "cpus-per-node",
    "time",
    "partition",
    "account",
    "qos",
    "constraint",
)
_SLURM_COUNTS = ("nodes", "cpus-per-node")
# In a command line, the word that stands for python's arguments (-c
# PROGRAM) as one shell-quoted word, for a far side that reads a shell line.
ARGS = "{args}"
_COMMAND_EXAMPLE = "command:docker exec -i BOX python3"


def _kind(entry: str) -> str:
    return entry.strip().partition(":")[0].lower()


def is_slurm(entry: str) -> bool:
    return _kind(entry) == "slurm"


def is_command(entry: str) -> bool:
    return _kind(entry) == "command"


def join_slurm_options(items: list[str]) -> list[str]:
    """Comma-split entries with a slurm entry's options joined back to it:
    'slurm:nodes=2,time=1:00:00' is one entry."""
    entries: list[str] = []
    for item in items:
        # Any KEY=VALUE, so that an unknown option is refused as one.
        option = re.match(r"\s*[A-Za-z][\w.-]*=", item)
        if entries and is_slurm(entries[-1]) and option:
            entries[-1] += "," + item.strip()
        else:
            entries.append(item)
    return entries


def slurm_options(raw: str, text: str) -> tuple[tuple[str, str], ...]:
    """The KEY=VALUE,... after 'slurm:' (empty for plain 'slurm')."""
    options: dict[str, str] = {}
    for item in text.split(",") if text.strip() else []:
        key, _, value = (part.strip() for part in item.partition("="))
        if key in SLURM_OPTIONS and not value:
            example = "2" if key in _SLURM_COUNTS else "..."
            raise BadHostSpec(
                f"host spec {raw!r}: {key} needs a value: write e.g. {key}={example}",
                host=raw,
            )
        if key not in SLURM_OPTIONS:
            raise BadHostSpec(
                f"host spec {raw!r}: {item.strip()!r} is not a Slurm option: "
                f"write slurm:KEY=VALUE,... with KEY one of {', '.join(SLURM_OPTIONS)}",
                host=raw,
            )
        if key in _SLURM_COUNTS and not (
            value.isascii() and value.isdigit() and int(value) > 0
        ):
            raise BadHostSpec(
                f"host spec {raw!r}: {key}={value!r} is not a positive "
                f"number: write e.g. {key}=2",
                host=raw,
            )
        options[key] = value
    return tuple(options.items())


def command_line(raw: str, text: str) -> tuple[tuple[str, str], ...]:
    """The command after 'command:' as the spec's options (("command",
    CMD),), checked to be one: shell words, the first the program."""
    try:
        words = shlex.split(text)
    except ValueError as exc:  # an unclosed quote
        raise BadHostSpec(
            f"host spec {raw!r}: cannot read the command ({exc}): quote it as "
            f"a shell would, e.g. {_COMMAND_EXAMPLE}",
            host=raw,
        ) from None
    if not words:
        raise BadHostSpec(
            f"host spec {raw!r} has no command after 'command:': write the "
            f"command that starts python3 there, e.g. {_COMMAND_EXAMPLE}",
            host=raw,
        )
    if words[0] == ARGS:
        raise BadHostSpec(
            f"host spec {raw!r}: the command cannot start with {ARGS}: write "
            f"the command that starts python3, e.g. {_COMMAND_EXAMPLE}",
            host=raw,
        )
    return (("command", text.strip()),)
