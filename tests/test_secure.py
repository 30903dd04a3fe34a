"""The base directory and what qjamfab makes under it are ours: a directory
another user owns, can write to, or can re-point (a symlink of theirs) is
refused before anything is run from it or stored in it, with a first line
naming the path, its owner and mode, and what to do."""

import json
import os
import pwd
import shutil
import subprocess
import sys

import pytest

from qjamfab import runtime
from qjamfab.runtime import InsecureDirectory, probe, secure_dir
from qjamfab.runtime import packages as runtime_packages
from qjamfab.runtime.cache import RefCache

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADVICE = "remove it or set QJAMFAB_HOME to a directory of your own"


@pytest.fixture(scope="session")
def other_user():
    """A second local user (uid), made for this session and removed at its
    end; only root can do that."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to make a second user")
    name = f"qjamtest{os.getpid()}"
    subprocess.run(
        ["useradd", "-M", "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _me() -> str:
    return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"


def test_a_fresh_base_is_made_0700_all_the_way_and_passes(tmp_path):
    base = tmp_path / "a" / "b" / "base"
    runtime.ensure_local_bundle(str(base))
    for path in (tmp_path / "a", tmp_path / "a" / "b", base, base / "runtime"):
        assert os.stat(path).st_mode & 0o777 == 0o700, path
    secure_dir(str(base), create=False)  # and again, as found


def test_a_base_anyone_can_write_to_is_refused(tmp_path):
    base = tmp_path / "shared"
    base.mkdir()
    base.chmod(0o777)
    with pytest.raises(InsecureDirectory) as info:
        runtime.ensure_local_bundle(str(base))
    assert _first_line(info.value) == (
        f"{base} (owner {_me()}) has mode 0777: its group and other users "
        f"can plant code or data in it; run chmod 700 {base} or set "
        "QJAMFAB_HOME to a directory of your own"
    )
    assert not (base / "runtime").exists()  # nothing written there


def test_a_group_writable_subdirectory_is_refused(tmp_path):
    base = tmp_path / "base"
    secure_dir(str(base))
    (base / "cache").mkdir(mode=0o700)
    (base / "cache").chmod(0o770)
    with pytest.raises(
        InsecureDirectory,
        match=r"^\S+/cache \(owner .*\) "
        r"has mode 0770: its group can plant",
    ):
        RefCache(str(base / "cache"))


def test_a_base_owned_by_another_user_is_refused(tmp_path, other_user):
    base = tmp_path / "theirs"
    base.mkdir(mode=0o700)
    os.chown(base, other_user, -1)
    name = pwd.getpwuid(other_user).pw_name
    with pytest.raises(InsecureDirectory) as info:
        runtime.ensure_local_bundle(str(base))
    assert _first_line(info.value) == (
        f"{base} is owned by {name} (uid {other_user}), mode 0700, not by "
        f"you: it could hold code or data that is not yours; {ADVICE}"
    )


def test_a_symlink_to_another_users_directory_is_refused(tmp_path, other_user):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, other_user, -1)
    link = tmp_path / "base"
    link.symlink_to(theirs)
    name = pwd.getpwuid(other_user).pw_name
    with pytest.raises(InsecureDirectory) as info:
        secure_dir(str(link))
    assert _first_line(info.value) == (
        f"{link} (a symlink to {theirs}) is owned by {name} (uid "
        f"{other_user}), mode 0700, not by you: it could hold code or data "
        f"that is not yours; {ADVICE}"
    )


def test_a_symlink_another_user_owns_is_refused_even_to_our_directory(
    tmp_path, other_user
):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "base"
    link.symlink_to(mine)
    os.lchown(link, other_user, -1)  # they could point it elsewhere later
    with pytest.raises(InsecureDirectory) as info:
        secure_dir(str(link / "cache"))
    assert _first_line(info.value) == (
        f"{link} is a symlink (to {mine}) owned by "
        f"{pwd.getpwuid(other_user).pw_name} (uid {other_user}), who can "
        f"point it elsewhere: {ADVICE}"
    )


def test_our_own_symlink_to_our_own_directory_is_accepted(tmp_path):
    mine = tmp_path / "bigdisk"
    mine.mkdir(mode=0o700)
    link = tmp_path / "base"
    link.symlink_to(mine)
    runtime.ensure_local_bundle(str(link))
    assert (mine / "runtime").is_dir()


def test_a_parent_others_can_write_to_without_sticky_bit_is_refused(tmp_path):
    lab = tmp_path / "lab"
    lab.mkdir()
    lab.chmod(0o777)  # /tmp is 1777: its sticky bit makes it fine
    with pytest.raises(InsecureDirectory) as info:
        secure_dir(str(lab / "me" / "qjamfab"))
    assert _first_line(info.value) == (
        f"{lab}, a parent of {lab}/me/qjamfab, has mode 0777 (owner {_me()}) "
        "and no sticky bit: its group and other users can replace what is "
        "under it; set QJAMFAB_HOME to a directory whose parents only you or "
        "root can write to"
    )
    assert os.listdir(lab) == []  # refused before making me/qjamfab there
    lab.chmod(0o1777)
    secure_dir(str(lab / "me" / "qjamfab"))


def test_a_parent_another_user_owns_is_refused(tmp_path, other_user):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    (theirs / "me").mkdir(mode=0o700)  # ours, inside their directory
    os.chown(theirs, other_user, -1)
    with pytest.raises(InsecureDirectory) as info:
        secure_dir(str(theirs / "me"))
    assert _first_line(info.value) == (
        f"{theirs}, a parent of {theirs}/me, is owned by "
        f"{pwd.getpwuid(other_user).pw_name} (uid {other_user}), mode 0755: "
        "they can replace what is under it; set QJAMFAB_HOME to a directory "
        "whose parents only you or root can write to"
    )


def test_a_planted_symlink_for_the_cache_is_refused(tmp_path, other_user):
    base = tmp_path / "base"
    secure_dir(str(base))
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, other_user, -1)
    (base / "cache").symlink_to(theirs)
    with pytest.raises(
        InsecureDirectory,
        match=(rf"^{base}/cache \(a symlink to {theirs}\) is owned by "),
    ):
        RefCache(str(base / "cache"))


def test_the_probe_reports_an_insecure_base_and_writes_nothing(tmp_path, monkeypatch):
    base = tmp_path / "shared"
    base.mkdir()
    base.chmod(0o757)
    monkeypatch.setenv("QJAMFAB_HOME", str(base))
    # As the master runs it: its source alone, with `python -c`.
    with open(probe.__file__) as f:
        source = f.read()
    out = subprocess.run(
        [sys.executable, "-I", "-c", source, "abc"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert report["insecure"].startswith(
        f"{base} (owner {_me()}) has mode 0757: other users can plant code"
    )
    assert report["writable"] is False and os.listdir(base) == []
    base.chmod(0o700)
    report = json.loads(
        subprocess.run(
            [sys.executable, "-I", "-c", source, "abc"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert report["insecure"] == "" and report["writable"] is True
    assert sorted(os.listdir(base)) == ["cache", "runtime"]
    assert all(os.stat(base / d).st_mode & 0o777 == 0o700 for d in os.listdir(base))
    # Sockets, pid files and logs: on the host, not in the (shared) base.
    assert report["host_dir"] == probe.host_dir(str(base))
    assert os.stat(report["host_dir"]).st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "module, argv", [("worker", ["--name", "w", "--pipe"]), ("manage", ["status"])]
)
def test_worker_and_manage_refuse_an_insecure_base_in_one_line(tmp_path, module, argv):
    base = tmp_path / "shared"
    base.mkdir()
    base.chmod(0o777)
    env = {**os.environ, "QJAMFAB_HOME": str(base), "PYTHONPATH": ROOT}
    code = (
        f"import sys; sys.argv[1:] = {argv!r}; "
        f"from qjamfab.runtime.{module} import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[0].startswith(
        f"{base} (owner {_me()}) has mode 0777: its group and other users"
    )
    assert os.listdir(base) == []


def test_a_runtime_changed_after_it_was_installed_does_not_run(qjamfab_home):
    """The bundle is checked against its hash before it runs: a file
    planted or changed in it stops the worker, saying what to do."""
    from qjamfab import Master, WorkerLost, runtime

    base = str(qjamfab_home)
    runtime.ensure_local_bundle(base)
    planted = os.path.join(
        base, "runtime", runtime.bundle_hash(), "qjamfab", "runtime", "worker.py"
    )
    with open(planted, "a") as f:
        f.write("\nimport os; os.system('echo owned')\n")
    with pytest.raises(WorkerLost) as info:
        Master("local:1")
    first = str(info.value).splitlines()[0]
    bundle = os.path.join(base, "runtime", runtime.bundle_hash())
    assert first.startswith(
        "worker local-0 did not start (exit status 1): "
        f"qjamfab: the runtime is not what was installed at {bundle}: "
        "remove that directory"
    )


# --- nothing written before the refusal, on every path that writes -----------


def _everything_under(path: str) -> list[str]:
    return [os.path.join(r, n) for r, ds, fs in os.walk(path) for n in ds + fs]


def _theirs(path, uid: int) -> None:
    """A directory anyone can write to, owned by user `uid`."""
    os.mkdir(path)
    os.chmod(path, 0o777)
    os.chown(path, uid, -1)


def _untrusted(request, layout: str, home: str, spare: str) -> tuple[str, str]:
    """Make `home` (absent) one of the layouts another user controls; `spare`
    is a free path beside it. The directory to watch (nothing may appear in
    it) and the first line of the refusal."""
    if layout == "parent":  # 0777 without the sticky bit, above the base
        lab = os.path.dirname(home)
        os.chmod(lab, 0o777)
        request.addfinalizer(lambda: os.chmod(lab, 0o700))
        return lab, (
            f"{lab}, a parent of {home}, has mode 0777 (owner {_me()}) and no "
            "sticky bit: its group and other users can replace what is under "
            "it; set QJAMFAB_HOME to a directory whose parents only you or root "
            "can write to"
        )
    uid = request.getfixturevalue("other_user")
    owner = f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    not_yours = (
        f"is owned by {owner}, mode 0777, not by you: it could hold code or "
        f"data that is not yours; {ADVICE}"
    )
    if layout == "theirs":
        _theirs(home, uid)
        request.addfinalizer(lambda: shutil.rmtree(home))
        return home, f"{home} {not_yours}"
    _theirs(spare, uid)
    os.symlink(spare, home)
    request.addfinalizer(lambda: (os.unlink(home), shutil.rmtree(spare)))
    return spare, f"{home} (a symlink to {spare}) {not_yours}"


LAYOUTS = ["theirs", "symlink", "parent"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_local_master_writes_nothing_where_another_user_can(
    request, tmp_path, monkeypatch, layout
):
    from qjamfab import Master, PreflightFailed

    (tmp_path / "lab").mkdir(mode=0o700)
    home = str(tmp_path / "lab" / "qjamfab")
    watched, line = _untrusted(request, layout, home, str(tmp_path / "lab" / "spare"))
    monkeypatch.setenv("QJAMFAB_HOME", home)
    with pytest.raises(PreflightFailed) as info:
        Master("local:2")
    assert _first_line(info.value) == line
    assert _everything_under(watched) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_ssh_host_gets_nothing_written_where_another_user_can(request, ssh, layout):
    """The agent's boot code checks before it installs the runtime, and
    inv bootstrap's preflight before it uploads anything."""
    from qjamfab import Master, QjamfabError, hostspec
    from qjamfab.engines import cluster

    host = ssh["host1"]  # its sshd sets QJAMFAB_HOME=host.home
    watched, line = _untrusted(
        request, layout, host.home, os.path.join(host.dir, "spare")
    )
    before = _everything_under(watched)
    with pytest.raises(QjamfabError) as info:
        Master(["host1"], workers_per_host=2, ssh_config=ssh.ssh_config)
    assert _first_line(info.value) == (f"host1 did not start (exit status 1): {line}")
    assert _everything_under(watched) == before
    [result] = cluster.bootstrap(
        hostspec.parse_hosts(["host1"]), ssh_config=ssh.ssh_config
    )
    assert not result.ok and _first_line(result.error) == f"host1: {line}"
    assert _everything_under(watched) == before
    assert layout != "parent" or not os.path.lexists(host.home)


