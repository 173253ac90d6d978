"""The storage seam: both stores behave alike; the sqlite one is durable and refuses bad files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import MemoryStore, Registry, ServiceEntry, SqliteStore, Store, StoreError

from .helpers import make_entry


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "s.db")
    yield store
    store.close()


def test_put_get_delete_scan(store: Store) -> None:
    store.put("services", "b/h", {"n": 2})
    store.put("services", "a/h", {"n": 1, "nested": [1, "x", None]})
    store.commit()
    assert store.get("services", "a/h") == {"n": 1, "nested": [1, "x", None]}
    assert store.get("services", "missing") is None
    assert list(store.scan("services")) == [("a/h", {"n": 1, "nested": [1, "x", None]}), ("b/h", {"n": 2})]
    store.delete("services", "a/h")
    store.delete("services", "never-there")
    store.commit()
    assert [key for key, _ in store.scan("services")] == ["b/h"]


def test_delete_below_trims_in_key_order(store: Store) -> None:
    for revision in range(1, 21):
        store.put("events", f"{revision:020d}", {"revision": revision})
    store.delete_below("events", f"{15:020d}")
    store.commit()
    assert [value["revision"] for _, value in store.scan("events")] == list(range(15, 21))


def test_tables_are_separate_and_unknown_tables_refused(store: Store) -> None:
    store.put("services", "k", 1)
    store.put("allocations", "k", 2)
    assert store.get("services", "k") == 1
    assert store.get("allocations", "k") == 2
    with pytest.raises(StoreError, match="unknown store table 'nope'"):
        store.put("nope", "k", 1)


def test_values_must_be_json(store: Store) -> None:
    with pytest.raises(StoreError, match=r"cannot be stored as JSON: .*object"):
        store.put("services", "k", object())


def test_values_are_stored_as_msgspec_encodes_them(store: Store) -> None:
    """Tuples and sets become arrays, NaN and infinities null: what comes back is plain JSON."""
    store.put("services", "k", {"tuple": (1, 2), "set": {3}, "nan": float("nan"), "inf": float("inf")})
    store.commit()
    assert store.get("services", "k") == {"tuple": [1, 2], "set": [3], "nan": None, "inf": None}


def test_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.put("services", "k", 1)


def test_sqlite_store_is_durable_by_default(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        assert store.synchronous_level() == "FULL"
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    relaxed = SqliteStore(tmp_path / "s.db", synchronous="normal")
    try:
        assert relaxed.synchronous_level() == "NORMAL"
    finally:
        relaxed.close()
    with pytest.raises(StoreError, match="synchronous 'sometimes'"):
        SqliteStore(tmp_path / "s.db", synchronous="sometimes")


def test_values_are_json_text_on_disk_never_pickle(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.put("services", "k", {"a": 1})
    store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:
        (raw,) = connection.execute("SELECT value FROM services WHERE key='k'").fetchone()
    assert raw == '{"a":1}'


def test_data_survives_reopen(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.put("meta", "x", [1, 2])
    store.close()
    reopened = SqliteStore(tmp_path / "s.db", create=False)
    try:
        assert reopened.get("meta", "x") == [1, 2]
    finally:
        reopened.close()


def test_store_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """registry.db and its -wal and -shm files hold every service's metadata: 0600, like the keys."""
    path = tmp_path / "registry.db"
    old_umask = os.umask(0o022)
    try:
        store = SqliteStore(path)
        store.put("services", "a", {"n": 1})
        store.commit()
        files = [path, tmp_path / "registry.db-wal", tmp_path / "registry.db-shm"]
        assert {name.name: oct(name.stat().st_mode & 0o777) for name in files} == {name.name: "0o600" for name in files}
        store.close()
        # a store from an earlier version (0644) is tightened when it is opened
        for name in files:
            if name.exists():
                name.chmod(0o644)
        SqliteStore(path).close()
        assert {oct(name.stat().st_mode & 0o777) for name in files if name.exists()} == {"0o600"}
    finally:
        os.umask(old_umask)


def test_group_commit_from_many_threads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            for index in range(100):
                store.put("services", f"{number}/{index}", index)
                store.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert errors == []
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("SELECT count(*) FROM services").fetchone()[0] == 800


def _commit_soon(store: Store) -> tuple[threading.Event, list[StoreError | None]]:
    finished = threading.Event()
    outcome: list[StoreError | None] = []

    def done(error: StoreError | None) -> None:
        outcome.append(error)
        finished.set()

    store.commit_soon(done)
    return finished, outcome


def test_commit_soon_reports_once_the_writes_are_durable(store: Store, tmp_path: Path) -> None:
    store.put("services", "a/h", {"n": 1})
    finished, outcome = _commit_soon(store)
    assert finished.wait(10) and outcome == [None]
    if isinstance(store, SqliteStore):  # durable: another connection sees it
        with sqlite3.connect(tmp_path / "s.db") as connection:
            assert connection.execute("SELECT value FROM services WHERE key = 'a/h'").fetchone() == ('{"n":1}',)
    finished, outcome = _commit_soon(store)  # nothing to commit: reported at once
    assert finished.is_set() and outcome == [None]


