"""`command:` hosts: a command line run here that starts python3 somewhere,
its stdin and stdout the stream to the host's agent (engines/command.py).
Here the commands start this machine's python3, directly, through `env`,
and through `ssh -T` to a test sshd."""

import os
import shutil
import signal
import sys
import threading
import time

import pytest

from qjamfab import BadHostSpec, DataSet, HostUnreachable, Master, PreflightFailed
from qjamfab.engines import cluster
from qjamfab.engines.command import command_argv, command_host
from qjamfab.hostspec import parse_hosts
from tests.jobs import constant, inner_product, multiply_sum, sum_params

pytestmark = pytest.mark.timeout(90)
PY = sys.executable
MARK = "QJAMFAB_COMMAND_TEST=1"  # in the environment of the command's python


def _stop(hosts) -> None:
    """End the daemons the command hosts' agents left (they stay warm for
    the next Master, as on an SSH host)."""
    for result in cluster.stop_workers([command_host(s) for s in parse_hosts(hosts)]):
        assert result.ok, result.error


def test_the_original_cases_over_command_hosts():
    hosts = [f"command:{PY}", f"command:env {MARK} {PY}"]
    try:
        with Master(hosts, workers_per_host=1) as m:
            assert m.workers == [f"{h}-0" for h in hosts]
            assert m.run(constant) == 84
            assert m.run(sum_params, params=[1, 2, 3, 6, 7, 9]) == 56
            data = DataSet(list(range(100)))
            assert m.run(multiply_sum, params=3, dataset=data) == 14850
            pairs = DataSet([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]])
            assert m.run(inner_product, params=[2, 4], dataset=pairs) == 170
            assert m.last_run.lost_workers == []
    finally:
        _stop(hosts)


def test_the_host_tasks_reach_a_command_host():
    (spec,) = parse_hosts(f"command:env {MARK} {PY}")
    try:
        (started,) = cluster.start_workers([command_host(spec)], 2)
        assert started.ok, started.error
        (status,) = cluster.status([command_host(spec)])
        assert status.ok and status.host == spec.raw
    finally:
        (stopped,) = cluster.stop_workers([command_host(spec)])
    assert stopped.ok and stopped.info["stopped"] == 2
    (result,) = cluster.status([spec])  # the spec alone: told what to pass
    assert result.error.startswith(
        f"{spec.raw}: a command host is reached through its command: pass "
        "engines.command.command_host(spec)"
    )


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client")
def test_a_command_host_over_ssh_takes_its_arguments_as_one_shell_word(ssh):
    host = ssh["host1"]
    spec = f"command:ssh -T -F {ssh.ssh_config} host1 python3 {{args}}"
    with Master(["local:1", spec], workers_per_host=2) as m:
        assert m.workers == ["local-0", f"{spec}-0", f"{spec}-1"]
        assert m.run(constant) == 126
        data = DataSet(list(range(100)))
        assert m.run(multiply_sum, params=3, dataset=data) == 14850
        # The ssh client killed: as when an SSH host's connection drops.
        lost = [f"{spec}-0", f"{spec}-1"]
        _lost_and_back(m, lambda: os.kill(_ssh_client(), signal.SIGKILL), lost)
    assert host.running  # its daemons: stopped with the ssh fixture's hosts


def _ssh_client() -> int:
    """The pid of the ssh client this process started."""
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == os.getpid() and argv[0] == b"ssh":
            return int(name)
    raise AssertionError("the command host's ssh client is not running")


def _command_process() -> int:
    """The pid of the command this process started whose python has MARK."""
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == os.getpid() and MARK.encode() in environ:
            return int(name)
    raise AssertionError("the command host's process is not running")


def slow_sum(delay, xs):
    time.sleep(delay)
    return sum(xs)


def _lost_and_back(m: Master, kill, lost: list[str]) -> None:
    """`kill` mid-run: `lost` are lost, the run ends right on the others,
    and the next run starts the command again and has them all."""
    data = DataSet(list(range(60)), slice_size=5)
    timer = threading.Timer(0.6, kill)
    timer.start()
    try:
        assert m.run(slow_sum, params=0.4, dataset=data) == sum(range(60))
    finally:
        timer.join()
    assert m.last_run.lost_workers == lost
    assert m.run(slow_sum, params=0, dataset=data) == sum(range(60))
    assert m.last_run.workers == len(m.workers) and not m.last_run.lost_workers


