"""One filter for services: ``list_services``, ``list_endpoints``, subscriptions, the CLI and
the Ansible ``service_info`` module all take a :class:`ServiceQuery`, so a value one of them
refuses (``location: mars``) is refused by all, with the same message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final

import msgspec

from .model import ConvertingMeta, Location, ServiceEntry, ServiceState, owner_instance
from .schema import convert

__all__ = ["QUERY_FIELDS", "ServiceQuery"]

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]


class ServiceQuery(
    msgspec.Struct, metaclass=ConvertingMeta, frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Which instances to select; every given field must match (all of them: AND)."""

    service_name: _Name | None = None
    host_id: _Name | None = None
    location: Location | None = None
    state: ServiceState | None = None
    network: _Name | None = None
    tag: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None

    @classmethod
    def parse(cls, value: ServiceQuery | Mapping[str, Any] | None, *, path: str = "filter") -> ServiceQuery:
        """A query from its wire/CLI form (a mapping; ``None`` selects everything).

        Raises:
            ValidationError: naming ``path.field`` and the bad value.
        """
        if value is None:
            return _EVERYTHING
        if isinstance(value, ServiceQuery):
            return value
        return convert(value, cls, path=path)

    def matches(self, entry: ServiceEntry | Mapping[str, Any]) -> bool:
        """Whether an entry, or its wire form (an event's ``data["service"]``), is selected."""
        if isinstance(entry, ServiceEntry):
            name, host, location, state, tags = (
                entry.service_name,
                entry.host_id,
                entry.location,
                entry.state,
                entry.tags,
            )
            network = entry.network_info.network
        else:
            name, host, location, state, tags = (
                entry["service_name"],
                entry["host_id"],
                entry["location"],
                entry["state"],
                entry["tags"],
            )
            network = entry["network_info"].get("network")
        # Location and ServiceState are StrEnums: a member equals its wire string.
        return (
            (self.service_name is None or name == self.service_name)
            and (self.host_id is None or host == self.host_id)
            and (self.location is None or location == self.location)
            and (self.state is None or state == self.state)
            and (self.network is None or network == self.network)
            and (self.tag is None or self.tag in tags)
        )

    def matches_allocation(self, allocation: Mapping[str, Any]) -> bool:
        """Whether an ``IpAllocated``/``IpReleased`` event's allocation is selected: by its
        network, and by service and host when its owner is an instance (``service@host``).
        Location, state and tag say nothing about an address: they do not filter these."""
        if self.network is not None and allocation.get("network") != self.network:
            return False
        if self.service_name is None and self.host_id is None:
            return True
        instance = owner_instance(str(allocation.get("owner", "")))
        return instance is not None and self.service_name in (None, instance[0]) and self.host_id in (None, instance[1])

    @property
    def is_everything(self) -> bool:
        return self == _EVERYTHING

    def to_dict(self) -> dict[str, str]:
        """The wire form: only the given fields."""
        return {key: str(value) for key, value in msgspec.structs.asdict(self).items() if value is not None}


_EVERYTHING: Final = ServiceQuery()
QUERY_FIELDS: Final = tuple(field.name for field in msgspec.structs.fields(ServiceQuery))
