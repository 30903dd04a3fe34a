"""The worker side of qjamfab, and the bundle that ships it.

Everything a worker runs is standard library plus the master's own
cloudpickle, vendored. `bundle_files()` gathers those sources: a stub
`qjamfab/__init__.py` (so the master's dependencies are never imported on a
worker), `errors.py`, `protocol.py`, `reduce.py`, this package, and
cloudpickle. A bundle is named by the hash of its content and lives in
`<base>/runtime/<hash>/` on every host, local or remote, so workers
everywhere run the same code.

`secure_dir` (defined in probe.py, which must stand alone) is the rule that
the base directory and what qjamfab creates under it are ours: code and
pickles are only ever read from directories no other user can change.
What belongs to one host (daemons' sockets, pid files, claims, logs) lives
in `host_dir(base)`, on host-local storage: the base is often a home
directory that every machine of a lab shares.

It also holds what the runtime's processes share: a runtime entry point
started detached (`start_detached`), a Unix socket to listen on
(`listen_unix`), a process's state and start time, the lock of a
handed-over stream.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

from .. import protocol

# The one copy of the rule lives in probe.py, which must run standalone.
from .probe import (  # noqa: F401
    NETWORK_FS,
    InsecureDirectory,
    fs_type,
    host_dir,
    host_id,
    secure_dir,
    secure_dir_source,
    secure_host_dir,
)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHIPPED = ("errors.py", "protocol.py", "reduce.py")
_STUB = '"""qjamfab worker runtime bundle (the master-side package is not here)."""\n'


def default_base() -> str:
    """The base directory on this host: $QJAMFAB_HOME, else ~/.cache/qjamfab."""
    return os.environ.get("QJAMFAB_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "qjamfab"
    )


def set_process_name(name: str) -> None:
    """Name this process for `ps -e`, top and pgrep (Linux: its comm, 15
    characters at most), rather than "python3" beside a boot script. The
    command line stays: it names the base directory, which stop-workers
    and the tests look for."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # no /proc (not Linux): the name is cosmetic


@functools.lru_cache(maxsize=1)
def bundle_files() -> dict[str, bytes]:
    """Relative path -> content of every file a worker needs."""
    import cloudpickle  # the master's own copy, shipped as source

    files = {"qjamfab/__init__.py": _STUB.encode()}
    names = [
        *_SHIPPED,
        *(
            os.path.join("runtime", n)
            for n in sorted(os.listdir(os.path.dirname(__file__)))
            if n.endswith(".py")
        ),
    ]
    for name in names:
        with open(os.path.join(_PACKAGE_DIR, name), "rb") as f:
            files[f"qjamfab/{name}"] = f.read()
    cp_dir = os.path.dirname(cloudpickle.__file__)
    for name in sorted(os.listdir(cp_dir)):
        if name.endswith(".py"):
            with open(os.path.join(cp_dir, name), "rb") as f:
                files[f"cloudpickle/{name}"] = f.read()
    return files


