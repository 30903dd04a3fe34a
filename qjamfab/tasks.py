"""The lifecycle tasks as one Invoke Collection, `ns`.

    inv bootstrap --hosts=a,b,c          # preflight + upload the runtime
    inv start-workers --hosts=a,b,c      # long-lived workers
    inv status --hosts=a,b,c
    inv run examples/sum_matrix.py --hosts=a,b,c -- 2000
    inv run "examples/sum_matrix.py 2000" --hosts=a,b,c
    inv clear-cache --hosts=a,b,c
    inv stop-workers --hosts=a,b,c

Three fronts share this Collection: ``inv`` (the top-level ``tasks.py``),
``qjamfab`` (`qjamfab.cli`, an `invoke.Program`) and ``fab`` (the top-level
``fabfile.py``). Every task takes ``--hosts`` (default ``$QJAMFAB_HOSTS``,
else ``local``), ``--ssh-config`` (default ``$QJAMFAB_SSH_CONFIG``) and
``--verbose``. Under ``fab``, ``-H a,b,c`` and ``-S/--ssh-config`` work too:
Fabric calls a task once per ``-H`` host with a Connection, so the first call
acts on every host at once (in parallel) and the calls for the other hosts
do nothing.

Each lifecycle task shows a line per host while it works (in a terminal),
then prints one table, a row per host (`qjamfab.display`: coloured in a
terminal, plain text with a rule of dashes under the header elsewhere, 80
columns at most with a status cut to fit), and exits with status 1 when any
host failed (each failure's full text is printed below the table); a bad
argument exits with status 2. A QjamfabError ends a task with one line (the
traceback with --verbose), Ctrl-C with "interrupted" and status 130. `run`
exits with the script's own status; with --verbose the script's Masters
log their debug messages to stderr ($QJAMFAB_LOG_LEVEL).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shlex
import signal
import site
import subprocess
import sys
import textwrap
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeGuard, TypeVar

from invoke import Collection, Context, Exit, Program, Task, task

from . import cluster, display
from .errors import QjamfabError
from .hostspec import HostSpec, parse_hosts

if TYPE_CHECKING:
    from fabric import Connection

__all__ = ["ns", "running_program"]

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


def _help(**extra: str) -> dict:
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


def _task(**options: object) -> Callable[[Callable], Task]:
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


def _remainder() -> list[str]:
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


def _is_connection(ctx: object) -> TypeGuard[Connection]:
    try:
        from fabric import Connection
    except ImportError:  # pragma: no cover - fabric is a dependency
        return False
    return isinstance(ctx, Connection)


class _Skip(Exception):
    """This is one of fab's per-host calls after the one that did the work."""


def _targets(
    ctx: Context | None, task_name: str, hosts: str | None, ssh_config: str | None
) -> tuple[list[HostSpec], str | None]:
    """Host specs and ssh_config path for this call (raises _Skip for
    fab's per-host calls after the first).

    Precedence: the task's --hosts, else fab's -H, else $QJAMFAB_HOSTS, else
    local; the task's --ssh-config, else fab's -S/--ssh-config (or Fabric's
    ssh_config_path setting), else $QJAMFAB_SSH_CONFIG.
    """
    program = running_program()
    if _is_connection(ctx):
        fab_hosts = _core_value(program, "hosts")
        if program is not None and fab_hosts:
            skips = _fab_skips.setdefault(program, {})
            if skips.get(task_name, 0) > 0:
                skips[task_name] -= 1
                raise _Skip
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


def _setup_logging(verbose: bool) -> None:
    """The "qjamfab" logger to stderr: DEBUG with --verbose, else INFO."""
    display.log_to_stderr(logging.DEBUG if verbose else logging.INFO, "cli")


# --- one lifecycle step over many hosts ---------------------------------------


class _Action(Protocol):
    """A lifecycle step over hosts, as cluster's functions take them."""

    def __call__(
        self,
        specs: list[HostSpec],
        /,
        *,
        ssh_config: str | None,
        on_result: Callable[[cluster.HostResult], None],
    ) -> list[cluster.HostResult]: ...


