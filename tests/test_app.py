"""registry.app: the registry assembled from svcreg.yaml, started and stopped in this process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest
import yaml

from registry import Registry
from registry.app import RegistryApp
from registry.client import ConnectionSettings, WsClient
from registry.config import ServerConfig
from registry.exceptions import ConfigError
from registry.setup import InitResult, init_directory
from registry.tls import TlsClientConfig

from .helpers import free_port, make_entry


def configure(result: InitResult, **changes: object) -> ServerConfig:
    """The config `svcreg init` wrote, on a free port, with ``changes`` applied to the file."""
    data = yaml.safe_load(result.config_path.read_text())
    data.update({"listen": f"127.0.0.1:{free_port()}", **changes})
    result.config_path.write_text(yaml.safe_dump(data))
    return ServerConfig.from_file(result.config_path)


def settings(app: RegistryApp, result: InitResult) -> ConnectionSettings:
    return ConnectionSettings(f"wss://{app.address}/", TlsClientConfig(ca_file=result.ca_cert), result.admin_token)


@pytest.fixture
def home(tmp_path: Path) -> InitResult:
    return init_directory(tmp_path / "svcreg")


async def test_the_app_serves_its_config_and_stops_gracefully(home: InitResult) -> None:
    config = configure(home)
    async with RegistryApp(config, topology_interval=None) as app:
        assert app.address == config.listen
        client = await WsClient.connect(settings(app, home))
        try:
            await client.register_service(make_entry("web"))
            assert [entry.service_name for entry in await client.list_services()] == ["web"]
            assert [network["name"] for network in await client.list_networks()] == ["local"]  # services.yaml
        finally:
            await client.close()
        registry = app.registry
    assert registry is not None and registry.closed
    assert app.server is None and app.deploys is None
    await app.stop()  # a second stop does nothing
    assert (home.directory / "packages").is_dir() and (home.directory / "deploys").is_dir()  # deploy jobs' folders
    with Registry.with_persistence(config.db) as reopened:  # committed and closed: nothing lost
        assert [entry.service_name for entry in reopened.list_services()] == ["web"]


async def test_a_failed_start_leaves_nothing_open(home: InitResult) -> None:
    config = configure(home)
    with socket.create_server((config.host, config.port)):  # the port is taken
        app = RegistryApp(config, topology_interval=None)
        with pytest.raises(OSError):
            await app.start()
    assert app.registry is not None and app.registry.closed
    assert app.server is None and app.deploys is None


async def test_bad_tls_files_stop_the_start_before_the_store_opens(home: InitResult) -> None:
    home.server_key.write_text("not a key\n")
    app = RegistryApp(configure(home), topology_interval=None)
    with pytest.raises(ConfigError, match=r"server\.key is not a PEM private key"):
        await app.start()
    assert app.registry is None
    assert not (home.directory / "registry.db").exists()


async def test_serve_runs_until_a_shutdown_is_requested(home: InitResult) -> None:
    seen: list[str] = []

    def started(app: RegistryApp) -> None:
        seen.append(f"started {app.address}")
        app.request_shutdown()

    app = RegistryApp(configure(home), topology_interval=None)
    await asyncio.wait_for(app.serve(started=started, stopping=lambda app: seen.append("stopping")), 30)
    assert seen == [f"started {app.config.listen}", "stopping"]
    assert app.registry is not None and app.registry.closed


async def test_a_handled_signal_only_sets_the_flag(home: InitResult) -> None:
    app = RegistryApp(configure(home), topology_interval=None)
    loop = asyncio.get_running_loop()
    app.handle_signals([signal.SIGUSR1])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(app.wait_for_shutdown(), 10)
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert app.registry is None  # nothing was started or stopped by the signal itself


# --- reload (SIGHUP) ----------------------------------------------------------------------------------

SERVICES_WITH_LAN = {
    "networks": {
        "local": {"type": "local", "subnet": "127.0.0.0/8"},
        "production": {"type": "lan", "subnet": "192.168.1.0/24"},
    }
}


def _reloads(app: RegistryApp, result: str) -> float:
    assert app.server is not None
    return app.server.metrics.reloads.labels(result)._value.get()


async def test_a_reload_reads_tokens_limits_and_networks(home: InitResult) -> None:
    from registry.auth import Role
    from registry.exceptions import Unauthorized
    from registry.setup import add_token

    config = configure(home)
    async with RegistryApp(config, config_path=home.config_path, topology_interval=None) as app:
        assert app.registry is not None
        late = add_token(home.config_path, "late", Role.READ)
        with pytest.raises(Unauthorized):
            await WsClient.connect(
                ConnectionSettings(f"wss://{app.address}/", TlsClientConfig(ca_file=home.ca_cert), late)
            )
        admin = await WsClient.connect(settings(app, home))
        events = await admin.subscribe(["NetworkTopologyChanged"])
        (home.directory / "services.yaml").write_text(yaml.safe_dump(SERVICES_WITH_LAN))
        data = yaml.safe_load(home.config_path.read_text())
        data["limits"] = {"max_subscriptions_per_connection": 2}
        home.config_path.write_text(yaml.safe_dump(data))
        assert await app.reload() is True
        # the new token signs in; the networks changed (one event, and list_networks says so at once)
        reader = await WsClient.connect(
            ConnectionSettings(f"wss://{app.address}/", TlsClientConfig(ca_file=home.ca_cert), late)
        )
        assert [network.name for network in await reader.list_networks()] == ["local", "production"]
        changed = await admin.next_event(timeout=5)
        assert changed.subscription == events and changed.data["networks"]["added"] == ["production"]
        entry = await admin.register_service(
            {"service_name": "web", "host_id": "h1", "network_info": {"network": "production"}}
        )
        assert entry.network_info.ip == "192.168.1.2"
        assert app.server is not None and app.server.limits.max_subscriptions_per_connection == 2
        # a removed token stops working for new connections; signed-in connections stay
        data = yaml.safe_load(home.config_path.read_text())
        data["tokens"] = [token for token in data["tokens"] if token["name"] != "late"]
        home.config_path.write_text(yaml.safe_dump(data))
        assert await app.reload() is True
        with pytest.raises(Unauthorized):
            await WsClient.connect(
                ConnectionSettings(f"wss://{app.address}/", TlsClientConfig(ca_file=home.ca_cert), late)
            )
        assert (await reader.ping())["pong"] is True
        assert _reloads(app, "ok") == 2 and _reloads(app, "failed") == 0
        await reader.close()
        await admin.close()


async def test_a_reload_that_fails_validation_keeps_the_running_configuration(
    home: InitResult, caplog: pytest.LogCaptureFixture
) -> None:
    config = configure(home)
    async with RegistryApp(config, config_path=home.config_path, topology_interval=None) as app:
        good = home.config_path.read_text()
        broken = yaml.safe_load(good)
        broken["limits"] = {**(broken.get("limits") or {}), "send_queue": -5}
        home.config_path.write_text(yaml.safe_dump(broken))
        assert await app.reload() is False
        assert (
            "svcreg.yaml" in caplog.text
            and "limits.send_queue" in caplog.text
            and "running configuration stays" in caplog.text
        )
        home.config_path.write_text(good)
        (home.directory / "services.yaml").write_text("networks:\n  lan1: {type: lan, subnet: 10.0.0.1/24}\n")
        assert await app.reload() is False
        assert "services.yaml" in caplog.text and "networks.lan1.subnet" in caplog.text
        assert _reloads(app, "failed") == 2 and _reloads(app, "ok") == 0
        client = await WsClient.connect(settings(app, home))  # the old tokens and networks are in use
        assert [network.name for network in await client.list_networks()] == ["local"]
        await client.close()


async def test_sighup_reloads(home: InitResult) -> None:
    config = configure(home)
    app = RegistryApp(config, config_path=home.config_path, topology_interval=None)
    loop = asyncio.get_running_loop()
    app.handle_signals([signal.SIGUSR2])
    try:
        async with app:
            (home.directory / "services.yaml").write_text(yaml.safe_dump(SERVICES_WITH_LAN))
            os.kill(os.getpid(), signal.SIGHUP)
            async with asyncio.timeout(10):
                while _reloads(app, "ok") == 0:
                    await asyncio.sleep(0.02)
            assert app.registry is not None and app.registry.networks is not None
            assert list(app.registry.networks.networks) == ["local", "production"]
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)
        loop.remove_signal_handler(signal.SIGHUP)


async def test_a_token_with_visibility_all_sees_every_instance_without_admin_rights(home: InitResult) -> None:
    from registry.auth import Role
    from registry.exceptions import Forbidden
    from registry.setup import add_token

    configure(home, networks="services.yaml")
    (home.directory / "services.yaml").write_text(yaml.safe_dump(SERVICES_WITH_LAN))
    async with RegistryApp(
        ServerConfig.from_file(home.config_path), config_path=home.config_path, topology_interval=None
    ) as app:
        admin = await WsClient.connect(settings(app, home))
        # a local instance of another host: from the registry host, a plain read token does not see it
        await admin.register_service(
            {"service_name": "db", "host_id": "elsewhere", "network_info": {"ip": "127.0.0.1"}}
        )
        plain = add_token(home.config_path, "plain", Role.READ)
        inventory = add_token(home.config_path, "inventory", Role.READ, sees_all=True)
        assert "visibility: all" in home.config_path.read_text()
        assert await app.reload() is True

        def as_token(token: str) -> ConnectionSettings:
            return ConnectionSettings(f"wss://{app.address}/", TlsClientConfig(ca_file=home.ca_cert), token)

        reader = await WsClient.connect(as_token(plain))
        seer = await WsClient.connect(as_token(inventory))
        assert await reader.list_services() == []
        assert [entry.host_id for entry in await seer.list_services()] == ["elsewhere"]
        with pytest.raises(Forbidden):  # still a read token
            await seer.register_service(make_entry("x"))
        for client in (admin, reader, seer):
            await client.close()
    bad = yaml.safe_load(home.config_path.read_text())
    bad["tokens"][-1]["visibility"] = "everything"
    with pytest.raises(ConfigError, match=r"tokens\[\d+\]\.visibility"):
        ServerConfig.from_dict(bad, base_dir=home.directory)
