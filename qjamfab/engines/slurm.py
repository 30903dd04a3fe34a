"""Slurm: one host agent per node of an allocation, over `srun`'s stdin and
stdout.

Inside an allocation (`salloc`, `sbatch`: SLURM_JOB_ID set) the nodes and
their CPUs are the allocation's. Outside one, a ``slurm:nodes=N,...`` spec
asks Slurm for one: `salloc` runs a holder on this machine (`cat`, reading
a pipe from the master until it closes) and the allocation lasts as long
as the holder does. So it is released when the Master closes (the pipe is
closed, then `scancel` to be sure) and when the master's process ends
any other way, SIGKILL included (the kernel closes the pipe; salloc then
relinquishes the allocation); the time limit bounds the rest.

Each node's agent runs as a one-task job step, `srun --nodelist=NODE
--unbuffered ...`, whose stdin and stdout are the agent's stream: srun
forwards the bytes as they come (without --unbuffered it holds output
until a newline, which a binary frame may never have). A step that ends
(scancel, a node lost, the allocation ended) ends the stream: its workers
are lost, as when an SSH connection drops.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .. import runtime
from ..errors import BadHostSpec, HostUnreachable, PreflightFailed
from ..hostspec import HostSpec
from ..links.handshake import start_agent
from ..links.transport import ProcessTransport
from ..links.workers import Link
from . import Engine, EngineSettings, Host, StatusLine, cluster, register
from .agent_host import AgentHost

__all__ = [
    "Allocation",
    "SlurmNode",
    "SrunTransport",
    "allocation_for",
    "command_hosts",
    "cpus_per_node",
    "srun_argv",
]

log = logging.getLogger("qjamfab")

SRUN_MISSING = (
    "Slurm's srun is not installed on this machine: run the Master on a "
    "Slurm login or compute node, or install Slurm's client commands"
)
TASKS_OUTSIDE = (
    "the host tasks reach the nodes of the Slurm allocation they run in: run "
    "them inside it (salloc, sbatch), e.g. salloc --nodes=2 inv status "
    "--hosts=slurm; they never ask Slurm for one"
)
NOT_IN_ALLOCATION = (
    "'slurm' outside a Slurm allocation: run inside one (salloc, sbatch), or "
    "let the Master ask for one with e.g. 'slurm:nodes=2,cpus-per-node=8,"
    "time=1:00:00'"
)
_HOLDER_MARK = "qjamfab-allocation"
# Runs where salloc runs its command (here): says what was granted, then
# holds the allocation until the master's end of its stdin closes.
_HOLDER = (
    f'echo "{_HOLDER_MARK} $SLURM_JOB_ID $SLURM_JOB_NODELIST '
    '$SLURM_JOB_CPUS_PER_NODE"; exec cat >/dev/null'
)
# A node is ours only while the allocation lasts, and Slurm (with
# proctrack/linuxproc) does not end daemons that left the step: they end
# this long after their agent, unless a new session claims them first.
IDLE_TIMEOUT_S = 5.0
_PENDING_POLL_S = 2.0  # how often squeue is asked why a job still waits
# What srun says when asked for a step of a job that has ended.
_JOB_GONE = re.compile(r"Expired or invalid job|Invalid job id|already completing")
_RELEASE_WAIT_S = 10.0  # for salloc to relinquish after its holder ends
_COMMAND_TIMEOUT_S = 30.0  # scontrol, squeue, scancel
# salloc options a spec may give, by their name in the spec.
_SALLOC_OPTIONS = {
    "time": "--time",
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
}


def _need(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        if command == "srun":
            raise PreflightFailed(SRUN_MISSING, host="slurm")
        raise PreflightFailed(
            f"Slurm's {command} is not installed on this machine, though srun "
            "is: install Slurm's client commands",
            host="slurm",
        )
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT_S,
    )


def _one_line(text: str) -> str:
    """Slurm's messages, on one line, without their "salloc: error:"."""
    lines = [
        re.sub(r"^\w+: (error: )?", "", line.strip())
        for line in text.splitlines()
        if line.strip()
    ]
    return "; ".join(lines) or "no message"


