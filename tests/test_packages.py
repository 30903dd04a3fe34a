"""Shipping the master's distributions to hosts that lack them
(`Master(packages=...)`, `inv bootstrap --packages`): the zips and their
hashes, installing on the host, the platform check, bad names; over SSH a
bare venv running numpy with packages=["numpy"], the cache a second session
and bootstrap share, clear-cache keeping it, status showing it."""

import io
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter

import numpy as np
import pytest

from qjamfab import BadPackage, DataSet, Master, PreflightFailed, hostspec, protocol
from qjamfab.engines import cluster
from qjamfab.links import packages as shipping
from qjamfab.runtime import packages as host_packages
from qjamfab.runtime.probe import platform_info, secure_host_dir
from tests.test_tasks import cli, describe

pytestmark = pytest.mark.timeout(60)

NUMPY = np.__version__


def _pure():
    """A small pure-Python distribution every test run has (pytest's)."""
    return shipping.resolve(["pluggy"])[0]


# --- resolving and zipping ------------------------------------------------------


def test_a_distribution_is_its_files_named_by_their_hash():
    (numpy,) = shipping.resolve(["numpy"])
    assert (numpy.name, numpy.version) == ("numpy", NUMPY)
    assert "numpy/__init__.py" in numpy.files
    assert any(f.endswith(".dist-info/METADATA") for f in numpy.files)
    assert not [f for f in numpy.files if "__pycache__" in f or f.startswith("..")]
    assert numpy.native and numpy.libc == "glibc" and numpy.glibc
    with zipfile.ZipFile(io.BytesIO(numpy.zip())) as z:
        assert sorted(z.namelist()) == sorted(numpy.files)
        entries = [(n, z.read(n)) for n in z.namelist()]
    assert host_packages.content_hash(entries) == numpy.hash
    assert host_packages.content_hash(reversed(entries)) == numpy.hash
    # The same files, the same name; a name once in any spelling.
    assert shipping.resolve("numpy")[0].hash == numpy.hash
    assert [d.name for d in shipping.resolve(["numpy", "NumPy"])] == ["numpy"]
    assert shipping.resolve(None) == []


def test_a_pure_distribution_has_no_platform():
    pure = _pure()
    assert not pure.native and pure.libc is None
    odd = {"platform": "darwin", "machine": "arm64", "ext_suffixes": [], "libc": None}
    assert shipping.platform_problem(pure, odd) is None


def test_a_zip_whose_files_changed_since_resolving_is_refused(monkeypatch):
    pure = _pure()
    changed = shipping.Distribution(**{**pure.__dict__, "hash": "0" * 16})
    with pytest.raises(
        BadPackage,
        match=r"^the files of pluggy .* changed "
        r"since it was resolved \(reinstalled\?\): create the "
        r"Master again",
    ):
        changed.zip()


@pytest.mark.parametrize(
    "names, message",
    [
        (
            ["no-such-dist"],
            r"^no distribution 'no-such-dist' is installed for "
            r"this Python \(.*\): install it here \(pip install "
            r"no-such-dist\) or fix the name in packages=",
        ),
        (
            ["sklearn"],
            r"^'sklearn' is a module of the distribution "
            r"'scikit-learn', not a distribution's name: give "
            r"packages=\['scikit-learn'\]",
        ),
        (
            ["cloudpickle"],
            r"^cloudpickle comes with qjamfab's runtime on every "
            r"host: leave it out of packages=",
        ),
        (
            3,
            r"^packages must be a list of distribution names, like \['numpy', "
            r"'scipy'\], not int 3",
        ),
        ([""], r"^packages= holds '', which is not a distribution name"),
        (
            ["numpy>=2"],
            r"^packages= holds 'numpy>=2', which is not a "
            r"distribution name: give names as pip knows them",
        ),
        ([None], r"^packages= holds None, which is not a distribution name"),
    ],
)
def test_names_that_cannot_be_shipped(names, message):
    if names == ["sklearn"]:
        pytest.importorskip("sklearn")
    with pytest.raises(BadPackage, match=message):
        shipping.resolve(names)


def _fake_distribution(site, name, record=True, editable=False):
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n\n"
    )
    (site / f"{name}.py").write_text("VALUE = 1\n")
    if record:
        (info / "RECORD").write_text(
            f"{name}.py,,\n{name}-1.0.dist-info/METADATA,,\n"
            f"{name}-1.0.dist-info/RECORD,,\n"
        )
    if editable:
        (info / "direct_url.json").write_text(
            json.dumps({"url": "file:///src/x", "dir_info": {"editable": True}})
        )


