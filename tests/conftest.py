"""Shared fixtures: every test gets its own QJAMFAB_HOME, and no test may
leave a process behind that names it."""
import os
import time

import pytest


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture(autouse=True)
def qjamfab_home(tmp_path, monkeypatch):
    home = tmp_path / "qjamfab-home"
    monkeypatch.setenv("QJAMFAB_HOME", str(home))
    for name in ("QJAMFAB_HOSTS", "QJAMFAB_SSH_CONFIG", "QJAMFAB_USER",
                 "QJAMFAB_REMOTE_PYTHON", "QJAM_USER", "QJAM_REMOTE_PYTHON"):
        monkeypatch.delenv(name, raising=False)
    yield home
    deadline = time.monotonic() + 5
    while processes_mentioning(str(home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = processes_mentioning(str(home))
    assert not leftover, f"the test left processes behind: {leftover}"
