"""Real SSH hosts for tests: one network namespace per host, each running its own sshd.

Every host is a network namespace joined to this machine by a veth pair (this side .1, the
namespace side .2 of a private /30 in 10.231.0.0/16) with ``sshd -D -e`` listening on the
namespace address. The hosts share this machine's filesystem and root account, so each gets its
own ``install_base`` under the work directory. Ansible reaches them as ordinary SSH hosts, with
host key checking on::

    with ssh_hosts(2, tmp_path) as hosts, ansible_env(tmp_path) as env:
        inventory(hosts, tmp_path / "hosts.yml")
        subprocess.run([ANSIBLE_PLAYBOOK, "-i", tmp_path / "hosts.yml", "play.yml"], env=env, check=True)

Needs root, iproute2, openssh-server and openssh-client (scripts/ensure-system-deps). A missing
tool is an error, never a skip. Leaving the context kills sshd and every process still running
inside the namespaces (services started over SSH live there), then deletes the namespaces.
One ``ssh_hosts`` at a time per work directory: the key files and host directories live there.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
    "SSHD",
    "SshHost",
    "SshNetError",
    "ansible_env",
    "inventory",
    "namespace_pids",
    "ssh_hosts",
    "stop_host",
]

SSHD = "/usr/sbin/sshd"
_REPOSITORY = Path(__file__).resolve().parents[1]
_SUBNETS = ipaddress.ip_network("10.231.0.0/16")
_SLOTS = _SUBNETS.num_addresses // 4
# Serialises subnet allocation between concurrent test runs on this machine.
_ALLOCATION_LOCK = Path("/run/svcreg-sshnet.lock")
_counter = itertools.count()


class SshNetError(RuntimeError):
    """A host could not be set up or torn down (missing tool, no free subnet, sshd did not start)."""


@dataclass(frozen=True)
class SshHost:
    """One namespace whose sshd on ``ip:port`` lets ``user`` in with the client ``key``."""

    name: str
    netns: str
    ip: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    install_base: Path
    veth: str = field(repr=False)
    sshd: subprocess.Popen[bytes] = field(repr=False, compare=False)
    sshd_log: Path = field(repr=False)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace directly (``ip netns exec``, not SSH) and capture its output.

        Raises:
            SshNetError: ``check`` is true and the command exited non-zero.
        """
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, *cmd], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise SshNetError(f"{' '.join(cmd)} in {self.netns} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def ssh_command(self, *cmd: str) -> list[str]:
        """The ``ssh`` command line running ``cmd`` on this host as ``user``, host key checking on."""
        return [
            "ssh",
            *_ssh_options(self.known_hosts),
            "-i",
            str(self.key),
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-p",
            str(self.port),
            f"{self.user}@{self.ip}",
            *cmd,
        ]


def _ssh_options(known_hosts: Path) -> list[str]:
    return ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes"]


@contextmanager
def ssh_hosts(
    count: int, workdir: Path, *, names: Sequence[str] | None = None, timeout: float = 10
) -> Iterator[list[SshHost]]:
    """Start ``count`` SSH hosts and tear them down on exit, even when setup or the body fails.

    Args:
        count: how many hosts.
        workdir: where keys, ``known_hosts``, sshd configs and logs and each host's
            ``install_base`` (``workdir/NAME/opt``) go.
        names: inventory names of the hosts; ``node0``, ``node1``, ... by default.
        timeout: seconds to wait for every sshd to accept connections.

    Raises:
        SshNetError: a tool is missing, not root, no free subnet, or sshd did not start
            (the message carries its log).
    """
    _require_tools()
    names = [f"node{index}" for index in range(count)] if names is None else list(names)
    if len(names) != count or len(set(names)) != count:
        raise ValueError(f"names must be {count} distinct names, got {names!r}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    key = workdir / "id_ed25519"
    _keygen(key, "svcreg-sshnet client")
    authorized_keys = workdir / "authorized_keys"
    authorized_keys.write_text(key.with_suffix(".pub").read_text())
    known_hosts = workdir / "known_hosts"
    # sshd refuses to start without its privilege separation directory; nothing else creates it here.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    _remove_abandoned()

    created: list[tuple[str, str]] = []  # (netns, veth) as soon as each exists, for the teardown
    hosts: list[SshHost] = []
    failed = False
    try:
        for name in names:
            number = next(_counter)
            netns = f"svs-{os.getpid()}-{number}"
            veth = f"vs{os.getpid():x}-{number:x}"  # interface names are at most 15 characters
            _sh("ip", "netns", "add", netns)
            created.append((netns, veth))
            ip = _attach(netns, veth, number)
            hosts.append(_start_sshd(name, netns, veth, ip, workdir / name, key, known_hosts, authorized_keys))
        known_hosts.write_text("".join(f"{host.ip} {_host_public_key(host)}\n" for host in hosts))
        deadline = time.monotonic() + timeout
        for host in hosts:
            _wait_for_sshd(host, deadline)
        yield hosts
    except BaseException:
        failed = True
        raise
    finally:
        problems = _teardown(created, hosts)
        if problems and not failed:
            raise SshNetError("teardown of SSH test hosts failed: " + "; ".join(problems))


def stop_host(host: SshHost) -> None:
    """Make ``host`` unreachable over SSH: kill its sshd and every SSH session it serves.

    Sessions go too, so an Ansible ControlPersist master cannot keep reaching the host; processes
    started over SSH keep running (leaving ``ssh_hosts`` kills them).
    """
    host.sshd.kill()
    host.sshd.wait()
    for pid in namespace_pids(host.netns):
        if _command_name(pid) == "sshd":
            _kill(pid)


def namespace_pids(netns: str) -> list[int]:
    """The processes running in ``netns`` (none when it does not exist)."""
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def inventory(hosts: Sequence[SshHost], path: Path, *, group: str = "all") -> Path:
    """Write a YAML inventory of ``hosts`` (in ``group``) that Ansible reaches over SSH; returns ``path``."""
    entries = {
        host.name: {
            "ansible_host": host.ip,
            "ansible_port": host.port,
            "ansible_user": host.user,
            "ansible_ssh_private_key_file": str(host.key),
            "ansible_ssh_common_args": " ".join(_ssh_options(host.known_hosts)),
            "ansible_python_interpreter": "/usr/bin/python3",
            "svcreg_install_base": str(host.install_base),
        }
        for host in hosts
    }
    tree = {"all": {"hosts": entries}} if group == "all" else {"all": {"children": {group: {"hosts": entries}}}}
    path = Path(path)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@contextmanager
def ansible_env(workdir: Path) -> Iterator[dict[str, str]]:
    """An environment for ``ansible-playbook`` against SSH test hosts.

    It points ``ANSIBLE_CONFIG`` at ``workdir/ansible.cfg`` (this repository's collections, host key
    checking, pipelining, ControlPersist) and drops inherited ``ANSIBLE_*`` variables. The
    ControlPath directory is a short one under /tmp, removed on exit: a Unix socket path has at
    most 107 bytes and pytest's tmp_path alone can take most of them.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="svs-cp-", dir="/tmp") as control_dir:
        config = workdir / "ansible.cfg"
        config.write_text(
            "[defaults]\n"
            f"collections_path = {_REPOSITORY}\n"
            "host_key_checking = True\n"
            "timeout = 10\n"
            "forks = 20\n"
            "[ssh_connection]\n"
            "pipelining = True\n"
            "ssh_args = -o ControlMaster=auto -o ControlPersist=60s\n"
            f"control_path_dir = {control_dir}\n"
            # %C is a fixed-length hash of host, port and user: short whatever the address.
            "control_path = %(directory)s/%%C\n"
        )
        environment = {name: value for name, value in os.environ.items() if not name.startswith("ANSIBLE_")}
        yield {**environment, "ANSIBLE_CONFIG": str(config)}


def _sh(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SshNetError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _require_tools() -> None:
    missing = [tool for tool in ("ip", "ssh", "ssh-keygen") if shutil.which(tool) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        raise SshNetError(f"SSH test hosts need {', '.join(missing)}: run scripts/ensure-system-deps (as root)")
    if os.geteuid() != 0:
        raise SshNetError("SSH test hosts need root for network namespaces")


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))


def _attach(netns: str, veth: str, number: int) -> str:
    """Join ``netns`` to this machine by ``veth`` on a free /30 and return the namespace's address.

    The first subnet tried depends on the pid, so concurrent runs rarely even meet; the lock and
    the check against every address and route on this machine keep them from ever sharing one.
    """
    _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    with _ALLOCATION_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = _used_networks()
        first = os.getpid() * 8 + number
        for slot in range(first, first + _SLOTS):
            subnet = ipaddress.ip_network((int(_SUBNETS.network_address) + 4 * (slot % _SLOTS), 30))
            if not any(subnet.overlaps(other) for other in used):
                break
        else:
            raise SshNetError(f"no free /30 left in {_SUBNETS} on this machine")
        here, there = subnet.hosts()
        _sh("ip", "addr", "add", f"{here}/30", "dev", veth)
    _sh("ip", "link", "set", veth, "up")
    _sh("ip", "-n", netns, "addr", "add", f"{there}/30", "dev", "eth0")
    _sh("ip", "-n", netns, "link", "set", "eth0", "up")
    _sh("ip", "-n", netns, "link", "set", "lo", "up")
    return str(there)


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = [
        ipaddress.ip_interface(f"{address['local']}/{address['prefixlen']}").network
        for link in json.loads(_sh("ip", "-j", "-4", "addr", "show"))
        for address in link.get("addr_info", ())
    ]
    for route in json.loads(_sh("ip", "-j", "-4", "route", "show", "table", "all")):
        if route.get("dst", "default") != "default":
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    return used


def _start_sshd(
    name: str,
    netns: str,
    veth: str,
    ip: str,
    hostdir: Path,
    key: Path,
    known_hosts: Path,
    authorized_keys: Path,
) -> SshHost:
    install_base = hostdir / "opt"
    install_base.mkdir(parents=True, exist_ok=True)
    host_key = hostdir / "ssh_host_ed25519_key"
    _keygen(host_key, f"svcreg-sshnet {name}")
    config = hostdir / "sshd_config"
    config.write_text(
        f"ListenAddress {ip}\n"
        "Port 22\n"
        f"HostKey {host_key}\n"
        f"PidFile {hostdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized_keys}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        # The key files live in a test's tmp_path, whatever its modes.
        "StrictModes no\n"
        # Ansible with many forks opens many connections and sessions at once.
        "MaxStartups 100\n"
        "MaxSessions 100\n"
        "UseDNS no\n"
        "PrintMotd no\n"
        "Subsystem sftp /usr/lib/openssh/sftp-server\n"
    )
    log = hostdir / "sshd.log"
    # A log file rather than a pipe: nobody would read a pipe, and sshd blocks once it is full.
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return SshHost(name, netns, ip, 22, "root", key, known_hosts, install_base, veth, process, log)


def _host_public_key(host: SshHost) -> str:
    public = (host.sshd_log.parent / "ssh_host_ed25519_key.pub").read_text().split()
    return f"{public[0]} {public[1]}"


def _wait_for_sshd(host: SshHost, deadline: float) -> None:
    while True:
        if host.sshd.poll() is not None:
            raise SshNetError(f"sshd in {host.netns} exited {host.sshd.returncode}:\n{host.sshd_log.read_text()}")
        try:
            with socket.create_connection((host.ip, host.port), timeout=1) as connection:
                if connection.recv(4) == b"SSH-":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SshNetError(
                f"sshd in {host.netns} does not accept connections on {host.ip}:{host.port}:\n"
                f"{host.sshd_log.read_text()}"
            )
        time.sleep(0.01)


def _teardown(created: list[tuple[str, str]], hosts: list[SshHost]) -> list[str]:
    problems = []
    for host in hosts:
        host.sshd.kill()
    for netns, veth in reversed(created):
        try:
            _kill_all_in(netns)
        except SshNetError as error:
            problems.append(str(error))
        # Deleting the link first takes its address away at once; the namespace may still be
        # held for a moment by a process that is exiting.
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        deleted = subprocess.run(["ip", "netns", "del", netns], capture_output=True, text=True, check=False)
        if deleted.returncode != 0:
            problems.append(f"ip netns del {netns}: {deleted.stderr.strip()}")
    for host in hosts:
        host.sshd.wait()
    return problems


def _remove_abandoned() -> None:
    """Tear down the namespaces of test runs that died without cleaning up (killed by a timeout, say).

    A namespace is abandoned when the pid in its name is not running: its sshd still holds an
    address and a veth otherwise, until the next reboot.
    """
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        netns = line.split()[0] if line.strip() else ""
        prefix, _, owner = netns.partition("-")
        owner = owner.partition("-")[0]
        if prefix == "svs" and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with suppress(SshNetError):  # another run may be removing it at the same moment
                _kill_all_in(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def _kill_all_in(netns: str, timeout: float = 10) -> None:
    # Killed processes may have forked just before; go round until the namespace is empty.
    deadline = time.monotonic() + timeout
    while pids := [pid for pid in namespace_pids(netns) if _command_name(pid) is not None]:
        if time.monotonic() > deadline:
            raise SshNetError(f"processes {pids} in {netns} survive SIGKILL")
        for pid in pids:
            _kill(pid)
        time.sleep(0.01)


def _command_name(pid: int) -> str | None:
    """The command name of a live process; None when it is gone or a zombie (nothing left to kill)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = status.partition("(")[2].rpartition(")")
    return None if rest.split()[0] == "Z" else name


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
