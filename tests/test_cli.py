"""`svcreg` end to end: init, serve, the client commands, exit codes, kill -9 of the server."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from .helpers import SVCREG, ServeProcess, free_port


def run(*args: str, env: dict[str, str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([*SVCREG, *args], env=env, capture_output=True, text=True, timeout=60, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"svcreg {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


class Server:
    """The `svcreg serve` of a test's home directory; ``start`` may be called again after a stop."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.serve: ServeProcess | None = None

    def start(self, *options: str) -> None:
        self.serve = ServeProcess(self.home / "svcreg.yaml", self.env, *options)

    @property
    def process(self) -> subprocess.Popen[str] | None:
        return self.serve.process if self.serve is not None else None

    @property
    def revision(self) -> int:
        """The registry's revision when it started serving (after topology detection)."""
        assert self.serve is not None
        return self.serve.revision

    def output(self) -> str:
        assert self.serve is not None
        return self.serve.output()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.serve is not None
        return self.serve.stop(signum)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path / "svcreg"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SVCREG_")}
    env["SVCREG_HOME"] = str(home)
    result = run("init", str(home), env=env)
    assert "admin token" in result.stdout
    config = home / "svcreg.yaml"
    port = free_port()
    config.write_text(config.read_text().replace("127.0.0.1:9443", f"127.0.0.1:{port}"))
    client_env = home / "client.env"
    client_env.write_text(client_env.read_text().replace("127.0.0.1:9443", f"127.0.0.1:{port}"))
    yield home, env


@pytest.fixture
def server(home: tuple[Path, dict[str, str]]) -> Iterator[Server]:
    server = Server(*home)
    server.start()
    yield server
    if server.process and server.process.poll() is None:
        server.stop()


