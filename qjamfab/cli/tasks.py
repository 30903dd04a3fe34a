"""qjamfab's Invoke tasks as one Collection, `ns`: the lifecycle tasks here,
`run` from tasks_run.py, what they share from tasks_common.py.

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
then prints one table, a row per host (`qjamfab.display.tables`: coloured in a
terminal, plain text with a rule of dashes under the header elsewhere, 80
columns at most with a status cut to fit), and exits with status 1 when any
host failed (each failure's full text is printed below the table); a bad
argument exits with status 2. A QjamfabError ends a task with one line (the
traceback with --verbose), Ctrl-C with "interrupted" and status 130. `run`
exits with the script's own status; with --verbose the script's Masters
log their debug messages to stderr ($QJAMFAB_LOG_LEVEL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

from invoke import Collection, Context, Exit, Task

from .. import text
from ..display import tables
from ..engines import cluster
from .tasks_common import (
    Action,
    lifecycle,
    qjamfab_task,
    running_program,
    task_help,
)
from .tasks_run import run

__all__ = ["ns", "running_program"]


@qjamfab_task(
    help=task_help(
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
    from ..links import package_ship
    from ..links import packages as shipping

    names = shipping.resolve(packages)  # a bad name: one line, no host
    if with_dependencies and names:
        names = shipping.resolve(shipping.with_dependencies(*(d.name for d in names)))
    shipped: list[str] = []

    def row(info: dict) -> list:
        if info.get("packages"):
            shipped.append(
                textwrap.fill(
                    package_ship.describe(info["packages"]), 80, subsequent_indent="  "
                )
            )
        return [
            ".".join(map(str, info.get("python") or [])),
            info.get("numpy") or "none",
            info.get("cores"),
            info.get("runtime"),
        ]

    lifecycle(
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


@qjamfab_task(
    help=task_help(
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
        specs: list[cluster.Target],
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

    lifecycle(
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


@qjamfab_task(help=task_help())
def status(
    c: Context,
    hosts: str | None = None,
    ssh_config: str | None = None,
    verbose: bool = False,
) -> None:
    """Workers, cache and runtimes on every host."""
    from .. import runtime

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
                    f"{text.format_bytes(said['pinned'])}, over its limit "
                    f"of {text.format_bytes(said['limit'])} ({when}): "
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
        home = tables.home_kind(info.get("base_fs"))
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
            text.format_duration(uptime),
            info.get("cache_entries"),
            text.format_bytes(info.get("cache_bytes")),
            text.format_bytes(info.get("cache_limit"), compact=True),
            home,
            _runtimes(info.get("runtimes") or [], current),
        ]

    def action(
        specs: list[cluster.Target],
        /,
        *,
        ssh_config: str | None,
        on_result: Callable[[cluster.HostResult], None],
    ) -> list[cluster.HostResult]:
        results = cluster.status(specs, ssh_config=ssh_config, on_result=on_result)
        for r in results:  # for the packages footnote
            r.info["qjamfab_host"] = r.host
        return results

    lifecycle(
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


def _table_task(
    name: str,
    doc: str,
    action: Action,
    headers: list[str],
    align: str,
    row: Callable[[dict], list],
) -> Task:
    """The task `name`, which only runs `action` on every host and shows
    `row(info)`'s cells for each in the table (tasks_common.lifecycle)."""

    def body(
        c: Context,
        hosts: str | None = None,
        ssh_config: str | None = None,
        verbose: bool = False,
    ) -> None:
        lifecycle(c, name, hosts, ssh_config, verbose, action, headers, align, row)

    body.__name__ = body.__qualname__ = name.replace("-", "_")
    body.__doc__ = doc
    return qjamfab_task(help=task_help())(body)


# Each action is looked up in cluster when the task runs.
clear_cache = _table_task(
    "clear-cache",
    "Empty the workers' caches (memory and disk) on every host.",
    lambda specs, **kw: cluster.clear_cache(specs, **kw),
    ["host", "entries removed", "bytes removed", "seconds", "status"],
    "lrrrl",
    lambda info: [info.get("entries"), text.format_bytes(info.get("bytes"))],
)
stop_workers = _table_task(
    "stop-workers",
    "Stop the long-lived workers on every host.",
    lambda specs, **kw: cluster.stop_workers(specs, **kw),
    ["host", "stopped", "seconds", "status"],
    "lrrl",
    lambda info: [stopped_cell(info)],
)


def stopped_cell(info: dict) -> str:
    """How many daemons stop-workers ended on a host, and how many of them
    it had to kill."""
    killed = len(info.get("killed", ()))
    return f"{info.get('stopped')}" + (f" ({killed} killed)" if killed else "")


# --- bench ---------------------------------------------------------------------


def _bench_root() -> str | None:
    """The source checkout holding benchmarks/ (it is not installed)."""
    # the checkout holding qjamfab/ (this module is in qjamfab/cli/)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (here, os.getcwd()):
        if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
            return root
    return None


@qjamfab_task(
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
