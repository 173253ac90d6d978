"""The svcreg.registry collection against a real registry: `svcreg serve` in a subprocess, then the real
`ansible-inventory` and `ansible-playbook` (from the repository's ansible.cfg, so the collection is found in
./ansible_collections without installing it).

The inventory is compared with tests/data/ansible_inventory_expected.json (volatile fields normalised);
regenerate it with SVCREG_UPDATE_EXPECTED=1 after an intended change and review the diff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.client import PAGE_SIZE, BlockingClient, ConnectionSettings, WsClient
from registry.tls import TlsClientConfig

from .helpers import SVCREG, ServeProcess, free_port

pytestmark = [pytest.mark.ansible, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXPECTED = Path(__file__).parent / "data" / "ansible_inventory_expected.json"
VOLATILE = ("create_revision", "mod_revision", "updated_at")

NETWORKS = """\
networks:
  local:
    type: local
    subnet: "127.0.0.0/8"
  production:
    type: lan
    subnet: "192.168.1.0/24"
    nodes:
      - {host: "192.168.1.100", name: "prod-api", ssh_user: "deploy", datacenter: "eu-1"}
      - {host: "192.168.1.101", name: "prod-db"}
  edge.eu:
    type: wireguard
    subnet: "10.0.0.0/24"
    nodes:
      - {host: "10.0.0.5", name: "edge-1"}
"""


class Registry:
    """A running `svcreg serve` with its admin token; `env` is what ansible needs to reach it."""

    def __init__(self, home: Path, process: subprocess.Popen[str], settings: ConnectionSettings) -> None:
        self.home, self.process, self.settings = home, process, settings
        self.env = _ansible_env(
            SVCREG_URL=settings.url, SVCREG_CA=str(home / "tls" / "ca.crt"), SVCREG_TOKEN=settings.token or ""
        )

    def client(self) -> BlockingClient:
        return BlockingClient(self.settings)


def _ansible_env(**svcreg: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SVCREG_", "ANSIBLE_"))}
    env.update(svcreg)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_LOCAL_TEMP"] = env["ANSIBLE_REMOTE_TEMP"] = str(Path(svcreg.get("SVCREG_CA", "/tmp")).parent)
    return env


@contextlib.contextmanager
def running_registry(home: Path, networks: str = NETWORKS, extra_config: str = "") -> Iterator[Registry]:
    """`svcreg init` into ``home``, the test networks, `svcreg serve` on a free loopback port."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SVCREG_")}
    subprocess.run([*SVCREG, "init", str(home)], env=env, check=True, capture_output=True, timeout=60)
    (home / "services.yaml").write_text(networks)
    port = free_port()
    config = home / "svcreg.yaml"
    config.write_text(config.read_text().replace("127.0.0.1:9443", f"127.0.0.1:{port}") + extra_config)
    serve = ServeProcess(config, env)
    token = (home / "admin.token").read_text().strip()
    settings = ConnectionSettings(f"wss://127.0.0.1:{port}/", TlsClientConfig(ca_file=home / "tls" / "ca.crt"), token)
    try:
        yield Registry(home, serve.process, settings)
    finally:
        serve.stop()


def ansible(tool: str, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / tool), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def recap(output: str, host: str = "localhost") -> dict[str, int]:
    match = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", output, re.MULTILINE)
    assert match, output
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def plain(data: Any) -> Any:
    """ansible-inventory's JSON without its ``{"__ansible_unsafe": value}`` wrappers."""
    if isinstance(data, dict):
        if set(data) == {"__ansible_unsafe"}:
            return data["__ansible_unsafe"]
        return {key: plain(value) for key, value in data.items()}
    if isinstance(data, list):
        return [plain(item) for item in data]
    return data


def normalise(data: Any) -> Any:
    """Revisions and timestamps change from run to run; everything else must match exactly."""
    if isinstance(data, dict):
        return {key: "<volatile>" if key in VOLATILE else normalise(value) for key, value in sorted(data.items())}
    if isinstance(data, list):
        return [normalise(item) for item in data]
    return data


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry for the playbook tests, which write to it."""
    with running_registry(tmp_path_factory.mktemp("svcreg")) as running:
        yield running


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry of its own holding exactly what the expected inventory shows; only read by the tests."""
    with running_registry(tmp_path_factory.mktemp("svcreg-inventory")) as registry:
        _seed(registry)
        yield registry