def test_init_refuses_to_overwrite(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    result = run("init", str(path), env=env, check=False)
    assert result.returncode == 2
    assert "already" in result.stderr
    assert (path / "admin.token").stat().st_mode & 0o777 == 0o600


def test_client_commands_end_to_end(server: Server) -> None:
    env = server.env
    registered = run(
        "services",
        "register",
        "api-server",
        "--host",
        "prod-host-1",
        "--ip",
        "127.0.0.1",
        "--location",
        "local",
        "--endpoint",
        "http:8080",
        "--tag",
        "blue",
        "--meta",
        "team=core",
        "--json",
        env=env,
    )
    # The first write after startup; serve's own topology detection may have used a revision before it.
    assert json.loads(registered.stdout)["mod_revision"] == server.revision + 1
    listed = json.loads(run("services", "list", "--json", env=env).stdout)
    assert [(s["service_name"], s["host_id"]) for s in listed] == [("api-server", "prod-host-1")]
    table = run("services", "list", env=env).stdout
    assert "api-server" in table and "http:8080/tcp" in table
    assert json.loads(run("services", "set-state", "api-server", "stopped", "--json", env=env).stdout)["state"] == (
        "stopped"
    )
    missing = run("services", "get", "ghost", env=env, check=False)
    assert missing.returncode == 3 and "'ghost' is not registered" in missing.stderr
    bad = run("services", "register", "Bad_Name", "--host", "h", "--ip", "10.0.0.1", env=env, check=False)
    assert bad.returncode == 2 and "service_name: 'Bad_Name' is invalid" in bad.stderr
    allocation = json.loads(run("ip", "allocate", "web-1", "local", "--json", env=env).stdout)
    assert allocation["network"] == "local"
    assert json.loads(run("ip", "list", "--json", env=env).stdout) == [allocation]
    assert "local" in run("networks", env=env).stdout
    assert json.loads(run("services", "remove", "api-server", "--json", env=env).stdout)["service_name"] == (
        "api-server"
    )


def test_wrong_token_and_unreachable_exit_codes(server: Server) -> None:
    env = dict(server.env)
    denied = run("services", "list", "--token", "svcreg_wrong", env=env, check=False)
    assert denied.returncode == 4 and "401" in denied.stderr  # denied, not unreachable
    unreachable = run("services", "list", "--url", f"127.0.0.1:{free_port()}", env=env, check=False)
    assert unreachable.returncode == 5
    plaintext = run("services", "list", "--url", "ws://127.0.0.1:9", env=env, check=False)
    assert plaintext.returncode == 2 and "only speaks TLS" in plaintext.stderr


def test_token_create_gives_a_working_read_token(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    token = run("token", "create", "--role", "read", "--name", "dashboard", env=env).stdout.strip()
    server = Server(path, env)
    server.start()
    try:
        assert run("services", "list", "--token", token, env=env).returncode == 0
        denied = run(
            "services", "register", "x", "--host", "h", "--ip", "10.1.1.1", "--token", token, env=env, check=False
        )
        assert denied.returncode == 4 and "needs the write role" in denied.stderr
    finally:
        server.stop()


def test_watch_prints_events(server: Server) -> None:
    # --since: the event arrives whether the watcher subscribes before or after the write.
    watcher = subprocess.Popen(
        [*SVCREG, "watch", "ServiceRegistered", "--since", str(server.revision), "--json"],
        env=server.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        run("services", "register", "web", "--host", "h1", "--ip", "127.0.0.1", "--location", "local", env=server.env)
        assert watcher.stdout is not None
        event = json.loads(watcher.stdout.readline())
        assert event["event"] == "ServiceRegistered" and event["data"]["service"]["service_name"] == "web"
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=10)


def test_sigterm_is_graceful_and_kill_9_loses_no_acknowledged_write(server: Server) -> None:
    env = server.env
    for number in range(20):
        run("services", "register", f"svc-{number}", "--host", "h", "--ip", "127.0.0.1", "--location", "local", env=env)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server.start()
    listed = json.loads(run("services", "list", "--json", env=env).stdout)
    assert sorted(s["service_name"] for s in listed) == sorted(f"svc-{n}" for n in range(20))
    assert server.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_shuts_down_gracefully_on_a_signal(server: Server, signum: int) -> None:
    env = server.env
    run("services", "register", "web", "--host", "h1", "--ip", "127.0.0.1", "--location", "local", env=env)
    settings = _read_client_env(server.home / "client.env")
    context = ssl.create_default_context(cafile=settings["SVCREG_CA"])
    headers = {"Authorization": f"Bearer {settings['SVCREG_TOKEN']}"}
    with connect(settings["SVCREG_URL"], ssl=context, additional_headers=headers, open_timeout=10) as client:
        client.send(json.dumps({"id": "1", "type": "request", "action": "ping"}))
        assert json.loads(client.recv(timeout=10))["result"]["pong"] is True
        server.process.send_signal(signum)
        with pytest.raises(ConnectionClosed) as closed:
            client.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001  # going away
    assert server.process.wait(timeout=30) == 0
    output = server.output()
    assert "shutting down" in output and "stopped at revision" in output
    assert "Traceback" not in output
    # The store was closed: the last connection to a WAL database checkpoints and removes the -wal file.
    assert (server.home / "registry.db").exists()
    assert not (server.home / "registry.db-wal").exists()
    server.start()
    assert [s["service_name"] for s in json.loads(run("services", "list", "--json", env=env).stdout)] == ["web"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serve_runs_on_the_chosen_event_loop(home: tuple[Path, dict[str, str]], loop: str) -> None:
    """uvloop is a dependency (on CPython/Linux) and the default; asyncio's own loop stays selectable."""
    server = Server(*home)
    server.start("--loop", loop)
    try:
        assert server.serve is not None and f"{loop} loop, revision" in server.serve.lines[-1]
        run("services", "register", "web", "--host", "h1", "--ip", "127.0.0.1", "--location", "local", env=server.env)
        listed = json.loads(run("services", "list", "--json", env=server.env).stdout)
        assert [entry["service_name"] for entry in listed] == ["web"]
    finally:
        assert server.stop() == 0


def test_serve_uses_uvloop_by_default(server: Server) -> None:
    assert server.serve is not None and "uvloop loop, revision" in server.serve.lines[-1]


def test_serve_refuses_an_unknown_event_loop(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    result = run("serve", "--config", str(path / "svcreg.yaml"), "--loop", "tokio", env=env, check=False)
    assert result.returncode == 2 and "invalid choice: 'tokio'" in result.stderr


def test_serve_refuses_a_bad_topology_interval(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    for bad in ("0", "-5", "soon", "nan"):
        result = run("serve", "--config", str(path / "svcreg.yaml"), "--topology-interval", bad, env=env, check=False)
        assert result.returncode == 2 and "positive number of seconds" in result.stderr


def _read_client_env(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, _, value in pairs}


def test_large_frames_pass_the_servers_small_tls_read_buffer(server: Server) -> None:
    """serve reads TLS in 32 KiB chunks (to keep idle connections small): big frames still arrive whole."""
    settings = _read_client_env(server.home / "client.env")
    context = ssl.create_default_context(cafile=settings["SVCREG_CA"])
    headers = {"Authorization": f"Bearer {settings['SVCREG_TOKEN']}"}
    metadata = {f"key-{number}": os.urandom(1500).hex() for number in range(64)}  # ~190 KiB of random text
    service = {
        "service_name": "big",
        "host_id": "h1",
        "location": "local",
        "network_info": {"ip": "127.0.0.1"},
        "metadata": metadata,
    }
    request = {"id": "1", "type": "request", "action": "register_service", "params": {"service": service}}
    with connect(settings["SVCREG_URL"], ssl=context, additional_headers=headers, max_size=2**21) as client:
        client.send(json.dumps(request))
        assert json.loads(client.recv(timeout=20))["result"]["metadata"] == metadata
        client.send(
            json.dumps({"id": "2", "type": "request", "action": "get_service", "params": {"service_name": "big"}})
        )
        assert json.loads(client.recv(timeout=20))["result"]["metadata"] == metadata


def test_verbose_serve_never_logs_a_token(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    serve = ServeProcess(path / "svcreg.yaml", env, verbose=True)
    try:
        settings = _read_client_env(path / "client.env")
        token = settings["SVCREG_TOKEN"]
        context = ssl.create_default_context(cafile=settings["SVCREG_CA"])
        with connect(settings["SVCREG_URL"], ssl=context) as client:  # the token in a frame, not a header
            client.send(
                json.dumps({"id": "1", "type": "request", "action": "authenticate", "params": {"token": token}})
            )
            assert json.loads(client.recv(timeout=10))["result"]["role"] == "admin"
    finally:
        assert serve.stop() == 0
    output = serve.output()
    assert "DEBUG" in output  # it was verbose
    assert token[-12:] not in output  # websockets would log the end of the frame that carries it


def test_quiet_serve_prints_no_per_connection_lines(server: Server) -> None:
    for _ in range(3):
        run("services", "list", env=server.env)
    assert server.stop() == 0
    output = server.output()
    assert "connection open" not in output and "connection closed" not in output
    assert "stopped at revision" in output


WITH_LAN = "networks:\n  local: {type: local, subnet: 127.0.0.0/8}\n  production: {type: lan, subnet: 192.168.1.0/24}\n"


def test_a_new_token_works_after_kill_hup_and_the_networks_reload(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    server = Server(path, env)
    server.start()
    try:
        token = run("token", "create", "--role", "read", "--name", "late", env=env)
        assert "kill -HUP" in token.stderr  # reload, not restart
        late = token.stdout.strip()
        assert run("services", "list", "--token", late, env=env, check=False).returncode == 4
        (path / "services.yaml").write_text(WITH_LAN)
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while run("services", "list", "--token", late, env=env, check=False).returncode != 0:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert [n["name"] for n in json.loads(run("networks", "--json", env=env).stdout)["networks"]] == [
            "local",
            "production",
        ]
        # a bad file: the running configuration stays, the log names the file and the field
        (path / "services.yaml").write_text("networks:\n  production: {type: lan, subnet: 192.168.1.1/24}\n")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload failed" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert "services.yaml" in server.output() and "networks.production.subnet" in server.output()
        assert run("services", "list", "--token", late, env=env).returncode == 0
    finally:
        server.stop()


def test_register_without_an_address_heartbeat_and_local_topology(home: tuple[Path, dict[str, str]]) -> None:
    path, env = home
    (path / "services.yaml").write_text(WITH_LAN)
    server = Server(path, env)
    server.start()
    try:
        registered = json.loads(
            run(
                "services",
                "register",
                "web",
                "--host",
                "h1",
                "--network",
                "production",
                "--ttl",
                "30",
                "--json",
                env=env,
            ).stdout
        )
        assert (registered["network_info"]["ip"], registered["location"]) == ("192.168.1.2", "lan")
        local = json.loads(
            run("services", "register", "db", "--host", "h1", "--ip", "127.0.0.1", "--json", env=env).stdout
        )
        assert local["location"] == "local"  # from the address: no --location needed
        nowhere = run("services", "register", "x", "--host", "h1", "--ip", "203.0.113.9", env=env, check=False)
        assert nowhere.returncode == 2 and "location is required for 203.0.113.9" in nowhere.stderr
        assert "production (lan 192.168.1.0/24)" in nowhere.stderr
        assert json.loads(run("ip", "list", "--json", env=env).stdout) == [
            {"owner": "web@h1", "network": "production", "ip": "192.168.1.2", "prefixlen": 24}
        ]
        taken = run("ip", "allocate", "thief", "production", "--ip", "192.168.1.2", env=env, check=False)
        assert taken.returncode == 1 and "already allocated to 'web@h1'" in taken.stderr
        beat = run("services", "heartbeat", "web", "--host", "h1", "--json", env=env)
        assert json.loads(beat.stdout)["mod_revision"] == registered["mod_revision"]  # not a change
        shown = json.loads(run("networks", "--json", env=env).stdout)  # the wire's shapes, as before 0.2
        assert set(shown["topology"]) == {"revision", "topology"} and "networks" in shown["topology"]["topology"]
        table = run("networks", env=env).stdout
        assert "production" in table and "ON THE REGISTRY HOST" in table
        here = json.loads(run("topology", "--networks", str(path / "services.yaml"), "--json", env=env).stdout)
        assert any(item["interface"] == "lo" and item["network"] == "local" for item in here["networks"])
        assert "production" in here["missing"]
    finally:
        server.stop()


def test_watch_says_when_it_loses_and_regains_the_server_and_exits_130_on_ctrl_c(server: Server) -> None:
    watcher = subprocess.Popen(
        [*SVCREG, "watch", "--since", str(server.revision)],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run("services", "register", "a", "--host", "h1", "--ip", "127.0.0.1", env=server.env)
        assert watcher.stdout is not None and watcher.stderr is not None
        assert "ServiceRegistered" in watcher.stdout.readline()
        server.stop()
        closed = watcher.stderr.readline()
        assert "closed: code 1001" in closed and "reconnecting, resuming after revision" in closed, closed
        server.start()
        run("services", "register", "b", "--host", "h1", "--ip", "127.0.0.1", env=server.env)
        deadline = time.monotonic() + 20
        while "reconnected at revision" not in (line := watcher.stderr.readline()):
            assert time.monotonic() < deadline and line, line
        assert "b@h1" in watcher.stdout.readline()
    finally:
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=10) == 130
