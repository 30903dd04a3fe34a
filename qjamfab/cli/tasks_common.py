"""What every qjamfab task shares: its decorator (one-line errors, no short
flags) and help, the hosts and ssh_config it acts on (``--hosts``, fab's
``-H`` and ``-S``, $QJAMFAB_HOSTS, $QJAMFAB_SSH_CONFIG; a hosts @FILE is read
by hostspec.parse_hosts), the running Invoke Program and the words after
``--``, and `lifecycle`: one step over many hosts, shown per host while it
runs, then as one table.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeGuard, TypeVar

from invoke import Context, Exit, Program, Task, task

from .. import text
from ..display import logs, tables
from ..engines import cluster
from ..errors import QjamfabError
from ..hostspec import HostSpec, parse_hosts

if TYPE_CHECKING:
    from fabric import Connection

__all__ = [
    "task_help",
    "qjamfab_task",
    "running_program",
    "remainder",
    "is_connection",
    "Skip",
    "targets",
    "setup_logging",
    "Action",
    "lifecycle",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

log = logging.getLogger("qjamfab")

_HELP = {
    "hosts": "comma-separated hosts: local, local:N, [user@]host[:port] or "
    "ssh_config aliases; or @FILE, a hosts file of one host a line, each with "
    "its settings (workers=N python=PATH env.NAME=VALUE) (default: "
    "$QJAMFAB_HOSTS, else local)",
    "ssh-config": "ssh_config file for the SSH hosts (default: "
    "$QJAMFAB_SSH_CONFIG, else ~/.ssh/config)",
    "verbose": "log qjamfab's debug messages to stderr",
}


def task_help(**extra: str) -> dict:
    """The help of the options every task takes, with a task's own."""
    return {**_HELP, **extra}


