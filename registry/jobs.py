"""Deploy jobs for the server: targets by node name, a thread pool, and progress anyone can watch.

:class:`DeployJobs` lives on the server's event loop. A ``deploy_package`` request is
validated completely (package, targets, env) before a job exists; the deployment then
runs in a dedicated thread pool (``max_jobs`` at once), so the event loop and the
server's other work never wait for SSH. Progress events from ansible-runner threads are
handed to the loop with ``call_soon_threadsafe`` and fanned out to the job's watchers.

Jobs are kept in memory: the last ``max_finished`` finished jobs stay readable
(``get_job``/``watch_job``); a restart forgets them (the registry's service entries, which
the deployment updated, are durable).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .config import DeployConfig
from .deploy import DeployEvent, DeployResult, PackageDeployer, RemoteTarget
from .exceptions import NotFound, RateLimited, ValidationError
from .network import NetworkConfig
from .package import Package
from .protocol import DeployParams, DeployTarget, decode_params
from .schema import convert, shown

__all__ = ["DeployJobs", "Job"]

log = logging.getLogger(__name__)

_EVENTS_KEPT = 2000
_KEEP_RELEASES = 5

Listener = Callable[["Job", str, dict[str, Any]], None]


@dataclass(eq=False)
class Job:
    """One deployment. ``status``: running, then successful / failed / error (the job itself broke)."""

    id: str
    package: dict[str, Any]
    targets: list[dict[str, Any]]
    status: str = "running"
    created: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    events: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=_EVENTS_KEPT))
    listeners: set[Listener] = field(default_factory=set)
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finished is not None

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "status": self.status,
            "package": self.package,
            "targets": self.targets,
            "created": self.created,
            "finished": self.finished,
            "result": self.result,
        }

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "progress":
            self.events.append(data)
        for listener in list(self.listeners):
            try:
                listener(self, kind, data)
            except Exception:
                log.exception("a job listener failed")


class DeployJobs:
    """Starts and tracks deploy jobs (one instance per server, used from its event loop)."""

    def __init__(
        self,
        deployer: PackageDeployer,
        config: DeployConfig,
        networks: NetworkConfig | None = None,
        *,
        max_finished: int = 100,
    ) -> None:
        self.deployer = deployer
        self.config = config
        self.networks = networks
        self.max_finished = max_finished
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._numbers = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=config.max_jobs, thread_name_prefix="svcreg-deploy")
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.done)

    # --- requests -------------------------------------------------------------------------

    def package_path(self, name: str) -> Path:
        """A package in ``packages_dir``: a file name, or a path that resolves inside it."""
        root = self.config.packages_dir.resolve()
        candidate = Path(name)
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not path.is_relative_to(root):
            raise ValidationError(
                f"package {shown(name)} is outside the registry's packages folder {root}; put it there first",
                field="params.package",
            )
        if not path.is_file():
            raise NotFound(f"no package {shown(name)} in {root}", details={"package": name[:255]})
        return path

    def target(self, item: str | DeployTarget | Mapping[str, Any], *, path: str = "params.target") -> RemoteTarget:
        """A node name from the networks file, or a {host, ssh_user, ssh_key, install_base, port, name} object.

        Raises:
            NotFound: no node of that name.
            ValidationError: a bad target, naming ``path.<field>``.
        """
        defaults = self.config
        if isinstance(item, str):
            found = self.networks.find_node(item) if self.networks is not None else None
            if found is None:
                raise NotFound(
                    f"no node named {shown(item)} in the networks file", details={"node": item[:255], "field": path}
                )
            network, node = found
            variables = node.vars
            return _remote_target(
                path,
                host=node.host,
                ssh_user=node.ssh_user or defaults.ssh_user,
                ssh_key=str(variables.get("ssh_key") or defaults.ssh_key or "") or None,
                install_base=str(variables.get("install_base") or defaults.install_base),
                port=int(variables.get("ssh_port", 22)),
                name=node.name,
                network=network.name,
            )
        given = item if isinstance(item, DeployTarget) else convert(item, DeployTarget, path=path)
        return _remote_target(
            path,
            host=given.host,
            ssh_user=given.ssh_user or defaults.ssh_user,
            ssh_key=given.ssh_key or (str(defaults.ssh_key) if defaults.ssh_key else None),
            install_base=given.install_base or defaults.install_base,
            port=given.port,
            name=given.name,
            network=given.network,
        )

    async def start(self, params: DeployParams | Mapping[str, Any], watcher: Listener | None = None) -> Job:
        """Validate and start a deployment; progress goes to ``watcher`` (and later watchers).

        ``params`` are those of the ``deploy_package`` action, checked or as sent.
        """
        if self.running >= self.config.max_jobs:
            raise RateLimited(f"{self.config.max_jobs} deployments are already running; try again when one ends")
        if not isinstance(params, DeployParams):
            params = cast(DeployParams, decode_params("deploy_package", params))
        items: list[tuple[str, str | DeployTarget]] = [
            (f"params.targets[{index}]", item) for index, item in enumerate(params.targets or ())
        ]
        if params.node is not None:
            items.append(("params.node", params.node))
        if params.target is not None:
            items.append(("params.target", params.target))
        if not items:
            raise ValidationError("name where to deploy: node, target or targets", field="params.targets")
        keep_releases = params.keep_releases if params.keep_releases is not None else _KEEP_RELEASES
        path = self.package_path(params.package)
        targets = [self.target(item, path=where) for where, item in items]
        package, targets, env = await asyncio.to_thread(self.deployer.prepare, path, targets, params.env or {})
        job = Job(
            id=f"job-{next(self._numbers)}-{os.urandom(3).hex()}",
            package={"name": package.manifest.name, "version": package.manifest.version, "sha256": package.sha256},
            targets=[target.to_dict() for target in targets],
        )
        if watcher is not None:
            job.listeners.add(watcher)
        self._jobs[job.id] = job
        task = asyncio.create_task(self._run(job, package, targets, env, keep_releases))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept until {self.max_finished} newer ones end)")
        return job

    def list(self) -> builtins.list[dict[str, Any]]:
        return [job.summary() for job in self._jobs.values()]

    async def close(self) -> None:
        """Cancel running deployments (ansible-runner stops its playbook) and wait for them."""
        for job in self._jobs.values():
            job.cancel.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False)

    # --- running --------------------------------------------------------------------------

    async def _run(
        self,
        job: Job,
        package: Package,
        targets: builtins.list[RemoteTarget],
        env: dict[str, str],
        keep_releases: int,
    ) -> None:
        loop = asyncio.get_running_loop()

        def on_event(event: DeployEvent) -> None:
            loop.call_soon_threadsafe(job.publish, "progress", event.to_dict())

        try:
            result: DeployResult = await loop.run_in_executor(
                self._pool,
                lambda: self.deployer.run_prepared(
                    package,
                    targets,
                    env,
                    on_event=on_event,
                    job_id=job.id,
                    keep_releases=keep_releases,
                    cancel=job.cancel,
                ),
            )
            job.result = result.to_dict()
            job.status = "successful" if result.ok else "failed"
        except Exception as exc:
            log.exception("deploy job %s broke", job.id)
            job.result = {"job": job.id, "status": "error", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            job.status = "error"
        job.finished = time.time()
        job.publish("finished", job.summary())
        job.listeners.clear()
        self._forget_old()

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.done]
        for job_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job_id]


def _remote_target(path: str, **fields: Any) -> RemoteTarget:
    """A :class:`RemoteTarget`; its errors name the field under ``path`` (``params.targets[1].ssh_user``)."""
    try:
        return RemoteTarget(**fields)
    except ValidationError as exc:
        name = (exc.field or "").removeprefix("target").lstrip(".")
        field = f"{path}.{name}" if name else path
        raise ValidationError(f"{field}: {exc.message}", field=field) from None
