"""Worker daemons forked from a warm per-host template (runtime/forkserver.py),
and each session's jobs in daemons fresh for it: a job of an earlier
session that patched a builtin is never seen by the next one; a session's
daemons are the template's (through their keepers), with random streams
of their own; stop-workers ends the template and leaves nothing;
QJAMFAB_FORKSERVER=0 starts each daemon as its own Python; a template that
died is started again; env. settings read when a library loads reach the
daemons all the same."""

import os
import signal
import socket
import time

import pytest

from qjamfab import Master, hostspec, runtime
from qjamfab.engines import cluster
from qjamfab.runtime import manage, procs, template
from tests.conftest import processes_mentioning

pytestmark = pytest.mark.timeout(120)

OFF = "env.QJAMFAB_FORKSERVER=0"


def _status(spec: str, **kw) -> dict:
    [result] = cluster.status(hostspec.parse_hosts([spec]), **kw)
    assert result.ok, result.error
    return result.info


def _forked(alias: str, ssh) -> list[bool]:
    """Whether each daemon of the host came from its template."""
    return [w["forked"] for w in _status(alias, ssh_config=ssh.ssh_config)["workers"]]


def _template_of(pid: int) -> int:
    """The process that forked daemon `pid`'s keeper (its grandparent)."""
    stat = runtime.process_stat(pid)
    assert stat is not None, pid
    keeper = runtime.process_stat(stat[1])
    assert keeper is not None, stat
    return keeper[1]


def _concat(a: list, b: list) -> list:
    return a + b


def _wait_for(condition, what: str, within: float = 20.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"not within {within:g} s: {what}")


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("setting", ["", OFF], ids=["forked", "off"])
def test_a_builtin_patched_by_a_session_is_not_seen_by_the_next(ssh, count, setting):
    host = f"host1 {setting}".strip()
    opts = dict(workers_per_host=count, ssh_config=ssh.ssh_config)

    def patch_sum(params, dataset):
        import builtins

        real = builtins.sum
        builtins.sum = lambda it, start=0: real(it, start) + 10
        return 0

    with Master([host], **opts) as a:
        a.run(patch_sum)
        assert a.run(lambda p, d: sum(range(100))) == count * 4960  # patched
    with Master([host], **opts) as b:
        assert b.run(lambda p, d: sum(range(100))) == count * 4950


def test_a_sessions_daemons_are_forked_from_the_template_with_streams_of_their_own(
    ssh,
):
    def draw(params, dataset):
        import os
        import random
        import signal

        import numpy as np

        # The template ignores SIGCHLD (the kernel reaps its children): a
        # worker that kept that would lose its own children's exit status.
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
        return [(os.getpid(), random.random(), float(np.random.random()))]

    with Master(["host2"], workers_per_host=3, ssh_config=ssh.ssh_config) as m:
        drawn = m.run(draw, reduce=_concat)
        info = _status("host2", ssh_config=ssh.ssh_config)
    assert len(drawn) == 3
    tmpl = info["template"]
    # numpy, once the first daemons were forked; no BLAS pool, no thread.
    preloaded = _wait_for(
        lambda: (
            _status("host2", ssh_config=ssh.ssh_config)["template"]["preloaded"]
            == ["qjamfab.runtime", "cloudpickle", "numpy"]
            and _status("host2", ssh_config=ssh.ssh_config)["template"]
        ),
        "the template preloaded numpy",
    )
    assert preloaded["threads"] == 1 and preloaded["pid"] == tmpl["pid"]
    assert {_template_of(pid) for pid, _, _ in drawn} == {tmpl["pid"]}
    assert len({r for _, r, _ in drawn}) == 3
    assert len({r for _, _, r in drawn}) == 3


def test_fork_server_off_starts_each_daemon_as_its_own_python(ssh):
    with Master(["host3 " + OFF], workers_per_host=2, ssh_config=ssh.ssh_config) as m:
        assert m.run(lambda p, d: 1) == 2
        info = _status("host3", ssh_config=ssh.ssh_config)
    assert [w["forked"] for w in info["workers"]] == [False, False]
    for w in info["workers"]:
        assert w["socket"] in procs.cmdline(w["pid"])