def _seed(registry: Registry) -> None:
    services = [
        {
            "service_name": "api-server",
            "host_id": "prod-api",
            "location": "lan",
            "state": "running",
            "network_info": {"ip": "192.168.1.100"},
            "endpoints": [{"name": "http", "port": 8080}],
            "tags": ["blue"],
            "metadata": {"team": "core"},
        },
        {
            "service_name": "postgres",
            "host_id": "prod-db",
            "location": "lan",
            "state": "stopped",
            "network_info": {"ip": "192.168.1.101"},
            "endpoints": [{"name": "db", "port": 5432}],
        },
        {
            "service_name": "api-server",
            "host_id": "cache-7",
            "location": "local",
            "state": "running",
            "network_info": {"ip": "127.0.0.7", "network": "local"},
            "endpoints": [{"name": "http", "port": 8081}],
        },
    ]
    with registry.client() as client:
        for service in services:
            client.register_service(service)


INVENTORY = """\
plugin: svcreg.registry.registry
services: [api-server, postgres]
keyed_groups:
  - key: svcreg_services | map(attribute='tags') | flatten
    prefix: tag
groups:
  runs_services: svcreg_services | length > 0
compose:
  first_service: (svcreg_services | first).service_name if svcreg_services else 'none'
"""


def test_inventory_list_matches_expected(seeded: Registry, tmp_path: Path) -> None:
    source = write(tmp_path / "test.svcreg.yml", INVENTORY)
    result = ansible("ansible-inventory", "-i", str(source), "--list", env=seeded.env)
    actual = normalise(json.loads(result.stdout))
    if os.environ.get("SVCREG_UPDATE_EXPECTED"):
        EXPECTED.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n")
    assert actual == json.loads(EXPECTED.read_text())


def test_inventory_groups_are_sanitised_and_filters_apply(seeded: Registry, tmp_path: Path) -> None:
    source = write(
        tmp_path / "filtered.svcreg.yml",
        """\
        plugin: svcreg.registry.registry
        states: [running]
        locations: [lan, wireguard]
        """,
    )
    data = json.loads(ansible("ansible-inventory", "-i", str(source), "--list", env=seeded.env).stdout)
    assert set(data["service_api_server"]["hosts"]) == {"prod-api"}  # cache-7 is local: filtered out
    assert "service_postgres" not in data  # stopped
    assert data["network_edge_eu"]["hosts"] == ["edge-1"]  # "edge.eu" -> a valid group name
    assert "network_local" not in data and "local" not in data


def test_inventory_groups_every_network_and_chooses_ansible_host_the_same_way_every_time(
    registry: Registry, tmp_path: Path
) -> None:
    """A host in two networks is in both groups; ansible_host follows preferred_networks, else node address first,
    lan before wireguard; options may be templates (here the token, from the environment)."""
    with registry.client() as client:
        client.register_service({"service_name": "mesh", "host_id": "multi", "network_info": {"ip": "10.0.0.40"}})
        client.register_service({"service_name": "web", "host_id": "multi", "network_info": {"ip": "192.168.1.40"}})
        client.register_service({"service_name": "mesh", "host_id": "edge-1", "network_info": {"ip": "10.0.0.5"}})
        client.register_service({"service_name": "web", "host_id": "edge-1", "network_info": {"ip": "192.168.1.41"}})
    env = dict(registry.env, SVCREG_INVENTORY_TOKEN=registry.env["SVCREG_TOKEN"], SVCREG_TOKEN="")
    base = """\
        plugin: svcreg.registry.registry
        token: "{{ lookup('ansible.builtin.env', 'SVCREG_INVENTORY_TOKEN') }}"
        services: [mesh, web]
        group_by: [networks, locations, services, tags]
        strict: true
        """
    for name in ("svcreg.yml", "registry.yaml"):  # the accepted plain names
        source = write(tmp_path / name, base)
        data = json.loads(ansible("ansible-inventory", "-i", str(source), "--list", env=env).stdout)
        hostvars = plain(data["_meta"]["hostvars"])
        assert "multi" in data["network_production"]["hosts"] and "multi" in data["network_edge_eu"]["hosts"]
        assert "multi" in data["lan"]["hosts"] and "multi" in data["wireguard"]["hosts"]
        assert hostvars["multi"]["ansible_host"] == "192.168.1.40"  # lan before wireguard
        assert hostvars["multi"]["svcreg_networks"] == ["edge.eu", "production"]
        assert hostvars["edge-1"]["ansible_host"] == "10.0.0.5"  # a node's own address first
        assert "edge-1" in data["network_production"]["hosts"]  # its instance there puts it in the group too
    source = write(tmp_path / "pref.svcreg.yml", base + "preferred_networks: [wireguard]\n")
    listed = json.loads(ansible("ansible-inventory", "-i", str(source), "--list", env=env).stdout)
    hostvars = plain(listed["_meta"]["hostvars"])
    assert hostvars["multi"]["ansible_host"] == "10.0.0.40" and hostvars["multi"]["svcreg_network"] == "edge.eu"
    assert hostvars["edge-1"]["ansible_host"] == "10.0.0.5"
    with registry.client() as client:
        for name, host in (("mesh", "multi"), ("web", "multi"), ("mesh", "edge-1"), ("web", "edge-1")):
            client.remove_service(name, host)