@pytest.mark.parametrize(
    "writer",
    [
        lambda base: runtime.ensure_local_bundle(base),
        lambda base: RefCache(os.path.join(base, "cache")),
        lambda base: runtime_packages.answer_offer(base, []),
    ],
    ids=["runtime", "cache", "packages"],
)
def test_no_writer_makes_a_directory_under_a_parent_others_can_write_to(
    tmp_path, writer
):
    lab = tmp_path / "lab"
    lab.mkdir()
    lab.chmod(0o777)
    with pytest.raises(InsecureDirectory, match=rf"^{lab}, a parent of "):
        writer(str(lab / "me" / "qjamfab"))
    assert os.listdir(lab) == []


def test_host_state_is_in_the_runtime_dir_else_under_tmp(tmp_path, monkeypatch):
    base = str(tmp_path / "base")
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    here = probe.host_dir(base)
    assert os.path.dirname(here) == str(xdg / "qjamfab")
    assert probe.host_dir(str(tmp_path / "other")) != here  # one per base
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "absent"))
    assert os.path.dirname(probe.host_dir(base)) == f"/tmp/qjamfab-{os.geteuid()}"
    if os.geteuid() == 0:  # another user's, as sudo leaves it
        os.chown(xdg, 65534, 65534)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        assert probe.host_dir(base) == f"/tmp/qjamfab-0/{os.path.basename(here)}"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert os.path.dirname(probe.host_dir(base)) == f"/tmp/qjamfab-{os.geteuid()}"