def test_editable_installs_and_ones_without_a_file_list_are_refused(
    tmp_path, monkeypatch
):
    _fake_distribution(tmp_path, "qjfeditable", editable=True)
    _fake_distribution(tmp_path, "qjfnorecord", record=False)
    _fake_distribution(tmp_path, "qjfplain")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        BadPackage,
        match=r"^qjfeditable is an editable "
        r"install \(from file:///src/x\): qjamfab ships "
        r"installed files only; install it normally",
    ):
        shipping.resolve(["qjfeditable"])
    with pytest.raises(
        BadPackage,
        match=r"^qjfnorecord 1.0 has no list of "
        r"its files \(no RECORD\): .*reinstall it with pip",
    ):
        shipping.resolve(["qjfnorecord"])
    (plain,) = shipping.resolve(["qjfplain"])
    assert sorted(plain.files) == [
        "qjfplain-1.0.dist-info/METADATA",
        "qjfplain-1.0.dist-info/RECORD",
        "qjfplain.py",
    ]


def test_dependencies_only_when_asked():
    pytest.importorskip("scipy")
    assert [d.name for d in shipping.resolve(["scipy"])] == ["scipy"]
    assert shipping.with_dependencies("scipy") == ["scipy", "numpy"]
    with pytest.raises(BadPackage, match=r"^no distribution 'nope'"):
        shipping.with_dependencies("nope")


def test_a_missing_module_suggests_the_distribution_that_has_it():
    assert shipping.suggestion("numpy.linalg") == "packages=['numpy']"
    # scikit-learn needs numpy, scipy, joblib ... there too
    assert (
        shipping.suggestion("sklearn.svm")
        == "packages=with_dependencies('scikit-learn')"
    )
    assert shipping.suggestion("no_such_module_here") is None


# --- the platform check ---------------------------------------------------------


def test_compiled_files_go_only_where_they_load():
    (numpy,) = shipping.resolve(["numpy"])
    here = platform_info()
    assert shipping.platform_problem(numpy, here) is None
    machine = "aarch64" if here["machine"] != "aarch64" else "x86_64"
    cases = {
        "machine": (
            {**here, "machine": machine},
            rf"^its compiled files are for {here['platform']} "
            rf"{here['machine']} and the host is "
            rf"{here['platform']} {machine}$",
        ),
        "os": ({**here, "platform": "darwin"}, r"and the host is darwin"),
        "abi": (
            {**here, "ext_suffixes": [".cpython-311d-x86_64-linux-gnu.so", ".so"]},
            r"^its extension modules end in \.cpython-.*\.so, which the "
            r"host's Python does not load \(it loads ",
        ),
        "old glibc": (
            {**here, "libc": "glibc 2.5"},
            r"^it needs glibc \d+\.\d+ or newer and the host has "
            r"glibc 2\.5$",
        ),
        "musl": (
            {**here, "libc": None},
            r"^it needs glibc .* and the host's C library is not glibc",
        ),
    }
    for name, (host, message) in cases.items():
        problem = shipping.platform_problem(numpy, host)
        assert problem is not None, name
        assert __import__("re").search(message, problem), (name, problem)
    with pytest.raises(
        PreflightFailed,
        match=(
            rf"^hostx cannot use numpy {NUMPY} as this master has it: its "
            r"compiled files are for .*; install numpy for /opt/py on hostx "
            r"itself, or leave it out of packages="
        ),
    ) as caught:
        shipping.check_platform(
            [numpy], {**here, "machine": machine}, "hostx", "/opt/py"
        )
    assert caught.value.host == "hostx"


@pytest.mark.parametrize(
    "tags, needed",
    [
        (
            "Tag: cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64\n",
            ("glibc", (2, 17)),
        ),
        (
            "Tag: cp311-cp311-manylinux_2_27_x86_64\n"
            "Tag: cp311-cp311-manylinux_2_28_x86_64\n",
            ("glibc", (2, 27)),
        ),
        ("Tag: cp311-cp311-manylinux2010_x86_64\n", ("glibc", (2, 12))),
        ("Tag: cp311-cp311-musllinux_1_1_x86_64\n", ("musl", None)),
    ],
)
def test_the_wheel_tags_say_which_c_library(tags, needed):
    assert shipping.libc_needed("Wheel-Version: 1.0\n" + tags) == needed