def test_inventory_pages_through_a_registry_larger_than_a_page(tmp_path: Path) -> None:
    """The plugin lists through the client, which fetches PAGE_SIZE entries per request: every host is there."""
    count = 2 * PAGE_SIZE + 100
    service = {"service_name": "bulk", "location": "lan", "network_info": {"ip": "192.168.1.100"}}

    async def fill(settings: ConnectionSettings) -> None:
        async with await WsClient.connect(settings) as client:
            for start in range(0, count, 100):
                batch = [dict(service, host_id=f"bulk-{number:04}") for number in range(start, start + 100)]
                await asyncio.gather(*(client.register_service(entry) for entry in batch))

    with running_registry(tmp_path / "svcreg") as big:
        asyncio.run(fill(big.settings))
        source = write(tmp_path / "big.svcreg.yml", "plugin: svcreg.registry.registry\n")
        inventory = json.loads(ansible("ansible-inventory", "-i", str(source), "--list", env=big.env).stdout)
    hosts = set(inventory["_meta"]["hostvars"])
    assert {f"bulk-{number:04}" for number in range(count)} <= hosts


def test_inventory_cache_serves_a_down_registry(seeded: Registry, tmp_path: Path) -> None:
    source = write(
        tmp_path / "cached.svcreg.yml",
        f"""\
        plugin: svcreg.registry.registry
        cache: true
        cache_plugin: ansible.builtin.jsonfile
        cache_connection: {tmp_path / "cache"}
        cache_timeout: 600
        """,
    )
    first = ansible("ansible-inventory", "-i", str(source), "--list", env=seeded.env)
    assert any((tmp_path / "cache").iterdir())
    down = dict(seeded.env, SVCREG_URL=f"wss://127.0.0.1:{free_port()}/")
    second = ansible("ansible-inventory", "-i", str(source), "--list", env=down)
    assert json.loads(second.stdout) == json.loads(first.stdout)


def test_inventory_bad_token_is_a_clear_error(seeded: Registry, tmp_path: Path) -> None:
    source = write(tmp_path / "bad.svcreg.yml", "plugin: svcreg.registry.registry\n")
    env = dict(seeded.env, SVCREG_TOKEN="svcreg_not-a-real-token")
    result = ansible("ansible-inventory", "-i", str(source), "--list", env=env, check=False)
    assert result.returncode != 0
    assert "refused the token (unauthorized)" in result.stderr
    assert "Traceback" not in result.stderr and "not-a-real-token" not in result.stderr + result.stdout


def test_inventory_registry_down_is_a_clear_error(tmp_path: Path) -> None:
    source = write(tmp_path / "down.svcreg.yml", "plugin: svcreg.registry.registry\n")
    env = _ansible_env(SVCREG_URL=f"wss://127.0.0.1:{free_port()}/", SVCREG_TOKEN="secret-token-value")
    result = ansible("ansible-inventory", "-i", str(source), "--list", env=env, check=False)
    assert result.returncode != 0
    assert "cannot reach the registry at wss://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr and "secret-token-value" not in result.stderr


# --- modules -------------------------------------------------------------------------------------------

SERVICE_TASKS = """\
- hosts: remote-node
  gather_facts: false
  tasks:
    - name: Register this (remote) host's instance; runs on the controller
      svcreg.registry.service:
        name: web-frontend
        ip: 192.168.1.50
        location: lan
        endpoints: [{name: http, port: 80}, {name: metrics, port: 9100}]
        tags: [green]
        metadata: {owner: test}
        ttl: 300
      register: registered
    - name: Stop it
      svcreg.registry.service:
        name: web-frontend
        state: stopped
    - name: Allocate an address for it
      svcreg.registry.ip_allocation:
        network: production
      register: allocation
    - name: Throwaway instance, then remove it
      svcreg.registry.service:
        name: scratch
        host: scratch-host
        ip: 127.0.0.9
        location: local
    - svcreg.registry.service:
        name: scratch
        host: scratch-host
        state: absent
"""