def test_a_host_dir_others_can_write_to_is_refused(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    (xdg / "qjamfab").mkdir(parents=True)
    (xdg / "qjamfab").chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    with pytest.raises(InsecureDirectory) as refused:
        probe.secure_host_dir(str(tmp_path / "base"))
    assert str(refused.value) == (
        f"{xdg}/qjamfab, a parent of {probe.host_dir(str(tmp_path / 'base'))}, "
        f"has mode 0777 (owner {_me()}) and no sticky bit: its group and other "
        "users can replace what is under it; set XDG_RUNTIME_DIR to a directory "
        "whose parents only you or root can write to"
    )


def test_a_host_dir_on_a_network_filesystem_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(probe, "fs_type", lambda path: "nfs4")
    with pytest.raises(OSError) as refused:
        probe.secure_host_dir(str(tmp_path / "base"))
    assert str(refused.value) == (
        f"{probe.host_dir(str(tmp_path / 'base'))}, where qjamfab keeps this "
        "host's sockets and pid files, is on a network filesystem (nfs4) that "
        "other machines may share: set XDG_RUNTIME_DIR to a directory on a "
        "local disk"
    )


def test_the_filesystem_type_comes_from_the_mount_table(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "40 22 0:35 / /qjhome rw,relatime shared:1 - nfs4 srv:/home rw,vers=4.2\n"
        "41 40 0:36 / /qjhome/a\\040b rw - tmpfs tmpfs rw\n"
        "42 22 0:37 / /qjhome rw - fuse.sshfs srv:/ rw\n"  # mounted over it
    )
    table = str(mountinfo)
    assert probe.fs_type("/qjhome/me/.cache", table) == "fuse.sshfs"
    assert probe.fs_type("/qjhome/a b/x", table) == "tmpfs"
    assert probe.fs_type("/qjhomework", table) == "ext4"
    assert probe.fs_type("/", table) == "ext4"
    assert probe.fs_type("/", str(tmp_path / "none")) is None
    assert "fuse.sshfs" in probe.NETWORK_FS and "ext4" not in probe.NETWORK_FS
