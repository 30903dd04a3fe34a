"""Shipping this master's installed distributions to hosts that lack them:
`Master(hosts, packages=["numpy", "scipy"])` and `inv bootstrap
--packages=numpy,scipy`.

This module owns the master's side:

- `resolve(names)`: each name -> a `Distribution`, its files found with
  importlib.metadata (its RECORD: modules, `.dist-info`, bundled libraries
  such as `numpy.libs`; not `__pycache__`, nor scripts and data outside
  site-packages), named by `content_hash` of those files. Exactly the
  distributions named are shipped, not their dependencies: a host may have
  those already, and a dependency shipped unasked could shadow the host's
  own. Ask for them with `with_dependencies("scipy")` (-> ["scipy",
  "numpy"]), or `inv bootstrap --packages=scipy --with-dependencies`.
  Names that cannot be shipped are a `BadPackage` whose first line says
  why and what to do: not installed here, a module's name instead of its
  distribution's (`sklearn` for `scikit-learn`), an editable install, one
  without a file list, qjamfab's own runtime (qjamfab, cloudpickle).
- `check_platform`: a distribution with compiled files goes only to a host
  whose OS, machine, extension-module suffixes (the Python ABI tag, e.g.
  `.cpython-311-x86_64-linux-gnu.so`) and C library (the glibc its wheel
  needs, from the wheel's tags) match, as the host's agent (or probe)
  reports them (`runtime.probe.platform_info`); otherwise a
  `PreflightFailed` names the host, the distribution and the difference.
  Pure-Python distributions go anywhere (the Python minor version is
  checked at every start anyway).
- shipping them over a host's agent stream, right after its HELLO, is
  package_ship.py's: only what the host lacks travels, once.
- `inv bootstrap --packages` sends the same zips over SFTP
  (cluster.py's `HostSession.upload_packages`); runtime/packages.py unpacks
  them there, into the same place.

Local workers run the master's own Python, which has the packages: nothing
is shipped to them.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import sys
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from ..errors import BadPackage, PreflightFailed
from ..runtime.packages import content_hash
from ..runtime.probe import platform_info

if TYPE_CHECKING:
    pass

log = logging.getLogger("qjamfab")

__all__ = [
    "Distribution",
    "resolve",
    "with_dependencies",
    "check_platform",
    "libc_needed",
    "glibc_version",
    "suggestion",
]

_RUNTIME_SHIPS = {"qjamfab", "cloudpickle"}
_NATIVE = re.compile(r"\.(so|pyd|dylib|dll)(\.[0-9]+)*$")
_ZIP_LOCK = threading.Lock()
_LEGACY_MANYLINUX = {
    "manylinux1": (2, 5),
    "manylinux2010": (2, 12),
    "manylinux2014": (2, 17),
}


@dataclass(frozen=True)
class Distribution:
    """One installed distribution as it would be shipped."""

    name: str
    version: str
    hash: str  # content_hash of its files
    root: str  # the directory its files are relative to
    files: tuple[str, ...]  # "/"-separated, relative to root
    size: int  # bytes, unpacked
    native: tuple[str, ...]  # its compiled files
    ext_suffixes: tuple[str, ...]  # ABI-tagged suffixes its modules need
    libc: str | None  # "glibc" or "musl" when native on Linux
    glibc: tuple[int, int] | None  # the oldest glibc it runs on

    def __str__(self) -> str:
        return f"{self.name} {self.version}"

    def zip(self) -> bytes:
        """Its files as a zip archive (built once per process, by one
        thread while the hosts' threads wait)."""
        with _ZIP_LOCK:
            return _zip(self)


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(names: str | Sequence[str] | None) -> list[Distribution]:
    """The distributions named (a list, or one comma-separated string), in
    order, each once. BadPackage for a name that cannot be shipped."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple, set, frozenset)):
        raise BadPackage(
            f"packages must be a list of distribution names, like "
            f"['numpy', 'scipy'], not {type(names).__name__} {names!r}"
        )
    found: list[Distribution] = []
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(
            r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*", name
        ):
            raise BadPackage(
                f"packages= holds {name!r}, which is not a distribution "
                "name: give names as pip knows them, like 'numpy' or "
                "'scikit-learn'"
            )
        key = canonical(name.strip())
        if key not in seen:
            seen.add(key)
            found.append(_distribution(name.strip()))
    return found


def _distribution(name: str) -> Distribution:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        owners = _module_owners(name)
        if owners:
            raise BadPackage(
                f"{name!r} is a module of the distribution {owners[0]!r}, "
                f"not a distribution's name: give packages=[{owners[0]!r}]"
            ) from None
        raise BadPackage(
            f"no distribution {name!r} is installed for this Python "
            f"({sys.executable}): install it here (pip install {name}) or "
            "fix the name in packages="
        ) from None
    real = dist.metadata["Name"] or name
    if canonical(real) in _RUNTIME_SHIPS:
        raise BadPackage(
            f"{real} comes with qjamfab's runtime on every host:"
            " leave it out of packages="
        )
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    if direct.get("dir_info", {}).get("editable"):
        raise BadPackage(
            f"{real} is an editable install (from {direct.get('url')}): "
            f"qjamfab ships installed files only; install it normally "
            f"(pip install {real}) to ship it"
        )
    if dist.files is None:
        raise BadPackage(
            f"{real} {dist.version} has no list of its files (no RECORD): "
            f"qjamfab ships only what it can list; reinstall it with pip"
        )
    root = str(dist.locate_file(""))
    record = str(
        dist.locate_file(next((f for f in dist.files if f.name == "RECORD"), ""))
    )
    try:
        stamp = os.stat(record).st_mtime_ns
    except OSError:
        stamp = time.time_ns()  # no RECORD to stamp it: always read again
    return _scan(
        real,
        dist.version,
        root,
        tuple(str(f) for f in dist.files),
        dist.read_text("WHEEL") or "",
        stamp,
    )


def _module_owners(name: str) -> list[str]:
    try:
        return metadata.packages_distributions().get(name, [])
    except Exception:  # a broken distribution elsewhere
        return []


@functools.lru_cache(maxsize=32)
def _scan(
    name: str, version: str, root: str, listed: tuple[str, ...], wheel: str, stamp: int
) -> Distribution:
    """A Distribution from its listed files (cached while its RECORD's
    mtime, `stamp`, stays)."""
    files = []
    for rel in listed:
        parts = rel.split("/")
        if (
            rel.startswith(("/", ".."))
            or "__pycache__" in parts
            or rel.endswith(".pyc")
        ):
            continue  # outside site-packages, or compiled here by imports
        if os.path.isfile(os.path.join(root, rel)):
            files.append(rel)
    if not files:
        raise BadPackage(
            f"{name} {version} has none of its files under "
            f"{root}: reinstall it with pip"
        )
    entries = _read(root, files)
    native = tuple(f for f in files if _NATIVE.search(f.rsplit("/", 1)[-1]))
    suffixes = sorted(platform_info()["ext_suffixes"], key=len, reverse=True)
    needed = set()
    for f in native:
        suffix = next((s for s in suffixes if f.endswith(s)), None)
        if suffix and suffix not in (".so", ".pyd"):
            needed.add(suffix)
    libc, glibc = (
        libc_needed(wheel)
        if native and sys.platform.startswith("linux")
        else (None, None)
    )
    return Distribution(
        name,
        version,
        content_hash(entries),
        root,
        tuple(files),
        sum(len(c) for _, c in entries),
        native,
        tuple(sorted(needed)),
        libc,
        glibc,
    )


def _read(root: str, files: Iterable[str]) -> list[tuple[str, bytes]]:
    entries = []
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            entries.append((rel, f.read()))
    return entries


def libc_needed(wheel: str) -> tuple[str, tuple[int, int] | None]:
    """The C library a Linux build needs, from its WHEEL tags (`wheel`:
    the text of its .dist-info/WHEEL): ("glibc", oldest version its
    manylinux tags allow) or ("musl", None); a build without such tags
    needs this master's glibc or newer."""
    versions, musl = [], False
    for line in wheel.splitlines():
        if not line.startswith("Tag:"):
            continue
        for plat in line.split(":", 1)[1].strip().split("-")[-1].split("."):
            match = re.match(r"manylinux_(\d+)_(\d+)_", plat)
            if match:
                versions.append((int(match[1]), int(match[2])))
            elif plat.split("_", 1)[0] in _LEGACY_MANYLINUX:
                versions.append(_LEGACY_MANYLINUX[plat.split("_", 1)[0]])
            elif plat.startswith("musllinux_"):
                musl = True
    if versions:
        return "glibc", min(versions)
    if musl:
        return "musl", None
    ours = glibc_version(platform_info()["libc"])
    return ("glibc", ours) if ours else ("musl", None)


def glibc_version(libc: str | None) -> tuple[int, int] | None:
    """(major, minor) of a C library as `platform_info()["libc"]` names it
    ("glibc 2.36" -> (2, 36)); None for another library or none known."""
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", libc or "")
    return (int(match[1]), int(match[2])) if match else None


@functools.lru_cache(maxsize=4)
def _zip(dist: Distribution) -> bytes:
    entries = _read(dist.root, dist.files)
    if content_hash(entries) != dist.hash:
        raise BadPackage(
            f"the files of {dist} changed since it was resolved (reinstalled?)"
            f": create the Master again to ship the new ones"
        )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for rel, content in entries:
            z.writestr(rel, content)
    return out.getvalue()


def with_dependencies(*names: str) -> list[str]:
    """These distributions and, recursively, those they require (as
    installed here; extras left out, environment markers evaluated when the
    `packaging` library is installed): a list for `packages=`."""
    order: list[str] = []
    seen: set[str] = set()
    todo = [n for name in names for n in ([name] if isinstance(name, str) else name)]
    while todo:
        name = todo.pop(0)
        if canonical(name) in seen:
            continue
        real = resolve([name])[0].name  # BadPackage for a bad name
        seen.add(canonical(name))
        seen.add(canonical(real))
        order.append(real)
        for req in metadata.distribution(real).requires or ():
            dep = _required(req)
            if dep and canonical(dep) not in seen | _RUNTIME_SHIPS:
                todo.append(dep)
    return order


def _required(requirement: str) -> str | None:
    """The name a Requires-Dist line needs here, or None (an extra, a
    marker that does not hold, or not installed here)."""
    spec, _, marker = requirement.partition(";")
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not name or "extra" in marker:
        return None
    if marker.strip():
        try:
            from packaging.markers import Marker

            if not Marker(marker).evaluate():
                return None
        except ImportError:
            pass  # judged by whether it is installed
        except Exception:
            return None
    try:
        metadata.distribution(name[1])
    except metadata.PackageNotFoundError:
        return None
    return name[1]


# --- the host's side of the comparison ----------------------------------------


def host_platform(info: dict) -> dict:
    """The platform fields of a host's HELLO or probe report."""
    return {k: info.get(k) for k in ("platform", "machine", "ext_suffixes", "libc")}


def platform_problem(dist: Distribution, host: dict) -> str | None:
    """Why `dist`'s compiled files would not load on `host` (its
    platform fields), or None when they would (or it has none)."""
    if not dist.native:
        return None
    ours = platform_info()
    if (host.get("platform"), host.get("machine")) != (
        ours["platform"],
        ours["machine"],
    ):
        return (
            f"its compiled files are for {ours['platform']} "
            f"{ours['machine']} and the host is {host.get('platform')} "
            f"{host.get('machine')}"
        )
    loads = host.get("ext_suffixes") or []
    for suffix in dist.ext_suffixes:
        if suffix not in loads:
            return (
                f"its extension modules end in {suffix}, which the "
                f"host's Python does not load (it loads "
                f"{', '.join(loads) or 'none'})"
            )
    have = glibc_version(host.get("libc"))
    if dist.libc == "glibc" and dist.glibc is not None:  # a version with glibc
        need = ".".join(map(str, dist.glibc))
        if have is None:
            return (
                f"it needs glibc {need} or newer and the host's C "
                f"library is {host.get('libc') or 'not glibc'}"
            )
        if have < dist.glibc:
            return f"it needs glibc {need} or newer and the host has {host.get('libc')}"
    elif dist.libc == "musl" and have is not None:
        return f"it is built for musl libc and the host has {host.get('libc')}"
    return None


def check_platform(
    dists: Sequence[Distribution], info: dict, label: str, python: str
) -> None:
    """PreflightFailed when a distribution's compiled files would not load
    on the host whose HELLO or probe report is `info`."""
    host = host_platform(info)
    for dist in dists:
        problem = platform_problem(dist, host)
        if problem:
            raise PreflightFailed(
                f"{label} cannot use {dist} as this master has it: {problem}"
                f"; install {dist.name} for {python} on {label} itself, or "
                f"leave it out of packages=",
                host=label,
            )


# --- for messages -------------------------------------------------------------


def suggestion(module: str) -> str | None:
    """For a module a host lacks: `packages=['dist']` when this master has
    the distribution that provides it (`packages=with_dependencies('dist')`
    when it requires others), else None."""
    top = module.split(".", 1)[0]
    try:  # most distributions are named as their module: no scan
        owners = [metadata.distribution(top).metadata["Name"] or top]
    except metadata.PackageNotFoundError:
        owners = _module_owners(top)
    if not owners:
        return None
    # A distribution that needs others here needs them there too.
    needs = (_required(r) for r in metadata.distribution(owners[0]).requires or ())
    if any(dep and canonical(dep) not in _RUNTIME_SHIPS for dep in needs):
        return f"packages=with_dependencies({owners[0]!r})"
    return f"packages=[{owners[0]!r}]"
