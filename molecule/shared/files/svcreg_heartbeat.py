"""Keep one service instance alive in the registry: a heartbeat every INTERVAL seconds until stopped.

    python3 svcreg_heartbeat.py SERVICE --host HOST [--interval SECONDS]

Runs on a node (from the client bundle, /opt/svcreg/lib) with the connection settings of the svcreg CLI in the
environment (SVCREG_URL, SVCREG_CA, SVCREG_CLIENT_CERT, SVCREG_CLIENT_KEY). The registry marks the instance
`failed` once its TTL passes without a heartbeat: here, when the node's container is stopped. A lost connection
is retried with the next beat, so a registry that blinks does not end the agent. Prints one line per state it
sees change, nothing per beat.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from registry.client import BlockingClient, ConnectionSettings
from registry.exceptions import RegistryError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service")
    parser.add_argument("--host", required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    options = parser.parse_args()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    settings = ConnectionSettings.from_env()
    client: BlockingClient | None = None
    last = None
    while not stop.is_set():
        try:
            client = client or BlockingClient(settings)
            state = client.heartbeat(options.service, options.host).state.value
        except RegistryError as exc:
            state = f"error: {exc.message}"
            if client is not None:
                client.close()
            client = None
        if state != last:
            print(f"{options.service}@{options.host}: {state}", flush=True)
            last = state
        stop.wait(options.interval)
    if client is not None:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
