"""qjamfab.hostspec, qjamfab.engines.ssh.hosts and qjamfab.engines.ssh.openssh:
host spec parsing, the OpenSSH command line, and connect() against private sshd servers
(tests/sshd_hosts.py) on 127.0.0.2, 127.0.0.3, ..."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import paramiko
import paramiko.packet
import pytest

from qjamfab import engines
from qjamfab.engines.ssh import hosts as qhosts
from qjamfab.engines.ssh import openssh
from qjamfab.engines.ssh.hosts import connect
from qjamfab.errors import (
    AuthenticationFailed,
    BadHostSpec,
    HostError,
    HostKeyError,
    HostUnreachable,
    QjamfabError,
    WorkerLost,
)
from qjamfab.hostspec import HostSpec, parse_hosts

try:
    from sshd_hosts import SshdHosts, _alive, sshd_available
except ImportError:  # tests/ collected as a package
    from tests.sshd_hosts import SshdHosts, _alive, sshd_available


ENV_VARS = (
    "QJAMFAB_HOSTS",
    "QJAMFAB_SSH_CONFIG",
    "QJAMFAB_USER",
    "QJAM_USER",
    "SSH_AUTH_SOCK",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# --- parse_hosts -----------------------------------------------------------


def specs(value):
    return [(s.raw, s.kind, s.workers) for s in parse_hosts(value)]


def test_default_is_local():
    assert specs(None) == [("local", "local", None)]


def test_env_hosts(monkeypatch):
    monkeypatch.setenv("QJAMFAB_HOSTS", " a , b:2222,local:3 ")
    assert specs(None) == [
        ("a", "ssh", None),
        ("b:2222", "ssh", None),
        ("local:3", "local", 3),
    ]
    monkeypatch.setenv("QJAMFAB_HOSTS", "   ")
    assert specs(None) == [("local", "local", None)]


def test_env_hosts_malformed(monkeypatch):
    monkeypatch.setenv("QJAMFAB_HOSTS", "a,,b")
    with pytest.raises(BadHostSpec, match="QJAMFAB_HOSTS"):
        parse_hosts(None)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("local", [("local", "local", None)]),
        ("local:4", [("local:4", "local", 4)]),
        ("LOCAL:2", [("LOCAL:2", "local", 2)]),
        ("localhost", [("localhost", "ssh", None)]),
        ("localhost:2222", [("localhost:2222", "ssh", None)]),
        ("host1", [("host1", "ssh", None)]),
        ("bob@10.1.2.3:2200", [("bob@10.1.2.3:2200", "ssh", None)]),
        ("a, b ,c", [("a", "ssh", None), ("b", "ssh", None), ("c", "ssh", None)]),
        (["a", " user@b "], [("a", "ssh", None), ("user@b", "ssh", None)]),
        (("local:1",), [("local:1", "local", 1)]),
        ("a,a", [("a", "ssh", None), ("a", "ssh", None)]),
        ("::1", [("::1", "ssh", None)]),
        ("[::1]:2222", [("[::1]:2222", "ssh", None)]),
        ("me@example.com@host", [("me@example.com@host", "ssh", None)]),
    ],
)
def test_parse_ok(value, expected):
    assert specs(value) == expected


def test_duplicates_are_two_hosts():
    a, b = parse_hosts("h,h")
    assert a == b and len(parse_hosts(["h", "h"])) == 2


def test_hostspec_fields():
    s = parse_hosts("local:3")[0]
    assert s == HostSpec("local:3", "local", 3) and s.is_local
    t = parse_hosts("u@h")[0]
    assert not t.is_local and t.workers is None and str(t) == "u@h"
    with pytest.raises(Exception):
        t.raw = "x"  # frozen


@pytest.mark.parametrize(
    "value, words",
    [
        ("", ["no hosts given"]),
        ("   ", ["no hosts given"]),
        ([], ["no hosts given"]),
        ("a,,b", ["empty", "extra comma"]),
        ("a,", ["empty", "extra comma"]),
        ([" "], ["empty"]),
        ("local:0", ["0 workers", "N >= 1"]),
        ("local:-1", ["positive integer", "local:4"]),
        ("local:x", ["positive integer", "local:4"]),
        ("local:", ["positive integer"]),
        ("local:1.5", ["positive integer"]),
        (["a b"], ["whitespace", "commas"]),
        ("a\tb", ["whitespace"]),
        ("host:abc", ["port 'abc'", "1 to 65535"]),
        ("host:0", ["port '0'", "1 to 65535"]),
        ("host:65536", ["port '65536'"]),
        ("host:", ["port ''"]),
        ("user@", ["no host after '@'"]),
        ("@host", ["empty user"]),
        ("user@:22", ["no host name"]),
        (":22", ["no host name"]),
        ("[::1", ["'[...]'"]),
        ("[]:22", ["'[...]'"]),
        ("[::1]:x", ["port 'x'"]),
        ("-oProxyCommand=x", ["starts with '-'"]),
        ("ssh://host", ["URL"]),
        (["a,b"], ["comma", "one host per list item"]),
        ([3], ["not a string"]),
        (42, ["must be None, a string or a list"]),
    ],
)
def test_parse_bad(value, words):
    with pytest.raises(BadHostSpec) as info:
        parse_hosts(value)
    first = str(info.value).splitlines()[0]
    for w in words:
        assert w in first, (w, first)


def test_rekey_constants():
    assert paramiko.packet.Packetizer.REKEY_BYTES == 2**40
    assert paramiko.packet.Packetizer.REKEY_PACKETS == 2**40
    assert qhosts.REKEY_LIMIT == 2**40


def test_connect_local_spec_refused():
    with pytest.raises(BadHostSpec, match="local"):
        connect(parse_hosts("local:2")[0])


def test_missing_ssh_config(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope")
    with pytest.raises(BadHostSpec, match="^h: ssh_config file .* does not"):
        connect(parse_hosts("h")[0], ssh_config=missing)
    monkeypatch.setenv("QJAMFAB_SSH_CONFIG", missing)
    with pytest.raises(BadHostSpec, match="QJAMFAB_SSH_CONFIG"):
        connect(parse_hosts("h")[0])


def test_unresolvable_name_maps_to_unreachable(monkeypatch, tmp_path):
    # no real DNS lookups from tests: make the resolver fail
    def fail(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    cfg = tmp_path / "cfg"
    cfg.write_text("")
    with pytest.raises(HostUnreachable) as info:
        connect(parse_hosts("no-such-host")[0], ssh_config=str(cfg))
    assert str(info.value).startswith("no-such-host: cannot resolve")
    assert info.value.host == "no-such-host"


# --- against real sshd servers ---------------------------------------------


def require_sshd():
    """Skip when sshd is absent, or fail when QJAMFAB_REQUIRE_SSHD=1."""
    if sshd_available() is None:
        reason = (
            "sshd is not installed (apt-get install openssh-server); SSH tests skipped"
        )
        if os.environ.get("QJAMFAB_REQUIRE_SSHD") == "1":
            pytest.fail(reason + " but QJAMFAB_REQUIRE_SSHD=1")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def sshd():
    require_sshd()
    hosts = SshdHosts(3)
    try:
        yield hosts
    finally:
        pids = [h.pid for h in hosts]
        hosts.stop()
        hosts.stop()  # idempotent
        assert not any(_alive(p) for p in pids), "sshd left behind"


def write_config(
    path, sshd, *, known_hosts=None, strict=None, user=None, identity=None, extra=""
):
    """An ssh_config like sshd.ssh_config with some settings changed."""
    lines = []
    for h in sshd:
        lines += [f"Host {h.alias}", f"    HostName {h.address}", f"    Port {h.port}"]
    lines += [
        "Host *",
        f"    User {user or sshd.user}",
        f"    IdentityFile {identity or sshd.client_key}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {known_hosts or sshd.known_hosts}",
        "    GlobalKnownHostsFile /dev/null",
    ]
    if strict:
        lines.append(f"    StrictHostKeyChecking {strict}")
    path.write_text(extra + "\n".join(lines) + "\n")
    return str(path)


def known_line(host, key_pub=None):
    key = " ".join((key_pub or host.host_key_pub).split()[:2])
    return f"{host.known_hosts_name} {key}\n"


def run_echo(conn, text="hi"):
    return conn.run(f"echo {text}", hide=True).stdout.strip()


def test_openssh_client_works(sshd):
    out = subprocess.run(
        ["ssh", "-F", sshd.ssh_config, "host1", "echo hi"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hi"


# --- the OpenSSH client for worker streams ----------------------------------


def test_openssh_client_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("QJAMFAB_SSH_CLIENT", raising=False)
    assert openssh.openssh_client() == shutil.which("ssh")
    assert openssh.openssh_client("paramiko") is None
    monkeypatch.setenv("QJAMFAB_SSH_CLIENT", "paramiko")
    assert openssh.openssh_client() is None
    assert openssh.openssh_client("openssh") == shutil.which("ssh")
    with pytest.raises(
        BadHostSpec,
        match=r"^ssh client 'putty' is not a "
        r"choice: use openssh, paramiko or auto",
    ):
        openssh.openssh_client("putty")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh there
    assert openssh.openssh_client("auto") is None
    with pytest.raises(
        BadHostSpec,
        match=r"^the openssh client was asked "
        r"for, but no ssh is on PATH: install openssh-client",
    ):
        openssh.openssh_client("openssh")


def test_openssh_command_names_user_port_and_config(monkeypatch):
    spec = parse_hosts("ann@10.1.2.3:2222")[0]
    argv = openssh.openssh_command(
        "/usr/bin/ssh", spec, "python3 -c x", ssh_config="/cfg"
    )
    assert argv[:3] == ["/usr/bin/ssh", "-F", "/cfg"]
    assert "BatchMode=yes" in argv
    assert argv[-7:] == ["-l", "ann", "-p", "2222", "--", "10.1.2.3", "python3 -c x"]
    monkeypatch.setenv("QJAMFAB_USER", "bob")
    argv = openssh.openssh_command("ssh", parse_hosts("alias")[0], "cmd")
    assert "-F" not in argv and argv[-5:] == ["-l", "bob", "--", "alias", "cmd"]


def test_connect_alias(sshd):
    conn = connect(parse_hosts("host1")[0], ssh_config=sshd.ssh_config)
    try:
        assert run_echo(conn) == "hi"
        assert conn.host == "127.0.0.2" and conn.port == sshd["host1"].port
        assert conn.user == sshd.user
        # keepalive set (default 15 s)
        assert conn.transport.packetizer._Packetizer__keepalive_interval == 15
    finally:
        conn.close()


def test_connect_string_and_env_config(sshd, monkeypatch):
    monkeypatch.setenv("QJAMFAB_SSH_CONFIG", sshd.ssh_config)
    conn = connect("host2")
    try:
        assert run_echo(conn, "x") == "x"
    finally:
        conn.close()


def test_user_at_address_port_form(sshd):
    h = sshd["host2"]
    spec = parse_hosts(f"{sshd.user}@{h.address}:{h.port}")[0]
    conn = connect(spec, ssh_config=sshd.ssh_config)
    try:
        assert run_echo(conn) == "hi"
        assert (conn.host, conn.port) == (h.address, h.port)
    finally:
        conn.close()


def test_each_host_has_its_own_home(sshd):
    seen = {}
    for alias in sshd.aliases:
        conn = connect(alias, ssh_config=sshd.ssh_config)
        try:
            seen[alias] = conn.run("echo $QJAMFAB_HOME", hide=True).stdout.strip()
        finally:
            conn.close()
    assert seen == sshd.homes
    assert len(set(seen.values())) == len(seen)


def test_server_alive_interval_and_connect_timeout(sshd, tmp_path):
    cfg = write_config(
        tmp_path / "cfg",
        sshd,
        extra="Host host1\n    ServerAliveInterval 7\n    ConnectTimeout 3\n",
    )
    conn = connect("host1", ssh_config=cfg, connect_timeout=20)
    try:
        assert conn.transport.packetizer._Packetizer__keepalive_interval == 7
        assert conn.connect_timeout == 3
    finally:
        conn.close()


def test_proxyjump(sshd, tmp_path):
    cfg = write_config(
        tmp_path / "cfg", sshd, extra="Host host3\n    ProxyJump host1\n"
    )
    conn = connect("host3", ssh_config=cfg)
    try:
        assert (
            conn.run("echo $QJAMFAB_HOME", hide=True).stdout.strip()
            == sshd.homes["host3"]
        )
        assert conn.gateway.is_connected
    finally:
        conn.close()
    assert not conn.gateway.is_connected  # close() closes the jump host


def test_proxyjump_checks_jump_host_key(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(known_line(sshd["host3"]))  # host1 unknown
    cfg = write_config(
        tmp_path / "cfg",
        sshd,
        known_hosts=kh,
        extra="Host host3\n    ProxyJump host1\n",
    )
    with pytest.raises(HostKeyError) as info:
        connect("host3", ssh_config=cfg)
    first = str(info.value).splitlines()[0]
    assert first.startswith("host3")
    assert "jump host 127.0.0.2" in first and "not in known_hosts" in first


# --- host keys -------------------------------------------------------------


def test_unknown_host_refused_by_default(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh)  # strict unset
    h = sshd["host1"]
    with pytest.raises(HostKeyError) as info:
        connect("host1", ssh_config=cfg)
    err = info.value
    first = str(err).splitlines()[0]
    assert err.host == "host1" and first.startswith("host1:")
    assert "not in known_hosts" in first
    assert f"ssh-keyscan -p {h.port} {h.address} >> {kh}" in first
    assert "accept-new" in first
    assert "SHA256:" in first
    assert kh.read_text() == ""


def test_the_known_hosts_hint_makes_a_missing_folder_first(sshd, tmp_path):
    kh = tmp_path / "no-such-dir" / "known_hosts"
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh)
    h = sshd["host1"]
    with pytest.raises(HostKeyError) as info:
        connect("host1", ssh_config=cfg)
    assert (
        f"run `mkdir -m 700 -p {kh.parent} && ssh-keyscan -p {h.port} "
        f"{h.address} >> {kh}`"
    ) in str(info.value).splitlines()[0]


def test_unknown_host_refused_with_yes(sshd, tmp_path):
    kh = tmp_path / "known_hosts"  # does not even exist
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh, strict="yes")
    with pytest.raises(HostKeyError, match="not in known_hosts"):
        connect("host2", ssh_config=cfg)
    assert not kh.exists()


def test_accept_new_saves_key(sshd, tmp_path):
    kh = tmp_path / "sub" / "known_hosts"
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh, strict="accept-new")
    conn = connect("host1", ssh_config=cfg)
    try:
        assert run_echo(conn) == "hi"
    finally:
        conn.close()
    assert kh.read_text() == known_line(sshd["host1"])
    assert (os.stat(kh).st_mode & 0o777) == 0o600
    # now known: works with strict checking, and nothing more is appended
    cfg2 = write_config(tmp_path / "cfg2", sshd, known_hosts=kh, strict="yes")
    conn = connect("host1", ssh_config=cfg2)
    try:
        assert run_echo(conn) == "hi"
    finally:
        conn.close()
    assert kh.read_text() == known_line(sshd["host1"])


def test_accept_new_hashed(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("# comment\n" + known_line(sshd["host2"]).rstrip("\n"))
    cfg = write_config(
        tmp_path / "cfg",
        sshd,
        known_hosts=kh,
        strict="accept-new",
        extra="Host *\n    HashKnownHosts yes\n",
    )
    connect("host1", ssh_config=cfg).close()
    lines = kh.read_text().splitlines()
    assert lines[:2] == ["# comment", known_line(sshd["host2"]).strip()]
    assert lines[2].startswith("|1|") and "127.0.0.2" not in lines[2]
    cfg2 = write_config(tmp_path / "cfg2", sshd, known_hosts=kh, strict="yes")
    connect("host1", ssh_config=cfg2).close()


def test_a_host_known_by_one_of_its_keys_is_checked_by_that_one(tmp_path):
    """A host known only by (say) its RSA key gets RSA host-key algorithms
    first (as with OpenSSH), so its ed25519 key, which paramiko would ask
    for first, does not get it refused as changed."""
    require_sshd()
    rsa = tmp_path / "ssh_host_rsa_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    rsa_pub = (tmp_path / "ssh_host_rsa_key.pub").read_text()
    two_keys = SshdHosts(1, sshd_options=[f"HostKey {rsa}"])
    try:
        host = two_keys["host1"]
        for known, key_type in [(rsa_pub, "ssh-rsa"), (None, "ssh-ed25519")]:
            kh = tmp_path / f"known_hosts-{key_type}"
            kh.write_text(known_line(host, known))
            cfg = write_config(
                tmp_path / f"cfg-{key_type}", two_keys, known_hosts=kh, strict="yes"
            )
            conn = connect("host1", ssh_config=cfg)
            try:
                assert run_echo(conn) == "hi"
                assert conn.transport.get_remote_server_key().get_name() == key_type
            finally:
                conn.close()
    finally:
        two_keys.stop()


def test_strict_no_accepts_without_saving(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh, strict="no")
    conn = connect("host3", ssh_config=cfg)
    try:
        assert run_echo(conn) == "hi"
    finally:
        conn.close()
    assert kh.read_text() == ""


@pytest.mark.parametrize("strict", [None, "accept-new", "no"])
def test_changed_key_refused(sshd, tmp_path, strict):
    kh = tmp_path / "known_hosts"
    # host1's name with host2's key: a changed key
    kh.write_text(
        "# first line\n" + known_line(sshd["host1"], sshd["host2"].host_key_pub)
    )
    before = kh.read_text()
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh, strict=strict)
    with pytest.raises(HostKeyError) as info:
        connect("host1", ssh_config=cfg)
    first = str(info.value).splitlines()[0]
    assert first.startswith("host1:")
    assert "CHANGED" in first and "man-in-the-middle" in first
    assert f"{kh}:2" in first and "ssh-keygen -R" in first
    assert info.value.host == "host1"
    assert kh.read_text() == before


def test_known_by_hashed_and_wildcard_entries(sshd, tmp_path):
    h = sshd["host1"]
    key = " ".join(h.host_key_pub.split()[:2])
    hashed = paramiko.HostKeys.hash_host(h.known_hosts_name)
    kh = tmp_path / "known_hosts"
    kh.write_text(
        f"{hashed} {key}\n[127.0.0.3]:* "
        + " ".join(sshd["host2"].host_key_pub.split()[:2])
        + "\n"
    )
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh, strict="yes")
    connect("host1", ssh_config=cfg).close()
    connect("host2", ssh_config=cfg).close()


def test_revoked_key_refused(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(
        "@revoked * "
        + " ".join(sshd["host1"].host_key_pub.split()[:2])
        + "\n"
        + known_line(sshd["host1"])
    )
    cfg = write_config(tmp_path / "cfg", sshd, known_hosts=kh, strict="no")
    with pytest.raises(HostKeyError, match="revoked"):
        connect("host1", ssh_config=cfg)


# --- unreachable and auth failures -----------------------------------------


def free_port(address):
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.mark.timeout(30)
def test_down_host_fails_fast(sshd):
    port = free_port("127.0.0.9")
    spec = parse_hosts(f"{sshd.user}@127.0.0.9:{port}")[0]
    # Refused at once: a wait for the connect timeout would outlast the
    # test's own timeout.
    with pytest.raises(HostUnreachable) as info:
        connect(spec, ssh_config=sshd.ssh_config, connect_timeout=120)
    first = str(info.value).splitlines()[0]
    assert first.startswith(spec.raw) and "refused" in first
    assert info.value.host == spec.raw


def test_stopped_host_times_out(sshd):
    h = sshd["host3"]
    h.pause()
    try:
        with pytest.raises(HostUnreachable) as info:
            connect("host3", ssh_config=sshd.ssh_config, connect_timeout=1)
    finally:
        h.resume()
    first = str(info.value).splitlines()[0]
    assert first.startswith("host3") and "timed out" in first
    connect("host3", ssh_config=sshd.ssh_config).close()  # back


def test_killed_host_then_restarted(sshd):
    h = sshd["host3"]
    conn = connect("host3", ssh_config=sshd.ssh_config)
    h.kill()
    try:
        assert not h.running
        with pytest.raises(HostUnreachable, match="refused"):
            connect("host3", ssh_config=sshd.ssh_config)
    finally:
        conn.close()
        h.start()
    conn = connect("host3", ssh_config=sshd.ssh_config)
    try:
        assert run_echo(conn) == "hi"
    finally:
        conn.close()


def test_wrong_user(sshd):
    with pytest.raises(AuthenticationFailed) as info:
        connect("nosuchuser@host1", ssh_config=sshd.ssh_config)
    first = str(info.value).splitlines()[0]
    assert first.startswith("nosuchuser@host1:")
    assert "'nosuchuser'" in first and "ssh-copy-id" in first
    assert "QJAMFAB_USER" in first and "IdentityFile" in first


@pytest.mark.parametrize("var", ["QJAMFAB_USER", "QJAM_USER"])
def test_env_user_beats_ssh_config(sshd, monkeypatch, var):
    monkeypatch.setenv(var, "nosuchuser")
    with pytest.raises(AuthenticationFailed, match="'nosuchuser'") as info:
        connect("host1", ssh_config=sshd.ssh_config)
    # The advice names the variable the user came from.
    assert f"(user@host, {var} or User in ssh_config)" in str(info.value)
    # but user@ in the spec beats the environment
    conn = connect(f"{sshd.user}@host1", ssh_config=sshd.ssh_config)
    conn.close()


def test_env_setting_says_which_variable_it_came_from(monkeypatch):
    from qjamfab.hostspec import env_setting

    assert env_setting("USER") == (None, "QJAMFAB_USER")
    monkeypatch.setenv("QJAM_USER", "ann")
    assert env_setting("USER") == ("ann", "QJAM_USER")
    monkeypatch.setenv("QJAMFAB_USER", "")  # empty counts as unset
    assert env_setting("USER") == ("ann", "QJAM_USER")
    monkeypatch.setenv("QJAMFAB_USER", "bob")
    assert env_setting("USER") == ("bob", "QJAMFAB_USER")


def test_qjamfab_user_beats_qjam_user(sshd, monkeypatch):
    monkeypatch.setenv("QJAM_USER", "nosuchuser")
    monkeypatch.setenv("QJAMFAB_USER", sshd.user)
    connect("host2", ssh_config=sshd.ssh_config).close()


def test_wrong_key(sshd, tmp_path):
    key = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        timeout=30,
    )
    cfg = write_config(tmp_path / "cfg", sshd, identity=key)
    with pytest.raises(AuthenticationFailed) as info:
        connect("host2", ssh_config=cfg)
    assert str(info.value).startswith("host2: SSH authentication failed")


def test_missing_identity_file_is_skipped(sshd, tmp_path):
    cfg = write_config(
        tmp_path / "cfg", sshd, extra=f"Host host1\n    IdentityFile {tmp_path}/nope\n"
    )
    connect("host1", ssh_config=cfg).close()


def test_errors_are_host_errors(sshd, tmp_path):
    """No paramiko or socket exception escapes connect()."""
    port = free_port("127.0.0.9")
    for spec in (f"127.0.0.9:{port}", "nosuchuser@host1"):
        with pytest.raises(HostError) as info:
            connect(spec, ssh_config=sshd.ssh_config)
        assert not isinstance(info.value, (paramiko.SSHException, OSError))


# --- the SshdHosts fixture itself --------------------------------------------


def test_kill_sshd_keeps_open_connections(sshd):
    h = sshd["host2"]
    conn = connect("host2", ssh_config=sshd.ssh_config)
    try:
        h.kill_sshd()
        assert not h.running
        assert run_echo(conn, "still") == "still"
        with pytest.raises(HostUnreachable, match="refused"):
            connect("host2", ssh_config=sshd.ssh_config)
    finally:
        conn.close()
        h.stop()
        h.start()
    connect("host2", ssh_config=sshd.ssh_config).close()


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_stop_ends_detached_daemons(tmp_path):
    require_sshd()
    with SshdHosts(1) as hosts:
        conn = connect("host1", ssh_config=hosts.ssh_config)
        try:
            # a daemon that detaches (new session, parent exits) and
            # drops QJAMFAB_HOME from its environment
            conn.run(
                "setsid env -u QJAMFAB_HOME sleep 300 </dev/null >/dev/null 2>&1 &",
                hide=True,
            )
            deadline = time.monotonic() + 5
            sleepers = []
            while not sleepers and time.monotonic() < deadline:
                sleepers = [
                    p
                    for p in hosts["host1"].processes()
                    if cmdline(p).startswith(b"sleep\x00300\x00")
                ]
                time.sleep(0.05)
            assert sleepers, "detached sleep not found in the host's tree"
        finally:
            conn.close()
    assert not any(_alive(p) for p in sleepers)
    assert not os.path.exists(hosts.dir)


# --- per-host settings -------------------------------------------------------


def test_an_entry_may_carry_its_own_settings(tmp_path):
    gpu, local = parse_hosts(
        [
            "u@gpu1:2222 workers=4 python=/opt/py/bin/python"
            " env.CUDA_VISIBLE_DEVICES={worker} env.X=1",
            "local:2 env.A=b",
        ]
    )
    assert (gpu.raw, gpu.workers, gpu.python) == (
        "u@gpu1:2222",
        4,
        "/opt/py/bin/python",
    )
    assert gpu.worker_env(3) == {"CUDA_VISIBLE_DEVICES": "3", "X": "1"}
    assert (local.workers, local.worker_env(0)) == (2, {"A": "b"})
    path = tmp_path / "hosts"
    path.write_text("# lab\n\nhost1 workers=8  # big\nhost2\n")
    assert [(s.raw, s.workers) for s in parse_hosts(f"@{path}")] == [
        ("host1", 8),
        ("host2", None),
    ]


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            "gpu workers=0",
            "host gpu: workers='0' is not a positive number of "
            "workers: write e.g. workers=8",
        ),
        (
            "gpu cores=2",
            "host gpu: unknown setting 'cores=2': use workers=N, "
            "python=PATH or env.NAME=VALUE",
        ),
        ("local python=/x", "host local: python= is for SSH hosts"),
        (
            "@/nonexistent/hosts",
            "cannot read hosts file '/nonexistent/hosts' "
            "(No such file or directory): fix the path",
        ),
    ],
)
def test_bad_settings_are_named(entry, message):
    with pytest.raises(BadHostSpec) as info:
        parse_hosts(entry)
    assert str(info.value).startswith(message)


def test_hosts_that_cannot_serve_make_one_error_with_a_line_each():
    lone = HostUnreachable("a: refused\nmore detail", host="a")
    assert engines.cannot_serve([("a", lone)]) is lone
    error = engines.cannot_serve(
        [
            ("a", lone),
            ("b", AuthenticationFailed("b: SSH authentication failed\npara")),
        ]
    )
    assert type(error) is HostError
    assert str(error).splitlines() == [
        "2 hosts cannot serve: fix each as its line says (or leave it out) and retry",
        "  a: refused",
        "  b: SSH authentication failed",
    ]
    mixed = engines.cannot_serve(
        [("a", lone), ("c", WorkerLost("c did not start (exit status 1): boom"))]
    )
    assert type(mixed) is QjamfabError
    assert str(mixed).splitlines()[2] == "  c: c did not start (exit status 1): boom"


def test_a_host_of_another_python_minor_version_is_refused(monkeypatch):
    """One check for a host's probe, its agent and a Dask worker: the first
    line names both versions, why it matters and what to set."""
    import sys

    from qjamfab.errors import PreflightFailed
    from qjamfab.hostspec import python_mismatch

    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    same = {"python": [*sys.version_info[:2], 99], "executable": "/x/python3"}
    assert python_mismatch("h1", same, "h1") is None
    monkeypatch.setenv("QJAM_REMOTE_PYTHON", "python3")
    other = {"python": [3, 1, 4], "executable": "/x/python3"}
    problem = python_mismatch("h1", other, "h1")
    assert isinstance(problem, PreflightFailed) and problem.host == "h1"
    assert str(problem) == (
        f"h1 runs Python 3.1.4 (/x/python3), the master {ours}: cloudpickle "
        f"needs the same minor version; set QJAM_REMOTE_PYTHON to a "
        f"python{ours} there"
    )
    problem = python_mismatch(
        "Dask worker tcp://w:1", {"python": [3, 1, 4]}, "tcp://w:1", "use a {python}"
    )
    assert str(problem) == (
        f"Dask worker tcp://w:1 runs Python 3.1.4, the master {ours}: "
        f"cloudpickle needs the same minor version; use a python{ours}"
    )