def test_a_command_killed_mid_run_is_a_lost_host():
    """SIGKILL of the command (here the agent's python itself, which
    relays its two workers' frames): its workers are lost."""
    hosts = ["local:1", f"command:env {MARK} {PY}"]
    try:
        with Master(hosts, workers_per_host=2) as m:
            lost = [f"{hosts[1]}-0", f"{hosts[1]}-1"]
            assert m.workers == ["local-0", *lost]
            _lost_and_back(m, lambda: os.kill(_command_process(), signal.SIGKILL), lost)
    finally:
        _stop(hosts[1:])


def test_arguments_go_after_the_command_or_as_one_word_where_it_says():
    (plain,) = parse_hosts("command:docker exec -i box python3")
    assert command_argv(plain, ["-c", "print('a b')"]) == [
        *"docker exec -i box python3 -c".split(),
        "print('a b')",
    ]
    (shell,) = parse_hosts("command:ssh -T 'my host' python3 {args} ")
    assert command_argv(shell, ["-c", "print('a b')"]) == [
        *"ssh -T".split(),
        "my host",
        "python3",
        "-c 'print('\"'\"'a b'\"'\"')'",
    ]
    a, b = parse_hosts(["command:env A=1,2 python3", "local:1"])  # a list item
    assert (a.kind, b.kind) == ("command", "local")
    assert [s.kind for s in parse_hosts("command:a python3,command:b python3")] == [
        "command",
        "command",
    ]


@pytest.mark.parametrize(
    "spec, says",
    [
        (
            "command:",
            "host spec 'command:' has no command after 'command:': write the "
            "command that starts python3 there, e.g. command:docker exec -i "
            "BOX python3",
        ),
        (
            "command:sh -c 'exit",
            'host spec "command:sh -c \'exit": cannot read the command '
            "(No closing quotation): quote it as a shell would",
        ),
        ("command:{args} python3", "host spec 'command:{args} python3': the "),
    ],
)
def test_a_command_host_without_a_command_is_refused(spec, says):
    with pytest.raises(BadHostSpec) as info:
        Master(spec)
    assert str(info.value).splitlines()[0].startswith(says)


_FIX = (
    "the command must start python3 with the arguments qjamfab adds (-c "
    "PROGRAM; where a shell reads them, as over ssh, write {args} where "
    "they go) and pass its stdin and stdout through"
)


def test_a_command_that_is_not_found_says_so():
    with pytest.raises(PreflightFailed) as info:
        Master("command:no-such-command-qjamfab python3")
    assert str(info.value) == (
        "command 'no-such-command-qjamfab python3': 'no-such-command-qjamfab' "
        "is no program found on this machine (PATH): install it, or give "
        "its full path"
    )


@pytest.mark.parametrize(
    "command, ended, said",
    [
        ("false", "ended (exit status 1)", "it wrote nothing"),
        (
            "sh -c 'echo no python here >&2; exit 3'",
            "ended (exit status 3)",
            "no python here",
        ),
    ],
)
def test_a_command_that_exits_at_once_says_how_and_what_it_said(command, ended, said):
    with pytest.raises(HostUnreachable) as info:
        Master(f"command:{command}")
    assert str(info.value).splitlines()[0] == (
        f"command {command!r} {ended} before qjamfab's agent started ({said}): {_FIX}"
    )


def test_a_command_that_prints_something_else_says_what():
    with pytest.raises(PreflightFailed) as info:
        Master("command:echo hello")
    assert str(info.value).splitlines()[0] == (
        "command:echo hello: the command printed b'hello -c import os, stat, "
        f"sys\\n' before qjamfab's agent started: {_FIX}"
    )


def test_a_command_that_says_nothing_is_given_up(monkeypatch):
    from qjamfab.links import handshake

    monkeypatch.setattr(handshake, "HANDSHAKE_TIMEOUT_S", 1.0)
    command = f"{PY} -c 'import time; time.sleep(60)'"
    with pytest.raises(HostUnreachable) as info:
        Master(f"command:{command}")
    assert str(info.value).splitlines()[0] == (
        f"command {command!r} said nothing for 1 s before qjamfab's agent "
        f"started (it wrote nothing): {_FIX}"
    )