def cpus_per_node(text: str) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE ("72(x2),36") as one count per node, in the
    node list's order."""
    counts: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise PreflightFailed(
                f"cannot read Slurm's CPUs per node {text!r} "
                "(SLURM_JOB_CPUS_PER_NODE): run the Master in the job's own "
                "environment (salloc, sbatch), unchanged",
                host="slurm",
            )
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _hostnames(nodelist: str) -> list[str]:
    """A Slurm node list ("node[01-03],gpu7") as host names."""
    done = _run([_need("scontrol"), "show", "hostnames", nodelist])
    names = done.stdout.split()
    if done.returncode != 0 or not names:
        raise PreflightFailed(
            f"Slurm's scontrol cannot expand the node list {nodelist!r}: "
            f"{_one_line(done.stderr)}",
            host="slurm",
        )
    return names


@dataclass
class Allocation:
    """A Slurm job's nodes and CPUs; `holder` is the salloc that holds it
    when this process asked for it (None: the allocation is the caller's,
    and stays when the Master closes)."""

    job_id: str
    nodes: list[str]
    cpus: dict[str, int]
    holder: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, job_id: str, nodelist: str, cpus_text: str) -> Allocation:
        nodes = _hostnames(nodelist)
        counts = cpus_per_node(cpus_text)
        if len(counts) != len(nodes):
            raise PreflightFailed(
                f"Slurm job {job_id} lists {len(nodes)} nodes but CPUs for "
                f"{len(counts)} ({cpus_text!r}): run the Master in the job's "
                "own environment (salloc, sbatch), unchanged",
                host="slurm",
            )
        return cls(job_id, nodes, dict(zip(nodes, counts)))

    def release(self) -> None:
        """Give the allocation back, if this process asked for it: end the
        holder (salloc relinquishes it), then scancel whatever is left."""
        holder, self.holder = self.holder, None
        if holder is None:
            return
        if holder.stdin is not None:
            try:
                holder.stdin.close()
            except OSError:
                pass
        try:
            holder.wait(timeout=_RELEASE_WAIT_S)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        if self.job_id and shutil.which("scancel"):
            _run(["scancel", self.job_id])
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()

    def node_list(self) -> list[SlurmNode]:
        return [SlurmNode(self, node) for node in self.nodes]


@dataclass(frozen=True, eq=False)
class SlurmNode:
    """One node of an allocation: where one host agent runs."""

    allocation: Allocation
    name: str

    @property
    def cpus(self) -> int:
        return self.allocation.cpus[self.name]

    def transport(self, label: str, argv: list[str]) -> SrunTransport:
        """`argv` as a one-task step on this node, spoken to over its pipes."""
        job_id = self.allocation.job_id
        return SrunTransport(
            label, job_id, srun_argv(job_id, self.name, self.cpus, argv)
        )

    def run(
        self, argv: list[str], timeout: float, stdin: bytes
    ) -> tuple[int, str, str]:
        """`argv` as a one-task step on this node, to its end (a
        cluster.Runner)."""
        return cluster.run_command(
            srun_argv(self.allocation.job_id, self.name, self.cpus, argv),
            timeout,
            stdin,
        )


def srun_argv(job_id: str, node: str, cpus: int, argv: list[str]) -> list[str]:
    """srun running argv as one task on node, its stdin and stdout a byte
    stream: --unbuffered passes output on as it comes (else srun waits for
    a newline); --overlap lets a second Master's steps (or the batch
    script's own) share the CPUs instead of waiting for them."""
    return [
        _need("srun"),
        f"--jobid={job_id}",
        "--nodes=1",
        "--ntasks=1",
        f"--nodelist={node}",
        f"--cpus-per-task={cpus}",
        "--overlap",
        "--unbuffered",
        "--export=ALL",
        "--job-name=qjamfab-agent",
        *argv,
    ]


