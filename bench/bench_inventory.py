"""`ansible-inventory --list` over the svcreg inventory plugin with N services: how long it takes, and our part.

    .venv/bin/python bench/bench_inventory.py [--services 2000] [--runs 3]

Starts its own `svcreg init` + `svcreg serve` (the durable embedded store, as users run it), registers N
instances on N/4 hosts in the lan network of the repository's services.yaml, then times, with the median of
--runs runs:

  * ansible-inventory: `ansible-inventory -i registry.svcreg.yml --list` as a user runs it (a fresh process:
    Python and ansible-core start-up, the plugin, JSON output);
  * registry: the plugin's fetch alone (list_networks + list_services, paged, through the blocking client);
  * populate: the plugin building hosts, groups and variables from that data (no network).
Figures for the notes, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_webui import svcreg_server

from registry.client import BlockingClient

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def entries(count: int) -> list[dict[str, object]]:
    return [
        {
            "service_name": f"svc-{number % 40}",
            "host_id": f"host-{number // 4}",
            "network_info": {"ip": f"192.168.{1 + number // 4 // 250}.{number // 4 % 250 + 2}"},
            "location": "lan",
            "endpoints": [{"name": "http", "port": 8000 + number % 1000}],
            "tags": ["bench", f"t{number % 7}"],
            "metadata": {"team": f"team-{number % 5}"},
        }
        for number in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "svcreg"
        home.mkdir(mode=0o700)
        # two /24 lan networks so that 2,000 instances on 500 hosts have addresses of their own
        (home / "services.yaml").write_text(
            "networks:\n"
            "  local: {type: local, subnet: 127.0.0.0/8}\n"
            "  production: {type: lan, subnet: 192.168.0.0/22}\n"
        )
        with svcreg_server(home, timeout=60) as server:
            settings = server.settings(timeout=60)
            with BlockingClient(settings) as client:
                for entry in entries(options.services):
                    client.register_service(entry)
            source = Path(folder) / "bench.svcreg.yml"
            source.write_text("plugin: svcreg.registry.registry\n")
            env = {
                **os.environ,
                "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
                "SVCREG_URL": f"wss://127.0.0.1:{server.port}/",
                "SVCREG_CA": str(home / "tls" / "ca.crt"),
                "SVCREG_TOKEN": server.token,
            }
            wall, fetch, populate = [], [], []
            for _ in range(options.runs):
                started = time.perf_counter()
                listed = subprocess.run(
                    [str(BIN / "ansible-inventory"), "-i", str(source), "--list"],
                    env=env,
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                wall.append(time.perf_counter() - started)
                hosts = len(json.loads(listed.stdout)["_meta"]["hostvars"])
                fetch_s, populate_s = _plugin_parts(settings)
                fetch.append(fetch_s)
                populate.append(populate_s)
    print(f"{options.services} services on {hosts} hosts, median of {options.runs}:")
    print(f"  ansible-inventory --list   {statistics.median(wall):6.2f} s")
    print(f"  registry (fetch)           {statistics.median(fetch):6.3f} s")
    print(f"  plugin populate            {statistics.median(populate):6.3f} s")


def _plugin_parts(settings: object) -> tuple[float, float]:
    from ansible.inventory.data import InventoryData

    from ansible_collections.svcreg.registry.plugins.inventory import registry as inventory_plugin
    from ansible_collections.svcreg.registry.plugins.inventory.registry import InventoryModule

    started = time.perf_counter()
    with BlockingClient(settings) as client:  # type: ignore[arg-type]
        data = {
            "networks": [dict(network) for network in client.list_networks()],
            "services": [entry.to_dict() for entry in client.list_services()],
        }
    fetched = time.perf_counter() - started
    plugin = InventoryModule()
    plugin.inventory = InventoryData()
    # the plugin's own option defaults (its DOCUMENTATION), plus those of the constructed fragment it extends
    documented = yaml.safe_load(inventory_plugin.DOCUMENTATION)["options"]
    defaults = {name: spec.get("default") for name, spec in documented.items()}
    defaults.update(strict=False, compose={}, groups={}, keyed_groups=[])
    plugin.get_option = defaults.__getitem__  # type: ignore[method-assign]
    started = time.perf_counter()
    plugin._populate(data)
    return fetched, time.perf_counter() - started


if __name__ == "__main__":
    shutil.which("ansible-inventory") or BIN.joinpath("ansible-inventory").exists() or sys.exit("no ansible-inventory")
    main()
