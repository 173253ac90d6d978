"""Package deployment end to end: real sshd in network namespaces, real ansible-runner and ansible-playbook.

Each host is a network namespace with its own sshd (tests/sshnet.py); the hello package
(examples/hello, a tiny HTTP service) is deployed to it, and the tests talk to the service
over the veth link, read the registry, and look at the release folders on disk.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import yaml

from registry import Registry
from registry.auth import Role, TokenRegistry
from registry.client import WsClient
from registry.config import DeployConfig
from registry.deploy import DeployEvent, PackageDeployer, RemoteTarget
from registry.events import EventType
from registry.exceptions import Forbidden, NotFound, PackageError, ValidationError
from registry.jobs import DeployJobs
from registry.network import NetworkConfig, NetworkManager
from registry.package import Limits, Package, build_package

from .package_corpus import CORPUS, BadPackage
from .sshnet import SshHost, ansible_env, inventory, ssh_hosts, stop_host
from .test_ansible_collection import BIN, REPO, ansible, recap, running_registry
from .test_server import Running, write_pki

pytestmark = [pytest.mark.netns, pytest.mark.slow]

EXAMPLE = REPO / "examples" / "hello"
SECRET = "s3cr3t-greeting-4711"


# --- packages -----------------------------------------------------------------------------


def hello(tmp_path: Path, version: str, *, start: str | None = None, health: dict | None = None) -> Package:
    """The example package at ``version``; ``start`` replaces its start script, ``health`` its health check."""
    source = tmp_path / "src" / version / "hello"
    shutil.copytree(EXAMPLE, source)
    manifest = yaml.safe_load((source / "manifest.yaml").read_text())
    manifest["version"] = version
    if health is not None:
        manifest["health"] = health
    (source / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    if start is not None:
        (source / "scripts" / "start.sh").write_text(start)
    return build_package(source, tmp_path / "packages")


def answer(host: SshHost) -> str:
    with urllib.request.urlopen(f"http://{host.ip}:8080/", timeout=5) as response:
        return response.read().decode().strip()


def service_pid(host: SshHost) -> int:
    return int((host.install_base / "hello" / "shared" / "hello.pid").read_text())


def targets(hosts: list[SshHost]) -> list[RemoteTarget]:
    return [RemoteTarget(h.ip, "root", str(h.key), str(h.install_base), name=h.name) for h in hosts]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[SshHost]]:
    with ssh_hosts(2, tmp_path / "hosts") as made:
        yield made


def deployer(hosts: list[SshHost], registry: Registry | None, tmp_path: Path, **options: object) -> PackageDeployer:
    return PackageDeployer(
        registry, known_hosts=hosts[0].known_hosts, work_dir=tmp_path / "jobs", keep_artifacts=True, **options
    )


# --- PackageDeployer ----------------------------------------------------------------------


def test_deploy_redeploy_upgrade_and_rollbacks_on_two_hosts(hosts: list[SshHost], tmp_path: Path) -> None:
    registry = Registry()
    seen = registry.subscribe([EventType.SERVICE_REGISTERED, EventType.SERVICE_STATE_CHANGED])
    progress: list[DeployEvent] = []
    deploy = deployer(hosts, registry, tmp_path)
    env = {"HELLO_GREETING": SECRET}

    v1 = hello(tmp_path, "1.0.0")
    first = deploy.deploy_package(v1.path, targets(hosts), env, on_event=progress.append)
    assert first.ok, first.to_dict()
    assert {result.status for result in first.hosts.values()} == {"deployed"}
    assert [answer(host) for host in hosts] == [f"{SECRET} from 1.0.0"] * 2
    entries = {entry.host_id: entry for entry in registry.list_services(service_name="hello")}
    assert sorted(entries) == ["node0", "node1"]
    for host in hosts:
        entry = entries[host.name]
        assert (entry.state.value, entry.version, entry.network_info.ip) == ("running", "1.0.0", host.ip)
        assert [(e.name, e.port) for e in entry.endpoints] == [("http", 8080)]
    events = [seen.get(timeout=1) for _ in range(4)]
    assert [(e.type, e.service.host_id, e.service.state.value) for e in events if e.service.host_id == "node0"] == [
        (EventType.SERVICE_REGISTERED, "node0", "starting"),
        (EventType.SERVICE_STATE_CHANGED, "node0", "running"),
    ]
    assert {(e.kind, e.host) for e in progress} >= {("started", "node0"), ("changed", "node0"), ("changed", "node1")}

    pids = [service_pid(host) for host in hosts]
    revision = registry.revision
    again = deploy.deploy_package(v1.path, targets(hosts), env)
    assert {result.status for result in again.hosts.values()} == {"unchanged"}, again.to_dict()
    assert [service_pid(host) for host in hosts] == pids  # not restarted
    assert registry.revision == revision  # and the instances did not flap through "starting"

    upgrade = deploy.deploy_package(hello(tmp_path, "1.1.0").path, targets(hosts), env)
    assert upgrade.ok and upgrade.hosts["node0"].previous_version == "1.0.0"
    assert [answer(host) for host in hosts] == [f"{SECRET} from 1.1.0"] * 2
    assert (hosts[0].install_base / "hello" / "current").resolve().name == "1.1.0"

    broken = hello(tmp_path, "1.2.0", start="#!/bin/sh\necho starting 1.2.0; echo cannot bind >&2; exit 3\n")
    failed = deploy.deploy_package(broken.path, targets(hosts), env)
    assert not failed.ok
    for result in failed.hosts.values():
        assert (result.status, result.rolled_back_to) == ("failed", "1.1.0"), failed.to_dict()
        assert "start" in result.message
        assert "hello 1.2.0" in result.message  # manifest defaults ("hello") are not masked as secrets
    assert [answer(host) for host in hosts] == [f"{SECRET} from 1.1.0"] * 2
    assert registry.get_service("hello", "node0").version == "1.1.0"
    assert registry.get_service("hello", "node0").state.value == "running"

    slow = hello(tmp_path, "1.3.0", health={"tcp": 9, "timeout": 2})  # nothing listens on port 9
    timed_out = deploy.deploy_package(slow.path, targets(hosts)[:1], env)
    assert timed_out.hosts["node0"].status == "failed"
    assert timed_out.hosts["node0"].rolled_back_to == "1.1.0"
    assert "health" in timed_out.hosts["node0"].message
    assert answer(hosts[0]) == f"{SECRET} from 1.1.0"

    # The env reached the service, and nowhere else: not the artifacts, not the events, not the results.
    leaks = [path for path in (tmp_path / "jobs").rglob("*") if path.is_file() and SECRET in path.read_text("latin-1")]
    assert leaks == []
    assert SECRET not in json.dumps([e.to_dict() for e in progress] + [failed.to_dict(), first.to_dict()])
    env_file = hosts[0].install_base / "hello" / "shared" / "env"
    assert env_file.stat().st_mode & 0o777 == 0o600 and SECRET in env_file.read_text()


def test_unreachable_host_fails_alone(hosts: list[SshHost], tmp_path: Path) -> None:
    registry = Registry()
    stop_host(hosts[1])
    result = deployer(hosts, registry, tmp_path).deploy_package(hello(tmp_path, "1.0.0").path, targets(hosts))
    assert result.hosts["node0"].status == "deployed"
    assert result.hosts["node1"].status == "unreachable"
    assert not result.ok
    assert registry.get_service("hello", "node1").state.value == "failed"
    assert registry.get_service("hello", "node0").state.value == "running"


def test_unknown_host_key_is_refused(hosts: list[SshHost], tmp_path: Path) -> None:
    strangers = tmp_path / "empty_known_hosts"
    strangers.write_text("")
    deploy = PackageDeployer(known_hosts=strangers, work_dir=tmp_path / "jobs")
    result = deploy.deploy_package(hello(tmp_path, "1.0.0").path, targets(hosts)[:1])
    assert result.hosts["node0"].status == "unreachable"
    assert "Host key verification failed" in result.hosts["node0"].message
    assert not (hosts[0].install_base / "hello").exists()


@pytest.mark.parametrize("bad", CORPUS, ids=str)
def test_bad_packages_are_refused_before_any_connection(bad: BadPackage, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    deploy = PackageDeployer(work_dir=tmp_path / "jobs", limits=Limits(max_unpacked=64 * 1024 * 1024))
    with pytest.raises(PackageError, match=re.escape(bad.reason)):
        deploy.deploy_package(bad.make(tmp_path), RemoteTarget("127.0.0.1", port=port))
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody knocked
    listener.close()
    assert not (tmp_path / "jobs").exists()


def test_env_is_checked_against_the_manifest_before_connecting(tmp_path: Path) -> None:
    package = hello(tmp_path, "1.0.0")
    deploy = PackageDeployer(work_dir=tmp_path / "jobs")
    with pytest.raises(ValidationError, match=r"does not declare env variable.*HELO_GREETING"):
        deploy.deploy_package(package.path, RemoteTarget("127.0.0.1", port=1), {"HELO_GREETING": SECRET})
    with pytest.raises(ValidationError, match="install_base"):
        RemoteTarget("10.0.0.1", install_base="opt")


# --- the package module through ansible-playbook ------------------------------------------


def test_module_rollback_absent_and_check_mode(hosts: list[SshHost], tmp_path: Path) -> None:
    v1, v2 = hello(tmp_path, "1.0.0"), hello(tmp_path, "2.0.0")
    hosts_file = inventory(hosts, tmp_path / "hosts.yml")
    playbook = tmp_path / "play.yml"

    def run(task: dict, *extra: str) -> subprocess.CompletedProcess[str]:
        play = [{"name": "t", "hosts": "all", "gather_facts": False, "tasks": [{"svcreg.registry.package": task}]}]
        playbook.write_text(yaml.safe_dump(play))
        with ansible_env(tmp_path) as env:
            return subprocess.run(
                [str(BIN / "ansible-playbook"), "-i", str(hosts_file), str(playbook), *extra],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )

    base = {"install_base": "{{ svcreg_install_base }}"}
    for package in (v1, v2):
        done = run({**base, "src": str(package.path)})
        assert done.returncode == 0, done.stdout
    assert [answer(host) for host in hosts] == ["hello from 2.0.0"] * 2

    preview = run({**base, "name": "hello", "rollback": True}, "--check")
    assert preview.returncode == 0 and recap(preview.stdout, "node0")["changed"] == 1, preview.stdout
    assert answer(hosts[0]) == "hello from 2.0.0"

    rolled = run({**base, "name": "hello", "rollback": True})
    assert rolled.returncode == 0, rolled.stdout
    assert [answer(host) for host in hosts] == ["hello from 1.0.0"] * 2

    refused = run({**base, "src": str(tmp_path / "missing-1.0.0.tar.gz")})
    assert refused.returncode == 2 and "missing-1.0.0.tar.gz" in refused.stdout

    gone = run({**base, "name": "hello", "state": "absent"})
    assert gone.returncode == 0 and recap(gone.stdout, "node0")["changed"] == 1, gone.stdout
    assert not (hosts[0].install_base / "hello").exists()
    with pytest.raises(OSError):
        answer(hosts[0])
    again = run({**base, "name": "hello", "state": "absent"})
    assert recap(again.stdout, "node0")["changed"] == 0


# --- through the registry: WebSocket jobs, the CLI, playbooks/deploy.yml ----------------------


def _networks(hosts: list[SshHost]) -> dict:
    """A LAN of the test hosts; the node variables serve the registry's deployer and the Ansible inventory."""
    nodes = [
        {
            "name": host.name,
            "host": host.ip,
            "ssh_user": "root",
            "ssh_key": str(host.key),
            "install_base": str(host.install_base),
            "ansible_ssh_private_key_file": str(host.key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={host.known_hosts} -o StrictHostKeyChecking=yes",
            "ansible_python_interpreter": "/usr/bin/python3",
            "svcreg_install_base": str(host.install_base),
        }
        for host in hosts
    ]
    return {"networks": {"lab": {"type": "lan", "subnet": "10.231.0.0/16", "nodes": nodes}}}


async def test_deploy_package_over_websocket(hosts: list[SshHost], tmp_path: Path) -> None:
    pki = write_pki(tmp_path, trustme.CA())
    tokens = TokenRegistry([])
    plain = {role.label: tokens.add(role.label, role)[1] for role in Role}
    config = NetworkConfig.from_dict(_networks(hosts))
    settings = DeployConfig(
        packages_dir=tmp_path / "packages", work_dir=tmp_path / "jobs", known_hosts=hosts[0].known_hosts
    )
    registry = Registry.with_persistence(tmp_path / "registry.db", networks=config)
    jobs = DeployJobs(PackageDeployer(registry, networks=config, known_hosts=hosts[0].known_hosts), settings, config)
    from registry.server import WsServer

    server = await WsServer.new_tls(
        ("127.0.0.1", 0),
        registry,
        pki.server,
        tokens=tokens,
        networks=NetworkManager(config, store=registry.store),
        deploys=jobs,
    )
    running = Running(server, registry, pki, plain)
    package = hello(tmp_path, "1.0.0")
    try:
        async with await running.client("admin") as admin, await running.client("read") as reader:
            with pytest.raises(Forbidden):
                await reader.deploy_package(package.file_name, node="node0")
            with pytest.raises(NotFound, match="no node named 'nope'"):
                await admin.deploy_package(package.file_name, node="nope")
            with pytest.raises(ValidationError, match="outside the registry's packages folder"):
                await admin.deploy_package("../registry.db", node="node0")
            with pytest.raises(NotFound, match="no package"):
                await admin.deploy_package("hello-9.tar.gz", node="node0")
            with pytest.raises(ValidationError, match="does not declare env"):
                await admin.deploy_package(package.file_name, node="node0", env={"NOPE": "x"})

            job = await admin.deploy_package(
                package.file_name, targets=["node0", "node1"], env={"HELLO_GREETING": SECRET}
            )
            assert job["status"] == "running" and [t["name"] for t in job["targets"]] == ["node0", "node1"]
            watched = await reader.watch_job(job["job"])
            assert watched["job"] == job["job"]
            # The event loop keeps answering while the deployment runs in its thread pool.
            pings = [await admin.ping() for _ in range(5)]
            assert all(p["pong"] for p in pings)

            async def finished(client: WsClient) -> list:
                return [message async for message in client.job_messages(job["job"], timeout=120)]

            mine, theirs = await asyncio.gather(finished(admin), finished(reader))
            for messages in (mine, theirs):
                assert messages[-1].event == "finished"
                assert messages[-1].data["status"] == "successful", messages[-1].data
            kinds = {(m.data["kind"], m.data["host"]) for m in mine[:-1]}
            assert {("started", "node0"), ("changed", "node0"), ("changed", "node1")} <= kinds
            assert SECRET not in json.dumps([m.data for m in mine])
            summary = await admin.get_job(job["job"])
            assert summary["result"]["ok"] is True and summary["events"]
            assert [j["job"] for j in await reader.list_jobs()] == [job["job"]]
            services = await admin.list_services(service_name="hello")
            assert sorted((s.host_id, s.state.value, s.location.value) for s in services) == [
                ("node0", "running", "lan"),
                ("node1", "running", "lan"),
            ]
        assert [answer(host) for host in hosts] == [f"{SECRET} from 1.0.0"] * 2
    finally:
        await server.close()
        await jobs.close()
        registry.close()


def test_cli_deploy_and_deploy_playbook_through_the_inventory(hosts: list[SshHost], tmp_path: Path) -> None:
    home = tmp_path / "home"
    deploy_config = f"deploy:\n  known_hosts: {hosts[0].known_hosts}\n"
    with running_registry(home, yaml.safe_dump(_networks(hosts)), deploy_config) as live:
        env = dict(live.env, SVCREG_URL=live.settings.url)
        packages = home / "packages"
        v1 = hello(tmp_path, "1.0.0")
        shutil.copy(v1.path, packages)
        secrets = tmp_path / "deploy.env"
        secrets.write_text(f"HELLO_GREETING={SECRET}\n")
        cli = subprocess.run(
            [str(BIN / "svcreg"), "deploy", v1.file_name, "--node", "node0", "--env-file", str(secrets)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "node0" in cli.stdout and "deployed" in cli.stdout
        assert SECRET not in cli.stdout + cli.stderr
        assert answer(hosts[0]) == f"{SECRET} from 1.0.0"

        broken = hello(tmp_path, "1.1.0", start="#!/bin/sh\nexit 7\n")
        shutil.copy(broken.path, packages)
        failed = subprocess.run(
            [str(BIN / "svcreg"), "deploy", broken.file_name, "--node", "node0", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert json.loads(failed.stdout)["result"]["hosts"]["node0"]["rolled_back_to"] == "1.0.0"

        v2 = hello(tmp_path, "2.0.0")
        args = ["playbooks/deploy.yml", "-e", f"svcreg_package={v2.path}", "-e", "svcreg_deploy_hosts=node0,node1"]
        first = ansible("ansible-playbook", *args, env=env)
        second = ansible("ansible-playbook", *args, env=env)
        assert recap(first.stdout, "node1")["changed"] >= 2
        assert recap(second.stdout, "node0")["changed"] == 0 and recap(second.stdout, "node1")["changed"] == 0
        assert [answer(host) for host in hosts] == ["hello from 2.0.0"] * 2
        with live.client() as client:
            entries = {e.host_id: e for e in client.list_services(service_name="hello")}
        assert {name: (e.state.value, e.version) for name, e in entries.items()} == {
            "node0": ("running", "2.0.0"),
            "node1": ("running", "2.0.0"),
        }
        assert entries["node1"].network_info.ip == hosts[1].ip


def test_deployed_instances_are_placed_like_any_registration(tmp_path: Path) -> None:
    """A node inside its network keeps its address; a target SSH reaches from outside its network gets one
    from the registry (and keeps it on a redeploy); an address in no network is LAN, loopback local."""
    from registry.model import ServiceState

    config = NetworkConfig.from_dict(
        {
            "networks": {
                "production": {
                    "type": "lan",
                    "subnet": "192.168.1.0/24",
                    "nodes": [{"host": "192.168.1.10", "name": "n1"}],
                }
            }
        }
    )
    registry = Registry(networks=config)
    deploy = PackageDeployer(registry, networks=config, work_dir=tmp_path / "jobs")
    package = hello(tmp_path, "1.0.0")
    for target in (
        RemoteTarget("192.168.1.10", name="n1", network="production"),
        RemoteTarget("203.0.113.7", name="edge-1", network="production"),
        RemoteTarget("198.51.100.4", name="far"),
        RemoteTarget("127.0.0.1", name="here"),
    ):
        deploy._register(package, target, ServiceState.RUNNING, "1.0.0")
    placed = {entry.host_id: (entry.location.value, entry.network_info.ip) for entry in registry.list_services()}  # type: ignore[union-attr]
    assert placed == {
        "n1": ("lan", "192.168.1.10"),
        "edge-1": ("lan", "192.168.1.2"),
        "far": ("lan", "198.51.100.4"),
        "here": ("local", "127.0.0.1"),
    }
    assert [a.owner for a in registry.allocations()] == ["hello@edge-1"]
    deploy._register(
        package, RemoteTarget("203.0.113.7", name="edge-1", network="production"), ServiceState.RUNNING, "1.0.1"
    )
    assert registry.get_service("hello", "edge-1").network_info.ip == "192.168.1.2"
