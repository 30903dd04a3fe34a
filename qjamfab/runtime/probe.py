"""Preflight: what a host offers a worker, as one line of JSON.

Sent as source and run with the remote Python before anything is uploaded
(`python3 -c <this file> BUNDLE_HASH`), so it must stand alone: standard
library only, no imports from qjamfab. It also creates the base directory
(0700) and checks that it is writable.
"""
import json
import os
import shutil
import sys


def probe(bundle_hash: str) -> dict:
    base = os.environ.get("QJAMFAB_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "qjamfab")
    report = {"python": list(sys.version_info[:3]),
              "executable": sys.executable, "cores": os.cpu_count(),
              "base": base, "numpy": None, "writable": False,
              "free_bytes": None, "runtime_present": False, "error": ""}
    try:  # the version without importing numpy (0.1 s)
        from importlib.metadata import version
        report["numpy"] = version("numpy")
    except Exception:
        pass
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        for sub in ("runtime", "cache", "run", "log"):
            os.makedirs(os.path.join(base, sub), mode=0o700, exist_ok=True)
        check = os.path.join(base, f".write-check-{os.getpid()}")
        with open(check, "w") as f:
            f.write("ok")
        os.unlink(check)
        report["writable"] = True
        report["free_bytes"] = shutil.disk_usage(base).free
    except OSError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["runtime_present"] = os.path.isdir(
        os.path.join(base, "runtime", bundle_hash, "qjamfab"))
    return report


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else "")))
