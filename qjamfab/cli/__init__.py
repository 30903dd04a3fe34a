"""The ``qjamfab`` program: the lifecycle tasks once qjamfab is installed.

    qjamfab --list
    qjamfab bootstrap --hosts=a,b,c
    qjamfab run examples/sum_matrix.py --hosts=a,b,c -- 2000

An `invoke.Program` around `qjamfab.cli.tasks.ns` that speaks for qjamfab: its
help lists the tasks and the few options that matter here (not Invoke's
shell-command options such as ``--pty`` or ``--dry``, which no task uses),
and a word it does not know gets the nearest task or option name
(``qjamfab statsu``: "did you mean 'status'?"). ``inv`` and ``fab`` keep
their own programs; `suggest_nearest_names` gives them the suggestion too.
"""

from __future__ import annotations

import difflib
import re

from invoke import Program
from invoke.exceptions import ParseError
from invoke.parser import Argument

from ..version import __version__
from .tasks import ns, running_program

__all__ = ["QjamfabProgram", "program", "main", "suggest_nearest_names"]

# Invoke's core options that qjamfab's tasks have a use for, with help in
# qjamfab's words (None: Invoke's). The others only set defaults for
# Invoke's run() of shell commands, which no task calls.
_CORE_OPTIONS = {
    "help": "show this help, or a task's options (--help TASK) and exit",
    "list": "list the tasks and exit",
    "version": "show qjamfab's version and exit",
    "print-completion-script": None,
    "complete": None,  # used by the completion script; not shown
}

_UNKNOWN = re.compile(r"^No idea what '(.+)' is!$")


def with_suggestion(error: ParseError, program: Program) -> ParseError:
    """`error` about a word the parser does not know, said as qjamfab says
    it: which word, the nearest task (or, for ``--word``, option) name, and
    where the names are listed. Other parse errors are returned as they are.
    """
    match = _UNKNOWN.match(str(error))
    if match is None:
        return error
    word = match.group(1)
    binary = re.sub(r"\[.*?\]", "", program.binary)  # "inv[oke]": inv
    context = error.context
    if word.startswith("-"):
        what = "option"
        names = list(program.initial_context.flags)
        if context is not None and context.name:  # a task's, not the core's
            names += list(context.flags)
            where = f"'{binary} --help {context.name}' lists its options"
        else:
            where = f"'{binary} --help' lists them"
        nearest = difflib.get_close_matches(word.split("=", 1)[0], names, n=1)
    else:
        what, where = "task", f"'{binary} --list' lists them"
        names = [
            name
            for task, aliases in program.collection.task_names.items()
            for name in [task, *aliases]
        ]
        nearest = difflib.get_close_matches(word, names, n=1)
    hint = f"did you mean '{nearest[0]}'? " if nearest else ""
    return ParseError(f"no {what} named '{word}': {hint}({where})", context)


class QjamfabProgram(Program):
    """The ``qjamfab`` program (see the module docstring)."""

    def core_args(self) -> list[Argument]:
        kept = [a for a in super().core_args() if a.name in _CORE_OPTIONS]
        for argument in kept:
            argument.help = _CORE_OPTIONS[str(argument.name)] or argument.help
        return kept

    def parse_core_args(self) -> None:
        super().parse_core_args()
        # Invoke's own steps read every core option it defines: the ones
        # left out read as not given.
        args = self.core[0].args
        for argument in Program.core_args(self):
            if argument.name not in args:
                args[argument.name] = argument

    def parse_tasks(self) -> None:
        try:
            super().parse_tasks()
        except ParseError as exc:
            raise with_suggestion(exc, self) from None

    def parse_cleanup(self) -> None:
        try:
            super().parse_cleanup()  # --help WORD for an unknown WORD
        except ParseError as exc:
            raise with_suggestion(exc, self) from None

    def task_list_opener(self, extra: str = "") -> str:
        return "Tasks"

    def print_help(self) -> None:
        print(f"Usage: {self.binary} [--help [TASK]] [--list] [--version]")
        print(f"       {self.binary} TASK [--options] [-- SCRIPT ARGS]")
        print()
        print(
            f"qjamfab {self.version}: iterative, data-parallel Python on "
            "machines you reach with SSH."
        )
        print()
        self.list_tasks()
        print("Options:")
        print()
        self.print_columns(
            [
                (flags, text)
                for flags, text in self.initial_context.help_tuples()
                if not flags.startswith("--complete")
            ]
        )
        print(
            "Every task takes --hosts (a,b,c or @FILE; default $QJAMFAB_HOSTS, "
            "else local),\n--ssh-config PATH and --verbose; "
            f"'{self.binary} --help TASK' shows a task's options."
        )


program = QjamfabProgram(
    namespace=ns, version=__version__, name="qjamfab", binary="qjamfab"
)


def suggest_nearest_names(running: Program | None = None) -> None:
    """Have a running Invoke program (``inv``, ``fab``) suggest the
    nearest task or option name for a word it does not know, as ``qjamfab``
    does. tasks.py and fabfile.py call it while Invoke imports them (before
    it parses the tasks); elsewhere it does nothing."""
    running = running if running is not None else running_program()
    if running is None or isinstance(running, QjamfabProgram):
        return
    parse_tasks = running.parse_tasks

    def suggesting() -> None:
        try:
            parse_tasks()
        except ParseError as exc:
            raise with_suggestion(exc, running) from None

    running.parse_tasks = suggesting  # type: ignore[method-assign]  # this one only


def main(argv: list[str] | None = None) -> None:
    """Run the program on argv (default: sys.argv); exits the process."""
    program.run(argv)


if __name__ == "__main__":
    main()
