# -*- coding: utf-8 -*-
# Copyright: svcreg maintainers
# MIT License or Apache License 2.0 (see the repository's LICENSE files)
"""What the service, service_info and ip_allocation modules do, given a connected client.

Each ``run_*`` function reads the current state, compares it with the wanted state and
writes only when they differ; in check mode it predicts without writing. It is shared by
the modules and by the action plugins that run them on the controller.
"""

from __future__ import annotations

from typing import Any

from ansible_collections.svcreg.registry.plugins.module_utils.connection import HAS_REGISTRY

if HAS_REGISTRY:
    from registry.exceptions import NotFound, ValidationError
    from registry.model import BOOKKEEPING_FIELDS, ServiceEntry
    from registry.query import ServiceQuery

__all__ = [
    "IP_ALLOCATION_ARGUMENT_SPEC",
    "SERVICE_ARGUMENT_SPEC",
    "SERVICE_INFO_ARGUMENT_SPEC",
    "RUN_STATES",
    "run_ip_allocation",
    "run_service",
    "run_service_info",
    "wanted_entry",
]

RUN_STATES = ("starting", "running", "stopped", "failed")
# Option choices, as documented; tests/unit checks them against registry.model's enums.
LOCATIONS = ("local", "lan", "wireguard")

SERVICE_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "name": {"type": "str", "required": True, "aliases": ["service_name"]},
    "host": {"type": "str", "aliases": ["host_id"]},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent", *RUN_STATES]},
    "ip": {"type": "str"},
    "hostname": {"type": "str"},
    "network": {"type": "str"},
    "location": {"type": "str", "choices": list(LOCATIONS)},
    "endpoints": {
        "type": "list",
        "elements": "dict",
        "options": {
            "name": {"type": "str", "required": True},
            "port": {"type": "int", "required": True},
            "protocol": {"type": "str", "default": "tcp", "choices": ["tcp", "udp"]},
        },
    },
    "tags": {"type": "list", "elements": "str"},
    "metadata": {"type": "dict"},
    "ttl": {"type": "float"},
    "deregister_after": {"type": "float"},
    "version": {"type": "str"},
}

SERVICE_INFO_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "name": {"type": "str", "aliases": ["service_name"]},
    "host": {"type": "str", "aliases": ["host_id"]},
    "state": {"type": "str", "choices": list(RUN_STATES)},
    "location": {"type": "str", "choices": list(LOCATIONS)},
    "network": {"type": "str"},
    "tag": {"type": "str"},
}

IP_ALLOCATION_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "owner": {"type": "str"},
    "network": {"type": "str", "required": True},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
}


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry without the registry's bookkeeping, endpoints in name order: what a user compares."""
    data = {key: value for key, value in entry.items() if key not in BOOKKEEPING_FIELDS}
    data["endpoints"] = sorted(data.get("endpoints") or [], key=lambda endpoint: endpoint["name"])
    return data


