"""Deploying service packages to hosts over SSH, on ansible-runner.

:class:`PackageDeployer` validates the package first (nothing is sent, no connection is
opened for a refused package), then runs the collection's own playbook
(``svcreg.registry.deploy_package``, the ``svcreg.registry.package`` module on each
target) through ``ansible_runner.run`` in a private data directory per job. Progress
comes from ansible-runner's ``event_handler`` and ``status_handler`` — stdout is never
parsed. With a :class:`~registry.core.Registry`, each target's instance goes
``starting`` → ``running`` (or ``failed``) with the manifest's endpoints, so subscribers
see the deployment as ``ServiceRegistered`` / ``ServiceStateChanged`` events.

Secrets: the env values travel to ansible-playbook in a mode-0600 vars file inside the
private data directory, which is removed when the job ends; the ``package`` module marks
them ``no_log``, so they are masked in results, events and artifacts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .exceptions import ServiceNotFound, ValidationError
from .model import Endpoint, Location, NetworkInfo, ServiceEntry, ServiceState, validate_host_id
from .package import Limits, Package, inspect_package, resolve_env

if TYPE_CHECKING:
    from .core import Registry
    from .network import NetworkConfig

__all__ = [
    "DeployEvent",
    "DeployResult",
    "HostResult",
    "PackageDeployer",
    "RemoteTarget",
    "check_keep_releases",
    "collection_root",
]

log = logging.getLogger(__name__)

PLAYBOOK = "svcreg.registry.deploy_package"
COLLECTION_PACKAGE = "ansible_collections.svcreg.registry"
_job_numbers = itertools.count(1)
# Unix socket paths are limited to 108 bytes: ssh's ControlPath lives in a short folder.
_CONTROL_DIR_ROOT = "/tmp"


def collection_root() -> Path:
    """The folder holding ``ansible_collections/svcreg/registry`` (for ``ANSIBLE_COLLECTIONS_PATH``).

    Found by import, so it works the same from a checkout and from an installed distribution,
    which ships the collection as the namespace package ``ansible_collections.svcreg.registry``.
    """
    try:
        spec = importlib.util.find_spec(COLLECTION_PACKAGE)
    except ImportError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "playbooks" / "deploy_package.yml").is_file():
            return Path(location).resolve().parents[2]
    raise ValidationError(f"the svcreg.registry Ansible collection ({COLLECTION_PACKAGE}) is not installed")


@dataclass(frozen=True, slots=True)
class RemoteTarget:
    """One host to deploy to, reached over SSH.

    ``name`` is the instance's ``host_id`` in the registry (default: ``host``). ``network`` is
    the configured network the instance belongs to: when ``host`` (the address SSH uses) is
    outside it, the registry allocates the instance's address in it.
    """

    host: str
    ssh_user: str = "root"
    ssh_key: str | None = None
    install_base: str = "/opt"
    port: int = 22
    name: str | None = None
    python: str = "/usr/bin/python3"
    network: str | None = None

    def __post_init__(self) -> None:
        if not self.host or any(char.isspace() for char in self.host):
            raise ValidationError(f"target host {self.host!r} is not a host name or address", field="target.host")
        if not self.ssh_user or any(char.isspace() or char == "@" for char in self.ssh_user):
            raise ValidationError(f"ssh_user {self.ssh_user!r} is not a user name", field="target.ssh_user")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValidationError(f"target port {self.port!r} is out of range (1-65535)", field="target.port")
        if not self.install_base.startswith("/"):
            raise ValidationError(
                f"install_base {self.install_base!r} must be an absolute path", field="target.install_base"
            )
        validate_host_id(self.host_id, "target.name")

    @property
    def host_id(self) -> str:
        return self.name or self.host

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.host_id,
            "host": self.host,
            "ssh_user": self.ssh_user,
            "ssh_key": self.ssh_key,
            "install_base": self.install_base,
            "port": self.port,
        }


@dataclass(frozen=True, slots=True)
class DeployEvent:
    """Progress: ``kind`` is started / ok / changed / failed / unreachable / skipped (per host and task),
    or ``status`` (the job's status changed; ``host`` and ``task`` empty)."""

    job: str
    kind: str
    host: str = ""
    task: str = ""
    message: str = ""
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "kind": self.kind,
            "host": self.host,
            "task": self.task,
            "message": self.message,
            "timestamp": self.timestamp,
        }


