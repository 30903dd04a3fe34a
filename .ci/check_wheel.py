"""CI: the wheel holds what users need: qjamfab/py.typed (type checkers
read qjamfab's annotations), the runtime, and qjamfab.__version__ as its
version. Usage: python .ci/check_wheel.py DIST/qjamfab-*.whl"""

from __future__ import annotations

import ast
import os
import sys
import zipfile

INIT = os.path.join(os.path.dirname(__file__), "..", "qjamfab", "version.py")


def source_version() -> str:
    """qjamfab.__version__ as this checkout writes it (qjamfab/version.py, read,
    not imported)."""
    with open(INIT) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return str(ast.literal_eval(node.value))
    sys.exit(f"{INIT} sets no __version__")


def main(wheel: str) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("qjamfab/py.typed", "qjamfab/runtime/worker.py"):
        if needed not in names:
            sys.exit(f"{wheel} lacks {needed}: see [tool.setuptools] in pyproject.toml")
    version, expected = os.path.basename(wheel).split("-")[1], source_version()
    if version != expected:
        sys.exit(
            f"{wheel} is version {version}, qjamfab.__version__ is "
            f"{expected}: pyproject.toml must read it from there"
        )
    print(f"{os.path.basename(wheel)}: py.typed, runtime and version {version} ok")


if __name__ == "__main__":
    main(sys.argv[1])