def test_settings_read_as_libraries_load_reach_the_daemons(ssh):
    """OPENBLAS_NUM_THREADS is read as numpy loads, in the template: a value
    every daemon shares restarts the template with it, one that differs
    between daemons gets them started afresh, and a setting read later
    (QF_TEST_X) reaches forked daemons as it is."""

    def env(params, dataset):
        import os

        return [(os.environ.get("QF_TEST_X"), os.environ.get("OPENBLAS_NUM_THREADS"))]

    opts = dict(workers_per_host=2, ssh_config=ssh.ssh_config)
    for setting, seen, forked in [
        ("env.QF_TEST_X=w{worker}", [("w0", None), ("w1", None)], True),
        ("env.OPENBLAS_NUM_THREADS=1", [(None, "1")] * 2, True),
        ("env.OPENBLAS_NUM_THREADS={worker}", [(None, "0"), (None, "1")], False),
        ("", [(None, None)] * 2, True),
    ]:
        with Master([f"host3 {setting}".strip()], **opts) as m:
            assert sorted(m.run(env, reduce=_concat)) == seen, setting
            assert _forked("host3", ssh) == [forked] * 2, setting


def _start(count: int) -> dict:
    [started] = cluster.start_workers(hostspec.parse_hosts(["local"]), count)
    assert started.ok, started.error
    return _status("local")


def test_stop_workers_ends_the_template_too_and_leaves_nothing(qjamfab_home):
    info = _start(2)
    tmpl = info["template"]
    assert tmpl is not None
    assert {_template_of(w["pid"]) for w in info["workers"]} == {tmpl["pid"]}
    [stopped] = cluster.stop_workers(hostspec.parse_hosts(["local"]))
    assert stopped.ok and stopped.info == {
        "stopped": 2,
        "killed": [],
        "template": True,
    }
    assert runtime.process_ended(tmpl["pid"])
    assert processes_mentioning(str(qjamfab_home)) == []
    assert _status("local")["template"] is None


def test_a_template_that_died_is_started_again(qjamfab_home):
    first = _start(1)["template"]
    os.kill(first["pid"], signal.SIGKILL)
    _wait_for(lambda: runtime.process_ended(first["pid"]), "the template ended")
    info = _start(2)
    again = info["template"]
    assert again is not None and again["pid"] != first["pid"]
    [new] = [w for w in info["workers"] if w["name"] == "worker-1"]
    assert _template_of(new["pid"]) == again["pid"]
    cluster.stop_workers(hostspec.parse_hosts(["local"]))


def test_the_template_drops_a_bad_request_and_serves_the_next(qjamfab_home):
    base = str(qjamfab_home)
    tmpl = _start(1)["template"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(tmpl["socket"])
        conn.sendall(b'{"workers": [{"name": "../../etc", "env": {}}]}\n')
        assert conn.recv(100) == b""  # dropped, nothing forked
    log = tmpl["socket"][: -len(".sock")] + ".log"
    said = _wait_for(lambda: runtime.read_tail(log), "the template's log")
    assert said.splitlines()[0] == (
        "qjamfab template: dropped a bad request: its workers are not a "
        "list of names and env settings"
    )
    assert template.fork_slots(base, [1], 60.0, {}) == {1}
    up = _wait_for(
        lambda: [w for w in manage.live_workers(base) if w["name"] == "worker-1"],
        "worker-1 listening",
    )
    assert _template_of(up[0]["pid"]) == tmpl["pid"]
    cluster.stop_workers(hostspec.parse_hosts(["local"]))


def test_run_from_the_package_the_runtime_is_named_by_its_bundle_hash():
    """The master (and a test) calling host-side code names the runtime as
    a host running the installed bundle does: by the bundle's hash, not by
    the checkout's directory name (a template would look out of date)."""
    assert runtime.this_runtime() == runtime.bundle_hash()