@dataclass(slots=True)
class HostResult:
    """What happened on one host. ``status``: deployed, unchanged, restarted, failed, unreachable."""

    host: str
    status: str
    version: str | None = None
    previous_version: str | None = None
    rolled_back_to: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("deployed", "unchanged", "restarted")

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "status": self.status,
            "ok": self.ok,
            "version": self.version,
            "previous_version": self.previous_version,
            "rolled_back_to": self.rolled_back_to,
            "message": self.message,
        }


@dataclass(slots=True)
class DeployResult:
    job: str
    package: dict[str, Any]
    status: str  # successful / failed / timeout / canceled
    hosts: dict[str, HostResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "successful" and all(result.ok for result in self.hosts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "package": self.package,
            "status": self.status,
            "ok": self.ok,
            "hosts": {host: result.to_dict() for host, result in self.hosts.items()},
            "seconds": round(self.seconds, 3),
        }


class PackageDeployer:
    """Deploys packages with ansible-runner; thread-safe, each job in its own private data directory.

    Args:
        registry: when given, instances are registered/updated as the deployment goes.
        networks: the networks config, to give registered instances the right location.
        known_hosts: the ``known_hosts`` file ssh checks host keys against (default: ssh's own,
            ``~/.ssh/known_hosts``).
        host_key_checking: on by default; turning it off accepts any host key (first-use trust
            is not offered: a changed key must fail a deployment).
        work_dir: where private data directories are made (default: the system temp folder).
        keep_artifacts: keep each job's ansible-runner artifacts (events, stdout; never the env
            values) under ``work_dir/jobs/<job>``; by default they are removed with the job.
        limits: package size limits (see :class:`registry.package.Limits`).
        timeout: seconds after which a job is stopped (None: no limit).
        forks: hosts deployed in parallel within one job.
    """

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        networks: NetworkConfig | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
        host_key_checking: bool = True,
        work_dir: str | os.PathLike[str] | None = None,
        keep_artifacts: bool = False,
        limits: Limits | None = None,
        timeout: int | None = None,
        forks: int = 10,
    ) -> None:
        self.registry = registry
        self.networks = networks
        self.known_hosts = Path(known_hosts) if known_hosts is not None else None
        self.host_key_checking = host_key_checking
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.keep_artifacts = keep_artifacts
        self.limits = limits or Limits()
        self.timeout = timeout
        self.forks = forks

    # --- the job ----------------------------------------------------------------------

    def prepare(
        self,
        path: str | os.PathLike[str],
        targets: RemoteTarget | Sequence[RemoteTarget],
        env_vars: Mapping[str, object] | None = None,
    ) -> tuple[Package, list[RemoteTarget], dict[str, str]]:
        """Everything that can be checked without connecting: the package, the targets, the env."""
        package = inspect_package(path, self.limits)
        target_list = [targets] if isinstance(targets, RemoteTarget) else list(targets)
        if not target_list:
            raise ValidationError("no target to deploy to", field="target")
        names = [target.host_id for target in target_list]
        if len(set(names)) != len(names):
            raise ValidationError(f"targets named twice: {', '.join(sorted(set(names)))}", field="target")
        given = env_vars or {}
        resolved = resolve_env(package.manifest, given)
        # Only the values given are sent (and masked as no_log); the module adds the manifest's
        # defaults itself, so a default such as "hello" is not masked in every output line.
        env = {name: value for name, value in resolved.items() if name in given}
        return package, target_list, env

    def deploy_package(
        self,
        path: str | os.PathLike[str],
        target: RemoteTarget | Sequence[RemoteTarget],
        env_vars: Mapping[str, object] | None = None,
        *,
        on_event: Callable[[DeployEvent], None] | None = None,
        job_id: str | None = None,
        keep_releases: int = 5,
        cancel: threading.Event | None = None,
    ) -> DeployResult:
        """Deploy ``path`` to ``target`` (one or several) and wait for the result.

        Raises PackageError / ValidationError before any connection when the package, a
        target or the env is refused. A deployment that runs and fails is not an exception:
        ``result.ok`` is False and each host says why.
        """
        package, targets, env = self.prepare(path, target, env_vars)
        check_keep_releases(keep_releases)
        return self.run_prepared(
            package, targets, env, on_event=on_event, job_id=job_id, keep_releases=keep_releases, cancel=cancel
        )

    def run_prepared(
        self,
        package: Package,
        targets: list[RemoteTarget],
        env: dict[str, str],
        *,
        on_event: Callable[[DeployEvent], None] | None = None,
        job_id: str | None = None,
        keep_releases: int = 5,
        cancel: threading.Event | None = None,
    ) -> DeployResult:
        """Run a deployment :meth:`prepare` accepted."""
        import ansible_runner

        job = job_id or f"deploy-{os.getpid()}-{next(_job_numbers)}"
        began = time.monotonic()
        progress = _Progress(job, package, targets, on_event, self._register)
        self._register_all(package, targets, ServiceState.STARTING)
        with self._job_dirs(job) as (data_dir, control_dir):
            secrets = data_dir / "secret-vars.json"
            descriptor = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"svcreg_env": env}, handle)
            runner = ansible_runner.run(
                private_data_dir=str(data_dir),
                ident="run",
                playbook=PLAYBOOK,
                inventory=self._inventory(targets),
                extravars={
                    "svcreg_package": str(package.path.resolve()),
                    "svcreg_secret_vars": str(secrets),
                    "svcreg_keep_releases": keep_releases,
                },
                envvars=self._envvars(data_dir, control_dir),
                event_handler=progress.on_runner_event,
                status_handler=progress.on_status,
                cancel_callback=(lambda: cancel.is_set()) if cancel is not None else None,
                quiet=True,
                forks=self.forks,
                timeout=self.timeout,
                suppress_env_files=True,
            )
            status = runner.status
            why = "" if progress.complete else _last_lines(data_dir / "artifacts" / "run" / "stdout")
        results = progress.finish(status, why)
        return DeployResult(
            job=job,
            package={"name": package.manifest.name, "version": package.manifest.version, "sha256": package.sha256},
            status=status,
            hosts=results,
            seconds=time.monotonic() - began,
        )

    # --- registry -----------------------------------------------------------------------

    def _entry(self, package: Package, target: RemoteTarget, state: ServiceState, version: str) -> ServiceEntry:
        """The instance as the registry places any registration: the location from the address (a
        configured network's, loopback is local, elsewhere LAN), or, for a target whose network
        does not hold its SSH address, no address: the registry allocates one in that network."""
        ip = _address_of(target.host)
        networks = self.registry.networks if self.registry is not None else self.networks
        inside = networks.classify(ip) if networks is not None else None
        location: Location | None = None
        info = NetworkInfo(ip=ip)
        if target.network is not None and (inside is None or inside.name != target.network):
            info = NetworkInfo(network=target.network)
        elif inside is None:
            location = Location.LOCAL if ipaddress.ip_address(ip).is_loopback else Location.LAN
        return ServiceEntry(
            service_name=package.manifest.name,
            host_id=target.host_id,
            location=location,
            state=state,
            network_info=info,
            endpoints=tuple(Endpoint(e.name, e.port, e.protocol) for e in package.manifest.endpoints),
            version=version,
            metadata={"deployed_by": "svcreg"},
        )

    def _register_all(self, package: Package, targets: list[RemoteTarget], state: ServiceState) -> None:
        """Mark each target's instance ``state`` — except where this version already runs: a redeploy
        that turns out unchanged must not make the instance flap through ``starting``."""
        for target in targets:
            if self.registry is not None:
                with contextlib.suppress(ServiceNotFound):
                    current = self.registry.get_service(package.manifest.name, target.host_id)
                    if current.state is ServiceState.RUNNING and current.version == package.manifest.version:
                        continue
            self._register(package, target, state, package.manifest.version)

    def _register(self, package: Package, target: RemoteTarget, state: ServiceState, version: str) -> None:
        if self.registry is None:
            return
        try:
            self.registry.add_or_update(self._entry(package, target, state, version))
        except Exception:  # the deployment goes on; the registry's own log says why
            log.exception("could not record %s on %s as %s", package.manifest.name, target.host_id, state.value)

    # --- ansible-runner inputs ------------------------------------------------------------

    @contextlib.contextmanager
    def _job_dirs(self, job: str) -> Iterator[tuple[Path, Path]]:
        root = self.work_dir
        if root is not None:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        data_dir = Path(tempfile.mkdtemp(prefix=f"svcreg-{job}-", dir=root))
        control_dir = Path(tempfile.mkdtemp(prefix="svcreg-cp-", dir=_CONTROL_DIR_ROOT))
        try:
            yield data_dir, control_dir
        finally:
            (data_dir / "secret-vars.json").unlink(missing_ok=True)
            if self.keep_artifacts and root is not None:
                kept = root / "jobs" / job
                kept.parent.mkdir(parents=True, exist_ok=True)
                # ansible-runner records the whole process environment there: never keep it.
                (data_dir / "artifacts" / "run" / "command").unlink(missing_ok=True)
                shutil.move(str(data_dir / "artifacts" / "run"), kept)
            shutil.rmtree(data_dir, ignore_errors=True)
            shutil.rmtree(control_dir, ignore_errors=True)

    def _inventory(self, targets: list[RemoteTarget]) -> dict[str, Any]:
        hosts: dict[str, Any] = {}
        for target in targets:
            host_vars: dict[str, Any] = {
                "ansible_host": target.host,
                "ansible_port": target.port,
                "ansible_user": target.ssh_user,
                "ansible_python_interpreter": target.python,
                "svcreg_install_base": target.install_base,
            }
            if target.ssh_key:
                host_vars["ansible_ssh_private_key_file"] = target.ssh_key
            hosts[target.host_id] = host_vars
        return {"all": {"children": {"svcreg_deploy_targets": {"hosts": hosts}}}}

    def _envvars(self, data_dir: Path, control_dir: Path) -> dict[str, str]:
        ssh_args = ["-o ControlMaster=auto", "-o ControlPersist=60s", "-o ServerAliveInterval=15"]
        if self.known_hosts is not None:
            ssh_args.append(f"-o UserKnownHostsFile={self.known_hosts}")
        if not self.host_key_checking:
            ssh_args.append("-o UserKnownHostsFile=/dev/null")
        config = data_dir / "ansible.cfg"
        config.write_text("# svcreg deploy: settings come from the environment\n")
        return {
            "PATH": os.pathsep.join([str(Path(_ansible_playbook()).parent), os.environ.get("PATH", os.defpath)]),
            "ANSIBLE_CONFIG": str(config),
            "ANSIBLE_COLLECTIONS_PATH": str(collection_root()),
            "ANSIBLE_HOST_KEY_CHECKING": "True" if self.host_key_checking else "False",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_SSH_ARGS": " ".join(ssh_args),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
            "ANSIBLE_SSH_CONTROL_PATH": "%(directory)s/%%C",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOLOR": "True",
            "ANSIBLE_LOCAL_TEMP": str(data_dir / "tmp"),
            "ANSIBLE_TIMEOUT": "20",
        }


