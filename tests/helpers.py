"""Test helpers shared by test modules and by helper subprocesses."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from registry import Endpoint, Location, NetworkInfo, ServiceEntry, ServiceState
from registry.pki import CertificateBundle, generate_ca, generate_server_certificate
from registry.tls import TlsClientConfig, TlsServerConfig


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_entry(
    name: str = "api-server",
    host: str = "prod-host-1",
    *,
    ip: str = "192.168.1.100",
    location: Location = Location.LAN,
    state: ServiceState = ServiceState.RUNNING,
    **fields: object,
) -> ServiceEntry:
    fields.setdefault("endpoints", (Endpoint("http", 8080),))
    return ServiceEntry(name, host, location, NetworkInfo(ip), state, **fields)


SVCREG = [sys.executable, "-m", "registry.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServeProcess:
    """`svcreg serve` as a subprocess, started and waited for until it serves.

    Its output is drained by a thread for as long as it runs: a pipe nobody reads fills up
    after 64 KiB of log lines and then blocks the server in the middle of a request.
    """

    def __init__(self, config: Path, env: dict[str, str], *options: str, verbose: bool = False) -> None:
        self.process = subprocess.Popen(
            [*SVCREG, *(["--verbose"] if verbose else []), "serve", "--config", str(config), *options],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        self.lines: list[str] = []
        for line in self.process.stdout:  # warnings may come before the banner
            self.lines.append(line)
            if "serving wss://" in line:
                break
        else:
            self.process.wait()
            raise AssertionError("svcreg serve exited before serving:\n" + "".join(self.lines))
        found = re.search(r"revision (\d+)\)", line)
        self.revision = int(found.group(1)) if found else -1
        self._banner = len(self.lines)
        self._drain = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._drain.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def output(self) -> str:
        """Everything printed after the banner (complete once the process has exited)."""
        if self.process.poll() is not None:
            self._drain.join(timeout=10)
        return "".join(self.lines[self._banner :])

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"svcreg serve ignored signal {signum} for {timeout} s") from None
        finally:
            self._drain.join(timeout=10)


@dataclass
class Pki:
    """A CA and a server certificate for localhost, 127.0.0.1 and ::1, as files in ``directory``."""

    directory: Path
    ca: CertificateBundle
    ca_file: Path
    cert: Path
    key: Path

    def server(self, *, client_ca: Path | None = None) -> TlsServerConfig:
        return TlsServerConfig.from_files(self.cert, self.key, client_ca=client_ca)

    def client(self, **options: object) -> TlsClientConfig:
        return TlsClientConfig(ca_file=self.ca_file, **options)


def make_pki(directory: Path, **server_options: object) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = generate_ca()
    server = generate_server_certificate(ca, hostnames=["localhost"], ips=["127.0.0.1", "::1"], **server_options)
    ca.write(directory / "ca.crt", directory / "ca.key")
    server.write(directory / "server.crt", directory / "server.key")
    return Pki(directory, ca, directory / "ca.crt", directory / "server.crt", directory / "server.key")