REMOTE_INVENTORY = """\
[remote]
# Unreachable on purpose: a module that tried to run there would fail.
remote-node ansible_host=192.0.2.10 ansible_connection=ssh ansible_python_interpreter=/nonexistent/python
"""


def test_service_module_check_diff_and_idempotence(registry: Registry, tmp_path: Path) -> None:
    inventory = write(tmp_path / "hosts.ini", REMOTE_INVENTORY)
    playbook = write(tmp_path / "service.yml", SERVICE_TASKS)
    args = ("-i", str(inventory), str(playbook))

    checked = ansible("ansible-playbook", *args, "--check", "--diff", env=registry.env)
    assert recap(checked.stdout, "remote-node")["changed"] == 4, checked.stdout
    assert '+    "service_name": "web-frontend"' in checked.stdout  # the diff
    with registry.client() as client:
        assert client.list_services(service_name="web-frontend") == []  # check mode wrote nothing
        assert client.list_allocations("production") == []

    first = ansible("ansible-playbook", *args, "--diff", env=registry.env)
    assert recap(first.stdout, "remote-node") | {"changed": 5} == recap(first.stdout, "remote-node")
    with registry.client() as client:
        entry = client.get_service("web-frontend", "remote-node")
        assert entry.state == "stopped" and entry.ttl_seconds == 300 and entry.metadata == {"owner": "test"}
        # the host's own allocation, and the instance's address (recorded when it registered on it)
        assert [a.owner for a in client.list_allocations("production")] == ["remote-node", "web-frontend@remote-node"]
        assert client.list_services(service_name="scratch") == []

    second = ansible("ansible-playbook", *args, env=registry.env)
    # Idempotent, except the throwaway instance that the play creates and removes each time.
    assert recap(second.stdout, "remote-node")["changed"] == 2, second.stdout
    assert "192.0.2.10" not in second.stdout  # never connected to the remote host


def test_idempotent_second_run_reports_no_change(registry: Registry, tmp_path: Path) -> None:
    playbook = write(
        tmp_path / "idempotent.yml",
        """\
        - hosts: localhost
          gather_facts: false
          tasks:
            - svcreg.registry.service:
                name: billing
                host: billing-1
                ip: 127.0.0.20
                location: local
                endpoints: [{name: grpc, port: 50051}]
                state: running
            - svcreg.registry.ip_allocation:
                owner: billing-1
                network: local
            - svcreg.registry.service_info:
                name: billing
              register: info
            - ansible.builtin.assert:
                that:
                  - info.services | length == 1
                  - info.services[0].endpoints[0].port == 50051
        """,
    )
    assert recap(ansible("ansible-playbook", str(playbook), env=registry.env).stdout)["changed"] == 2
    assert recap(ansible("ansible-playbook", str(playbook), env=registry.env).stdout)["changed"] == 0


def test_lookup_returns_ip_port(seeded: Registry, tmp_path: Path) -> None:
    playbook = write(
        tmp_path / "lookup.yml",
        """\
        - hosts: localhost
          gather_facts: false
          tasks:
            - ansible.builtin.assert:
                that:
                  - lookup('svcreg.registry.endpoint', 'postgres', endpoint='db', state='any') == '192.168.1.101:5432'
                  - lookup('svcreg.registry.endpoint', 'api-server', endpoint='http', first=true) == '127.0.0.7:8081'
                  - query('svcreg.registry.endpoint', 'api-server', endpoint='http')
                    == ['127.0.0.7:8081', '192.168.1.100:8080']
                  - lookup('svcreg.registry.endpoint', 'api-server', endpoint='http', wantlist=true) | length == 2
        """,
    )
    ansible("ansible-playbook", str(playbook), env=seeded.env)


