"""Deployment benchmark: one package to 1 and to 10 hosts, against a plain copy+unarchive playbook.

The hosts are sshd in network namespaces on this machine (tests/sshnet.py), so the figures
measure svcreg's own overhead (validation, ansible-runner, the module's work on the host)
rather than a network. Also measured: how fast the registry's event loop answers ``ping``
while two deployments to 10 hosts run (the aim is within 10 ms).

Run as root: ``.venv/bin/python bench/bench_deploy.py`` (about two minutes).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from registry import Registry  # noqa: E402
from registry.auth import Role, TokenRegistry  # noqa: E402
from registry.client import ConnectionSettings, WsClient  # noqa: E402
from registry.config import DeployConfig  # noqa: E402
from registry.deploy import PackageDeployer, RemoteTarget  # noqa: E402
from registry.jobs import DeployJobs  # noqa: E402
from registry.package import build_package  # noqa: E402
from registry.server import WsServer  # noqa: E402
from registry.tls import TlsClientConfig  # noqa: E402
from tests.sshnet import SshHost, ansible_env, inventory, ssh_hosts  # noqa: E402
from tests.test_server import write_pki  # noqa: E402

BIN = Path(sys.executable).parent


def targets(hosts: list[SshHost]) -> list[RemoteTarget]:
    return [RemoteTarget(h.ip, "root", str(h.key), str(h.install_base), name=h.name) for h in hosts]


def clean(hosts: list[SshHost]) -> None:
    for host in hosts:
        subprocess.run(["rm", "-rf", str(host.install_base)], check=True)
        host.install_base.mkdir(parents=True)


def timed_deploy(deployer: PackageDeployer, package: Path, hosts: list[SshHost]) -> float:
    began = time.perf_counter()
    result = deployer.deploy_package(package, targets(hosts))
    elapsed = time.perf_counter() - began
    assert result.ok, result.to_dict()
    return elapsed


def baseline(package: Path, hosts: list[SshHost], work: Path) -> float:
    """The same copy + unpack with stock modules: ansible.builtin.copy then ansible.builtin.unarchive."""
    hosts_file = inventory(hosts, work / "hosts.yml")
    play = [
        {
            "name": "copy and unarchive",
            "hosts": "all",
            "gather_facts": False,
            "tasks": [
                {"ansible.builtin.file": {"path": "{{ svcreg_install_base }}/plain", "state": "directory"}},
                {
                    "ansible.builtin.unarchive": {
                        "src": str(package),
                        "dest": "{{ svcreg_install_base }}/plain",
                    }
                },
            ],
        }
    ]
    playbook = work / "baseline.yml"
    playbook.write_text(yaml.safe_dump(play))
    with ansible_env(work) as env:
        began = time.perf_counter()
        subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(hosts_file), str(playbook), "--forks", "10"],
            env=env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - began


async def ping_while_deploying(package: Path, hosts: list[SshHost], work: Path) -> list[float]:
    pki = write_pki(work, trustme.CA())
    tokens = TokenRegistry([])
    token = tokens.add("admin", Role.ADMIN)[1]
    registry = Registry()
    settings = DeployConfig(packages_dir=package.parent, work_dir=work / "jobs", known_hosts=hosts[0].known_hosts)
    jobs = DeployJobs(PackageDeployer(registry, known_hosts=hosts[0].known_hosts), settings)
    server = await WsServer.new_tls(("127.0.0.1", 0), registry, pki.server, tokens=tokens, deploys=jobs)
    url = f"wss://127.0.0.1:{server.port}/"
    client_settings = ConnectionSettings(url, TlsClientConfig(ca_file=str(pki.ca_file)), token, timeout=60)
    latencies: list[float] = []
    try:
        async with await WsClient.connect(client_settings) as client:
            half = len(hosts) // 2
            started = [
                await client.deploy_package(
                    package.name,
                    targets=[
                        {"host": h.ip, "ssh_key": str(h.key), "install_base": str(h.install_base), "name": h.name}
                        for h in group
                    ],
                )
                for group in (hosts[:half], hosts[half:])
            ]
            pending = {job["job"] for job in started}
            while pending:
                began = time.perf_counter()
                await client.ping()
                latencies.append((time.perf_counter() - began) * 1000)
                for job in list(pending):
                    if (await client.get_job(job))["status"] != "running":
                        pending.discard(job)
                await asyncio.sleep(0.02)
            for job in started:
                assert (await client.get_job(job["job"]))["result"]["ok"]
    finally:
        await server.close()
        await jobs.close()
        registry.close()
    return latencies


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    package = build_package(REPO / "examples" / "hello", work / "packages")
    with ssh_hosts(10, work / "hosts") as hosts:
        deployer = PackageDeployer(known_hosts=hosts[0].known_hosts, work_dir=work / "jobs")
        for count in (1, 10):
            chosen = hosts[:count]
            clean(hosts)
            first = timed_deploy(deployer, package.path, chosen)
            again = timed_deploy(deployer, package.path, chosen)
            plain = baseline(package.path, chosen, work)
            print(
                f"{count:2} host(s): first deploy {first:5.2f} s, unchanged redeploy {again:5.2f} s, "
                f"plain copy+unarchive playbook {plain:5.2f} s"
            )
        clean(hosts)
        latencies = asyncio.run(ping_while_deploying(package.path, hosts, work))
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"ping while 2 jobs deploy to 10 hosts: n={len(latencies)}, p50 {statistics.median(latencies):.2f} ms, "
        f"p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms"
    )


if __name__ == "__main__":
    main()