def check_keep_releases(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"keep_releases {value!r} must be a whole number of at least 1", field="keep_releases")
    return value


def _ansible_playbook() -> str:
    """ansible-playbook next to this Python (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ansible-playbook")
    if found is None:
        raise ValidationError("ansible-playbook is not installed (pip install ansible-core)")
    return found


def _last_lines(path: Path, count: int = 5) -> str:
    """The end of ansible-playbook's output, to say why a job ended early (results are masked there)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "ERROR" in line or "error:" in line]
    return " | ".join((errors or lines)[-count:])[-1500:]


def _address_of(host: str) -> str:
    """The target's IP: ``host`` itself when it is an address, else its first resolved address."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None)[0][4][0])
    except OSError as exc:
        raise ValidationError(f"target host {host!r} does not resolve: {exc}", field="target.host") from None


class _Progress:
    """Turns ansible-runner events into :class:`DeployEvent` s and per-host results."""

    _KINDS: ClassVar[dict[str, str]] = {
        "runner_on_start": "started",
        "runner_on_ok": "ok",
        "runner_on_failed": "failed",
        "runner_on_unreachable": "unreachable",
        "runner_on_skipped": "skipped",
    }

    def __init__(
        self,
        job: str,
        package: Package,
        targets: list[RemoteTarget],
        on_event: Callable[[DeployEvent], None] | None,
        register: Callable[[Package, RemoteTarget, ServiceState, str], None],
    ) -> None:
        self.job = job
        self.package = package
        self.targets = {target.host_id: target for target in targets}
        self.on_event = on_event
        self.register = register
        self.results: dict[str, HostResult] = {}

    def _emit(self, event: DeployEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("a deploy progress handler failed")

    def on_status(self, status: Mapping[str, Any], runner_config: Any = None) -> None:
        self._emit(DeployEvent(self.job, "status", message=str(status.get("status", ""))))

    def on_runner_event(self, event: Mapping[str, Any]) -> bool:
        kind = self._KINDS.get(str(event.get("event")))
        if kind is None:
            return True
        data = event.get("event_data") or {}
        host = str(data.get("host") or "")
        task = str(data.get("task") or "")
        res = data.get("res")
        result: Mapping[str, Any] = res if isinstance(res, Mapping) else {}
        if kind == "ok" and result.get("changed"):
            kind = "changed"
        message = str(result.get("msg") or "") if kind in ("failed", "unreachable") else ""
        # The package task's result carries "package"; any failure on a host ends it there.
        finishes_host = kind in ("failed", "unreachable") or (kind != "started" and result.get("package") is not None)
        if finishes_host and host in self.targets:
            self._host_done(host, kind, result)
        self._emit(DeployEvent(self.job, kind, host=host, task=task, message=message))
        return True

    def _host_done(self, host: str, kind: str, result: Mapping[str, Any]) -> None:
        target = self.targets[host]
        version = self.package.manifest.version
        if kind == "unreachable":
            outcome = HostResult(host, "unreachable", message=str(result.get("msg") or "unreachable"))
            state = ServiceState.FAILED
        elif kind == "failed":
            rolled_back_to = result.get("rolled_back_to")
            outcome = HostResult(
                host,
                "failed",
                version=version,
                previous_version=result.get("previous_version"),
                rolled_back_to=rolled_back_to,
                message=str(result.get("msg") or "the deployment failed"),
            )
            # A rollback leaves the previous version running: that is the truth to record.
            state = ServiceState.RUNNING if rolled_back_to else ServiceState.FAILED
            version = rolled_back_to or version
        else:
            outcome = HostResult(
                host,
                str(result.get("action") or "deployed"),
                version=result.get("version") or version,
                previous_version=result.get("previous_version"),
            )
            state = ServiceState.RUNNING
        self.results[host] = outcome
        self.register(self.package, target, state, version)

    @property
    def complete(self) -> bool:
        return all(host in self.results for host in self.targets)

    def finish(self, status: str, why: str = "") -> dict[str, HostResult]:
        for host, target in self.targets.items():
            if host not in self.results:
                message = f"the job ended ({status}) before this host was done" + (f": {why}" if why else "")
                self.results[host] = HostResult(host, "failed", message=message)
                self.register(self.package, target, ServiceState.FAILED, self.package.manifest.version)
        return dict(self.results)