def test_a_local_build_needs_this_masters_glibc():
    ours = shipping.glibc_version(platform_info()["libc"])
    assert shipping.libc_needed("Tag: cp311-cp311-linux_x86_64\n") == (
        ("glibc", ours) if ours else ("musl", None)
    )


# --- installing on the host -----------------------------------------------------


def _zip_file(tmp_path, dist, data=None):
    path = tmp_path / f"{dist.name}.zip"
    path.write_bytes(dist.zip() if data is None else data)
    return str(path)


def test_install_unpacks_checks_and_renames(tmp_path):
    pure = _pure()
    base = str(tmp_path / "base")
    target = host_packages.install_zip(base, pure.hash, _zip_file(tmp_path, pure))
    assert target == os.path.join(base, "packages", pure.hash)
    assert os.path.isfile(os.path.join(target, "pluggy", "__init__.py"))
    assert oct(os.stat(target).st_mode & 0o777) == "0o700"
    assert host_packages.install_zip(base, pure.hash, "/nonexistent") == target
    assert host_packages.installed(base) == [
        {"name": "pluggy", "version": pure.version, "hash": pure.hash}
    ]
    assert host_packages.answer_offer(
        base,
        [
            {"hash": pure.hash, "name": "pluggy", "version": pure.version},
            {"hash": "1" * 16, "name": "qjf-nothing", "version": "1"},
        ],
    ) == {"missing": ["1" * 16], "on_host": []}


def test_a_damaged_upload_installs_nothing(tmp_path):
    pure = _pure()
    base = str(tmp_path / "base")
    data = bytearray(pure.zip())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        other = io.BytesIO()
        with zipfile.ZipFile(other, "w") as out:
            for name in z.namelist():
                out.writestr(name, z.read(name) + b"#")
    with pytest.raises(ValueError, match="the upload was damaged"):
        host_packages.install_zip(
            base, pure.hash, _zip_file(tmp_path, pure, other.getvalue())
        )
    assert os.listdir(os.path.join(base, "packages")) == []
    with pytest.raises(ValueError, match="is not a package hash"):
        host_packages.install_zip(base, "../x", _zip_file(tmp_path, pure))


def test_a_distribution_the_host_has_at_that_version_is_not_sent(tmp_path):
    (numpy,) = shipping.resolve(["numpy"])  # this Python has it, as a host
    answer = host_packages.answer_offer(
        str(tmp_path),
        [
            {"hash": numpy.hash, "name": "numpy", "version": numpy.version},
            {"hash": "2" * 16, "name": "numpy", "version": "0.0.1"},
        ],
    )
    assert answer == {"missing": ["2" * 16], "on_host": [numpy.hash]}


class _FakeDaemon:
    def __init__(self):
        self.closed = False
        self.frames = []

    def queue(self, buffers):
        self.frames.append(b"".join(bytes(b) for b in buffers))


class _FakeAgent:
    """What AgentPackages uses of the agent: the master's frames, tell()
    and the daemons."""

    def __init__(self, frames: bytes):
        stream = io.BytesIO(frames)
        self.master = type("Peer", (), {})()
        self.master.reader = protocol.FrameReader(stream.readinto)
        self.told = []
        self.daemons = {0: _FakeDaemon()}

    def tell(self, kind, head, payload=()):
        self.told.append((kind, head))

    def step(self, packages):
        kind, worker, head, lengths = self.master.reader.read_head()
        assert (kind, worker) == (protocol.PACKAGES, protocol.AGENT)
        packages.handle(self, head, lengths)


def _frames(*frames) -> bytes:
    return b"".join(
        bytes(b)
        for head, payload in frames
        for b in protocol.frame(protocol.PACKAGES, head, payload, protocol.AGENT)
    )


@pytest.fixture
def unknown(tmp_path, monkeypatch):
    """A distribution resolved here that this Python then no longer sees
    (as a host lacking it would)."""
    site = tmp_path / "site"
    _fake_distribution(site, "qjfunknown")
    monkeypatch.syspath_prepend(str(site))
    (dist,) = shipping.resolve(["qjfunknown"])
    sys.path.remove(str(site))
    __import__("importlib").invalidate_caches()
    return dist


