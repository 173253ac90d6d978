"""Benchmarks for the registry core (issue: registry core). Numbers for the notes, not pass/fail.

    .venv/bin/python bench/bench_core.py [--entries 100000] [--json]

Measures, on the embedded store with durability on (WAL + synchronous=FULL):
  * durable writes/s: 1 writer, 8 concurrent writer threads, and batched writes
    (add_or_update_many, 100 per call) - the group commit at work;
  * get_service reads/s with N entries (reads never touch the disk);
  * time to allocate every address of a /16;
  * time to load a store of N entries (Registry.load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from registry import (
    Endpoint,
    Location,
    NetworkConfig,
    NetworkInfo,
    NetworkManager,
    PoolExhausted,
    Registry,
    ServiceEntry,
    SqliteStore,
    Store,
)


def entry(number: int, host: str = "bench-host") -> ServiceEntry:
    return ServiceEntry(
        f"svc-{number}",
        host,
        Location.LAN,
        NetworkInfo(f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255 or 1}"),
        endpoints=(Endpoint("http", 8080),),
        tags=("bench",),
    )


def durable_writes(directory: Path, *, writers: int, per_writer: int) -> float:
    registry = Registry.with_persistence(directory / f"writes-{writers}.db")
    barrier = threading.Barrier(writers + 1)

    def work(offset: int) -> None:
        barrier.wait()
        for number in range(offset, offset + per_writer):
            registry.add_or_update(entry(number))

    threads = [threading.Thread(target=work, args=(n * per_writer,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    registry.close()
    return writers * per_writer / elapsed


def batched_writes(directory: Path, *, total: int, batch: int) -> float:
    registry = Registry.with_persistence(directory / "batched.db")
    began = time.perf_counter()
    for start in range(0, total, batch):
        registry.add_or_update_many([entry(number) for number in range(start, start + batch)])
    elapsed = time.perf_counter() - began
    registry.close()
    return total / elapsed


def fill(path: Path, count: int) -> None:
    registry = Registry.with_persistence(path, synchronous="OFF")
    for start in range(0, count, 1000):
        registry.add_or_update_many([entry(number) for number in range(start, min(start + 1000, count))])
    registry.close()


def reads(path: Path, count: int) -> tuple[float, float]:
    registry = Registry.load(path)
    names = [f"svc-{number}" for number in range(0, count, 7)]
    samples = []
    for _ in range(5):
        began = time.perf_counter()
        for name in names:
            registry.get_service(name)
        samples.append(len(names) / (time.perf_counter() - began))
    registry.close()
    best = max(samples)
    return best, 1e6 / best


def load_time(path: Path) -> float:
    samples = []
    for _ in range(3):
        began = time.perf_counter()
        registry = Registry.load(path)
        samples.append(time.perf_counter() - began)
        registry.close()
    return statistics.median(samples)


def allocate_slash16(store: Store | None = None, *, batch: int = 1) -> tuple[float, int]:
    """Allocate every address of a /16, one call per owner (batch=1) or allocate_many."""
    config = NetworkConfig.from_dict({"networks": {"big": {"type": "lan", "subnet": "10.20.0.0/16"}}})
    manager = NetworkManager(config, store=store)
    began = time.perf_counter()
    count = 0
    try:
        while True:
            owners = [f"owner-{number}" for number in range(count, count + batch)]
            if batch == 1:
                manager.allocate_ip(owners[0], "big")
            else:
                batch = min(batch, manager.free_count("big"))
                if batch == 0:
                    raise PoolExhausted("done")
                manager.allocate_many(owners[:batch], "big")
            count += batch
    except PoolExhausted:
        pass
    return time.perf_counter() - began, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--writes", type=int, default=4000, help="writes per durable-write run")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        directory = Path(tmp)
        results["durable_writes_per_s_1_writer"] = durable_writes(directory, writers=1, per_writer=options.writes // 4)
        results["durable_writes_per_s_8_writers"] = durable_writes(directory, writers=8, per_writer=options.writes // 8)
        results["durable_writes_per_s_batched_100"] = batched_writes(directory, total=options.writes * 5, batch=100)
        big = directory / "big.db"
        fill(big, options.entries)
        results["load_s"] = load_time(big)
        results["get_service_per_s"], results["get_service_us"] = reads(big, options.entries)
        results["allocate_slash16_memory_s"], allocated = allocate_slash16()
        results["allocated_addresses"] = allocated
        with SqliteStore(directory / "alloc.db") as store:
            results["allocate_slash16_durable_batch_1000_s"], _ = allocate_slash16(store, batch=1000)
        with SqliteStore(directory / "alloc1.db") as store:
            began = time.perf_counter()
            manager = NetworkManager(
                NetworkConfig.from_dict({"networks": {"n": {"type": "lan", "subnet": "10.0.0.0/22"}}}), store=store
            )
            for number in range(1000):
                manager.allocate_ip(f"o{number}", "n")
            results["allocate_durable_single_per_s"] = 1000 / (time.perf_counter() - began)
    if options.json:
        print(json.dumps(results, indent=2))
        return
    print(f"entries for read/load tests: {options.entries}")
    for key, value in results.items():
        print(f"{key:36s} {value:14,.2f}")


if __name__ == "__main__":
    main()
