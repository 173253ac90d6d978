"""The SSH test hosts of tests/sshnet.py: reachable by ssh and ansible-playbook, host keys checked, nothing left over.

These tests need root, iproute2 and OpenSSH (scripts/ensure-system-deps installs them). When
something is missing they fail and say what; they never skip.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import sshnet
from .sshnet import SshHost, SshNetError, ansible_env, inventory, namespace_pids, ssh_hosts, stop_host

pytestmark = pytest.mark.netns

ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))

PLAYBOOK = """\
- name: Reach every test host
  hosts: all
  gather_facts: false
  tasks:
    - name: Write a file under the host's install base
      ansible.builtin.copy:
        content: "{{ inventory_hostname }}\\n"
        dest: "{{ svcreg_install_base }}/marker"
        mode: "0644"
    - name: Read the namespace's addresses
      ansible.builtin.command: ip -4 -o addr show dev eth0
      register: addresses
      changed_when: false
    - name: The host answers from its own namespace
      ansible.builtin.assert:
        that: ansible_host in addresses.stdout
"""


def ssh(host: SshHost, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.ssh_command(command), capture_output=True, text=True, timeout=30, check=False)


def playbook(tmp_path: Path, inventory_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    play = tmp_path / "play.yml"
    play.write_text(PLAYBOOK)
    return subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(inventory_path), str(play)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def live_processes_with(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # exited while we looked
    return found


def is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state == "Z"  # killed, waiting for a parent that does not reap (a container's pid 1)


def test_ssh_logs_in_with_the_key_and_checked_host_key(tmp_path: Path) -> None:
    with ssh_hosts(2, tmp_path) as hosts:
        for host in hosts:
            result = ssh(host, "ip -4 -o addr show; hostname -I")
            assert result.returncode == 0, result.stderr
            assert f"inet {host.ip}/30" in result.stdout
            assert host.ip in result.stdout.splitlines()[-1].split()
        assert len({host.ip for host in hosts}) == len({host.netns for host in hosts}) == 2
        assert len({host.install_base for host in hosts}) == 2
        assert hosts[0].run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.count("inet ") == 1


def test_ansible_playbook_runs_against_two_hosts(tmp_path: Path) -> None:
    with ssh_hosts(2, tmp_path) as hosts, ansible_env(tmp_path) as env:
        result = playbook(tmp_path, inventory(hosts, tmp_path / "hosts.yml"), env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok=3" in result.stdout and "failed=0" in result.stdout and "unreachable=0" in result.stdout
        for host in hosts:
            assert (host.install_base / "marker").read_text() == f"{host.name}\n"
        control_dir = Path(env["ANSIBLE_CONFIG"]).read_text().split("control_path_dir = ")[1].split("\n")[0]
        assert len(list(Path(control_dir).iterdir())) == 2  # one persistent master per host


def test_a_wrong_host_key_is_refused(tmp_path: Path) -> None:
    with ssh_hosts(1, tmp_path) as [host], ansible_env(tmp_path) as env:
        impostor = tmp_path / "impostor"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
        wrong = tmp_path / "wrong_known_hosts"
        wrong.write_text(f"{host.ip} {impostor.with_suffix('.pub').read_text()}")
        stranger = dataclasses.replace(host, known_hosts=wrong)
        result = playbook(tmp_path, inventory([stranger], tmp_path / "hosts.yml"), env)
        assert result.returncode != 0
        assert "Host key verification failed" in result.stdout + result.stderr
        assert "unreachable=1" in result.stdout
        assert ssh(stranger, "true").returncode == 255
        assert ssh(host, "true").returncode == 0


def test_a_stopped_host_is_unreachable(tmp_path: Path) -> None:
    with ssh_hosts(1, tmp_path) as [host]:
        assert ssh(host, "true").returncode == 0
        stop_host(host)
        result = ssh(host, "true")
        assert result.returncode == 255 and "Connection refused" in result.stderr


def test_teardown_kills_sshd_and_detached_processes_and_deletes_the_namespaces(tmp_path: Path) -> None:
    with ssh_hosts(2, tmp_path) as hosts:
        started = ssh(hosts[1], f"setsid nohup sleep 600 >/dev/null 2>&1 </dev/null & echo $! > {tmp_path}/sleep.pid")
        assert started.returncode == 0, started.stderr
        detached = int((tmp_path / "sleep.pid").read_text())
        time.sleep(0.2)  # the SSH session is over by now; the detached process is not
        assert not is_gone(detached)
        assert detached in namespace_pids(hosts[1].netns)
        sshd_pids = [host.sshd.pid for host in hosts]
        namespaces = [host.netns for host in hosts]
        veths = [host.veth for host in hosts]
    assert is_gone(detached)
    assert all(is_gone(pid) for pid in sshd_pids)
    assert live_processes_with(str(tmp_path / "node0" / "sshd_config")) == []
    assert live_processes_with(str(tmp_path / "node1" / "sshd_config")) == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in namespaces)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert not any(f" {veth}@" in links for veth in veths)
    assert os.path.exists(tmp_path / "node0" / "opt")  # the work directory itself stays for the test to inspect


def test_teardown_runs_when_the_body_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the test failed"), ssh_hosts(1, tmp_path) as [host]:
        raise RuntimeError("the test failed")
    assert host.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert is_gone(host.sshd.pid)


def test_an_sshd_that_does_not_start_is_an_error_that_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sshnet, "SSHD", "/usr/bin/false")
    with pytest.raises(SshNetError, match=r"sshd in svs-\d+-\d+ exited 1"), ssh_hosts(2, tmp_path):
        pass
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"svs-{os.getpid()}-" not in listed