def test_commit_soon_failure_is_reported_and_the_store_refuses_more(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store.put("services", "first", 1)
    store.commit()
    store._conn.execute("PRAGMA busy_timeout = 50")  # give up on the lock below quickly
    with sqlite3.connect(tmp_path / "s.db", isolation_level=None) as other:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        store.put("services", "second", 2)
        finished, outcome = _commit_soon(store)
        assert finished.wait(10)
        other.execute("ROLLBACK")
    [error] = outcome
    assert isinstance(error, StoreError) and "a write failed: database is locked" in error.message
    with pytest.raises(StoreError, match="locked"):
        store.put("services", "third", 3)
    store.close()
    reopened = SqliteStore(tmp_path / "s.db")
    assert [key for key, _ in reopened.scan("services")] == ["first"]
    reopened.close()


def test_commit_soon_to_a_dead_worker_fails_on_check(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    store._conn.close(force=True)  # the sqlite worker thread is gone, as after a crash
    store.put("services", "a", 1)
    finished, outcome = _commit_soon(store)
    assert not finished.wait(0.2)  # nobody is there to answer ...
    store.check_commits()  # ... which the waiter's periodic check finds
    assert finished.is_set()
    [error] = outcome
    assert isinstance(error, StoreError) and "the sqlite worker stopped" in error.message
    store.check_commits()  # reported once only
    assert len(outcome) == 1
    store.close()


# --- files that are not our store fail at open, with a clear message ---------------------


def test_missing_store_with_create_false(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        SqliteStore(tmp_path / "absent.db", create=False)
    with pytest.raises(StoreError, match="no registry store at"):
        Registry.load(tmp_path / "absent.db")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"directory .* does not exist"):
        SqliteStore(tmp_path / "no" / "such" / "dir" / "s.db")
    # the library's entry point makes the folder, as the seed's with_persistence does
    with Registry.with_persistence(tmp_path / "var" / "registry.db") as registry:
        assert registry.revision == 0
    assert (tmp_path / "var").stat().st_mode & 0o777 == 0o700


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        SqliteStore(tmp_path)


def test_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("just some text, not a database\n" * 100)
    with pytest.raises(StoreError, match="not a SQLite database"):
        SqliteStore(path)
    with pytest.raises(StoreError, match="not a SQLite database"):
        Registry.load(path)
    assert path.read_text().startswith("just some text")  # never overwritten


def test_foreign_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StoreError, match=r"not a svcreg store \(tables: customers\)"):
        SqliteStore(path)


def test_empty_sqlite_database_is_not_a_store_to_load(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    path.write_bytes(b"")
    with pytest.raises(StoreError, match="no store at"):
        Registry.load(path)


def test_store_from_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'format'", ('{"app": "svcreg", "schema": 99}',))
    with pytest.raises(StoreError, match="newer svcreg \\(schema 99\\)"):
        SqliteStore(path)


def test_corrupt_database_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.db"
    registry = Registry.with_persistence(path)
    for number in range(300):
        registry.add_or_update(make_entry(f"svc-{number}", metadata={"pad": "x" * 200}))
    registry.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    for offset in range(2 * 4096, len(data) - 4096, 4096):  # scribble over every page but the first
        data[offset + 100 : offset + 400] = os.urandom(300)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"damaged|invalid|cannot be read"):
        Registry.load(path)


# --- kill -9 right after an acknowledged write loses nothing -----------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from registry import Registry
    from tests.helpers import make_entry

    registry = Registry.with_persistence(sys.argv[1])
    number = 0
    while True:
        registry.add_or_update(make_entry(f"svc-{number}", ip=f"10.0.{number // 250}.{number % 250 + 1}"))
        print(number, flush=True)  # acknowledged: add_or_update returned
        number += 1
    """
)


def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert process.stdout is not None
    acknowledged = -1
    for line in process.stdout:
        acknowledged = int(line)
        if acknowledged >= 300:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert acknowledged >= 300
    registry = Registry.load(path)
    try:
        names = {entry.service_name for entry in registry.list_services()}
        missing = [n for n in range(acknowledged + 1) if f"svc-{n}" not in names]
        assert missing == []
        assert registry.revision >= acknowledged + 1
    finally:
        registry.close()


def test_reads_see_uncommitted_writes_in_order(store: Store) -> None:
    store.put("events", "00000001", {"n": 1})
    store.put("events", "00000002", {"n": 2})
    store.put("events", "00000003", {"n": 3})
    assert store.get("events", "00000002") == {"n": 2}  # before any commit
    store.delete("events", "00000002")
    assert store.get("events", "00000002") is None
    store.delete_below("events", "00000003")  # must also drop the buffered 00000001
    store.put("events", "00000002", {"n": "again"})
    store.commit()
    assert list(store.scan("events")) == [("00000002", {"n": "again"}), ("00000003", {"n": 3})]


def test_many_rows_in_one_commit(store: Store) -> None:
    for number in range(2500):  # several multi-row statements
        store.put("allocations", f"k{number:05d}", {"n": number})
    for number in range(0, 2500, 2):
        store.delete("allocations", f"k{number:05d}")
    store.commit()
    rows = list(store.scan("allocations"))
    assert len(rows) == 1250 and rows[0] == ("k00001", {"n": 1}) and rows[-1] == ("k02499", {"n": 2499})


def test_typed_scan_decodes_entries_and_names_a_bad_row(store: Store) -> None:
    entry = make_entry("api", "h1")
    store.put("services", "api/h1", entry.to_record())
    store.put("services", "bad/h2", make_entry("bad", "h2").to_record() | {"endpoints": [{"name": "x", "port": 0}]})
    with pytest.raises(StoreError, match=r"invalid record 'bad/h2': endpoints\[0\]\.port: must be an integer >= 1"):
        list(store.scan("services", as_type=ServiceEntry))
    store.delete("services", "bad/h2")
    assert list(store.scan("services", as_type=ServiceEntry)) == [("api/h1", entry)]