@functools.lru_cache(maxsize=1)
def bundle_hash() -> str:
    digest = hashlib.sha256()
    for path, content in sorted(bundle_files().items()):
        digest.update(f"{path}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:16]


def ensure_local_bundle(base: str) -> str:
    """Write the bundle under <base>/runtime/ unless present; its directory.
    Raises InsecureDirectory when base, its runtime directory or the bundle
    there could be changed by another user."""
    secure_dir(base)
    root = os.path.join(base, "runtime")
    secure_dir(root)
    target = os.path.join(root, bundle_hash())
    if os.path.lexists(target):
        secure_dir(target, create=False)
        return target
    staging = tempfile.mkdtemp(prefix=".staging-", dir=root)
    for path, content in bundle_files().items():
        dest = os.path.join(staging, path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(content)
    try:
        os.rename(staging, target)
    except OSError:  # another process installed it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def this_runtime() -> str:
    """The content hash naming the bundle this code runs from: on a host,
    its directory's name; run from the package itself (the master, the
    tests), the hash its bundle is installed under."""
    name = os.path.basename(os.path.dirname(_PACKAGE_DIR))
    if re.fullmatch(r"[0-9a-f]{16}", name):
        return name
    return _source_bundle_hash()


@functools.lru_cache(maxsize=1)
def _source_bundle_hash() -> str:
    return bundle_hash()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (ours or not; a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def process_stat(pid: int) -> tuple[str, int] | None:
    """Process `pid`'s state letter (R, S, D, T, Z, ...) and its parent's
    pid, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
    return state.decode(), int(ppid)


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc): with
    its pid, what names one process, a recycled pid never matching; None
    when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def process_running(pid: int) -> bool:
    """Whether process `pid` is, seen from outside, running or ready to
    (R, S, D): not stopped (SIGSTOP), not a zombie, not gone."""
    stat = process_stat(pid)
    return stat is not None and stat[0] in ("R", "S", "D")


def process_ended(pid: int) -> bool:
    """Whether process `pid` has exited: gone, or a zombie that only its
    parent's wait keeps in the table."""
    stat = process_stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def stream_lock(socket_path: str) -> int:
    """The lock file (an fd) that the writers of a daemon's handed-over
    stream take around each frame: the daemon, and its agent beating for
    it. Each opens it itself: flock excludes open files, not processes."""
    path = socket_path[: -len(".sock")] + ".stream.lock"
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def listen_unix(path: str, backlog: int) -> tuple[socket.socket, int]:
    """A Unix socket listening at `path` (0600), and its inode: bound under
    a temporary name and renamed over `path` once it listens, so no connect
    to the name is refused and a restarted process takes the name over
    atomically."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}.tmp"
    old_umask = os.umask(0o177)  # the socket is born 0600
    try:
        listener.bind(tmp)
    finally:
        os.umask(old_umask)
    listener.listen(backlog)
    os.replace(tmp, path)
    return listener, os.stat(path).st_ino


def write_locked(lock_fd: int, writev: Callable[[list], int], buffers: list) -> None:
    """Write one frame's buffers whole while holding the stream's lock."""
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        protocol.write_all(writev, buffers)
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)


def read_tail(path: str, limit: int = 8192) -> str:
    """The last `limit` bytes of a file as text ("" when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


NO_RUNTIME = "qjamfab: no runtime at"
NEED_RUNTIME = b"qjamfab: need runtime\n"  # the agent's boot asks for it
HAVE_RUNTIME = b"qjamfab: runtime ok\n"


@functools.lru_cache(maxsize=1)
def bundle_zip() -> bytes:
    """The bundle as a zip archive, as the agent's boot code installs it."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, content in sorted(bundle_files().items()):
            z.writestr(path, content)
    return out.getvalue()


# Installs the bundle sent on stdin (a u64 length, then the zip) under a
# staging name, then renames it into place: another session installing it
# at the same time is harmless. Not before the base directory, its parents
# and runtime/ have passed secure_dir (creating them): nothing is written
# where another user could reach it.
_INSTALL = """
trusted(True, b, rt)
if not os.path.isdir(p):
    os.write(1, NEED)
    def rd(n):
        d = b''
        while len(d) < n:
            c = os.read(0, n - len(d))
            if not c:
                sys.exit('qjamfab: the runtime upload ended early')
            d += c
        return d
    import io, shutil, struct, tempfile, zipfile
    s = tempfile.mkdtemp(prefix='.staging-', dir=rt)
    zipfile.ZipFile(io.BytesIO(rd(struct.unpack('!Q', rd(8))[0]))).extractall(s)
    try:
        os.rename(s, p)
    except OSError:
        shutil.rmtree(s, ignore_errors=True)
else:
    os.write(1, HAVE)
"""

# Exits with secure_dir's one line when a directory is not ours.
_TRUSTED = """
def trusted(create, *dirs):
    try:
        for d in dirs:
            secure_dir(d, create)
    except OSError as e:
        sys.exit(str(e))
"""


def boot_code(module: str, install: bool = False) -> str:
    """`python -c` code that runs qjamfab.runtime.<module>.main() from the
    bundle under the base directory, as the host running it sees it.

    Without `install` it refuses to run when the bundle is absent, so a
    qjamfab installed on the host is never run in its place; with it, it
    first says whether the bundle is there (NEED_RUNTIME / HAVE_RUNTIME on
    stdout) and installs one sent on stdin. Either way the base directory,
    runtime/ and the bundle must pass `secure_dir` (its source is part of
    the code), before anything is written there or run from there. It
    replaces sys.path[0] (the current directory) so a `qjamfab/` folder
    there cannot shadow it.
    """
    head = (
        "import os, stat, sys\n"
        "b = os.environ.get('QJAMFAB_HOME') or "
        "os.path.join(os.path.expanduser('~'), '.cache', 'qjamfab')\n"
        "os.umask(0o077)\n"
        "rt = os.path.join(b, 'runtime')\n"
        f"p = os.path.join(rt, {bundle_hash()!r})\n" + secure_dir_source() + _TRUSTED
    )
    if install:
        head += f"NEED, HAVE = {NEED_RUNTIME!r}, {HAVE_RUNTIME!r}\n" + _INSTALL
    else:
        head += f"os.path.isdir(p) or sys.exit({NO_RUNTIME!r} + ' ' + p)\n"
    return (
        head
        + "trusted(False, b, rt, p)\n"
        + _CHECK.replace("HASH", repr(bundle_hash())).replace(
            "BAD", repr(CHANGED_RUNTIME)
        )
        + f"sys.path[0:1] = [p]\nfrom qjamfab.runtime.{module} import main\nmain()\n"
    )


def start_detached(
    module: str, args: list[str], log: str, env: dict[str, str]
) -> subprocess.Popen:
    """qjamfab.runtime.<module>.main() from the bundle (`boot_code`) with
    `args`, as a process of its own: in a new session (it outlives whoever
    started it), with no stdin or stdout, its stderr appended to `log`."""
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", boot_code(module), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


CHANGED_RUNTIME = "qjamfab: the runtime is not what was installed"

# The bundle is checked against its name before it runs (as bundle_hash
# computes it): a file changed or planted there stops it, with what to do.
_CHECK = """
import hashlib
d = hashlib.sha256()
found = []
for r, ds, fs in os.walk(p):
    ds[:] = [x for x in ds if x != '__pycache__']
    found += [os.path.relpath(os.path.join(r, f), p) for f in fs]
for f in sorted(found):
    with open(os.path.join(p, f), 'rb') as fh:
        c = fh.read()
    d.update(('%s\\0%d\\0' % (f, len(c))).encode())
    d.update(c)
if d.hexdigest()[:16] != HASH:
    sys.exit(BAD + ' at ' + p + ': remove that directory (qjamfab installs '
             'it again), and check who else can write there')
"""
