"""Distributions the master shipped to this host (`Master(packages=...)`,
`inv bootstrap --packages`): where they live, how they are installed, and
how the processes here put them on sys.path.

Standard library only: this module is part of the runtime bundle.

`<base>/packages/<hash>/` holds one distribution's files as they sit in
the master's site-packages (its modules, its `.dist-info`, e.g.
`numpy.libs`), named by `content_hash` of those files. It is installed by
the host agent (a PACKAGES frame, `AgentPackages`) or by `inv bootstrap
--packages` (this module's `main()`, after an SFTP upload): the zip is
unpacked into a staging directory, its files are hashed again, and only a
tree whose hash matches its name is renamed into place, so a directory
there is whole or absent. It outlives sessions and `clear-cache` (which
empties `<base>/cache` only); `manage.status` lists it (`installed`).

A process uses shipped packages by inserting their directories into
sys.path right after the runtime bundle (so the master's version wins over
one the host has) before any job, slice or result is unpickled: the agent
for its in-host reduce, each daemon when the agent sends it PACKAGES
{paths, packages}. Daemons serve one session after another: a path once
added stays (harmless to a session that does not use it). A daemon that
already holds another build of a distribution a session ships (another
hash, or the host's own copy imported before) records so in
`<host dir>/<worker>.packages` (host_dir: it is this host's daemon);
the next session's agent then replaces it
with a fresh daemon (`AgentPackages.conflicts`), as it does a daemon of
another Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from . import default_base, host_dir, secure_dir

if TYPE_CHECKING:
    import mmap

    from ..protocol import FrameReader


class Peer(Protocol):
    """What PACKAGES needs of a stream end (agent.py's peers)."""

    @property
    def closed(self) -> bool: ...
    @property
    def reader(self) -> FrameReader: ...

    def queue(self, buffers: list) -> None: ...


class Agent(Protocol):
    """What PACKAGES needs of the host agent (agent.py), named here so
    this module need not import the agent, which imports it."""

    @property
    def master(self) -> Peer: ...
    @property
    def daemons(self) -> Mapping[int, Peer]: ...

    def tell(
        self, kind: int, head: dict, payload: Sequence = (), worker: int = ...
    ) -> None: ...


_CHUNK = 1 << 20


def packages_dir(base: str) -> str:
    return os.path.join(base, "packages")


def content_hash(entries: Iterable[tuple[str, bytes]]) -> str:
    """The name of a distribution's files: a hash of their relative paths
    ("/"-separated) and contents, whatever the order given."""
    digest = hashlib.sha256()
    for path, content in sorted(entries, key=lambda e: e[0]):
        digest.update(f"{path}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:16]


def _tree(root: str) -> list[tuple[str, bytes]]:
    entries = []
    for directory, _, files in os.walk(root):
        for name in files:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if "__pycache__/" in rel:  # written by imports here
                continue
            with open(full, "rb") as f:
                entries.append((rel, f.read()))
    return entries


def _valid_hash(digest: object) -> bool:
    return (
        isinstance(digest, str)
        and len(digest) == 16
        and all(c in "0123456789abcdef" for c in digest)
    )


def install_zip(base: str, digest: str, archive: str) -> str:
    """Unpack the zip file `archive` as package `digest` under
    <base>/packages/ (unless there already); its directory. ValueError when
    the files do not hash to `digest` (nothing is installed then)."""
    if not _valid_hash(digest):
        raise ValueError(f"{digest!r} is not a package hash")
    root = packages_dir(base)
    secure_dir(root)
    target = os.path.join(root, digest)
    if os.path.isdir(target):
        return target
    staging = tempfile.mkdtemp(prefix=".staging-", dir=root)
    moved = False
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(staging)
        got = content_hash(_tree(staging))
        if got != digest:
            raise ValueError(
                f"its files hash to {got}, not {digest}: the upload was damaged"
            )
        try:
            os.rename(staging, target)
        except OSError:  # another session installed it first
            if not os.path.isdir(target):
                raise
        else:
            moved = True
    finally:
        if not moved:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def present(base: str, digest: str) -> str | None:
    """The directory of installed package `digest`, checked to be ours
    (secure_dir), or None when it is not there."""
    if not _valid_hash(digest):
        return None
    path = os.path.join(packages_dir(base), digest)
    if not os.path.isdir(path):
        return None
    secure_dir(path, create=False)
    return path


def _host_version(base: str, name: str) -> str | None:
    """The version of distribution `name` this Python has of its own (not
    one shipped here)."""
    from importlib.metadata import distributions

    shipped = os.path.abspath(packages_dir(base))
    path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(shipped)]
    for dist in distributions(name=name, path=path):
        return dist.version
    return None


def answer_offer(base: str, offers: list[dict]) -> dict:
    """Which offered packages ({hash, name, version}) the master must send:
    "missing" (neither installed under <base>/packages nor, at the same
    version, in this Python) and "on_host" (this Python has that version
    already: nothing to send, nothing to put on sys.path)."""
    secure_dir(packages_dir(base))
    missing, on_host = [], []
    for offer in offers:
        if present(base, offer["hash"]):
            continue
        if _host_version(base, offer["name"]) == offer["version"]:
            on_host.append(offer["hash"])
        else:
            missing.append(offer["hash"])
    return {"missing": missing, "on_host": on_host}


def use(paths: list[str]) -> list[str]:
    """Put these package directories on sys.path, after the runtime
    bundle (sys.path[0]); those that were not there yet."""
    import importlib

    added = [p for p in paths if p not in sys.path]
    sys.path[1:1] = added
    if added:
        importlib.invalidate_caches()
    return added


def _top_names(path: str) -> set[str]:
    """The top-level modules a package directory provides."""
    names = set()
    for entry in os.listdir(path):
        if entry.endswith((".dist-info", ".libs", ".pth")) or entry.startswith(
            (".", "__pycache__")
        ):
            continue
        names.add(entry.split(".", 1)[0])
    return names


def _shadowed(path: str) -> list[str]:
    """Modules of the package at `path` that this process imported from
    elsewhere before: they stay what they are."""
    inside = os.path.abspath(path) + os.sep
    shadowed = []
    for name in sorted(_top_names(path)):
        module = sys.modules.get(name)
        if module is None:
            continue
        where = [
            getattr(module, "__file__", None) or "",
            *getattr(module, "__path__", ()),
        ]
        if not any(w and os.path.abspath(w).startswith(inside) for w in where):
            shadowed.append(name)
    return shadowed


def _record_path(base: str, worker: str) -> str:
    # beside the daemon's pid file: a record of this host's daemon
    return os.path.join(host_dir(base), f"{worker}.packages")


def read_record(base: str, worker: str, pid: int) -> dict:
    """What daemon `worker` (process `pid`) recorded of its packages:
    {"packages": {name: hash}, "stale": [names it cannot switch]}."""
    try:
        with open(_record_path(base, worker)) as f:
            record = json.load(f)
        if record.get("pid") == pid:
            return record
    except (OSError, ValueError):
        pass
    return {"packages": {}, "stale": []}


def use_in_daemon(base: str, worker: str, head: dict) -> None:
    """A daemon's answer to PACKAGES {paths, packages: {name: hash}}: the
    paths go on sys.path; the record says what it now holds, and which
    distributions it imported from elsewhere before (it warns: the next
    session replaces it)."""
    root = os.path.abspath(packages_dir(base))
    paths = []
    for path in head.get("paths", ()):
        try:
            if os.path.dirname(os.path.abspath(path)) == root:
                secure_dir(path, create=False)
                paths.append(path)
        except OSError as exc:  # the job's import error will name it
            print(
                f"qjamfab: {worker} does not use {path}: {exc}",
                file=sys.stderr,
                flush=True,
            )
    record = read_record(base, worker, os.getpid())
    stale = set(record.get("stale", ()))
    by_hash = {digest: name for name, digest in head["packages"].items()}
    for path in paths:
        name = by_hash.get(os.path.basename(path))
        if name and _shadowed(path):
            stale.add(name)
            print(
                f"qjamfab: {worker} imported {name} from elsewhere before "
                f"this session shipped it, and keeps that copy; the next "
                f"session starts a fresh worker (or run inv stop-workers)",
                file=sys.stderr,
                flush=True,
            )
    use(paths)
    record = {
        "pid": os.getpid(),
        "stale": sorted(stale),
        "packages": {**record.get("packages", {}), **head["packages"]},
    }
    path = _record_path(base, worker)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        print(
            f"qjamfab: {worker} cannot record its packages: {exc}",
            file=sys.stderr,
            flush=True,
        )


def installed(base: str) -> list[dict]:
    """The packages installed here: {name, version, hash}, by name."""
    root = packages_dir(base)
    found = []
    for digest in os.listdir(root) if os.path.isdir(root) else ():
        if not _valid_hash(digest):
            continue
        directory = os.path.join(root, digest)
        name = version = None
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(".dist-info"):
                try:
                    with open(
                        os.path.join(directory, entry, "METADATA"),
                        encoding="utf-8",
                        errors="replace",
                    ) as f:
                        for line in f:
                            if line.startswith("Name:"):
                                name = line[5:].strip()
                            elif line.startswith("Version:"):
                                version = line[8:].strip()
                            elif not line.strip():
                                break
                except OSError:
                    pass
                break
        found.append({"name": name or "?", "version": version or "?", "hash": digest})
    return sorted(found, key=lambda p: (p["name"].lower(), p["version"]))


class AgentPackages:
    """The host agent's side of PACKAGES frames from the master:

    - {offer: [{hash, name, version}]} -> PACKAGES {missing, on_host}
    - {install: hash}, payload [zip] -> unpacked into <base>/packages
      (no answer; a failure is told at "use")
    - {use: [hash]} -> these go on the agent's sys.path and every
      daemon's; PACKAGES {paths, failed: {hash: reason}}
    """

    def __init__(self, base: str):
        self.base = base
        self.offered: dict[str, str] = {}  # hash -> name
        self.wanted: dict[str, str] = {}  # name -> hash, this session's
        self.paths: list[str] = []
        self.errors: dict[str, str] = {}  # hash -> why it failed

    def handle(self, agent: Agent, head: dict, lengths: list[int]) -> None:
        """One PACKAGES frame from the master (its payload still in the
        stream), answered through `agent.tell`."""
        from .. import protocol

        reader = agent.master.reader
        if "install" in head:
            self._install(head["install"], lengths, reader)
            return
        for n in lengths:  # nothing else carries a payload
            _skip(reader, n)
        if "offer" in head:
            try:
                self.offered.update({o["hash"]: o["name"] for o in head["offer"]})
                answer = answer_offer(self.base, head["offer"])
            except OSError as exc:
                answer = {"missing": [], "on_host": [], "error": str(exc)}
            agent.tell(protocol.PACKAGES, answer)
        elif "use" in head:
            failed = {}
            paths = []
            for digest in head["use"]:
                try:
                    path = present(self.base, digest)
                except OSError as exc:
                    path, self.errors[digest] = None, str(exc)
                if path is None:
                    failed[digest] = self.errors.get(digest, "it was not installed")
                else:
                    paths.append(path)
                    self.wanted[self.offered.get(digest, digest)] = digest
            self.paths = paths
            use(paths)
            self.tell_daemons(agent.daemons.values())
            agent.tell(protocol.PACKAGES, {"paths": paths, "failed": failed})

    def _install(self, digest: str, lengths: list[int], reader: FrameReader) -> None:
        """Stream the zip into a file under <base>/packages, then install
        it; the stream stays in step whatever fails."""
        fd: int | None = None
        tmp: str | None = None
        try:
            root = packages_dir(self.base)
            secure_dir(root)
            fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".zip", dir=root)
        except OSError as exc:
            self.errors[digest] = str(exc)
        for n in lengths:
            while n:
                chunk = reader.read_part(min(n, _CHUNK))
                n -= len(chunk)
                if fd is not None:
                    try:
                        _write_all(fd, chunk)
                    except OSError as exc:
                        self.errors[digest] = str(exc)
                        os.close(fd)
                        fd = None
        if fd is not None:
            assert tmp is not None  # made with fd
            os.close(fd)
            try:
                install_zip(self.base, digest, tmp)
                self.errors.pop(digest, None)
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                self.errors[digest] = str(exc)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def tell_daemons(self, daemons: Iterable[Peer]) -> None:
        """Send this session's package paths to these daemons."""
        if not self.paths:
            return
        from .. import protocol

        for daemon in daemons:
            if not daemon.closed:
                daemon.queue(
                    protocol.frame(
                        protocol.PACKAGES,
                        {"paths": self.paths, "packages": dict(self.wanted)},
                    )
                )

    def conflicts(self, worker: dict) -> bool:
        """Whether daemon `worker` ({name, pid}) holds another build of a
        distribution this session ships: it must be replaced."""
        if not self.wanted:
            return False
        record = read_record(self.base, worker["name"], worker["pid"])
        held = record.get("packages", {})
        return any(
            name in record.get("stale", ()) or held.get(name, digest) != digest
            for name, digest in self.wanted.items()
        )


def _write_all(fd: int, data: bytearray | mmap.mmap) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _skip(reader: FrameReader, n: int) -> None:
    while n:
        n -= len(reader.read_part(min(n, _CHUNK)))


def main() -> None:
    """`python -c <boot packages> offer JSON` or `install ZIP HASH`, for
    `inv bootstrap --packages`: one line of JSON."""
    base = default_base()
    command, args = sys.argv[1], sys.argv[2:]
    try:
        if command == "offer":
            result = answer_offer(base, json.loads(args[0]))
        elif command == "install":
            archive, digest = args
            try:
                result = {"installed": install_zip(base, digest, archive)}
            finally:
                os.unlink(archive)
        else:
            sys.exit(f"qjamfab packages: unknown command {command!r}")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        sys.exit(f"qjamfab packages: {command} failed: {exc}")
    print(json.dumps(result))
