"""DeployJobs without SSH: request validation, the packages folder, targets, limits, progress fan-out.

The deployment itself is replaced by a PackageDeployer whose ``run_prepared`` waits for the
test (the real one is exercised against sshd in tests/test_deploy.py); everything before it —
package validation, target resolution, env checks — is the real code.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from registry.config import DeployConfig
from registry.deploy import DeployEvent, DeployResult, HostResult, PackageDeployer, RemoteTarget
from registry.exceptions import NotFound, PackageError, RateLimited, ValidationError
from registry.jobs import DeployJobs, Job
from registry.network import NetworkConfig
from registry.package import Package, build_package

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello"
NETWORKS = {
    "networks": {
        "lab": {
            "type": "lan",
            "subnet": "10.20.0.0/24",
            "nodes": [
                {"name": "web-1", "host": "10.20.0.5", "ssh_user": "deploy", "ssh_key": "/keys/web", "ssh_port": 2222},
                {"name": "web-2", "host": "10.20.0.6"},
            ],
        }
    }
}


class HeldDeployer(PackageDeployer):
    """Runs no playbook: reports one progress event, then waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.calls: list[tuple[list[RemoteTarget], dict[str, str]]] = []

    def run_prepared(self, package: Package, targets: list[RemoteTarget], env: dict[str, str], **options: Any) -> Any:
        self.calls.append((targets, env))
        options["on_event"](DeployEvent(options["job_id"], "started", host=targets[0].host_id, task="Deploy"))
        assert self.release.wait(10)
        hosts = {t.host_id: HostResult(t.host_id, "deployed", version=package.manifest.version) for t in targets}
        return DeployResult(options["job_id"], {"name": package.manifest.name}, "successful", hosts, 0.1)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DeployJobs, HeldDeployer, DeployConfig]:
    config = DeployConfig(packages_dir=tmp_path / "packages", work_dir=tmp_path / "work", known_hosts=tmp_path / "kh")
    build_package(EXAMPLE, config.packages_dir)
    deployer = HeldDeployer()
    return DeployJobs(deployer, config, NetworkConfig.from_dict(NETWORKS), max_finished=1), deployer, config


def test_targets_from_nodes_and_objects(setup: tuple[DeployJobs, HeldDeployer, DeployConfig]) -> None:
    jobs, _, _ = setup
    web1 = jobs.target("web-1")
    assert (web1.host, web1.ssh_user, web1.ssh_key, web1.port, web1.host_id) == (
        "10.20.0.5",
        "deploy",
        "/keys/web",
        2222,
        "web-1",
    )
    assert (jobs.target("web-2").ssh_user, jobs.target("web-2").install_base) == ("root", "/opt")
    explicit = jobs.target({"host": "10.20.0.9", "ssh_user": "ops", "name": "box"})
    assert (explicit.host, explicit.ssh_user, explicit.host_id) == ("10.20.0.9", "ops", "box")
    with pytest.raises(NotFound, match="no node named 'web-3'"):
        jobs.target("web-3")
    with pytest.raises(ValidationError, match=r"target\.passwd: unknown field"):
        jobs.target({"host": "10.20.0.9", "passwd": "x"})
    with pytest.raises(ValidationError, match=r"target\.host: is required"):
        jobs.target({"ssh_user": "x"})
    with pytest.raises(ValidationError, match="install_base"):
        jobs.target({"host": "10.20.0.9", "install_base": "relative"})


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"targets": [{"host": "h", "ssh_user": 5}]}, "params.targets[0].ssh_user"),
        ({"targets": ["web-1", {"host": "h", "ssh_user": ["x"]}]}, "params.targets[1].ssh_user"),
        ({"target": {"host": "h", "install_base": 5}}, "params.target.install_base"),
        ({"target": {"host": "h", "install_base": "relative"}}, "params.target.install_base"),
        ({"target": {"host": "h", "ssh_user": "a b"}}, "params.target.ssh_user"),
        ({"targets": [{"host": "h", "port": True}]}, "params.targets[0].port"),
        ({"targets": [5]}, "params.targets[0]"),
        ({"targets": "web-1"}, "params.targets"),
        ({"node": "web-1", "env": ["HELLO_GREETING"]}, "params.env"),
        ({"node": "web-1", "keep_releases": 10**400}, "params.keep_releases"),
        ({"node": "web-1", "colour": "red"}, "params.colour"),
    ],
)
async def test_bad_params_name_the_field(
    setup: tuple[DeployJobs, HeldDeployer, DeployConfig], params: dict[str, Any], field: str
) -> None:
    jobs, deployer, _ = setup
    with pytest.raises(ValidationError) as caught:
        await jobs.start({"package": "hello-1.0.0.tar.gz", **params})
    assert caught.value.field == field and caught.value.code == "bad_request"
    assert caught.value.message.startswith(f"{field}: ")
    assert jobs.list() == [] and deployer.calls == []