class SrunTransport(ProcessTransport):
    """A node's agent, run as a job step of Slurm job `job_id` by `srun`:
    one step per node."""

    _what = "Slurm's srun"
    # srun waits for the step to end: the agent releases its daemons first.
    _close_wait_s = 2.0

    def __init__(self, name: str, job_id: str, argv: list[str]):
        super().__init__(name, argv)
        self.job_id = job_id

    def exit_report(self, log_path: str | None) -> tuple[int | None, str]:
        status, text = super().exit_report(log_path)
        if _JOB_GONE.search(text):  # srun's words for it are obscure
            text += (
                f"\nSlurm job {self.job_id} is over (its time limit, scancel "
                "or a failed node): create a new Master for a new allocation"
            )
        return status, text


def allocation_for(
    spec: HostSpec,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    status: StatusLine | None = None,
) -> Allocation:
    """The allocation a "slurm" spec means: with options, a new one asked
    of Slurm (waiting while it is pending, said on `status` if given);
    without, the one this process runs in ($SLURM_JOB_ID)."""
    env = os.environ if env is None else env
    _need("srun")
    options = dict(spec.options)
    if not options:
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            raise BadHostSpec(NOT_IN_ALLOCATION, host=spec.raw)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        cpus = env.get("SLURM_JOB_CPUS_PER_NODE")
        if not nodelist or not cpus:
            raise PreflightFailed(
                f"Slurm job {job_id}: SLURM_JOB_NODELIST or "
                "SLURM_JOB_CPUS_PER_NODE is not set: run the Master in the "
                "job's own environment (salloc, sbatch)",
                host=spec.raw,
            )
        return Allocation.from_env(job_id, nodelist, cpus)
    return request(options, clock, status)


def command_hosts(
    spec: HostSpec, env: Mapping[str, str] | None = None
) -> list[cluster.CommandHost]:
    """The nodes of the allocation this process runs in, as hosts the
    lifecycle tasks reach through srun, named by their node, "auto" workers
    the allocation's CPUs there (as for a Master). Outside an
    allocation, or given options (which would ask Slurm for a new one just
    to look at it), refused with what to do."""
    env = os.environ if env is None else env
    if spec.options or not env.get("SLURM_JOB_ID"):
        raise BadHostSpec(f"{spec.raw}: {TASKS_OUTSIDE}", host=spec.raw)
    return [
        cluster.CommandHost(spec, node.name, node.run, node.cpus)
        for node in allocation_for(spec, env).node_list()
    ]


def salloc_argv(options: Mapping[str, str]) -> list[str]:
    """salloc asking for these spec options and running the holder."""
    argv = [_need("salloc"), f"--nodes={options.get('nodes', '1')}"]
    if "cpus-per-node" in options:
        argv += ["--ntasks-per-node=1", f"--cpus-per-task={options['cpus-per-node']}"]
    else:
        argv.append("--exclusive")  # whole nodes: every CPU a worker
    argv += [
        f"{flag}={options[k]}" for k, flag in _SALLOC_OPTIONS.items() if k in options
    ]
    return argv + ["--job-name=qjamfab", "--", "/bin/sh", "-c", _HOLDER]


class _Unshown:
    """No status line: what start-up waits for goes to the log."""

    def show(self, text: str) -> bool:
        return False

    def close(self) -> None:
        pass


def request(
    options: Mapping[str, str],
    clock: Callable[[], float] = time.monotonic,
    status: StatusLine | None = None,
) -> Allocation:
    """Ask Slurm for an allocation and wait for it, saying why it is
    pending on `status` (cleared once granted), else through logging; it
    is held until `Allocation.release` or the end of this process."""
    holder = subprocess.Popen(
        salloc_argv(options),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C at the terminal is the Master's to handle.
        start_new_session=True,
    )
    status = status or _Unshown()
    try:
        return _granted(holder, clock, status)
    except BaseException:
        _give_up(holder)
        raise
    finally:
        status.close()


