"""A real one-node Slurm cluster on this machine, for tests.

`SlurmCluster()` writes a slurm.conf into a temporary directory (the node is
this machine, `hostname -s`, with its CPUs and a little less memory than is
free; one partition `debug`), makes a private 1024-byte munge key, and
starts munged (as user munge, its key, socket, log and pid file all in that
directory: nothing global is touched, not /etc/munge nor /run/munge),
slurmctld and slurmd (as root, `-D`: in the foreground, children of this
process) on free ports, then waits until the node is idle::

    with SlurmCluster() as cluster:
        subprocess.run(["srun", "hostname"], env=cluster.env())

Every Slurm command must see `SLURM_CONF=cluster.conf` (`cluster.env()`).
Importable from tests and from an Invoke tasks file: nothing here imports
pytest. Run ``python tests/slurm_cluster.py`` to start one by hand; it
prints the SLURM_CONF to export and waits for Ctrl-C.

Every process is accounted for: `stop()` cancels the cluster's jobs, then
ends every process whose environment holds this cluster's SLURM_CONF
(slurmstepd and job steps that outlived their slurmd, escaped daemons of
the jobs), then slurmd, slurmctld and munged. An atexit hook stops a
cluster still running.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

__all__ = ["SlurmCluster", "slurm_available"]

START_TIMEOUT = 60.0  # seconds for the node to be idle
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
_DAEMONS = ("munged", "slurmctld", "slurmd")


def slurm_available() -> bool:
    """Whether slurmctld, slurmd, munged and the client commands are here."""
    return all(
        shutil.which(c) or os.path.exists(f"/usr/sbin/{c}")
        for c in (*_DAEMONS, "srun", "salloc", "sinfo", "squeue", "scancel")
    )


def _which(command: str) -> str:
    return shutil.which(command) or f"/usr/sbin/{command}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _available_mib() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) // 1024


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _pids_with_env(entry: bytes) -> list[int]:
    """Pids other than ours whose environment holds exactly `entry`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if entry in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


def _end(processes: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; reaps them."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class SlurmCluster:
    """One node, this machine: see the module's doc."""

    def __init__(self) -> None:
        self.node = socket.gethostname().split(".")[0]
        self.dir = ""
        self.conf = ""
        self.processes: dict[str, subprocess.Popen] = {}
        self.started_s: float | None = None  # how long start() took

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for Slurm's commands: `base` (else ours) with
        this cluster's SLURM_CONF."""
        return {**(os.environ if base is None else base), "SLURM_CONF": self.conf}

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster, its output as text."""
        return subprocess.run(
            argv,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def jobs(self) -> list[str]:
        """squeue: the ids of the jobs pending or running."""
        return self.run("squeue", "--noheader", "--format=%i").stdout.split()

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {name}:\n{_tail(os.path.join(self.dir, 'log', name + '.log'))}"
            for name in _DAEMONS
        )

    # --- start ------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        self.dir = tempfile.mkdtemp(prefix="qjamfab-slurm-")
        self.conf = os.path.join(self.dir, "slurm.conf")
        _live.add(self)
        try:
            os.chmod(self.dir, 0o755)  # munged (user munge) reaches its socket
            for sub in ("log", "spool", "state"):
                os.mkdir(os.path.join(self.dir, sub), 0o700)
            self._start_munged()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                self._spawn(daemon, [_which(daemon), "-D"], user=None)
            self._wait_idle(started + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - started

    def _spawn(self, name: str, argv: list[str], user: str | None) -> None:
        with open(os.path.join(self.dir, "log", name + ".out"), "ab") as out:
            self.processes[name] = subprocess.Popen(
                argv,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                start_new_session=True,
            )

    def _start_munged(self) -> None:
        """munged as user munge, with a fresh key: its own directories (the
        key's private, the socket's open to all, as munged insists)."""
        munge = pwd.getpwnam("munge")
        key_dir = os.path.join(self.dir, "munge-key")
        run_dir = os.path.join(self.dir, "munge")
        for path, mode in ((key_dir, 0o700), (run_dir, 0o755)):
            os.mkdir(path, mode)
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key = os.path.join(key_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        self.munge_socket = os.path.join(run_dir, "munge.socket")
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={os.path.join(run_dir, 'munged.log')}",
                f"--pid-file={os.path.join(run_dir, 'munged.pid')}",
                f"--seed-file={os.path.join(run_dir, 'munged.seed')}",
            ],
            user="munge",
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.munge_socket):
            if (
                self.processes["munged"].poll() is not None
                or time.monotonic() > deadline
            ):
                raise RuntimeError(
                    "munged did not start:\n"
                    + _tail(os.path.join(self.dir, "log", "munged.out"))
                )
            time.sleep(0.02)

    def _write_conf(self) -> None:
        d = self.dir
        memory = max(256, int(_available_mib() * 0.9))
        lines = [
            "ClusterName=qjamfab",
            # Addresses given: nothing depends on the name resolving.
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "KillWait=2",
            "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} "
            f"RealMemory={memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES "
            "OverSubscribe=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _wait_idle(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.processes.items():
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({p.returncode}) while starting:\n"
                        + _tail(os.path.join(self.dir, "log", name + ".out"))
                        + self.log_tails()
                    )
            done = self.run("sinfo", "--noheader", "--nodes", self.node, "--format=%T")
            state = done.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"the Slurm node {self.node} is not idle after {START_TIMEOUT:g} s "
            f"(state {state!r}):\n{self.log_tails()}"
        )

    # --- stop -------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, end every process of the cluster, remove its
        directory. Idempotent."""
        if not self.dir:
            return
        daemons = self.processes
        if daemons.get("slurmctld") and daemons["slurmctld"].poll() is None:
            try:
                jobs = self.jobs()
                if jobs:
                    self.run("scancel", *jobs)
                deadline = time.monotonic() + STOP_TIMEOUT
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.05)
            except (OSError, subprocess.SubprocessError):
                pass  # the processes below go anyway
        for name in ("slurmd", "slurmctld", "munged"):
            if name in daemons:
                _end([daemons[name]])
        # What outlived them: job steps, slurmstepd, daemons the jobs left.
        strays = _pids_with_env(f"SLURM_CONF={self.conf}".encode())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in strays:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + STOP_TIMEOUT / 2
            while strays and time.monotonic() < deadline:
                strays = [p for p in strays if _alive(p)]
                time.sleep(0.02)
        self.processes = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = ""
        _live.discard(self)

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_live: set[SlurmCluster] = set()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_live):
        cluster.stop()


def main() -> int:
    if not slurm_available():
        print(
            "Slurm is not installed (apt-get install slurm-wlm munge)", file=sys.stderr
        )
        return 1
    with SlurmCluster() as cluster:
        print(
            f"up in {cluster.started_s:.1f} s: export SLURM_CONF={cluster.conf}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        try:
            signal.signal(
                signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)
            )
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