def test_the_agent_installs_what_it_lacks_and_tells_its_daemons(tmp_path, unknown):
    pure = unknown
    base = str(tmp_path / "base")
    offer = {"hash": pure.hash, "name": pure.name, "version": pure.version}
    agent = _FakeAgent(
        _frames(
            ({"offer": [offer]}, []),
            ({"install": pure.hash}, [pure.zip()]),
            ({"use": [pure.hash]}, []),
            ({"use": ["3" * 16]}, []),
        )
    )
    packages = host_packages.AgentPackages(base)
    saved = list(sys.path)
    try:
        agent.step(packages)
        assert agent.told[-1] == (
            protocol.PACKAGES,
            {"missing": [pure.hash], "on_host": []},
        )
        agent.step(packages)  # install: no answer
        assert len(agent.told) == 1
        agent.step(packages)
        path = os.path.join(base, "packages", pure.hash)
        assert agent.told[-1] == (protocol.PACKAGES, {"paths": [path], "failed": {}})
        assert sys.path[1] == path  # after the runtime bundle
        kind, _, head, _ = protocol.FrameReader(
            io.BytesIO(agent.daemons[0].frames[0]).readinto
        ).read()
        assert (kind, head) == (
            protocol.PACKAGES,
            {"paths": [path], "packages": {"qjfunknown": pure.hash}},
        )
        agent.step(packages)
        assert agent.told[-1][1]["failed"] == {"3" * 16: "it was not installed"}
    finally:
        sys.path[:] = saved
    assert not [
        n for n in os.listdir(os.path.join(base, "packages")) if n.startswith(".")
    ]


def test_a_failed_install_is_told_when_used(tmp_path, unknown):
    pure = unknown
    base = str(tmp_path / "base")
    agent = _FakeAgent(
        _frames(({"install": pure.hash}, [b"not a zip"]), ({"use": [pure.hash]}, []))
    )
    packages = host_packages.AgentPackages(base)
    agent.step(packages)
    agent.step(packages)
    why = agent.told[-1][1]["failed"][pure.hash]
    assert "zip" in why.lower()
    assert os.listdir(os.path.join(base, "packages")) == []


def test_a_daemon_records_its_packages_and_what_it_cannot_switch(
    tmp_path, monkeypatch, capsys
):
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    secure_host_dir(str(base))  # where its record goes
    root = base / "packages"
    fresh = root / ("a" * 16)
    shadow = root / ("b" * 16)
    (fresh / "qjf_fresh_mod").mkdir(parents=True)
    (fresh / "qjf_fresh_mod" / "__init__.py").write_text("X = 1\n")
    (shadow / "json").mkdir(parents=True)  # json is imported already
    (shadow / "json" / "__init__.py").write_text("")
    for d in (root, fresh, shadow):
        os.chmod(d, 0o700)
    monkeypatch.setattr(sys, "path", list(sys.path))
    host_packages.use_in_daemon(
        str(base),
        "worker-0",
        {
            "paths": [str(fresh), str(shadow), "/elsewhere"],
            "packages": {"fresh": "a" * 16, "fakejson": "b" * 16},
        },
    )
    assert sys.path[1:3] == [str(fresh), str(shadow)]
    assert "/elsewhere" not in sys.path
    assert __import__("qjf_fresh_mod").X == 1
    record = host_packages.read_record(str(base), "worker-0", os.getpid())
    assert record["packages"] == {"fresh": "a" * 16, "fakejson": "b" * 16}
    assert record["stale"] == ["fakejson"]
    assert "imported fakejson from elsewhere before" in capsys.readouterr().err
    # The next session's agent replaces it when it ships another build or
    # one it could not switch to; not when it ships nothing, or the same.
    agent = host_packages.AgentPackages(str(base))
    me = {"name": "worker-0", "pid": os.getpid()}
    assert not agent.conflicts(me)
    agent.wanted = {"fresh": "a" * 16}
    assert not agent.conflicts(me)
    agent.wanted = {"fresh": "c" * 16}
    assert agent.conflicts(me)
    agent.wanted = {"fakejson": "b" * 16}
    assert agent.conflicts(me)
    assert not agent.conflicts({"name": "worker-0", "pid": 1})  # not it


def test_master_refuses_a_bad_name_before_connecting():
    with pytest.raises(BadPackage, match=r"^no distribution 'no-such-dist'"):
        Master(["no-such-host.invalid"], packages=["no-such-dist"])