def wanted_entry(params: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
    """The entry the task asks for: the current one with every given option applied.

    Options left unset keep their current value; a new instance needs ``ip``. The result
    is validated and normalised by the registry's own model (``ServiceEntry``).

    Raises:
        ValueError: the entry is invalid; the message names the option and the value.
    """
    base = (
        dict(current)
        if current is not None
        else {
            "service_name": params["name"],
            "host_id": params["host"],
            "location": None,  # the registry takes it from the address (or the network)
            "state": "running",
            "network_info": {"ip": None, "hostname": None, "network": None},
        }
    )
    base["network_info"] = dict(base.get("network_info") or {})
    if params.get("state") in RUN_STATES:
        base["state"] = params["state"]
    if params.get("location") is not None:
        base["location"] = params["location"]
    moved = params.get("ip") is not None and params["ip"] != base["network_info"].get("ip")
    if moved and params.get("network") is None:
        base["network_info"]["network"] = None  # a new address: the registry finds its network again
        if params.get("location") is None:
            base["location"] = None
    for option in ("ip", "hostname", "network"):
        if params.get(option) is not None:
            base["network_info"][option] = params[option]
    if not base["network_info"].get("ip") and not base["network_info"].get("network"):
        raise ValueError(
            "ip (or network, for the registry to allocate one) is required to register a new instance of %r on host %r"
            % (params["name"], params["host"])
        )
    if params.get("endpoints") is not None:
        base["endpoints"] = [
            {"name": item["name"], "port": item["port"], "protocol": item.get("protocol") or "tcp"}
            for item in params["endpoints"]
        ]
    if params.get("tags") is not None:
        base["tags"] = list(params["tags"])
    if params.get("metadata") is not None:
        base["metadata"] = {str(key): _metadata_value(value) for key, value in params["metadata"].items()}
    for option, field in (("ttl", "ttl_seconds"), ("deregister_after", "deregister_after_seconds")):
        if params.get(option) is not None:
            base[field] = params[option]
    if params.get("version") is not None:
        base["version"] = params["version"]
    for field in BOOKKEEPING_FIELDS:
        base.pop(field, None)
    try:
        return _public(ServiceEntry.from_dict(base).to_dict())
    except ValidationError as exc:
        raise ValueError(_option_message(exc)) from None


_FIELD_OPTIONS = {
    "service_name": "name",
    "host_id": "host",
    "network_info.ip": "ip",
    "network_info.hostname": "hostname",
    "network_info.network": "network",
    "ttl_seconds": "ttl",
    "deregister_after_seconds": "deregister_after",
}


def _metadata_value(value: Any) -> Any:
    """Metadata values are strings; YAML numbers and booleans (``replicas: 3``) become their text, as in
    ``-e``; anything else is left for the model to refuse by name."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _option_message(exc: Any) -> str:
    """The model's message with its field path spoken as the module's option (``name``, ``endpoints[0].port``)."""
    field = getattr(exc, "field", None) or ""
    message = exc.message
    if field and message.startswith(field + ": "):
        message = message[len(field) + 2 :]
    option = _FIELD_OPTIONS.get(field, field)
    return "%s: %s" % (option, message) if option else message


def _current_service(client: Any, name: str, host: str) -> dict[str, Any] | None:
    try:
        return client.get_service(name, host).to_dict()
    except NotFound:
        return None


def run_service(client: Any, params: dict[str, Any], *, check_mode: bool) -> dict[str, Any]:
    """Register, update, change the run state of, or remove one instance.

    Raises:
        ValueError: bad options (named in the message).
        RegistryError: the registry refused a write.
    """
    if not params.get("host"):
        raise ValueError("host is required: the host_id the instance runs on")
    current = _current_service(client, params["name"], params["host"])
    before = _public(current) if current is not None else {}
    if params["state"] == "absent":
        if current is None:
            return {"changed": False, "service": {}, "diff": {"before": {}, "after": {}}}
        if not check_mode:
            client.remove_service(params["name"], params["host"])
        return {"changed": True, "service": {}, "diff": {"before": before, "after": {}}}
    if current is None and check_mode and not params.get("ip") and not params.get("network"):
        # A play run with --check cannot have registered the instance an earlier task would
        # create; predict the change instead of failing where the real run would succeed.
        return {
            "changed": True,
            "service": {},
            "diff": {"before": {}, "after": {"service_name": params["name"], "host_id": params["host"]}},
            "warnings": [
                "check mode: %r is not registered on %r and no ip was given; "
                "the real run fails unless an earlier task registers it" % (params["name"], params["host"])
            ],
        }
    after = wanted_entry(params, current)
    if after == before:
        return {"changed": False, "service": current, "diff": {"before": before, "after": after}}
    if check_mode:
        return {"changed": True, "service": after, "diff": {"before": before, "after": after}}
    # The diff shows what the registry stored (its location, allocated address, network), not the prediction.
    service = client.register_service(after).to_dict()
    return {"changed": True, "service": service, "diff": {"before": before, "after": _public(service)}}


def run_service_info(client: Any, params: dict[str, Any], *, check_mode: bool = False) -> dict[str, Any]:
    """Read instances; never changes anything, so check mode makes no difference."""
    del check_mode
    filters = {
        "service_name": params.get("name"),
        "host_id": params.get("host"),
        "state": params.get("state"),
        "location": params.get("location"),
        "network": params.get("network"),
        "tag": params.get("tag"),
    }
    # The same filter type the registry and the CLI use: a value one refuses, all refuse.
    query = ServiceQuery.parse({key: value for key, value in filters.items() if value is not None})
    services = client.list_services(**query.to_dict())
    return {"changed": False, "services": [entry.to_dict() for entry in services]}


def _find_allocation(client: Any, owner: str, network: str) -> dict[str, Any] | None:
    for allocation in client.list_allocations(network):
        if allocation["owner"] == owner:
            return dict(allocation)
    return None


def _allocation_result(
    changed: bool, allocation: dict[str, Any] | None, before: dict[str, Any] | None
) -> dict[str, Any]:
    allocation = allocation or {}
    return {
        "changed": changed,
        "ip": allocation.get("ip"),
        "network": allocation.get("network"),
        "prefixlen": allocation.get("prefixlen"),
        "allocation": allocation,
        "diff": {"before": before or {}, "after": allocation},
    }


def run_ip_allocation(client: Any, params: dict[str, Any], *, check_mode: bool) -> dict[str, Any]:
    """Allocate (or return) the owner's address in a network, or release it.

    Raises:
        ValueError: no owner.
        RegistryError: an unknown network, an exhausted pool, a refused write.
    """
    owner, network = params.get("owner"), params["network"]
    if not owner:
        raise ValueError("owner is required: who the address is for (a host or service name)")
    current = _find_allocation(client, owner, network)
    if params["state"] == "absent":
        if current is None:
            return _allocation_result(False, None, None)
        if not check_mode:
            client.release_ip(owner, current["network"])
        return _allocation_result(True, None, current)
    if current is not None:
        return _allocation_result(False, current, current)
    if check_mode:
        return _allocation_result(True, {"owner": owner, "network": network, "ip": None, "prefixlen": None}, None)
    return _allocation_result(True, dict(client.allocate_ip(owner, network)), None)
