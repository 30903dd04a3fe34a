"""``inv run``: a Python script run against the hosts (as ``python SCRIPT
ARGS`` would run it, with $QJAMFAB_HOSTS set for its Master), and the hint
``fab`` gives when Fabric takes the words after ``--`` as a shell command.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import site
import subprocess
import sys
from types import TracebackType

from invoke import Context, Exit

from ..display import logs
from .tasks_common import (
    Skip,
    is_connection,
    qjamfab_task,
    remainder,
    running_program,
    setup_logging,
    targets,
    task_help,
)

__all__ = ["run", "fab_hint_excepthook"]

log = logging.getLogger("qjamfab")


def _script_words(script: str) -> list[str]:
    """SCRIPT as given: an existing path stays whole (it may hold spaces);
    anything else is split like a shell would ("script.py 200")."""
    if os.path.exists(script):
        return [script]
    try:
        return shlex.split(script)
    except ValueError as exc:
        raise Exit(f"run: cannot split {script!r}: {exc}", code=2) from None


def _pythonpath(env: dict) -> str | None:
    """PYTHONPATH for the script, so that it imports this qjamfab even from
    a source checkout that is not installed."""
    # the checkout holding qjamfab/ (this module is in qjamfab/cli/)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    installed = set(site.getsitepackages())
    try:
        installed.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - some virtualenvs
        pass
    current = env.get("PYTHONPATH", "")
    if root in installed or root in current.split(os.pathsep):
        return current or None
    return os.pathsep.join(p for p in (current, root) if p)


# The script runs as `python SCRIPT ARGS` would run it (sys.argv, sys.path[0],
# __main__), but with an excepthook that makes a QjamfabError one line.
_RUN_SCRIPT = """\
import os, runpy, sys
from qjamfab.display.logs import script_excepthook
sys.argv.pop(0)
sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
sys.excepthook = script_excepthook(verbose=%r)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@qjamfab_task(
    help=task_help(
        script="the Python script to run, with its arguments after '--' "
        '(or in this one quoted string: "script.py 200")'
    )
)
def run(
    c: Context,
    script: str,
    hosts: str | None = None,
    ssh_config: str | None = None,
    verbose: bool = False,
) -> None:
    """Run a Python script against the hosts: run SCRIPT [--hosts=H] [-- ARGS].

    Runs SCRIPT ARGS with this Python, as `python SCRIPT ARGS` does, with
    QJAMFAB_HOSTS set to --hosts (and QJAMFAB_SSH_CONFIG to --ssh-config), so
    the script's Master() uses them (a Master given hosts of its own warns
    that it ignores --hosts), and with --verbose QJAMFAB_LOG_LEVEL=DEBUG, so
    it logs what its Masters do to stderr. A qjamfab error
    that ends the script prints its message alone (its traceback too with
    --verbose); Ctrl-C prints "interrupted" and exits 130.
    Its output streams through and its exit status is run's. Give ARGS after
    '--', or together with SCRIPT in one quoted string: "script.py 200".
    """
    setup_logging(verbose)
    if script in ("--help", "-h"):
        # Invoke gives a positional argument the word after it, even --help:
        # show the help that 'inv --help run' shows.
        program = running_program()
        try:
            if program is not None:
                program.print_task_help("run")
                raise Exit(code=0)
        except (AttributeError, KeyError):  # a nested name
            pass
        raise Exit(
            "usage: run [--hosts=H] [--ssh-config=PATH] [--verbose] "
            "SCRIPT [-- ARGS...]",
            code=0,
        )
    try:
        specs, ssh_config = targets(c, "run", hosts, ssh_config)
    except Skip:
        return
    words = _script_words(script)
    rest = remainder()
    if not words:
        raise Exit("run: no script given: run SCRIPT [-- ARGS...]", code=2)
    path = words[0]
    if not os.path.isfile(path):
        what = (
            "is a directory, not a script" if os.path.isdir(path) else "does not exist"
        )
        raise Exit(
            f"run: script {path} {what} (working directory {os.getcwd()})", code=2
        )
    command = [path, *words[1:], *rest]
    env = dict(os.environ)
    env["QJAMFAB_HOSTS"] = ",".join(s.entry for s in specs)  # with their settings
    # Hosts from --hosts or fab -H: a Master given others says it ignores
    # them (logs.warn_if_cli_hosts_ignored).
    env.pop("QJAMFAB_HOSTS_FROM_CLI", None)
    if hosts or is_connection(c):
        env["QJAMFAB_HOSTS_FROM_CLI"] = "1"
    if ssh_config:
        env["QJAMFAB_SSH_CONFIG"] = os.path.abspath(ssh_config)
    pythonpath = _pythonpath(env)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # Only with --verbose: a summary line per run (INFO) would repeat the
    # RunStats a script prints itself. A level the user set stays.
    if verbose:
        env["QJAMFAB_LOG_LEVEL"] = "DEBUG"
    log.debug(
        "run: %s with QJAMFAB_HOSTS=%s%s",
        shlex.join([sys.executable, *command]),
        env["QJAMFAB_HOSTS"],
        f" QJAMFAB_SSH_CONFIG={env['QJAMFAB_SSH_CONFIG']}" if ssh_config else "",
    )
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_SCRIPT % bool(verbose), *command], env=env
    )
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # The script got the same Ctrl-C (same process group): let it end.
        try:
            code = proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            code = proc.wait()
    if code == -signal.SIGINT:  # Ctrl-C: Python ends itself by SIGINT
        raise Exit("interrupted", code=130)
    if code < 0:
        name = (
            signal.Signals(-code).name
            if -code in signal.valid_signals()
            else f"signal {-code}"
        )
        raise Exit(f"run: {path} was killed by {name}", code=128 - code)
    if code != 0:
        raise Exit(code=code)


def fab_hint_excepthook(previous: logs.ExceptHook) -> logs.ExceptHook:
    """A sys.excepthook for ``fab`` (installed by fabfile.py) that turns
    Fabric's NothingToDo into a hint.

    Fabric takes the words after ``--`` as a shell command for the -H hosts,
    and with a task on the line it raises NothingToDo even when -H is given;
    the user meant them as the script's arguments. Other exceptions go to
    `previous`.
    """
    from fabric.exceptions import NothingToDo

    def hook(kind: type, exc: BaseException, tb: TracebackType | None) -> None:
        if not (issubclass(kind, NothingToDo) and "--" in sys.argv):
            return previous(kind, exc, tb)
        sys.stderr.write(
            "fab cannot pass the words after '--' to a task (Fabric runs them "
            f"as a shell command): give them with the script in one quoted "
            f"string: {_quoted_form(sys.argv[1:])}\n"
        )

    return hook


def _quoted_form(argv: list[str]) -> str:
    """fab's command line with the words after '--' moved into run's quoted
    SCRIPT: ``-H a run s.py -- 2000`` -> ``fab -H a run 's.py 2000'``."""
    cut = argv.index("--")
    words, rest = argv[:cut], argv[cut + 1 :]
    k = words.index("run") + 1 if "run" in words else len(words)
    # the script: run's first word that is neither an option nor its value
    while k < len(words) and words[k].startswith("-"):
        k += 2 if words[k] in ("--hosts", "--ssh-config") else 1
    if k >= len(words):
        return 'fab -H HOSTS run "SCRIPT ARGS..."'
    words[k] = shlex.join([words[k], *rest])
    return shlex.join(["fab", *words])
