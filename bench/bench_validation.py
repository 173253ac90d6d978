"""How fast a service entry is turned from JSON bytes into a validated object. Numbers for
the notes (msgspec or pydantic), not pass/fail.

    .venv/bin/python bench/bench_validation.py [--json]

Measures, in ops/s, for the same entry (one endpoint, one tag, one metadata key):
  * ``msgspec.json.decode(frame, type=ServiceEntry)`` - what the store and the wire use;
  * ``json.loads`` + ``ServiceEntry.from_dict`` - a decoded dict converted afterwards;
  * ``ServiceEntry(...)`` from Python values (the constructor converts like decoding);
  * pydantic v2 (``model_validate_json``) on a model of the same shape, bounds and rules,
    if pydantic is installed (it is not a dependency: ``pip install pydantic`` to compare).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import timeit
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

from registry import Endpoint, Location, NetworkInfo, ServiceEntry, ServiceState
from registry.model import validate_ip


def sample() -> ServiceEntry:
    return ServiceEntry(
        "svc-1",
        "bench-host",
        Location.LAN,
        NetworkInfo("10.0.0.1", "svc-1.example.org"),
        endpoints=(Endpoint("http", 8080),),
        tags=("bench",),
        metadata={"team": "core"},
        ttl_seconds=30,
    ).stamped(create_revision=1, mod_revision=2, updated_at=1_700_000_000.0)


def ops_per_second(call: Callable[[], object], *, number: int = 20_000) -> float:
    return number / min(timeit.repeat(call, number=number, repeat=5))


def pydantic_decoder() -> Callable[[bytes], object] | None:
    """A pydantic v2 model of the same shape: types and bounds in annotations, the rules no
    type can express in validators, as in registry.model."""
    try:
        from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
    except ImportError:
        return None

    service_name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    frozen = ConfigDict(frozen=True, extra="forbid")

    @functools.lru_cache(maxsize=4096)
    def address(text: str) -> tuple[str, bool]:
        parsed = validate_ip(text)
        return str(parsed), parsed.is_loopback

    class PydanticEndpoint(BaseModel):
        model_config = frozen
        name: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")]
        port: Annotated[int, Field(ge=1, le=65535, strict=True)]
        protocol: Literal["tcp", "udp"] = "tcp"

    class PydanticNetworkInfo(BaseModel):
        model_config = frozen
        ip: str
        hostname: str | None = None
        network: str | None = None

        @field_validator("ip")
        @classmethod
        def canonical(cls, value: str) -> str:
            return address(value)[0]

    class PydanticEntry(BaseModel):
        model_config = frozen
        service_name: service_name
        host_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9_.:-]{0,251}[A-Za-z0-9])?$")]
        location: Location
        network_info: PydanticNetworkInfo
        state: ServiceState = ServiceState.RUNNING
        endpoints: Annotated[tuple[PydanticEndpoint, ...], Field(max_length=64)] = ()
        tags: Annotated[tuple[Annotated[str, Field(min_length=1, max_length=255)], ...], Field(max_length=64)] = ()
        metadata: Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=64)] = {}
        ttl_seconds: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
        deregister_after_seconds: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
        version: Annotated[str, Field(min_length=1, max_length=128)] | None = None
        create_revision: Annotated[int, Field(ge=0)] = 0
        mod_revision: Annotated[int, Field(ge=0)] = 0
        updated_at: float | None = None

        @model_validator(mode="after")
        def rules(self) -> PydanticEntry:
            if (self.location is Location.LOCAL) != address(self.network_info.ip)[1]:
                raise ValueError("location and loopback address disagree")
            names = [endpoint.name for endpoint in self.endpoints]
            if len(set(names)) != len(names):
                raise ValueError("an endpoint name is used twice")
            if any(not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", key) for key in self.metadata):
                raise ValueError("bad metadata key")
            return self

    return PydanticEntry.model_validate_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    entry = sample()
    frame = json.dumps(entry.to_dict()).encode()
    decoder = msgspec.json.Decoder(ServiceEntry)
    assert decoder.decode(frame) == entry == ServiceEntry.from_dict(json.loads(frame))
    results: dict[str, Any] = {
        "msgspec_decode_per_s": ops_per_second(lambda: decoder.decode(frame)),
        "json_loads_from_dict_per_s": ops_per_second(lambda: ServiceEntry.from_dict(json.loads(frame))),
        "constructor_per_s": ops_per_second(
            lambda: ServiceEntry(
                "svc-1",
                "bench-host",
                "lan",  # type: ignore[arg-type]  # converted like decoded data
                {"ip": "10.0.0.1", "hostname": "svc-1.example.org"},  # type: ignore[arg-type]
                endpoints=[{"name": "http", "port": 8080}],  # type: ignore[arg-type]
                tags=["bench"],  # type: ignore[arg-type]
                metadata={"team": "core"},
                ttl_seconds=30,
            )
        ),
    }
    validate = pydantic_decoder()
    if validate is not None:
        validate(frame)
        results["pydantic_validate_json_per_s"] = ops_per_second(lambda: validate(frame))
    if options.json:
        print(json.dumps(results, indent=2))
        return
    print(f"service entry from {len(frame)} bytes of JSON")
    for key, value in results.items():
        print(f"{key:32s} {value:12,.0f}")


if __name__ == "__main__":
    main()