def _one_line_errors(body: Callable[_P, _R]) -> Callable[_P, _R]:
    """`body` as a task whose errors read as one line, not a traceback.

    A QjamfabError ends it with "TASK failed: MESSAGE" (its traceback first
    with --verbose), exit status 1; Ctrl-C with "interrupted", status 130
    (128 + SIGINT, as a shell reports it). Any other exception is a bug and
    keeps its traceback.
    """
    name = body.__name__.replace("_", "-")
    signature = inspect.signature(body)

    @functools.wraps(body)  # invoke reads the arguments through __wrapped__
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return body(*args, **kwargs)
        except QjamfabError as exc:
            if signature.bind(*args, **kwargs).arguments.get("verbose"):
                traceback.print_exc()
            raise Exit(f"{name} failed: {exc}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


def qjamfab_task(**options: object) -> Callable[[Callable], Task]:
    """invoke's @task for qjamfab's tasks: no automatic short flags (-h would
    be --hosts), one-line errors."""
    return lambda body: task(auto_shortflags=False, **options)(_one_line_errors(body))


# --- the running program: Fabric's -H and the '--' remainder ------------------


def running_program() -> Program | None:
    """The Invoke Program (inv, fab, qjamfab) that is running this task.

    Invoke hands a task only its Context: the core arguments (Fabric's
    ``-H``) and the exact words after ``--`` stay on the Program, which is
    found on the call stack (Program.run -> Executor.execute -> the task).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Program):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def remainder() -> list[str]:
    """The words after ``--`` on the command line, exactly as given.

    (Invoke keeps them only space-joined, as ``core.remainder``.)
    """
    program = running_program()
    argv = list(getattr(program, "argv", None) or sys.argv)[1:]
    if "--" not in argv:
        return []
    return argv[argv.index("--") + 1 :]


def _core_value(program: Program | None, name: str) -> str | None:
    if program is None:
        return None
    try:
        return program.core[0].args[name].value or None
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


# Per running Program and task: how many of Fabric's per-host calls are left
# to skip because the first one acted on every host.
_fab_skips: weakref.WeakKeyDictionary[Program, dict] = weakref.WeakKeyDictionary()


def is_connection(ctx: object) -> TypeGuard[Connection]:
    try:
        from fabric import Connection
    except ImportError:  # pragma: no cover - fabric is a dependency
        return False
    return isinstance(ctx, Connection)


class Skip(Exception):
    """This is one of fab's per-host calls after the one that did the work."""


def targets(
    ctx: Context | None, task_name: str, hosts: str | None, ssh_config: str | None
) -> tuple[list[HostSpec], str | None]:
    """Host specs and ssh_config path for this call (raises Skip for
    fab's per-host calls after the first).

    Precedence: the task's --hosts, else fab's -H, else $QJAMFAB_HOSTS, else
    local; the task's --ssh-config, else fab's -S/--ssh-config (or Fabric's
    ssh_config_path setting), else $QJAMFAB_SSH_CONFIG.
    """
    program = running_program()
    if is_connection(ctx):
        fab_hosts = _core_value(program, "hosts")
        if program is not None and fab_hosts:
            skips = _fab_skips.setdefault(program, {})
            if skips.get(task_name, 0) > 0:
                skips[task_name] -= 1
                raise Skip
            skips[task_name] = len(fab_hosts.split(",")) - 1
        else:  # called with a Connection outside fab -H: that host only
            fab_hosts = ctx.original_host
        if not hosts:
            hosts = fab_hosts
    if not ssh_config:
        ssh_config = (
            getattr(ctx.config, "_runtime_ssh_path", None) if ctx is not None else None
        )
    if not ssh_config:
        ssh_config = os.environ.get("QJAMFAB_SSH_CONFIG") or None
    if ssh_config:
        ssh_config = os.path.expanduser(ssh_config)
        if not os.path.isfile(ssh_config):
            raise Exit(
                f"ssh_config file {ssh_config} does not exist: fix "
                f"--ssh-config (or $QJAMFAB_SSH_CONFIG)",
                code=2,
            )
    try:
        specs = parse_hosts(hosts if hosts else None)
    except QjamfabError as exc:
        raise Exit(f"bad --hosts: {exc}", code=2) from None
    return specs, ssh_config


def setup_logging(verbose: bool) -> None:
    """The "qjamfab" logger to stderr: DEBUG with --verbose, else INFO."""
    logs.log_to_stderr(logging.DEBUG if verbose else logging.INFO, "cli")


# --- one lifecycle step over many hosts ---------------------------------------


class Action(Protocol):
    """A lifecycle step over hosts, as cluster's functions take them."""

    def __call__(
        self,
        specs: list[cluster.Target],
        /,
        *,
        ssh_config: str | None,
        on_result: Callable[[cluster.HostResult], None],
    ) -> list[cluster.HostResult]: ...


def reach(specs: Sequence[HostSpec]) -> list[cluster.Target]:
    """The hosts the tasks act on: each spec, but a "slurm" one is every
    node of the allocation this runs in (run through srun), and a
    "command" one is reached through its command."""
    reached: list[cluster.Target] = []
    for spec in specs:
        if spec.kind == "slurm":
            from ..engines import slurm  # only where Slurm is asked for

            reached += slurm.command_hosts(spec)
        elif spec.kind == "command":
            from ..engines import command

            reached.append(command.command_host(spec))
        else:
            reached.append(spec)
    return reached


def lifecycle(
    ctx: Context,
    task_name: str,
    hosts: str | None,
    ssh_config: str | None,
    verbose: bool,
    action: Action,
    headers: Sequence[str],
    align: str,
    row: Callable[[dict], list],
    problem: Callable[[dict], str] = lambda info: "",
    footnote: Callable[[], str] = lambda: "",
    seconds: bool = True,
    optional: Sequence[str] = ("seconds",),
) -> bool:
    """Run `action` on every host, print a table, exit 1 if any failed.

    `row(info)` gives a successful host's cells between the host name and
    the seconds (when `seconds`) and status columns; `problem(info)` says
    what is wrong with a host that answered but did not do all it was asked
    ("" when nothing); `footnote()` is printed under the table when not
    empty. The status column holds an error's first line (the table cuts it
    to fit); the whole error is printed below the table. The `optional`
    columns are left out, in that order, on a terminal too narrow for them.
    False when this was one of fab's per-host calls with nothing left to do.
    """
    setup_logging(verbose)
    try:
        specs, ssh_config = targets(ctx, task_name, hosts, ssh_config)
    except Skip:
        log.debug("%s: already done for every fab -H host", task_name)
        return False
    log.debug(
        "%s on %s (ssh_config: %s)",
        task_name,
        ", ".join(s.raw for s in specs),
        ssh_config or "default",
    )
    reached = reach(specs)
    with tables.HostProgress(
        task_name, [cluster.target_name(t) for t in reached]
    ) as shown:
        results = action(
            reached,
            ssh_config=ssh_config,
            on_result=lambda r: shown.done(r, problem(r.info) if r.ok else ""),
        )
    rows: list[list] = []
    failed: list[tuple[str, str]] = []
    failed_rows: list[int] = []
    blank = [None] * (len(headers) - 2 - seconds)
    for r in results:
        wrong = ""
        if r.ok:
            wrong = problem(r.info)
            if wrong:
                failed.append((r.host, wrong))
            status = (
                text.first_line(wrong, r.host)
                if wrong
                else (r.info.get("note") or "ok")
            )
            cells = row(r.info) if "note" not in r.info else blank
        else:
            failed.append((r.host, r.error))
            status, cells = text.first_line(r.error, r.host), blank
        if not r.ok or wrong:
            failed_rows.append(len(rows))
        took = [f"{r.seconds:.2f}"] if seconds else []
        rows.append([r.host, *cells, *took, status])
    tables.print_table(headers, rows, align, failed=failed_rows, optional=optional)
    if footnote():
        print(footnote())
    for host, error in failed:
        tables.print_failure(host, error)
    sys.stdout.flush()
    if failed:
        names = ", ".join(host for host, _ in failed)
        raise Exit(
            f"{task_name}: {len(failed)} of "
            f"{text.plural(len(results), 'host')} failed: {names} "
            f"(each host's reason is above)",
            code=1,
        )
    return True
