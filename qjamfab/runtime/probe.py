"""Preflight: what a host offers a worker, as one line of JSON.

Sent as source and run with the remote Python before anything is uploaded
(`python3 -c <this file> BUNDLE_HASH`), so it must stand alone: standard
library only, no imports from qjamfab. It also creates the base directory
and its subdirectories (0700), checks that they are ours (`secure_dir`:
the report's "insecure" says why not, and nothing is written there then)
and that the base is writable.

`secure_dir` lives here so that the probe and the rest of the runtime
(which imports it from here) apply one rule.
"""

import functools
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import threading


class InsecureDirectory(PermissionError):
    """A directory qjamfab would run code from or keep data in can be
    changed by another user. The message's first line names the path, its
    owner and mode, and what to do."""


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def secure_dir(path: str, create: bool = True, setting: str = "QJAMFAB_HOME") -> None:
    """Check that `path` is a directory only the current user can change,
    creating it and its missing parents 0700 when `create` is true, but
    only once what exists of the way there passes the parent rules below:
    nothing is created where another user could reach it. Its messages
    say to set `setting` (the variable that chose the path) elsewhere.

    Refused with `InsecureDirectory`:
    - the directory (after following symlinks) not owned by the current
      user, or writable by group or others;
    - a parent of it, after following symlinks, owned by anyone but the
      current user or root, or writable by group or others without the
      sticky bit (/tmp is fine: others cannot rename what is ours there);
    - a symlink on the way (the path as written, the directory itself
      included) owned by anyone but the current user or root: its owner
      could point it elsewhere later. A symlink of ours (or root's) to a
      directory that passes is accepted: it is how people move a cache to
      a bigger disk.
    Other OSErrors (no permission to create, a file in the way) propagate.
    """
    path = os.path.abspath(path)
    if create and not os.path.lexists(path):
        existing = os.path.dirname(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        _check_links(existing, setting)
        _check_parents(os.path.realpath(existing), path, setting)
        _make_dirs(path)
    _check_links(path, setting)
    uid = os.geteuid()
    real = os.path.realpath(path)
    shown = path if real == path else f"{path} (a symlink to {real})"
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(
            f"{shown} is not a directory: remove it or set {setting} to a "
            f"directory of your own"
        )
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != uid:
        raise InsecureDirectory(
            f"{shown} is owned by {_owner(st.st_uid)}, mode {mode:04o}, not "
            f"by you: it could hold code or data that is not yours; remove "
            f"it or set {setting} to a directory of your own"
        )
    if mode & 0o022:
        raise InsecureDirectory(
            f"{shown} (owner {_owner(st.st_uid)}) has mode {mode:04o}: "
            f"{_who(mode)} can plant code or data in it; run chmod 700 "
            f"{real} or set {setting} to a directory of your own"
        )
    _check_parents(os.path.dirname(real), shown, setting)


def _check_links(path: str, setting: str) -> None:
    """Refuse a symlink on the way to `path` (it included) that anyone but
    us or root owns."""
    uid = os.geteuid()
    prefix = os.sep
    for part in path.split(os.sep)[1:]:
        prefix = os.path.join(prefix, part)
        st = os.lstat(prefix)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (uid, 0):
            raise InsecureDirectory(
                f"{prefix} is a symlink (to {os.path.realpath(prefix)}) owned "
                f"by {_owner(st.st_uid)}, who can point it elsewhere: remove "
                f"it or set {setting} to a directory of your own"
            )


def _check_parents(parent: str, shown: str, setting: str) -> None:
    """Refuse `parent` (a real path) or any directory above it that
    another user owns, or that group or others can write to without the
    sticky bit: they could replace `shown`, below it."""
    uid = os.geteuid()
    while True:
        st = os.stat(parent)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (uid, 0):
            problem = f"is owned by {_owner(st.st_uid)}, mode {mode:04o}: they"
        elif mode & 0o022 and not mode & stat.S_ISVTX:
            problem = (
                f"has mode {mode:04o} (owner {_owner(st.st_uid)}) "
                f"and no sticky bit: {_who(mode)}"
            )
        else:
            problem = ""
        if problem:
            raise InsecureDirectory(
                f"{parent}, a parent of {shown}, {problem} can replace what "
                f"is under it; set {setting} to a directory whose parents "
                f"only you or root can write to"
            )
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def _who(mode: int) -> str:
    return {0o020: "its group", 0o002: "other users"}.get(
        mode & 0o022, "its group and other users"
    )


def _make_dirs(path: str) -> None:
    """mkdir path and its missing parents, each 0700 (os.makedirs gives
    the parents the umask's mode)."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass  # made meanwhile by another process; checked next


# Filesystems that other machines may mount too (statfs types, as
# /proc/self/mountinfo names them).
NETWORK_FS = frozenset(
    "nfs nfs4 cifs smb3 smbfs fuse.sshfs sshfs lustre gpfs afs ceph fuse.ceph "
    "beegfs glusterfs fuse.glusterfs panfs pvfs2 orangefs ocfs2 gfs2 9p "
    "fuse.s3fs fuse.gcsfuse fuse.juicefs".split()
)


def fs_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem holding `path` ("ext4", "nfs4", ...), from
    the mount table (os.statvfs does not say); None when unknown."""
    real = os.path.realpath(path)
    best, found = -1, None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        # Octal escapes: \040 is a space.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), parts[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # The longest mount point holding it; of equal ones, the last mounted.
        if inside and len(point) >= best:
            best, found = len(point), rest.split()[0]
    return found


def host_dir(base: str, runtime_dir: str | None = None) -> str:
    """Where this host keeps its state for the base directory `base`:
    daemons' sockets, pid files, claims, exit records and logs. Host-local
    storage, because a base in a home directory is usually shared by every
    machine (NFS), where pids, flock and Unix sockets mean nothing to the
    others: `$XDG_RUNTIME_DIR/qjamfab` (`runtime_dir` in its place when
    given) if that is a directory of ours, else `/tmp/qjamfab-<uid>`; below it one
    directory per base (a host may serve several), named by a hash of the
    base's real path."""
    if runtime_dir is None:
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    try:  # another user's (sudo keeps it) is not ours to use
        st = os.stat(runtime_dir) if runtime_dir else None
    except OSError:
        st = None
    if st and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
        top = os.path.join(runtime_dir, "qjamfab")
    else:  # not $TMPDIR: a batch job's, removed when the job ends
        top = f"/tmp/qjamfab-{os.geteuid()}"
    key = hashlib.sha256(os.path.realpath(base).encode()).hexdigest()[:16]
    return os.path.join(top, key)


def secure_host_dir(base: str) -> str:
    """host_dir(base), created 0700 and checked like the base (secure_dir),
    and not on a network filesystem; raises InsecureDirectory or OSError
    with a one-line reason otherwise."""
    path = host_dir(base)
    secure_dir(path, setting="XDG_RUNTIME_DIR")
    kind = fs_type(path)
    if kind in NETWORK_FS:
        raise OSError(
            f"{path}, where qjamfab keeps this host's sockets and pid files, "
            f"is on a network filesystem ({kind}) that other machines may "
            f"share: set XDG_RUNTIME_DIR to a directory on a local disk"
        )
    return path


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """Who this host is, for files that other machines sharing the base
    also read: a hash of /etc/machine-id, the host name and this process's
    pid namespace (pids mean something only within one; containers and
    the tests' simulated hosts share a machine-id)."""
    ident = []
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                ident.append(f.read().strip())
            break
        except OSError:
            continue
    ident.append(os.uname().nodename)
    try:
        ident.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return hashlib.sha256("\0".join(ident).encode()).hexdigest()[:12]


def secure_dir_source() -> str:
    """`secure_dir` and what it calls, as source: the runtime's boot code
    (runtime.boot_code) defines it from this, to check the base directory
    before it installs or runs anything there, when no qjamfab module is
    on the host yet. Needs `os` and `stat` imported. Read once: workers
    start from several threads, and Python 3.11's parser (which inspect
    uses for classes) is not safe to run in two threads at once."""
    global _SOURCE
    with _SOURCE_LOCK:
        if _SOURCE is None:
            _SOURCE = _read_secure_dir_source()
    return _SOURCE


_SOURCE: str | None = None
_SOURCE_LOCK = threading.Lock()


def _read_secure_dir_source() -> str:
    import inspect

    return "\n".join(
        inspect.getsource(o)
        for o in (
            InsecureDirectory,
            _owner,
            secure_dir,
            _check_links,
            _check_parents,
            _who,
            _make_dirs,
        )
    )


def platform_info() -> dict:
    """What decides whether a compiled extension built elsewhere loads in
    this Python: the OS, the machine, the extension file suffixes this
    interpreter imports (they carry its ABI tag) and the C library. The
    master compares them with a package's files before shipping it
    (qjamfab/links/packages.py)."""
    import importlib.machinery

    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        libc = None  # musl and others say nothing here
    return {
        "platform": sys.platform,
        "machine": os.uname().machine,
        "ext_suffixes": list(importlib.machinery.EXTENSION_SUFFIXES),
        "libc": libc,
    }


def host_info() -> dict:
    """This Python on this host: its version and path, the cores, numpy's
    version (None without it) and platform_info. The probe's and the
    host agent's HELLO say it."""
    try:  # the version without importing numpy (0.1 s)
        from importlib.metadata import version

        numpy = version("numpy")
    except Exception:
        numpy = None
    return {
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "cores": os.cpu_count(),
        "numpy": numpy,
        **platform_info(),
    }


def probe(bundle_hash: str) -> dict:
    base = os.environ.get("QJAMFAB_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "qjamfab"
    )
    report = {
        **host_info(),
        "base": base,
        "writable": False,
        "free_bytes": None,
        "runtime_present": False,
        "error": "",
        "insecure": "",
        "host_dir": None,
        "base_fs": None,
    }
    try:
        secure_dir(base)
        for sub in ("runtime", "cache"):
            secure_dir(os.path.join(base, sub))
        report["host_dir"] = secure_host_dir(base)
        report["base_fs"] = fs_type(base)
        check = os.path.join(base, f".write-check-{os.getpid()}")
        with open(check, "w") as f:
            f.write("ok")
        os.unlink(check)
        report["writable"] = True
        report["free_bytes"] = shutil.disk_usage(base).free
    except InsecureDirectory as exc:
        report["insecure"] = report["error"] = str(exc)
        return report  # not a byte written there, not a file believed
    except OSError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["runtime_present"] = os.path.isdir(
        os.path.join(base, "runtime", bundle_hash, "qjamfab")
    )
    return report


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else "")))