def _lifecycle(
    ctx: Context,
    task_name: str,
    hosts: str | None,
    ssh_config: str | None,
    verbose: bool,
    action: _Action,
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
    _setup_logging(verbose)
    try:
        specs, ssh_config = _targets(ctx, task_name, hosts, ssh_config)
    except _Skip:
        log.debug("%s: already done for every fab -H host", task_name)
        return False
    log.debug(
        "%s on %s (ssh_config: %s)",
        task_name,
        ", ".join(s.raw for s in specs),
        ssh_config or "default",
    )
    with display.HostProgress(task_name, [s.raw for s in specs]) as shown:
        results = action(
            specs,
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
                display.first_line(wrong, r.host)
                if wrong
                else (r.info.get("note") or "ok")
            )
            cells = row(r.info) if "note" not in r.info else blank
        else:
            failed.append((r.host, r.error))
            status, cells = display.first_line(r.error, r.host), blank
        if not r.ok or wrong:
            failed_rows.append(len(rows))
        took = [f"{r.seconds:.2f}"] if seconds else []
        rows.append([r.host, *cells, *took, status])
    display.print_table(headers, rows, align, failed=failed_rows, optional=optional)
    if footnote():
        print(footnote())
    for host, error in failed:
        display.print_failure(host, error)
    sys.stdout.flush()
    if failed:
        names = ", ".join(host for host, _ in failed)
        raise Exit(
            f"{task_name}: {len(failed)} of "
            f"{display.plural(len(results), 'host')} failed: {names} "
            f"(each host's reason is above)",
            code=1,
        )
    return True


@_task(
    help=_help(
        **{
            "packages": "comma-separated distributions installed here to upload "
            "to hosts that lack them, e.g. numpy,scipy",
            "with-dependencies": "also upload what those require (as installed here)",
        }
    )
)
def bootstrap(
    c: Context,
    hosts: str | None = None,
    ssh_config: str | None = None,
    packages: str | None = None,
    with_dependencies: bool = False,
    verbose: bool = False,
) -> None:
    """Preflight every host and upload the worker runtime (parallel, idempotent)."""
    from . import packages as shipping

    names = shipping.resolve(packages)  # a bad name: one line, no host
    if with_dependencies and names:
        names = shipping.resolve(shipping.with_dependencies(*(d.name for d in names)))
    shipped: list[str] = []

    def row(info: dict) -> list:
        if info.get("packages"):
            shipped.append(
                textwrap.fill(
                    shipping.describe(info["packages"]), 80, subsequent_indent="  "
                )
            )
        return [
            ".".join(map(str, info.get("python") or [])),
            info.get("numpy") or "none",
            info.get("cores"),
            info.get("runtime"),
        ]

    _lifecycle(
        c,
        "bootstrap",
        hosts,
        ssh_config,
        verbose,
        lambda specs, **kw: cluster.bootstrap(specs, names, **kw),
        ["host", "python", "numpy", "cores", "runtime", "seconds", "status"],
        "lllrlrl",
        row,
        footnote=lambda: "\n".join(shipped),
        optional=("seconds", "cores", "numpy"),
    )


def _count(value: str) -> int | str:
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise Exit(
        f"--workers-per-host must be a positive integer or 'auto', not {value!r}",
        code=2,
    )


@_task(
    help=_help(
        **{
            "workers-per-host": "workers to keep running on each host: a number, "
            "or auto for one per core (local:N hosts: N)"
        }
    )
)
def start_workers(
    c: Context,
    hosts: str | None = None,
    ssh_config: str | None = None,
    workers_per_host: str = "auto",
    verbose: bool = False,
) -> None:
    """Start long-lived workers on every host (the missing ones only)."""
    count = _count(workers_per_host)

    def action(
        specs: list[HostSpec],
        /,
        *,
        ssh_config: str | None,
        on_result: Callable[[cluster.HostResult], None],
    ) -> list[cluster.HostResult]:
        return cluster.for_each_host(
            specs,
            lambda s: s.start_workers(s.spec.workers or count),
            ssh_config=ssh_config,
            on_result=on_result,
        )

    def problem(info: dict) -> str:
        if not info.get("failed"):
            return ""
        names = ", ".join(info["failed"])
        return f"{names} did not start: see <base>/log/<worker>.daemon on that host"

    _lifecycle(
        c,
        "start-workers",
        hosts,
        ssh_config,
        verbose,
        action,
        ["host", "started", "running", "seconds", "status"],
        "lrrrl",
        lambda info: [len(info.get("started", [])), len(info.get("workers", []))],
        problem,
    )


@_task(help=_help())
def status(
    c: Context,
    hosts: str | None = None,
    ssh_config: str | None = None,
    verbose: bool = False,
) -> None:
    """Workers, cache and runtimes on every host."""
    from . import runtime

    current = runtime.bundle_hash()

    marked: list[bool] = []
    shipped: list[str] = []
    over: list[str] = []  # hosts whose tasks pinned more than the limit
    shared: list[str] = []  # hosts whose base is on a network filesystem

    def row(info: dict) -> list:
        said = info.get("cache_pinned_over")
        if said:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(said["time"]))
            over.append(
                textwrap.fill(
                    f"cache on {info['qjamfab_host']}: tasks pinned "
                    f"{display.format_bytes(said['pinned'])}, over its limit "
                    f"of {display.format_bytes(said['limit'])} ({when}): "
                    "raise QJAMFAB_CACHE_LIMIT there",
                    80,
                    subsequent_indent="  ",
                )
            )
        if info.get("packages"):
            shipped.append(
                textwrap.fill(
                    f"packages on {info['qjamfab_host']}: "
                    + ", ".join(
                        f"{p['name']} {p['version']}" for p in info["packages"]
                    ),
                    80,
                    subsequent_indent="  ",
                )
            )
        home = display.home_kind(info.get("base_fs"))
        if home != "local":
            shared.append(
                textwrap.fill(
                    f"{info['qjamfab_host']}: shared home ({home}), per-host "
                    f"state in {info.get('host_dir')}",
                    80,
                    subsequent_indent="  ",
                )
            )
        workers = info.get("workers") or []
        uptime = max((w.get("uptime_s", 0) for w in workers), default=None)
        marked.append(current in (info.get("runtimes") or []))
        return [
            len(workers),
            display.format_duration(uptime),
            info.get("cache_entries"),
            display.format_bytes(info.get("cache_bytes")),
            display.format_bytes(info.get("cache_limit"), compact=True),
            home,
            _runtimes(info.get("runtimes") or [], current),
        ]

    def action(
        specs: list[HostSpec],
        /,
        *,
        ssh_config: str | None,
        on_result: Callable[[cluster.HostResult], None],
    ) -> list[cluster.HostResult]:
        results = cluster.status(specs, ssh_config=ssh_config, on_result=on_result)
        for r in results:  # for the packages footnote
            r.info["qjamfab_host"] = r.host
        return results

    _lifecycle(
        c,
        "status",
        hosts,
        ssh_config,
        verbose,
        action,
        [
            "host",
            "workers",
            "uptime",
            "entries",
            "cache",
            "limit",
            "home",
            "runtime",
            "status",
        ],
        "lrrrrrlll",
        row,
        footnote=lambda: "\n".join(
            shared
            + shipped
            + over
            + (
                ["(runtime* = this qjamfab's runtime, +N = N others)"]
                if any(marked)
                else []
            )
        ),
        seconds=False,  # a status query is quick
        optional=("uptime", "entries", "home", "runtime", "limit"),
    )


