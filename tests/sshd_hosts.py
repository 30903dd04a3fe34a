"""Private OpenSSH servers on 127.0.0.2, 127.0.0.3, ... for tests.

`SshdHosts(k)` starts K `sshd -D` processes as the current user (root or
not), each listening on its own loopback address and a free port, with its own
ed25519 host key, its own ``SetEnv QJAMFAB_HOME=<dir>`` so that hosts share
no cache, and its own ``XDG_RUNTIME_DIR`` (host-local storage: where a host
keeps its daemons' sockets and pid files). It writes one client key, a
known_hosts file holding every host key, and an ssh_config with the aliases
``host1`` .. ``hostK``::

    with SshdHosts(2) as hosts:
        subprocess.run(["ssh", "-F", hosts.ssh_config, "host1", "echo hi"])
        hosts["host2"].pause()      # SIGSTOP the host's processes
        hosts["host2"].resume()
        hosts["host1"].kill()       # the host goes down (listener + sessions)

Importable from tests and from an Invoke tasks file: nothing here imports
pytest. Run ``python tests/sshd_hosts.py [K]`` to start K hosts by hand; it
prints the ssh_config path and waits for Ctrl-C.

Machines that share a home directory (NFS): ``SshdHosts(2,
shared_home=True, pid_namespaces=True)`` gives every host the same
QJAMFAB_HOME, and runs each sshd under ``unshare --pid --fork --mount-proc
--kill-child`` (root only), so each host has a process table of its own:
a pid of one means nothing to the other. `SshdHost.pid` is then unshare's
(its sshd is pid 1 inside), and `kill_sshd()` takes the whole host down.

Every process is accounted for: each sshd runs under a small Python parent
that is a child subreaper (Linux), so whatever a host starts, even a daemon
that detaches, stays in that host's process tree and orphans are reaped at
once. `stop()` ends each tree deepest first (sessions, then per-connection
sshd, then the listener) plus any process whose environment holds the host's
XDG_RUNTIME_DIR or (unless shared) QJAMFAB_HOME. An atexit hook stops
whatever is still running.
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
import threading
import time
import weakref
from collections.abc import Sequence

from qjamfab.runtime.probe import host_dir

__all__ = ["SshdHosts", "SshdHost", "sshd_available", "find_sftp_server"]

_SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")
_SFTP_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/local/libexec/sftp-server",
)

START_TIMEOUT = 10.0  # seconds for one sshd to accept TCP connections
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL


def sshd_available() -> str | None:
    """Path of a usable sshd (with ssh-keygen beside it), or None."""
    if shutil.which("ssh-keygen") is None:
        return None
    for path in _SSHD_CANDIDATES:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def find_sftp_server() -> str:
    """The system sftp-server, else sshd's built-in ``internal-sftp``."""
    for path in _SFTP_CANDIDATES:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return "internal-sftp"


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _keygen(path: str, comment: str) -> str:
    """Make an ed25519 key pair at path; return the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=30,
    )
    with open(path + ".pub") as f:
        return f.read().strip()


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _process_table() -> dict[int, int]:
    """pid -> ppid for every process we can see."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # comm may hold spaces and parens: split after the last ')'
            fields = stat[stat.rindex(b")") + 2 :].split()
            table[int(name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    return table


def _pids_with_env(entry: bytes, table: dict[int, int]) -> list[int]:
    """Pids whose environment holds exactly `entry` (b"NAME=value")."""
    out = []
    for pid in table:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if entry in env.split(b"\0"):
            out.append(pid)
    return out


def _signal(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


# The parent of each sshd: a child subreaper (Linux prctl), so everything
# the host starts stays in its process tree, even daemons that detach with
# setsid and a double fork, and orphans are reaped at once rather than left
# as zombies under init. Prints sshd's pid, forwards SIGTERM/SIGINT/SIGHUP to
# sshd, and exits with sshd's status once no child of its own is left.
_REAPER = r"""
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # SUBREAPER
except Exception:
    pass
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
def forward(sig, frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
sys.stdout.write("%d\n" % pid)
sys.stdout.flush()
sys.stdout.close()
code = 0
while True:
    try:
        p, status = os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    if p == pid:
        code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


class SshdHost:
    """One private sshd: `alias`, `address`, `port`, `pid` (the sshd
    listener), `home` (its QJAMFAB_HOME), `log`, `host_key_pub`.

    Faults: `kill()` takes the whole host down (listener, connections,
    sessions, daemons); `kill_sshd()` ends only the listener (new
    connections are refused, open ones live on); `pause()` / `resume()`
    SIGSTOP / SIGCONT every process of the host; `start()` brings it back
    on the same port with the same key; `stop()` ends it gracefully.
    """

    def __init__(self, owner: SshdHosts, index: int, address: str):
        self.owner = owner
        self.alias = f"host{index}"
        self.address = address
        self.port = 0
        self.dir = os.path.join(owner.dir, self.alias)
        #: QJAMFAB_HOME the server sets for every session (not created here)
        self.home = owner.shared_home or os.path.join(self.dir, "qjamfab-home")
        #: XDG_RUNTIME_DIR the server sets: this host's own storage
        self.runtime_dir = os.path.join(self.dir, "run")
        self.config = os.path.join(self.dir, "sshd_config")
        self.log = os.path.join(self.dir, "sshd.log")
        self.pidfile = os.path.join(self.dir, "sshd.pid")
        self.host_key = os.path.join(self.dir, "ssh_host_ed25519_key")
        self.host_key_pub = ""  # "ssh-ed25519 AAAA... comment"
        self.pid: int | None = None  # the sshd listener
        self.proc: subprocess.Popen | None = None  # its reaper
        self._reapers: list[subprocess.Popen] = []  # every one started
        self._paused: set[int] = set()
        os.makedirs(self.runtime_dir, mode=0o700)

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return (
            f"<SshdHost {self.alias} {self.address}:{self.port} pid={self.pid} {state}>"
        )

    # -- identity -----------------------------------------------------------

    @property
    def running(self) -> bool:
        """The sshd listener is alive (it may be paused)."""
        self._reap()
        return self.pid is not None and _alive(self.pid)

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts uses for this server: "[addr]:port"."""
        return f"[{self.address}]:{self.port}"

    @property
    def destination(self) -> str:
        """``user@address:port``, for code that takes Fabric host strings."""
        return f"{self.owner.user}@{self.address}:{self.port}"

    @property
    def host_dir(self) -> str:
        """Where this host keeps its daemons' sockets, pid files and logs."""
        return host_dir(self.home, self.runtime_dir)

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log, lines)

    # -- life cycle ---------------------------------------------------------

    def _write_config(self, extra: list[str]) -> None:
        o = self.owner
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.address}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pidfile}",
            f"AuthorizedKeysFile {o.authorized_keys}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {o.user}",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            f"SetEnv QJAMFAB_HOME={self.home} XDG_RUNTIME_DIR={self.runtime_dir}",
            f"Subsystem sftp {o.sftp_server}",
            f"LogLevel {o.log_level}",
        ] + extra
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start (or restart, on the same port when it has one) this sshd,
        and wait until it accepts TCP connections."""
        if self.running:
            return
        if not self.host_key_pub:
            self.host_key_pub = _keygen(self.host_key, f"qjamfab-test-{self.alias}")
        fixed_port = self.port != 0
        for attempt in range(3):
            if not fixed_port:
                self.port = _free_port(self.address)
            self._write_config(self.owner._extra_sshd_options)
            with open(self.log, "a") as f:
                f.write(
                    f"--- qjamfab tests: start attempt {attempt + 1} on "
                    f"{self.address}:{self.port}\n"
                )
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _REAPER,
                    *self.owner.wrapper,
                    self.owner.sshd,
                    "-D",
                    "-f",
                    self.config,
                    "-E",
                    self.log,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            self._reapers.append(self.proc)
            line = self.proc.stdout.readline()
            self.proc.stdout.close()
            self.pid = int(line) if line.strip().isdigit() else None
            if self.pid is not None and self._wait_listening(timeout):
                return
            log = self.log_tail()
            self.stop()
            if "Address already in use" in log and not fixed_port:
                continue  # lost the port race: pick another one
            break
        raise RuntimeError(
            f"sshd for {self.alias} did not start listening on "
            f"{self.address}:{self.port} within {timeout:g}s; "
            f"see {self.log}. Log tail:\n{self.log_tail()}"
        )

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _reap(self) -> None:
        for proc in self._reapers:
            proc.poll()

    def _levels(self) -> list[list[int]]:
        """This host's processes by depth, deepest first: its reapers and
        everything under them (sshd, per-connection sshd, sessions, detached
        daemons), plus any process whose environment holds this host's
        QJAMFAB_HOME. Ending leaves first lets each parent reap its child."""
        self._reap()
        table = _process_table()
        roots = [p.pid for p in self._reapers if p.returncode is None]
        roots += _pids_with_env(f"XDG_RUNTIME_DIR={self.runtime_dir}".encode(), table)
        if not self.owner.shared_home:  # else the other hosts' too
            roots += _pids_with_env(f"QJAMFAB_HOME={self.home}".encode(), table)
        children: dict[int, list[int]] = {}
        for pid, ppid in table.items():
            children.setdefault(ppid, []).append(pid)
        mine = {os.getpid(), os.getppid()}
        depth: dict[int, int] = {}
        todo = [(r, 0) for r in roots]
        while todo:
            pid, d = todo.pop()
            if pid in mine or depth.get(pid, -1) >= d:
                continue
            depth[pid] = d
            todo += [(c, d + 1) for c in children.get(pid, [])]
        levels: dict[int, list[int]] = {}
        for pid, d in depth.items():
            levels.setdefault(d, []).append(pid)
        return [levels[d] for d in sorted(levels, reverse=True)]

    def processes(self) -> list[int]:
        """Every live process of this host (see `_levels`), deepest first."""
        return [p for level in self._levels() for p in level if _alive(p)]

    def _end(self, sig: int, level_wait: float) -> list[int]:
        """Send `sig` level by level (deepest first), giving each level up
        to `level_wait` s to exit and be reaped; SIGKILL what is left."""
        levels = self._levels()
        everyone = {p for level in levels for p in level} | {os.getpid()}

        def settled(pid):
            # gone, or a zombie that none of ours will reap
            return not os.path.exists(f"/proc/{pid}") or (
                not _alive(pid) and _ppid(pid) not in everyone
            )

        ended = []
        for level in levels:
            _signal(level, signal.SIGCONT)  # a stopped process can't exit
            _signal(level, sig)
            ended += level
            deadline = time.monotonic() + level_wait
            while time.monotonic() < deadline:
                self._reap()
                if all(settled(p) for p in level):
                    break
                time.sleep(0.01)
        leftover = [p for p in ended if _alive(p)]
        _signal(leftover, signal.SIGCONT)
        _signal(leftover, signal.SIGKILL)
        for proc in self._reapers:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait()
        self._reapers = []
        self.proc = None
        self._paused.clear()
        return ended

    def stop(self) -> None:
        """Stop every process of this host: SIGTERM (deepest first), then
        SIGKILL what is left. Idempotent. Keeps port and key, so `start()`
        brings the host back."""
        self._end(signal.SIGTERM, STOP_TIMEOUT / 2)

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """The host goes down at once: `sig` (SIGKILL or SIGTERM) to every
        process of it, no grace period. Returns the pids signalled."""
        if sig not in (signal.SIGKILL, signal.SIGTERM):
            raise ValueError("kill() takes SIGKILL or SIGTERM; use signal_all")
        return self._end(sig, 0.5)

    def kill_sshd(self, sig: int = signal.SIGKILL) -> None:
        """End only the sshd listener: new connections are refused, open
        connections and their sessions live on (until `stop`)."""
        if self.running:
            _signal([self.pid], signal.SIGCONT)
            _signal([self.pid], sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.running and time.monotonic() < deadline:
                time.sleep(0.01)

    def signal_all(self, sig: int) -> list[int]:
        """Send `sig` to every process of this host; returns the pids."""
        pids = self.processes()
        _signal(pids, sig)
        return pids

    def pause(self) -> list[int]:
        """SIGSTOP every process of this host (it stops answering)."""
        pids = self.signal_all(signal.SIGSTOP)
        self._paused.update(pids)
        return pids

    def resume(self) -> list[int]:
        """SIGCONT what `pause` stopped (and the host's processes now)."""
        pids = sorted(self._paused | set(self.processes()))
        _signal(pids, signal.SIGCONT)
        self._paused.clear()
        return pids


_live: weakref.WeakSet[SshdHosts] = weakref.WeakSet()
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        pending = list(_live)
    for hosts in pending:
        try:
            hosts.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class SshdHosts:
    """K private sshd servers plus the client files to reach them.

    Attributes: `aliases` (["host1", ...]), `hosts` (alias -> SshdHost),
    `ssh_config`, `known_hosts`, `client_key`, `homes` (alias ->
    QJAMFAB_HOME), `user`, `dir`. ``hosts_obj["host1"]`` or ``[0]`` gives one
    `SshdHost` (`address`, `port`, `pid`, `stop()`, `kill()`, `pause()`,
    `resume()`, `start()`). `sshd_options` are more sshd_config lines for
    every host (say, a second `HostKey`). `shared_home`: one QJAMFAB_HOME
    for every host; `pid_namespaces`: a process table of its own for each
    (see the module's docstring).
    """

    def __init__(
        self,
        k: int = 2,
        *,
        start: bool = True,
        base_dir: str | None = None,
        log_level: str = "VERBOSE",
        keep_dir: bool | None = None,
        sshd_options: Sequence[str] = (),
        shared_home: bool = False,
        pid_namespaces: bool = False,
    ):
        if k < 1 or k > 250:
            raise ValueError(f"k must be 1..250, not {k}")
        sshd = sshd_available()
        if sshd is None:
            raise RuntimeError(
                "sshd (or ssh-keygen) is not installed: install "
                "openssh-server (Debian: apt-get install openssh-server)"
            )
        self.sshd = sshd
        self.sftp_server = find_sftp_server()
        self.log_level = log_level
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.dir = tempfile.mkdtemp(prefix="qjamfab-sshd-", dir=base_dir)
        os.chmod(self.dir, 0o700)
        self.shared_home = os.path.join(self.dir, "qjamfab-home") if shared_home else ""
        self.wrapper: list[str] = []
        if pid_namespaces:
            unshare = shutil.which("unshare")
            if unshare is None or os.geteuid() != 0:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(
                    "hosts with a process table of their own need root and "
                    "unshare (util-linux)"
                )
            self.wrapper = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child"]
        if keep_dir is None:
            keep_dir = bool(os.environ.get("QJAMFAB_KEEP_SSHD_DIR"))
        self.keep_dir = keep_dir
        self.client_key = os.path.join(self.dir, "id_ed25519")
        self.authorized_keys = os.path.join(self.dir, "authorized_keys")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.ssh_config = os.path.join(self.dir, "ssh_config")
        self.hosts: dict[str, SshdHost] = {}
        for i in range(1, k + 1):
            host = SshdHost(self, i, f"127.0.0.{i + 1}")
            self.hosts[host.alias] = host
        self.sshd_options = list(sshd_options)
        self._extra_sshd_options: list[str] = []
        self._stopped = False
        with _live_lock:
            _live.add(self)
        if start:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise

    # -- accessors ----------------------------------------------------------

    @property
    def aliases(self) -> list[str]:
        return list(self.hosts)

    @property
    def homes(self) -> dict[str, str]:
        return {a: h.home for a, h in self.hosts.items()}

    def __getitem__(self, key: str | int) -> SshdHost:
        if isinstance(key, int):
            return list(self.hosts.values())[key]
        return self.hosts[key]

    def __iter__(self):
        return iter(self.hosts.values())

    def __len__(self):
        return len(self.hosts)

    def __repr__(self):
        return f"<SshdHosts {list(self.hosts.values())!r} dir={self.dir}>"

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() == 0:
            # sshd as root insists on its privilege separation directory
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        pub = _keygen(self.client_key, f"qjamfab-test-client@{self.user}")
        with open(self.authorized_keys, "w") as f:
            f.write(pub + "\n")
        self._extra_sshd_options = self._probe_options() + self.sshd_options
        for host in self.hosts.values():
            host.start()
        self._write_client_files()

    def _probe_options(self) -> list[str]:
        """Options newer OpenSSH releases need for tests that fail on
        purpose (PerSourcePenalties, 9.8+), kept only if this sshd knows
        them (`sshd -t`)."""
        wanted = ["PerSourcePenalties no"]
        host = next(iter(self.hosts.values()))
        if not host.host_key_pub:
            host.host_key_pub = _keygen(host.host_key, f"qjamfab-test-{host.alias}")
        kept = []
        for option in wanted:
            host.port = _free_port(host.address)
            host._write_config([option])
            r = subprocess.run(
                [self.sshd, "-t", "-f", host.config],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
            if r.returncode == 0:
                kept.append(option)
        host.port = 0
        return kept

    def _write_client_files(self) -> None:
        with open(self.known_hosts, "w") as f:
            for host in self.hosts.values():
                key = " ".join(host.host_key_pub.split()[:2])
                f.write(f"{host.known_hosts_name} {key}\n")
        lines = []
        for host in self.hosts.values():
            lines += [
                f"Host {host.alias}",
                f"    HostName {host.address}",
                f"    Port {host.port}",
                "",
            ]
        lines += [
            "Host *",
            f"    User {self.user}",
            f"    IdentityFile {self.client_key}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {self.known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    HashKnownHosts no",
            "    BatchMode yes",
            "",
        ]
        with open(self.ssh_config, "w") as f:
            f.write("\n".join(lines))

    def stop(self) -> None:
        """Stop every sshd (and what runs under it); idempotent."""
        for host in self.hosts.values():
            host.stop()
        if not self._stopped:
            self._stopped = True
            with _live_lock:
                _live.discard(self)
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    close = stop

    def __enter__(self) -> SshdHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- per-host faults ----------------------------------------------------

    def stop_host(self, alias: str) -> None:
        self.hosts[alias].stop()

    def kill_host(self, alias: str, sig: int = signal.SIGKILL) -> list[int]:
        return self.hosts[alias].kill(sig)

    def kill_sshd(self, alias: str, sig: int = signal.SIGKILL) -> None:
        self.hosts[alias].kill_sshd(sig)

    def pause_host(self, alias: str) -> list[int]:
        return self.hosts[alias].pause()

    def resume_host(self, alias: str) -> list[int]:
        return self.hosts[alias].resume()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    k = int(argv[0]) if argv else 2
    if sshd_available() is None:
        print("sshd is not installed (apt-get install openssh-server)", file=sys.stderr)
        return 1
    with SshdHosts(k) as hosts:
        print(hosts.ssh_config, flush=True)
        for host in hosts:
            print(
                f"  {host.alias}: {host.destination} pid={host.pid} "
                f"QJAMFAB_HOME={host.home}",
                flush=True,
            )
        print(
            f"try: ssh -F {hosts.ssh_config} {hosts.aliases[0]} echo hi\n"
            f"Ctrl-C stops the servers.",
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