async def test_an_unknown_node_is_not_found_naming_the_field(
    setup: tuple[DeployJobs, HeldDeployer, DeployConfig],
) -> None:
    jobs, _, _ = setup
    with pytest.raises(NotFound, match="no node named 'x'") as caught:
        await jobs.start({"package": "hello-1.0.0.tar.gz", "targets": ["web-1", "x"]})
    assert caught.value.details == {"node": "x", "field": "params.targets[1]"}


def test_packages_only_from_the_packages_folder(setup: tuple[DeployJobs, HeldDeployer, DeployConfig]) -> None:
    jobs, _, config = setup
    assert jobs.package_path("hello-1.0.0.tar.gz") == (config.packages_dir / "hello-1.0.0.tar.gz").resolve()
    (config.packages_dir / "escape.tar.gz").symlink_to("/etc/passwd")
    for outside in ("../kh", "/etc/passwd", "escape.tar.gz"):
        with pytest.raises(ValidationError, match="outside the registry's packages folder"):
            jobs.package_path(outside)
    with pytest.raises(NotFound, match=r"no package 'hello-2\.tar\.gz'"):
        jobs.package_path("hello-2.tar.gz")


async def test_jobs_validate_first_then_run_and_fan_out(setup: tuple[DeployJobs, HeldDeployer, DeployConfig]) -> None:
    jobs, deployer, config = setup
    with pytest.raises(ValidationError, match="name where to deploy"):
        await jobs.start({"package": "hello-1.0.0.tar.gz"})
    with pytest.raises(ValidationError, match="does not declare env variable"):
        await jobs.start({"package": "hello-1.0.0.tar.gz", "node": "web-1", "env": {"TYPO": "x"}})
    with pytest.raises(ValidationError, match=r"params\.keep_releases: must be an integer >= 1"):
        await jobs.start({"package": "hello-1.0.0.tar.gz", "node": "web-1", "keep_releases": 0})
    (config.packages_dir / "broken-1.0.0.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(PackageError, match="not a readable"):
        await jobs.start({"package": "broken-1.0.0.tar.gz", "node": "web-1"})
    assert jobs.list() == [] and deployer.calls == []

    seen: list[tuple[str, str]] = []

    def watcher(job: Job, kind: str, data: dict[str, Any]) -> None:
        seen.append((kind, data.get("kind") or data.get("status")))

    job = await jobs.start(
        {"package": "hello-1.0.0.tar.gz", "targets": ["web-1", "web-2"], "env": {"HELLO_GREETING": "hi"}}, watcher
    )
    assert [t["name"] for t in job.targets] == ["web-1", "web-2"]
    for _ in range(100):
        if job.events:
            break
        await asyncio.sleep(0.01)
    assert job.events[0]["kind"] == "started"
    deployer.release.set()
    for _ in range(300):
        if job.done:
            break
        await asyncio.sleep(0.01)
    assert job.status == "successful" and job.result is not None and job.result["ok"] is True
    assert seen == [("progress", "started"), ("finished", "successful")]
    assert deployer.calls[0][1] == {"HELLO_GREETING": "hi"}  # the module adds the manifest's defaults
    assert jobs.get(job.id) is job
    await jobs.close()


async def test_max_jobs_and_forgetting_finished_ones(setup: tuple[DeployJobs, HeldDeployer, DeployConfig]) -> None:
    jobs, deployer, _ = setup
    jobs.config = DeployConfig(
        packages_dir=jobs.config.packages_dir, work_dir=jobs.config.work_dir, known_hosts=jobs.config.known_hosts
    )
    started = [await jobs.start({"package": "hello-1.0.0.tar.gz", "node": "web-1"}) for _ in range(4)]
    with pytest.raises(RateLimited, match="4 deployments are already running"):
        await jobs.start({"package": "hello-1.0.0.tar.gz", "node": "web-1"})
    deployer.release.set()
    for _ in range(300):
        if all(job.done for job in started):
            break
        await asyncio.sleep(0.01)
    assert [job["job"] for job in jobs.list()] == [started[-1].id]  # max_finished=1
    with pytest.raises(NotFound, match="no job"):
        jobs.get(started[0].id)
    await jobs.close()
