"""The storage seam: a few tables of JSON values, committed durably in groups.

The registry core and the network manager talk to a :class:`Store` only through
``get``/``put``/``delete``/``delete_below``/``scan``/``commit``; nothing else in the
package touches sqlite. Two implementations:

* :class:`MemoryStore` - dicts, for ``Registry()`` without persistence and for tests.
* :class:`SqliteStore` - the embedded default, on sqlitedict. All tables live in one
  sqlite file and share **one** sqlitedict worker connection, so one ``commit`` makes
  the writes to every table durable atomically (a service row and its event row land
  together or not at all).

Durability: sqlitedict hard-codes ``PRAGMA synchronous=OFF``; we switch the shared
connection to WAL + ``synchronous=FULL`` (configurable) right after it opens, and turn
off sqlitedict's per-call ``outer_stack`` capture. ``commit`` is a group commit:
writes are buffered in the store (last write per key wins) and handed to the worker as
a few multi-row statements when a commit starts; concurrent callers of ``commit`` share
one sqlite commit (one fsync) for everything written before it. Reads see buffered
writes.

Values are JSON, never pickle: a tampered pickle file is code execution.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Final, TypeVar, overload

import msgspec
from sqlitedict import SqliteDict, SqliteMultithread

from .exceptions import StoreError, ValidationError
from .schema import decode_json

log = logging.getLogger(__name__)

__all__ = ["SCHEMA_VERSION", "TABLES", "MemoryStore", "SqliteStore", "Store"]

T = TypeVar("T")

TABLES: Final = ("services", "allocations", "events", "meta")
SCHEMA_VERSION: Final = 1
_FORMAT_KEY: Final = "format"
_FORMAT_APP: Final = "svcreg"
_SQLITE_HEADER: Final = b"SQLite format 3\x00"
_SYNCHRONOUS_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
# sqlitedict's marker for "commit now" on its worker queue (see SqliteMultithread.run).
_COMMIT_REQUEST: Final = "--commit--"
_SCAN_BATCH: Final = 2048
# Rows per multi-row statement: 2 parameters each, far below sqlite's variable limit.
_ROWS_PER_STATEMENT: Final = 400


class Store(ABC):
    """A handful of named tables mapping string keys to JSON-able values.

    Writes become durable at the next ``commit``; reads see them at once.
    Implementations are thread-safe.
    """

    @abstractmethod
    def get(self, table: str, key: str) -> Any | None:
        """The value under ``key``, or None."""

    @abstractmethod
    def put(self, table: str, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` (a JSON-able object)."""

    @abstractmethod
    def delete(self, table: str, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def delete_below(self, table: str, key: str) -> None:
        """Remove every key that sorts before ``key`` (used to trim the event log)."""

    @overload
    def scan(self, table: str) -> Iterator[tuple[str, Any]]: ...
    @overload
    def scan(self, table: str, *, as_type: type[T]) -> Iterator[tuple[str, T]]: ...
    @abstractmethod
    def scan(self, table: str, *, as_type: type[T] | None = None) -> Iterator[tuple[str, Any]]:
        """Every ``(key, value)`` of the table, in key order; with ``as_type`` each value is
        decoded straight into that type (a msgspec struct), or a StoreError names the row."""

    @abstractmethod
    def commit(self) -> None:
        """Make every write issued so far durable; returns once it is."""

    def commit_soon(self, done: Callable[[StoreError | None], None]) -> None:
        """Start making every write issued so far durable and return; ``done`` is called once it
        is (None) or once it failed (the error), from whichever thread finished the commit, or at
        once when there is nothing to commit. For event loops: no thread waits for the disk.

        This default commits in the calling thread.
        """
        try:
            self.commit()
        except StoreError as exc:
            done(exc)
            return
        done(None)

    def check_commits(self) -> None:
        """Fail the pending :meth:`commit_soon` calls if the store can no longer finish them (its
        writer died); whoever waits for one calls this now and then. Nothing to do by default."""
        return

    @abstractmethod
    def close(self) -> None:
        """Commit and release the store; further calls fail."""

    commit_observer: Callable[[float], None] | None = None
    """Called with the duration in seconds of every physical commit (for metrics)."""

    @property
    def path(self) -> Path | None:
        """The file behind the store, or None for memory."""
        return None

    def healthy(self) -> bool:
        """Open and able to take writes."""
        return True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_table(table: str) -> None:
    if table not in TABLES:
        raise StoreError(f"unknown store table {table!r}; tables are {', '.join(TABLES)}")


class MemoryStore(Store):
    """Tables in dicts: nothing survives the process."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, Any]] = {name: {} for name in TABLES}
        self._lock = threading.Lock()
        self._closed = False

    def _table(self, table: str) -> dict[str, Any]:
        if self._closed:
            raise StoreError("the store is closed")
        _check_table(table)
        return self._tables[table]

    def get(self, table: str, key: str) -> Any | None:
        value = self._table(table).get(key)
        # A deep copy through JSON keeps the memory store as strict as the sqlite one:
        # callers can never alias stored state, and non-JSON values fail here too.
        return None if value is None else json.loads(value)

    def put(self, table: str, key: str, value: Any) -> None:
        encoded = _encode(value)
        with self._lock:
            self._table(table)[key] = encoded

    def delete(self, table: str, key: str) -> None:
        with self._lock:
            self._table(table).pop(key, None)

    def delete_below(self, table: str, key: str) -> None:
        with self._lock:
            rows = self._table(table)
            for old in [existing for existing in rows if existing < key]:
                del rows[old]

    def scan(self, table: str, *, as_type: type[T] | None = None) -> Iterator[tuple[str, Any]]:
        with self._lock:
            rows = sorted(self._table(table).items())
        for start in range(0, len(rows), _SCAN_BATCH):
            yield from _decode_rows(rows[start : start + _SCAN_BATCH], as_type, f"table {table!r}")

    def commit(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def close(self) -> None:
        self._closed = True

    def healthy(self) -> bool:
        return not self._closed


# One encoder for every write (msgspec's is ~5x faster than json's on a service row).
_ENCODER: Final = msgspec.json.Encoder()


def _decode_rows(rows: list[tuple[str, str]], as_type: type[T] | None, where: str) -> list[tuple[str, Any]]:
    """Decode a batch of rows with one call (loading a large store is dominated by this)."""
    document = "[" + ",".join(row[1] for row in rows) + "]"
    if as_type is None:
        values = json.loads(document)
    else:
        try:
            values = msgspec.json.decode(document, type=list[as_type])  # type: ignore[valid-type]
        except msgspec.ValidationError:
            # Find the bad row again on its own, for an error naming the row and the field.
            for key, raw in rows:
                try:
                    decode_json(raw, as_type)
                except ValidationError as exc:
                    raise StoreError(f"{where} holds an invalid record {key!r}: {exc.message}") from None
            raise
    return list(zip((row[0] for row in rows), values, strict=True))


def _encode(value: Any) -> str:
    """A row's JSON text, as msgspec writes it (tuples and sets as arrays, NaN and infinities as null)."""
    try:
        return _ENCODER.encode(value).decode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreError(f"value cannot be stored as JSON: {exc}") from None


class _SharedConnectionTable(SqliteDict):  # type: ignore[misc]  # sqlitedict has no type hints
    """A sqlitedict table that runs on the store's one shared worker connection.

    The store owns the connection: closing (or garbage-collecting) one table must
    not close it for the others.
    """

    def __init__(self, connection: SqliteMultithread, filename: str, tablename: str) -> None:
        self._shared_connection = connection
        super().__init__(
            filename,
            tablename=tablename,
            flag="c",
            autocommit=False,
            encode=_encode,
            decode=json.loads,
            outer_stack=False,
        )

    def _new_conn(self) -> SqliteMultithread:
        return self._shared_connection

    def close(self, do_log: bool = True, force: bool = False) -> None:
        self.conn = None


class SqliteStore(Store):
    """The embedded store: one sqlite file, sqlitedict tables, group commit.

    Args:
        path: the database file; its directory must exist.
        create: create the file if it is missing (False: fail if it does not exist).
        synchronous: sqlite's ``synchronous`` level; ``FULL`` (default) survives power
            loss with WAL, ``NORMAL`` survives process crashes only, ``OFF`` neither.
        integrity_check: run ``PRAGMA quick_check`` at open so a damaged file fails
            here, not halfway through serving.

    Raises:
        StoreError: the file is missing (with ``create=False``), not a sqlite
            database, a sqlite database that is not ours, from a newer schema, or damaged.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        synchronous: str = "FULL",
        integrity_check: bool = True,
    ) -> None:
        self._path = Path(path)
        level = synchronous.upper()
        if level not in _SYNCHRONOUS_MODES:
            raise StoreError(f"synchronous {synchronous!r} is not one of {', '.join(_SYNCHRONOUS_MODES)}")
        _preflight(self._path, create=create, integrity_check=integrity_check)
        _owner_only(self._path)

        self._cond = threading.Condition()
        self._written = 0  # writes accepted so far
        self._durable = 0  # writes known committed
        self._committing = False
        # Writes wait here until the next commit hands them to the worker as a few
        # multi-row statements: per row, a put costs a dict assignment instead of a
        # round trip through sqlitedict's worker queue (which needs the GIL per row
        # and dominated the cost of a write). Last write per key wins.
        self._pending: dict[str, dict[str, str | None]] = {name: {} for name in TABLES}
        self._failure: str | None = None
        self._closed = False
        self._commits: set[_PendingCommit] = set()  # commit_soon() calls the worker has not answered

        self._conn = SqliteMultithread(str(self._path), autocommit=False, journal_mode="WAL", outer_stack=False)
        try:
            self._conn.execute(f"PRAGMA synchronous={level}")
            self._tables = {name: _SharedConnectionTable(self._conn, str(self._path), name) for name in TABLES}
            self._conn.check_raise_error()
            if self.get("meta", _FORMAT_KEY) is None:
                self.put("meta", _FORMAT_KEY, {"app": _FORMAT_APP, "schema": SCHEMA_VERSION})
                self.commit()
        except sqlite3.Error as exc:
            self._conn.close(force=True)
            raise StoreError(f"cannot open store {self._path}: {exc}") from None

    @property
    def path(self) -> Path:
        return self._path

    def synchronous_level(self) -> str:
        """What sqlite reports for ``PRAGMA synchronous`` on the live connection."""
        row = self._conn.select_one("PRAGMA synchronous")
        return _SYNCHRONOUS_MODES[row[0]] if row else "unknown"

    def healthy(self) -> bool:
        return not self._closed and self._failure is None and self._conn.is_alive()

    def _usable(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self._path} is closed")
        if self._failure is not None:
            raise StoreError(f"the store {self._path} failed earlier and refuses writes: {self._failure}")

    def get(self, table: str, key: str) -> Any | None:
        _check_table(table)
        with self._cond:
            self._usable()
            pending = self._pending[table]
            buffered = key in pending
            encoded = pending.get(key)
        if buffered:
            return None if encoded is None else json.loads(encoded)
        # Not buffered: any earlier write to the key was handed to the worker before now,
        # so it is queued ahead of this read.
        return self._tables[table].get(key)

    def put(self, table: str, key: str, value: Any) -> None:
        _check_table(table)
        encoded = _encode(value)
        with self._cond:
            self._usable()
            self._pending[table][key] = encoded
            self._written += 1

    def delete(self, table: str, key: str) -> None:
        _check_table(table)
        with self._cond:
            self._usable()
            self._pending[table][key] = None
            self._written += 1

    def delete_below(self, table: str, key: str) -> None:
        _check_table(table)
        with self._cond:
            self._usable()
            self._flush(table)  # keep the order: earlier puts below ``key`` go too
            self._conn.execute(f'DELETE FROM "{table}" WHERE key < ?', (key,))
            self._written += 1

    def _flush(self, *tables: str) -> None:
        """Hand the buffered writes of ``tables`` to the worker (caller holds ``_cond``)."""
        for table in tables or TABLES:
            pending = self._pending[table]
            if not pending:
                continue
            self._pending[table] = {}
            rows = [(key, value) for key, value in pending.items() if value is not None]
            gone = [key for key, value in pending.items() if value is None]
            for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                chunk = rows[start : start + _ROWS_PER_STATEMENT]
                placeholders = ",".join(["(?,?)"] * len(chunk))
                self._conn.execute(
                    f'REPLACE INTO "{table}" (key, value) VALUES {placeholders}',
                    tuple(item for row in chunk for item in row),
                )
            for start in range(0, len(gone), _ROWS_PER_STATEMENT):
                keys = gone[start : start + _ROWS_PER_STATEMENT]
                self._conn.execute(f'DELETE FROM "{table}" WHERE key IN ({",".join(["?"] * len(keys))})', tuple(keys))

    def scan(self, table: str, *, as_type: type[T] | None = None) -> Iterator[tuple[str, Any]]:
        """Every row, in key order, as of now (pending writes are committed first).

        Reads go through a separate read-only connection in batches rather than
        sqlitedict's worker queue, which hands rows over one at a time between threads:
        loading a large store is dominated by this path.
        """
        _check_table(table)
        self.commit()
        try:
            reader = sqlite3.connect(f"{self._path.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise StoreError(f"store {self._path}: cannot open for reading: {exc}") from None
        try:
            cursor = reader.execute(f'SELECT key, value FROM "{table}" ORDER BY key')
            while rows := cursor.fetchmany(_SCAN_BATCH):
                yield from _decode_rows(rows, as_type, f"store {self._path}: table {table!r}")
        except StoreError:
            raise
        except (sqlite3.Error, ValueError, TypeError, msgspec.DecodeError) as exc:
            raise StoreError(f"store {self._path}: table {table!r} cannot be read: {exc}") from None
        finally:
            reader.close()

    def commit(self) -> None:
        with self._cond:
            target = self._written
            while self._durable < target:
                self._usable()
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                batch_end = self._written
                done: Queue[object] = Queue()
                self._flush()
                self._conn.execute(_COMMIT_REQUEST, None, done)
                self._cond.release()
                started = time.perf_counter()
                try:
                    self._wait_for_worker(done)
                    if self.commit_observer is not None:
                        self.commit_observer(time.perf_counter() - started)
                except StoreError as exc:
                    self._failure = exc.message
                    raise
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
                self._durable = max(self._durable, batch_end)  # a commit_soon may have gone further

    def commit_soon(self, done: Callable[[StoreError | None], None]) -> None:
        """The commit request goes into the worker's queue behind the flushed writes and ``done``
        runs in the worker's thread when sqlite has committed: the caller's thread never waits."""
        with self._cond:
            try:
                self._usable()
            except StoreError as exc:
                error: StoreError | None = exc
            else:
                if self._durable < self._written:
                    pending = _PendingCommit(self, self._written, done)
                    self._flush()
                    self._commits.add(pending)  # sqlitedict keeps only a weak reference
                    self._conn.execute(_COMMIT_REQUEST, None, pending)
                    return
                error = None
        done(error)

    def _committed(self, pending: _PendingCommit, error: StoreError | None) -> None:
        with self._cond:
            if pending not in self._commits:
                return  # check_commits failed it already
            self._commits.discard(pending)
            if error is None:
                self._durable = max(self._durable, pending.batch_end)
            elif self._failure is None:
                self._failure = error.message
            self._cond.notify_all()
        try:
            if error is None and self.commit_observer is not None:
                self.commit_observer(time.perf_counter() - pending.started)
            pending.done(error)
        except Exception:  # in sqlitedict's worker, where an exception would end the thread
            log.exception("a commit_soon callback of store %s failed", self._path)

    def check_commits(self) -> None:
        if self._conn.is_alive() or not self._commits:
            return
        error = StoreError(f"store {self._path}: the sqlite worker stopped; the commit did not happen")
        for pending in list(self._commits):
            self._committed(pending, error)

    def _wait_for_worker(self, done: Queue[object]) -> None:
        # sqlitedict's worker does not catch errors of the commit itself: it dies and
        # never answers. Poll its liveness so a dead worker is an error, not a hang.
        while True:
            try:
                done.get(timeout=0.5)
                break
            except Empty:
                if not self._conn.is_alive():
                    raise StoreError(
                        f"store {self._path}: the sqlite worker stopped; the commit did not happen"
                    ) from None
        error = self._worker_error()
        if error is not None:
            raise error

    def _worker_error(self) -> StoreError | None:
        """The error of a statement the worker ran since the last check, if one failed."""
        try:
            self._conn.check_raise_error()
        except sqlite3.Error as exc:
            return StoreError(f"store {self._path}: a write failed: {exc}")
        return None

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._failure is None:
                self.commit()
        finally:
            self._closed = True
            self._conn.close(force=not self._conn.is_alive())


class _PendingCommit:
    """The answer queue of one :meth:`SqliteStore.commit_soon`: sqlitedict's worker calls ``put``
    once the commit is done (its answer to every request goes through a ``put``)."""

    def __init__(self, store: SqliteStore, batch_end: int, done: Callable[[StoreError | None], None]) -> None:
        self.store = store
        self.batch_end = batch_end
        self.done = done
        self.started = time.perf_counter()

    def put(self, item: object) -> None:
        self.store._committed(self, self.store._worker_error())


def _preflight(path: Path, *, create: bool, integrity_check: bool) -> None:
    """Refuse a file that is not a healthy svcreg store before sqlitedict touches it."""
    if not path.parent.is_dir():
        raise StoreError(f"cannot open store {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise StoreError(f"cannot open store {path}: it is a directory")
    if not path.exists() or path.stat().st_size == 0:
        if not create:
            raise StoreError(f"no store at {path}")
        return
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise StoreError(f"cannot read store {path}: {exc.strerror}") from None
    if header != _SQLITE_HEADER:
        raise StoreError(f"{path} is not a svcreg store: it is not a SQLite database (foreign or corrupt file)")
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from None
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return
        if "meta" not in tables:
            raise StoreError(
                f"{path} is a SQLite database but not a svcreg store (tables: {', '.join(sorted(tables))})"
            )
        row = connection.execute("SELECT value FROM meta WHERE key = ?", (_FORMAT_KEY,)).fetchone()
        marker = _decode_marker(row[0] if row else None)
        if marker.get("app") != _FORMAT_APP:
            raise StoreError(f"{path} is a SQLite database but not a svcreg store (no svcreg format marker)")
        schema = marker.get("schema")
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise StoreError(
                f"{path} was written by a newer svcreg (schema {schema!r}); this version reads schema {SCHEMA_VERSION}"
            )
        if integrity_check:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise StoreError(f"store {path} is damaged: {'; '.join(map(str, problems[:3]))}")
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"store {path} is damaged or not a svcreg store: {exc}") from None
    finally:
        connection.close()


def _owner_only(path: Path) -> None:
    """Make the store's files readable by their owner only (0600), like the keys next to them.

    The database is created 0600 (SQLite gives its ``-wal`` and ``-shm`` files the database's
    mode); a store from an earlier version, made 0644, is tightened on open.
    """
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if name.exists() and name.stat().st_mode & 0o077:
                name.chmod(0o600)
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {exc.strerror}") from None


def _decode_marker(raw: object) -> dict[str, Any]:
    if not isinstance(raw, (str, bytes)):
        return {}
    try:
        marker = json.loads(raw)
    except ValueError:
        return {}
    return marker if isinstance(marker, dict) else {}