def _granted(
    holder: subprocess.Popen, clock: Callable[[], float], status: StatusLine
) -> Allocation:
    """Read salloc until its holder says what was granted."""
    assert holder.stdout is not None and holder.stderr is not None
    said = bytearray()  # salloc's stderr
    out = bytearray()
    job_id = ""
    reason = ""
    next_poll = clock()
    streams = [holder.stdout, holder.stderr]
    while streams:
        ready, _, _ = select.select(streams, [], [], _PENDING_POLL_S)
        for stream in ready:
            chunk = os.read(stream.fileno(), 1 << 16)
            if not chunk:
                streams.remove(stream)
            elif stream is holder.stderr:
                said += chunk
            else:
                out += chunk
        if b"\n" in out:
            mark, _, rest = out.partition(b"\n")[0].decode().partition(" ")
            if mark == _HOLDER_MARK:
                job_id, nodelist, cpus = rest.split()
                allocation = Allocation.from_env(job_id, nodelist, cpus)
                allocation.holder = holder
                log.info(
                    "Slurm job %s granted: %s", job_id, ", ".join(allocation.nodes)
                )
                return allocation
        m = re.search(rb"job allocation (\d+)", said) or re.search(
            rb"job (\d+) queued", said
        )
        if m and not job_id:
            job_id = m.group(1).decode()
        if job_id and clock() >= next_poll:
            next_poll = clock() + _PENDING_POLL_S
            now = _pending_reason(job_id)
            if now and now != reason:
                reason = now
                said_now = f"Slurm job {job_id} pending: {reason}"
                if not status.show(said_now):
                    log.warning("%s", said_now)
    holder.wait()
    raise HostUnreachable(
        "Slurm did not grant the allocation: "
        + _one_line(said.decode(errors="replace")),
        host="slurm",
    )


def _pending_reason(job_id: str) -> str:
    """Why squeue says the job waits ("Resources", "Priority"), or ""."""
    done = _run(["squeue", "--noheader", "--jobs", job_id, "--format=%T %r"])
    state, _, reason = done.stdout.strip().partition(" ")
    return reason if state == "PENDING" else ""


def _give_up(holder: subprocess.Popen) -> None:
    """Stop a salloc that was not granted: it cancels its request."""
    if holder.poll() is None:
        holder.send_signal(signal.SIGTERM)
        try:
            holder.wait(timeout=_RELEASE_WAIT_S)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    for stream in (holder.stdin, holder.stdout, holder.stderr):
        if stream is not None:
            stream.close()


class SlurmHost(AgentHost):
    """One node of an allocation as a host of the Master's: its agent runs
    as a job step, the step's stdin and stdout its stream."""

    # Slurm's linuxproc tracking does not end daemons that left the step:
    # they end soon after their agent instead of outliving the allocation.
    idle_timeout_s = IDLE_TIMEOUT_S
    # srun holds back a frame of more than 1024 bytes ~44 ms each way.
    spools = True

    def __init__(self, spec: HostSpec, node: SlurmNode, settings: EngineSettings):
        super().__init__(
            spec,
            node.name,
            spec.workers or settings.workers_per_host or node.cpus,
            settings,
        )
        self.node = node

    def open_link(self) -> Link:
        python = self.spec.python or sys.executable
        agent = [python, "-c", runtime.boot_code("agent", install=True)]
        link = Link(
            self.label,
            self.node.transport(self.label, agent),
            agent=True,
            stall_timeout=self.settings.heartbeat_timeout,
        )
        start_agent(link, python)
        return link

    def close(self) -> None:
        super().close()
        self.node.allocation.release()  # once: later calls find nothing


def _make(specs: Sequence[HostSpec], settings: EngineSettings) -> list[Host]:
    return [
        SlurmHost(spec, node, settings)
        for spec in specs
        for node in allocation_for(
            spec, status=settings.status() if settings.status else None
        ).node_list()
    ]


register(Engine("slurm", ("slurm",), _make))
