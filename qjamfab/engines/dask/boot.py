"""The first thing a Master gives a Dask cluster: a worker plugin that
travels by value (cloudpickle) and installs qjamfab's worker bundle in
each Dask worker, so that Dask workers need nothing of ours installed,
as our SSH hosts need nothing.

The bundle is the host runtime (runtime/, protocol, errors, reduce) and
worker.py, the part that runs in a Dask worker: written under
`qjamfab-runtime/<hash>/` next to the worker's local directory (0700, its
files checked against the hash before each use), put first on
`sys.path`, so the `qjamfab` worker plugin registered next, and the tasks
the Master submits, import from it. A Dask worker that already imported a
qjamfab of its own keeps it (the version check then says whether it
serves). This module imports nothing of qjamfab: it must run where
qjamfab is not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:
    from distributed import Worker

NAME = "qjamfab-runtime"


def digest(files: dict[str, bytes]) -> str:
    """The bundle's name: a hash of its paths and contents."""
    h = hashlib.sha256()
    for path, content in sorted(files.items()):
        h.update(f"{path}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()[:16]


class RuntimeInstaller(WorkerPlugin):
    """Installs the bundle and puts it on the Dask worker's `sys.path`."""

    idempotent = True
    name = NAME

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.hash = digest(files)

    def setup(self, worker: Worker) -> None:
        root = os.path.join(
            os.path.dirname(os.path.abspath(worker.local_directory)),
            "qjamfab-runtime",
        )
        os.makedirs(root, mode=0o700, exist_ok=True)
        self._check_private(root)
        target = os.path.join(root, self.hash)
        if not self._intact(target):
            self._install(root, target)
        if target not in sys.path:
            sys.path.insert(0, target)

    @staticmethod
    def _check_private(path: str) -> None:
        """Code is run from here: only this user may change it."""
        st = os.stat(path)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise PermissionError(
                f"{path} is not this user's alone (owner uid {st.st_uid}, mode "
                f"{st.st_mode & 0o777:04o}): qjamfab will not run code from "
                "it; remove it or give the Dask workers a local directory of "
                "their own"
            )

    def _intact(self, target: str) -> bool:
        """Whether `target` holds exactly this bundle."""
        found: dict[str, bytes] = {}
        for top, dirs, names in os.walk(target):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                path = os.path.join(top, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, target)] = f.read()
        return bool(found) and digest(found) == self.hash

    def _install(self, root: str, target: str) -> None:
        staging = os.path.join(root, f".staging-{uuid.uuid4().hex}")
        for path, content in self.files.items():
            full = os.path.join(staging, path)
            os.makedirs(os.path.dirname(full), mode=0o700, exist_ok=True)
            with open(full, "wb") as f:
                f.write(content)
        if os.path.exists(target):  # damaged: set aside, then replaced
            aside = f"{target}.damaged-{uuid.uuid4().hex}"
            os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another Dask worker of this machine was first
            shutil.rmtree(staging, ignore_errors=True)