def test_inv_bootstrap_packages_on_local_and_a_bad_name():
    _pure()
    proc = cli("inv", "bootstrap", "--hosts=local", "--packages=pluggy")
    assert proc.returncode == 0, describe(proc)
    assert (
        "packages on local: not needed (local workers run this Python)" in proc.stdout
    ), describe(proc)
    proc = cli("inv", "bootstrap", "--hosts=local", "--packages=pluggy,nosuchdist")
    assert proc.returncode == 1, describe(proc)
    assert (
        proc.stderr.strip()
        .splitlines()[0]
        .startswith(
            "bootstrap failed: no distribution 'nosuchdist' is installed for "
            "this Python"
        )
    ), describe(proc)


# --- over SSH -------------------------------------------------------------------


def _bare_python(tmp_path, monkeypatch) -> str:
    venv = tmp_path / "bare"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    python = str(venv / "bin" / "python")
    monkeypatch.setenv("QJAMFAB_REMOTE_PYTHON", python)
    return python


def _stop(ssh, alias):
    cluster.stop_workers(hostspec.parse_hosts([alias]), ssh_config=ssh.ssh_config)


@pytest.fixture
def sends(caplog):
    """sends(): the packages the Masters of a test sent to agents, by name,
    as their log says ("packages on host2: uploaded numpy 2.1.0; the
    host's own: ...")."""
    caplog.set_level("INFO", logger="qjamfab")

    def sent() -> list[str]:
        names = []
        for record in caplog.records:
            message = record.getMessage()
            if not message.startswith("packages on "):
                continue
            for said in message.split(": ", 1)[1].split("; "):
                if said.startswith("uploaded "):
                    names += [d.split()[0] for d in said[9:].split(", ")]
        return names

    return sent


@pytest.mark.timeout(300)
def test_a_bare_host_runs_numpy_with_packages(ssh, tmp_path, monkeypatch, sends):
    """host2's Python is a venv without numpy: the job fails naming the
    module and suggesting packages=; with packages=["numpy"] it runs, on
    the agent (in-host reduce of arrays) as on the workers; a second
    session sends nothing; clear-cache keeps the packages; status lists
    them."""
    python = _bare_python(tmp_path, monkeypatch)
    opts = dict(workers_per_host=2, ssh_config=ssh.ssh_config)
    x = np.arange(4000.0).reshape(400, 10)
    data = DataSet(x, slice_size=50)
    home = ssh.homes["host2"]
    _stop(ssh, "host2")
    try:
        with Master(["host2"], **opts) as m:
            with pytest.raises(
                PreflightFailed,
                match=(
                    r"^host2 lacks the Python module 'numpy', which a dataset "
                    rf"slice needs \(worker host2-\d\): install it for {python} "
                    r"there, ship it from here with Master\(\.\.\., "
                    r"packages=\['numpy'\]\), or set QJAMFAB_REMOTE_PYTHON"
                ),
            ):
                m.run(lambda p, s: s.sum(axis=0), dataset=data)
            before = {k: v["pid"] for k, v in m.worker_stats().items()}
        with Master(["host2"], packages=["numpy"], **opts) as m:
            assert sends() == ["numpy"]
            total = m.run(lambda p, s: s.sum(axis=0), dataset=data)
            np.testing.assert_array_equal(total, x.sum(axis=0))
            files = m.run(lambda p, s: Counter([__import__("numpy").__file__]))
            (numpy,) = shipping.resolve(["numpy"])
            where = os.path.join(home, "packages", numpy.hash, "numpy")
            assert files == {os.path.join(where, "__init__.py"): 2}
            # Fresh daemons for this session (none of the first's).
            pids = {k: v["pid"] for k, v in m.worker_stats().items()}
            assert pids.keys() == before.keys()
            assert set(pids.values()).isdisjoint(before.values())
        hosts = hostspec.parse_hosts(["host2"])
        (status,) = cluster.status(hosts, ssh_config=ssh.ssh_config)
        assert status.ok, status.error
        assert status.info["packages"] == [
            {"name": "numpy", "version": NUMPY, "hash": numpy.hash}
        ]
        (cleared,) = cluster.clear_cache(hosts, ssh_config=ssh.ssh_config)
        assert cleared.ok and cleared.info["entries"] > 0, cleared
        assert os.path.isdir(where)
        with Master(["host2"], packages=["numpy"], **opts) as m:
            assert sends() == ["numpy"]  # nothing sent this time
            total = m.run(lambda p, s: s.sum(axis=0), dataset=data)
            np.testing.assert_array_equal(total, x.sum(axis=0))
    finally:
        _stop(ssh, "host2")