def test_lookup_and_module_errors_are_clear(seeded: Registry, tmp_path: Path) -> None:
    lookup = write(
        tmp_path / "missing.yml",
        """\
        - hosts: localhost
          gather_facts: false
          tasks:
            - ansible.builtin.debug:
                msg: "{{ lookup('svcreg.registry.endpoint', 'ghost', endpoint='http') }}"
        """,
    )
    result = ansible("ansible-playbook", str(lookup), env=seeded.env, check=False)
    assert result.returncode != 0 and "no running instance of service 'ghost'" in result.stdout + result.stderr

    bad_input = write(
        tmp_path / "bad.yml",
        """\
        - hosts: localhost
          gather_facts: false
          tasks:
            - svcreg.registry.service: {name: Bad_Name, host: h1, ip: 10.0.0.1}
        """,
    )
    result = ansible("ansible-playbook", str(bad_input), env=seeded.env, check=False)
    assert result.returncode != 0 and "name: 'Bad_Name' is invalid" in result.stdout

    # Not the repository's registry inventory: it would fail first, with the same token.
    local = write(tmp_path / "local.ini", "localhost ansible_connection=local\n")
    bad_token = ansible(
        "ansible-playbook",
        "-i",
        str(local),
        str(bad_input),
        env=dict(seeded.env, SVCREG_TOKEN="wrong-token"),
        check=False,
    )
    assert bad_token.returncode != 0 and "refused the token (unauthorized)" in bad_token.stdout
    assert "wrong-token" not in bad_token.stdout + bad_token.stderr

    down = dict(seeded.env, SVCREG_URL=f"wss://127.0.0.1:{free_port()}/")
    result = ansible("ansible-playbook", "-i", str(local), str(bad_input), env=down, check=False)
    assert result.returncode != 0 and "cannot reach the registry at wss://127.0.0.1:" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_repository_playbooks_run(registry: Registry) -> None:
    checked = ansible("ansible-playbook", "playbooks/register.yml", "--check", "--diff", env=registry.env)
    assert recap(checked.stdout)["failed"] == 0
    first = ansible("ansible-playbook", "playbooks/register.yml", env=registry.env)
    assert "api-server at http://192.168.1.100:8080" in first.stdout
    assert recap(ansible("ansible-playbook", "playbooks/register.yml", env=registry.env).stdout)["changed"] == 0
    allocated = ansible("ansible-playbook", "playbooks/allocate.yml", "-e", "allocate_owner=pb-1", env=registry.env)
    assert re.search(r"pb-1: 127\.0\.0\.\d+/8 in local", allocated.stdout), allocated.stdout
    released = ansible(
        "ansible-playbook",
        "playbooks/allocate.yml",
        "-e",
        "allocate_owner=pb-1",
        "-e",
        "allocate_state=absent",
        env=registry.env,
    )
    assert recap(released.stdout)["changed"] == 1


def test_collection_builds_and_installs_from_a_tarball(tmp_path: Path) -> None:
    env = _ansible_env()
    collection = REPO / "ansible_collections" / "svcreg" / "registry"
    ansible("ansible-galaxy", "collection", "build", str(collection), "--output-path", str(tmp_path), env=env)
    tarball = tmp_path / "svcreg-registry-0.1.0.tar.gz"
    assert tarball.is_file()
    target = tmp_path / "installed"
    # --force: the repository copy (collections_path = .) already counts as installed.
    ansible("ansible-galaxy", "collection", "install", "--force", str(tarball), "-p", str(target), env=env)
    installed = target / "ansible_collections" / "svcreg" / "registry"
    assert (installed / "plugins" / "inventory" / "registry.py").is_file()
    # the licenses galaxy.yml names travel with it, and it says where it comes from
    assert "MIT License" in (installed / "LICENSE-MIT").read_text()
    assert "Apache License" in (installed / "LICENSE-APACHE").read_text()
    manifest = json.loads((installed / "MANIFEST.json").read_text())["collection_info"]
    assert manifest["license"] == ["MIT", "Apache-2.0"] and "example.invalid" not in manifest["repository"]
    shutil.rmtree(target)


def test_the_inventory_plugins_own_example_works_under_strict(seeded: Registry, tmp_path: Path) -> None:
    import ast

    source_file = REPO / "ansible_collections/svcreg/registry/plugins/inventory/registry.py"
    module = ast.parse(source_file.read_text())
    example = next(
        node.value.value
        for node in module.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXAMPLES"
    )
    config = example.replace("~/.cache/svcreg-inventory", str(tmp_path / "cache"))
    source = write(tmp_path / "example.svcreg.yml", config)
    env = dict(seeded.env, SVCREG_INVENTORY_TOKEN=seeded.env["SVCREG_TOKEN"])
    data = plain(json.loads(ansible("ansible-inventory", "-i", str(source), "--list", env=env).stdout))
    assert data["_meta"]["hostvars"]["prod-api"]["api_port"] == 8080
    assert "tag_blue" in data and "prod-api" in data["service_api_server"]["hosts"]
