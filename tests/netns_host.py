"""A test host behind a real network link: an sshd in a network namespace
joined to this one by a veth pair (root and iproute2 only).

Its subnet, 10.213.N.0/30 (N from the pid, so that test runs at once on one
machine, or one that leaked its namespace, do not collide), exists only
between this namespace and the one made here; a blackhole route for
10.213.N.0/24 is added before anything
else and removed last, so no packet for it can ever leave the machine, even
when the veth is gone. `cut()` blackholes the link both ways (the host stops
answering, nothing is reset); `restore()` undoes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from tests.sshd_hosts import SshdHosts, _keygen

SUBNET = f"10.213.{20 + os.getpid() % 200}"
LOCAL_ADDRESS = f"{SUBNET}.1"
ADDRESS = f"{SUBNET}.2"


def netns_available() -> str | None:
    """None when a namespace host can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = (
        ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


class NetnsHost:
    """An sshd at ADDRESS in its own namespace, reachable as alias `nshost`
    through `ssh_config` (a copy of the SshdHosts one, plus that alias)."""

    alias = "nshost"

    def __init__(self, servers: SshdHosts):
        self.servers = servers
        tag = str(os.getpid())[-6:]
        self.netns = f"qjf-{tag}"
        self.veth_here, self.veth_there = f"qjfh{tag}", f"qjfn{tag}"
        self.dir = os.path.join(servers.dir, self.alias)
        self.home = os.path.join(self.dir, "qjamfab-home")
        self.ssh_config = os.path.join(servers.dir, "ssh_config_netns")
        self.known_hosts = os.path.join(servers.dir, "known_hosts_netns")
        self.sshd: subprocess.Popen | None = None
        self.is_cut = False
        os.makedirs(self.dir, mode=0o700)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        _ip("route", "add", "blackhole", f"{SUBNET}.0/24")
        _ip("netns", "add", self.netns)
        _ip(
            "link",
            "add",
            self.veth_here,
            "type",
            "veth",
            "peer",
            "name",
            self.veth_there,
        )
        _ip("link", "set", self.veth_there, "netns", self.netns)
        _ip("addr", "add", f"{LOCAL_ADDRESS}/30", "dev", self.veth_here)
        _ip("link", "set", self.veth_here, "up")
        _ip("addr", "add", f"{ADDRESS}/30", "dev", self.veth_there, netns=self.netns)
        _ip("link", "set", self.veth_there, "up", netns=self.netns)
        _ip("link", "set", "lo", "up", netns=self.netns)
        route = _ip("route", "get", ADDRESS)
        if f"dev {self.veth_here}" not in route:
            raise RuntimeError(f"{ADDRESS} is not routed through the veth: {route}")
        key = os.path.join(self.dir, "ssh_host_ed25519_key")
        public = _keygen(key, "qjamfab-test-nshost")
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write(
                "\n".join(
                    [
                        "Port 22",
                        f"ListenAddress {ADDRESS}",
                        f"HostKey {key}",
                        f"PidFile {self.dir}/sshd.pid",
                        f"AuthorizedKeysFile {self.servers.authorized_keys}",
                        "UsePAM no",
                        "StrictModes no",
                        "PasswordAuthentication no",
                        "PermitRootLogin prohibit-password",
                        "UseDNS no",
                        f"SetEnv QJAMFAB_HOME={self.home}",
                        f"Subsystem sftp {self.servers.sftp_server}",
                        *self.servers._extra_sshd_options,
                    ]
                )
                + "\n"
            )
        self.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                self.servers.sshd,
                "-D",
                "-f",
                config,
                "-E",
                os.path.join(self.dir, "sshd.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with open(self.servers.known_hosts) as src, open(self.known_hosts, "w") as dst:
            dst.write(src.read() + f"{ADDRESS} {public}\n")
        with open(self.servers.ssh_config) as src:
            base = src.read().replace(self.servers.known_hosts, self.known_hosts)
        with open(self.ssh_config, "w") as f:
            f.write(
                base
                + "\n"
                + "\n".join(
                    [
                        f"Host {self.alias}",
                        f"    HostName {ADDRESS}",
                        "    Port 22",
                        f"    User {self.servers.user}",
                        f"    IdentityFile {self.servers.client_key}",
                        "    IdentitiesOnly yes",
                        f"    UserKnownHostsFile {self.known_hosts}",
                        "    StrictHostKeyChecking yes",
                        "",
                    ]
                )
            )
        deadline = time.monotonic() + 10
        while (
            ":22 "
            not in _ip(
                "netns", "exec", self.netns, "ss", "-ltn", netns=None, check=False
            )
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)

    def cut(self) -> None:
        """Blackhole the link both ways: packets vanish, nothing resets."""
        _ip("route", "add", "blackhole", f"{ADDRESS}/32")
        _ip("route", "add", "blackhole", f"{LOCAL_ADDRESS}/32", netns=self.netns)
        self.is_cut = True

    def restore(self) -> None:
        if self.is_cut:
            _ip("route", "del", "blackhole", f"{ADDRESS}/32", check=False)
            _ip(
                "route",
                "del",
                "blackhole",
                f"{LOCAL_ADDRESS}/32",
                netns=self.netns,
                check=False,
            )
            self.is_cut = False

    def stop(self) -> None:
        pids = _ip("netns", "pids", self.netns, check=False).split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if self.sshd is not None:
            self.sshd.wait(timeout=10)
        _ip("link", "del", self.veth_here, check=False)
        _ip("netns", "del", self.netns, check=False)
        _ip("route", "del", "blackhole", f"{ADDRESS}/32", check=False)
        # Last: while it stands, nothing for the subnet leaves the machine.
        _ip("route", "del", "blackhole", f"{SUBNET}.0/24", check=False)
        # Its files too, so the next test of the module can make one.
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":  # manual check: python -m tests.netns_host
    with SshdHosts(1) as servers:
        host = NetnsHost(servers)
        try:
            print("ssh -F", host.ssh_config, host.alias)
            subprocess.run(
                [
                    "ssh",
                    "-F",
                    host.ssh_config,
                    host.alias,
                    "echo",
                    "hello from the namespace",
                ],
                timeout=20,
            )
        finally:
            host.stop()
    sys.exit(0)