@pytest.mark.timeout(240)
def test_inv_bootstrap_uploads_packages_a_master_then_uses(
    ssh, tmp_path, monkeypatch, sends
):
    """`inv bootstrap --packages` over SFTP puts the zip where a Master's
    agent looks: the Master sends nothing; `inv status` lists it."""
    pure = _pure()
    _bare_python(tmp_path, monkeypatch)
    _stop(ssh, "host3")
    args = ("--hosts=host3", f"--ssh-config={ssh.ssh_config}")
    try:
        proc = cli("inv", "bootstrap", *args, "--packages=pluggy")
        assert proc.returncode == 0, describe(proc)
        assert f"packages on host3: uploaded pluggy {pure.version}" in proc.stdout, (
            describe(proc)
        )
        proc = cli("inv", "bootstrap", *args, "--packages=pluggy")
        assert proc.returncode == 0, describe(proc)
        assert (
            f"packages on host3: already there: pluggy {pure.version}" in proc.stdout
        ), describe(proc)
        proc = cli("inv", "status", *args)
        assert proc.returncode == 0, describe(proc)
        assert f"packages on host3: pluggy {pure.version}" in proc.stdout, describe(
            proc
        )
        opts = dict(workers_per_host=1, packages=["pluggy"], ssh_config=ssh.ssh_config)
        with Master(["host3"], **opts) as m:
            assert m.run(lambda p, s: __import__("pluggy").__version__) == pure.version
            pid = m.worker_stats()["host3-0"]["pid"]
        assert sends() == []
        # A daemon that holds another build of pluggy (as if an earlier
        # session shipped another version) is replaced by a fresh one.
        record = os.path.join(ssh["host3"].host_dir, "worker-0.packages")
        with open(record) as f:
            held = json.load(f)
        assert held == {"pid": pid, "stale": [], "packages": {"pluggy": pure.hash}}
        with open(record, "w") as f:
            json.dump({**held, "packages": {"pluggy": "0" * 16}}, f)
        with Master(["host3"], **opts) as m:
            assert m.run(lambda p, s: __import__("pluggy").__version__) == pure.version
            assert m.worker_stats()["host3-0"]["pid"] != pid
    finally:
        _stop(ssh, "host3")


@pytest.mark.timeout(120)
def test_a_host_of_another_platform_is_refused_with_the_difference(
    ssh, monkeypatch, sends
):
    """Simulated: host1 reports another machine. Nothing is sent, and the
    Master (whose only host it is) says why."""
    real = shipping.host_platform
    monkeypatch.setattr(
        shipping, "host_platform", lambda info: {**real(info), "machine": "riscv64"}
    )
    with pytest.raises(
        PreflightFailed,
        match=(
            rf"^host1 cannot use numpy {NUMPY} as this master has it: its "
            r"compiled files are for linux \S+ and the host is linux "
            r"riscv64; install numpy for \S+ on host1 itself, or leave it "
            r"out of packages="
        ),
    ):
        Master(
            ["host1"], workers_per_host=1, packages=["numpy"], ssh_config=ssh.ssh_config
        )
    assert sends() == []
    (result,) = cluster.bootstrap(
        hostspec.parse_hosts(["host1"]),
        shipping.resolve(["numpy"]),
        ssh_config=ssh.ssh_config,
    )
    assert not result.ok
    assert result.error.startswith(
        f"host1 cannot use numpy {NUMPY} as this master has it"
    ), result.error
    # Neither sent a byte of it: the host has no package.
    (status,) = cluster.status(
        hostspec.parse_hosts(["host1"]), ssh_config=ssh.ssh_config
    )
    assert status.ok and status.info["packages"] == [], status


@pytest.mark.timeout(120)
def test_a_host_with_the_same_version_is_sent_nothing(ssh, sends, caplog):
    """host1's Python is this one: it has numpy at this version."""
    caplog.set_level("INFO", logger="qjamfab")
    with Master(
        ["host1"], workers_per_host=1, packages=["numpy"], ssh_config=ssh.ssh_config
    ) as m:
        assert m.run(lambda p, s: __import__("numpy").__version__) == NUMPY
    assert sends() == []
    assert f"packages on host1: the host's own: numpy {NUMPY}" in caplog.text