def _runtimes(hashes: list[str], current: str) -> str | None:
    """The runtimes on a host in a narrow cell: "d9bfff6e*" for this
    qjamfab's (short, as git shortens hashes), else the first one, and "+N"
    for the others."""
    if not hashes:
        return None
    shown = current if current in hashes else hashes[0]
    cell = shown[:8] + ("*" if shown == current else "")
    return cell + (f" +{len(hashes) - 1}" if len(hashes) > 1 else "")


@_task(help=_help())
def clear_cache(
    c: Context,
    hosts: str | None = None,
    ssh_config: str | None = None,
    verbose: bool = False,
) -> None:
    """Empty the workers' caches (memory and disk) on every host."""
    _lifecycle(
        c,
        "clear-cache",
        hosts,
        ssh_config,
        verbose,
        cluster.clear_cache,
        ["host", "entries removed", "bytes removed", "seconds", "status"],
        "lrrrl",
        lambda info: [info.get("entries"), display.format_bytes(info.get("bytes"))],
    )


@_task(help=_help())
def stop_workers(
    c: Context,
    hosts: str | None = None,
    ssh_config: str | None = None,
    verbose: bool = False,
) -> None:
    """Stop the long-lived workers on every host."""
    _lifecycle(
        c,
        "stop-workers",
        hosts,
        ssh_config,
        verbose,
        cluster.stop_workers,
        ["host", "stopped", "seconds", "status"],
        "lrrl",
        lambda info: [stopped_cell(info)],
    )


def stopped_cell(info: dict) -> str:
    """How many daemons stop-workers ended on a host, and how many of them
    it had to kill."""
    killed = len(info.get("killed", ()))
    return f"{info.get('stopped')}" + (f" ({killed} killed)" if killed else "")


# --- run ---------------------------------------------------------------------


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
from qjamfab.display import script_excepthook
sys.argv.pop(0)
sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
sys.excepthook = script_excepthook(verbose=%r)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@_task(
    help=_help(
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
    _setup_logging(verbose)
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
        specs, ssh_config = _targets(c, "run", hosts, ssh_config)
    except _Skip:
        return
    words = _script_words(script)
    rest = _remainder()
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
    # them (display.warn_if_cli_hosts_ignored).
    env.pop("QJAMFAB_HOSTS_FROM_CLI", None)
    if hosts or _is_connection(c):
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


def fab_hint_excepthook(previous: display.ExceptHook) -> display.ExceptHook:
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


# --- bench ---------------------------------------------------------------------


def _bench_root() -> str | None:
    """The source checkout holding benchmarks/ (it is not installed)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (here, os.getcwd()):
        if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
            return root
    return None


@_task(
    help={
        "quick": "small sizes, about a minute (results in benchmarks/results/quick/)",
        "only": "comma-separated subset: sae, overhead, transfer, memory, bootstrap",
        "out": "directory for results.json and the plots",
    }
)
def bench(
    c: Context, quick: bool = False, only: str = "", out: str | None = None
) -> None:
    """Run the benchmark suite (python -m benchmarks) from a source checkout."""
    root = _bench_root()
    if root is None:
        raise Exit(
            "bench: benchmarks/ is not here: run it from a source checkout of qjamfab",
            code=2,
        )
    argv = [sys.executable, "-m", "benchmarks"]
    if quick:
        argv.append("--quick")
    if only:
        argv += ["--only", only]
    if out:
        argv += ["--out", os.path.abspath(out)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    code = subprocess.call(argv, cwd=root, env=env)
    if code != 0:
        raise Exit(code=code)


ns = Collection(bootstrap, start_workers, status, run, clear_cache, stop_workers, bench)
