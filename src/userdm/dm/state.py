"""The state store: the devices, flags and tables that survive a daemon restart, in SQLite.

One database, `STATE_DIR/state.db`, in WAL mode with `synchronous=FULL` (a commit is on disk
when it returns) and `locking_mode=EXCLUSIVE` (one daemon owns it; the WAL index lives in the
daemon's memory, so no `-shm` file is mapped, which matters on a full filesystem). Each change
is one transaction built from the small steps below (`device`, `flags`, `put_table`,
`drop_table`, `promote`, `drop_device`), so its cost is that of the change: a device is one row
keyed by its minor, each table text is one row written once, when it is loaded, and never
rewritten when other devices change (a resume moves the inactive row to the live slot).

`StateStore.commit` raises `DMError` with the errno of the failure (ENOSPC for a full disk,
EIO, EROFS ...) and a sentence; the caller then applies nothing. A store that cannot be written
(full disk at start, say) still loads: the daemon serves its devices and every change is
refused until the disk has room again.

A table text of `BIG_TABLE` bytes or more (a million segments is 40-65 MB) is written to its own
file, `STATE_DIR/tables/NAME.table`, and synced before its transaction, outside the store's
lock; its row names the file. So committing it does not hold every other change for the
hundreds of milliseconds that writing it takes. A file that no row names (a transaction that
failed, a crash in between, a table dropped or replaced) is removed after the next commit and
at start.

Migration: a `devices.json` written by earlier versions (a `{"version": 1, "devices": [...]}`
document, rewritten whole on every change) is copied into the database in one transaction at
the first start, and removed once that commit is durable; its leftover `devices.json.tmp.PID`
files are removed too. If that commit fails the devices are served from the JSON file and the
copy is retried with the next change.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import DMError

log = logging.getLogger("userdm.state")

DB_FILE = "state.db"
TABLE_DIR = "tables"
#: a table text this long or longer is kept in a file of its own (see the module docstring)
BIG_TABLE = 1 << 20
LEGACY_FILE = "devices.json"
SCHEMA_VERSION = 1

#: the rows that name table files, found without a scan of every table (`_remove_unnamed_tables`)
_FILE_INDEX = "CREATE INDEX IF NOT EXISTS tables_by_file ON tables (file) WHERE file IS NOT NULL"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devices ("
    " minor INTEGER PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL UNIQUE, uuid TEXT NOT NULL,"
    " shared INTEGER NOT NULL, autoclear INTEGER NOT NULL, max_opens INTEGER, no_open INTEGER NOT NULL,"
    " interpose INTEGER NOT NULL, suspended INTEGER NOT NULL, deferred_remove INTEGER NOT NULL,"
    " event_nr INTEGER NOT NULL, blockdev INTEGER NOT NULL DEFAULT 0, diskseq INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS tables ("
    " minor INTEGER NOT NULL, slot TEXT NOT NULL CHECK (slot IN ('live', 'inactive')),"
    " text TEXT NOT NULL, read_only INTEGER NOT NULL, file TEXT, PRIMARY KEY (minor, slot))",
    "CREATE INDEX IF NOT EXISTS devices_by_seq ON devices (seq)",
    _FILE_INDEX,
    f"INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '{SCHEMA_VERSION}')",
)

#: columns added after version 1 of the schema: added to an older database at start
_ADDED_COLUMNS = (("devices", "blockdev", "INTEGER NOT NULL DEFAULT 0"),
                  ("devices", "diskseq", "INTEGER NOT NULL DEFAULT 0"),
                  ("tables", "file", "TEXT"))

#: device columns that `flags` may change
FLAG_COLUMNS = frozenset({"name", "uuid", "no_open", "suspended", "deferred_remove", "event_nr"})

#: SQLite primary result codes -> errno
_ERRNO = {13: errno.ENOSPC, 10: errno.EIO, 8: errno.EROFS, 14: errno.EACCES, 3: errno.EPERM,
          5: errno.EBUSY, 6: errno.EBUSY, 11: errno.EIO, 26: errno.EIO, 7: errno.ENOMEM}

Step = tuple[str, tuple[Any, ...]]


@dataclass
class SavedTable:
    text: str
    read_only: bool


@dataclass
class SavedDevice:
    """One device as the store keeps it."""

    name: str
    minor: int
    uuid: str = ""
    shared: bool = False
    autoclear: bool = False
    max_opens: int | None = None
    no_open: bool = False
    interpose: bool = False
    suspended: bool = False
    deferred_remove: bool = False
    event_nr: int = 0
    live: SavedTable | None = None
    inactive: SavedTable | None = None
    seq: int = field(default=0, compare=False)
    #: a kernel block device over it (`create --blockdev`)
    blockdev: bool = False
    #: its disk sequence number, never reused (0: saved by a version without diskseq)
    diskseq: int = 0


# ---- the steps of a change ------------------------------------------------------------------

def device(d: SavedDevice) -> list[Step]:
    """A new device row, with its tables."""
    steps: list[Step] = [(
        "INSERT INTO devices (minor, seq, name, uuid, shared, autoclear, max_opens, no_open, interpose,"
        " suspended, deferred_remove, event_nr, blockdev, diskseq) VALUES (?, COALESCE((SELECT MAX(seq) FROM"
        " devices), 0) + 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (d.minor, d.name, d.uuid, int(d.shared), int(d.autoclear), d.max_opens, int(d.no_open),
         int(d.interpose), int(d.suspended), int(d.deferred_remove), d.event_nr, int(d.blockdev), d.diskseq)),
        # the counter outlives the device: a diskseq is never handed out twice, across restarts too
        ("INSERT INTO meta (key, value) VALUES ('diskseq', ?) ON CONFLICT (key) DO UPDATE SET value ="
         " MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))", (str(d.diskseq),))]
    for slot in ("live", "inactive"):
        table = getattr(d, slot)
        if table is not None:
            steps += put_table(d.minor, slot, table.text, table.read_only)
    return steps


def flags(minor: int, **values: Any) -> list[Step]:
    """Change some of a device's columns (`FLAG_COLUMNS`)."""
    unknown = set(values) - FLAG_COLUMNS
    if unknown:
        raise ValueError(f"not a device flag: {sorted(unknown)}")
    if not values:
        return []
    cols = ", ".join(f"{name} = ?" for name in values)
    params = tuple(int(v) if isinstance(v, bool) else v for v in values.values())
    return [(f"UPDATE devices SET {cols} WHERE minor = ?", (*params, minor))]


def diskseq(minor: int, value: int) -> list[Step]:
    """Give a device saved without a disk sequence number (an earlier version) its number."""
    return [("UPDATE devices SET diskseq = ? WHERE minor = ?", (value, minor)),
            ("INSERT INTO meta (key, value) VALUES ('diskseq', ?) ON CONFLICT (key) DO UPDATE SET value ="
             " MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))", (str(value),))]


_PUT_TABLE = "INSERT OR REPLACE INTO tables (minor, slot, text, read_only, file) VALUES (?, ?, ?, ?, ?)"


def put_table(minor: int, slot: str, text: str, read_only: bool) -> list[Step]:
    """A table text in a slot (a big one goes to a file of its own at the commit)."""
    return [(_PUT_TABLE, (minor, slot, text, int(read_only), None))]


def drop_table(minor: int, slot: str) -> list[Step]:
    return [("DELETE FROM tables WHERE minor = ? AND slot = ?", (minor, slot))]


def promote(minor: int) -> list[Step]:
    """The inactive table becomes the live one (resume), without copying its text."""
    return [("DELETE FROM tables WHERE minor = ? AND slot = 'live'"
             " AND EXISTS (SELECT 1 FROM tables WHERE minor = ? AND slot = 'inactive')", (minor, minor)),
            ("UPDATE tables SET slot = 'live' WHERE minor = ? AND slot = 'inactive'", (minor,))]


def drop_device(minor: int) -> list[Step]:
    return [("DELETE FROM tables WHERE minor = ?", (minor,)), ("DELETE FROM devices WHERE minor = ?", (minor,))]


# ---- the store --------------------------------------------------------------------------------

@dataclass
class _Ticket:
    """One change waiting in the group commit."""

    what: str
    steps: list[Step]
    done: bool = False
    error: DMError | None = None


def store_error(exc: BaseException, what: str, path: str) -> DMError:
    """The DMError for a failed commit: the errno of the SQLite or OS failure and a sentence."""
    if isinstance(exc, OSError):
        err = exc.errno or errno.EIO
        text = exc.strerror or str(exc)
    else:
        code = getattr(exc, "sqlite_errorcode", None)
        err = _ERRNO.get(code & 0xFF, errno.EIO) if isinstance(code, int) else errno.EIO
        text = str(exc)
    return DMError(err, f"cannot save the {what} in {path} ({text}); nothing was changed")


class StateStore:
    """The daemon's saved devices (see the module docstring). Thread-safe: commits are serialized."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DB_FILE)
        self._lock = threading.Lock()
        #: changes waiting for the next group commit (see `commit`)
        self._queue_lock = threading.Lock()
        self._queue: list[_Ticket] = []
        self.table_dir = os.path.join(state_dir, TABLE_DIR)
        #: table files written for changes not committed yet (under `_queue_lock`): kept by cleanups
        self._inflight: set[str] = set()
        self._has_files = os.path.isdir(self.table_dir)
        self._db: sqlite3.Connection | None = None
        #: steps that must precede the next change: the schema, a JSON migration not yet committed
        self._pending: list[Step] = []
        self._legacy: list[SavedDevice] | None = None
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._remove_stale_temporaries()
        try:
            self._open()
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot open the state store %s: %s; changes are refused until it opens", self.path, exc)
        self._prepare()
        with self._lock:
            self._cleanup()  # files of transactions that a crash cut short

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
                mode = db.execute("PRAGMA journal_mode").fetchone()[0]
                if mode.lower() != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _has_schema(self) -> bool:
        if self._db is None:
            return False
        try:
            row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'devices'").fetchone()
        except sqlite3.Error as exc:
            log.error("cannot read the state store %s: %s", self.path, exc)
            return False
        return row is not None

    def _prepare(self) -> None:
        """Schema and migration from devices.json, committed now if the disk lets us."""
        has_schema = self._has_schema()
        if not has_schema:
            self._pending += [(sql, ()) for sql in _SCHEMA]
        else:
            self._pending += self._upgrade_steps()
        legacy_path = os.path.join(self.state_dir, LEGACY_FILE)
        if os.path.exists(legacy_path):
            if has_schema and self._meta("migrated") is not None:
                self._unlink_legacy()  # the migration was committed; a crash kept the old file
            else:
                self._legacy = read_legacy(legacy_path)
                if self._legacy is not None:
                    for d in self._legacy:
                        self._pending += device(d)
                    self._pending.append(("INSERT OR REPLACE INTO meta (key, value) VALUES ('migrated', ?)",
                                          (LEGACY_FILE,)))
        if self._pending:
            try:
                self.commit("start")
            except DMError as exc:
                log.error("%s", exc)

    def _upgrade_steps(self) -> list[Step]:
        """The steps that bring a database of an earlier version to this schema: the columns
        it lacks, and the index over table files."""
        steps: list[Step] = [(f"ALTER TABLE {table} ADD COLUMN {column} {decl}", ())
                             for table, column, decl in _ADDED_COLUMNS if not self._has_column(table, column)]
        assert self._db is not None
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'tables_by_file'").fetchone() \
                is None:
            steps.append((_FILE_INDEX, ()))
        return steps

    def _meta(self, key: str) -> str | None:
        assert self._db is not None
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def load(self) -> list[SavedDevice]:
        """Every saved device with its tables, in creation order."""
        if self._legacy is not None and self._pending:
            return list(self._legacy)  # the migration is not committed yet: serve from the JSON file
        if not self._has_schema():
            return []
        assert self._db is not None
        with self._lock:
            file_col = "file" if self._has_column("tables", "file") else "NULL"
            tables: dict[tuple[int, str], SavedTable] = {
                (minor, slot): SavedTable(self._read_table(file) if file else text, bool(ro))
                for minor, slot, text, ro, file in self._db.execute(
                    f"SELECT minor, slot, text, read_only, {file_col} FROM tables")}
            out = []
            for row in self._db.execute(
                    "SELECT minor, seq, name, uuid, shared, autoclear, max_opens, no_open, interpose, suspended,"
                    " deferred_remove, event_nr, " + ", ".join(
                        c if self._has_column("devices", c) else "0" for c in ("blockdev", "diskseq")) +
                    " FROM devices ORDER BY seq"):
                (minor, seq, name, uuid, shared, autoclear, max_opens, no_open, interpose, suspended, deferred,
                 nr, blockdev, diskseq) = row
                out.append(SavedDevice(name, minor, uuid, bool(shared), bool(autoclear), max_opens, bool(no_open),
                                       bool(interpose), bool(suspended), bool(deferred), nr,
                                       tables.get((minor, "live")), tables.get((minor, "inactive")), seq,
                                       bool(blockdev), diskseq))
            return out

    def _read_table(self, name: str) -> str:
        path = os.path.join(self.table_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:  # restore then reports the table as not built, and keeps its row
            log.error("cannot read the saved table %s: %s", path, exc)
            return f"cannot read the saved table {path}: {exc.strerror}"

    def _has_column(self, table: str, column: str) -> bool:
        assert self._db is not None
        return any(row[1] == column for row in self._db.execute(f"PRAGMA table_info({table})"))

    def last_diskseq(self) -> int:
        """The highest disk sequence number ever handed out (`Mapper` continues after it)."""
        if self._db is None or not self._has_schema():
            return 0
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'diskseq'").fetchone()
            top = self._db.execute("SELECT MAX(diskseq) FROM devices").fetchone()[0] \
                if self._has_column("devices", "diskseq") else 0
        return max(int(row[0]) if row else 0, top or 0)

    def commit(self, what: str, *changes: list[Step]) -> None:
        """Apply the steps of one change in one durable transaction, or raise DMError and
        change nothing. `what` names the change in the error sentence.

        Group commit: changes that arrive while another commit is being synced to disk wait
        for it, and then the first of them commits them all in one transaction (each under its
        own savepoint, so that one failing change fails alone) with one sync, where one
        transaction each would pay one sync each. Every change still returns only once it is
        durable."""
        steps, files = self._spill(what, [step for change in changes for step in change])
        ticket = _Ticket(what, steps)
        with self._queue_lock:
            self._queue.append(ticket)
        try:
            with self._lock:
                if not ticket.done:
                    with self._queue_lock:
                        batch, self._queue = self._queue, []
                    self._commit_batch(batch)
        finally:
            if files:
                with self._queue_lock:
                    self._inflight.difference_update(files)
                if ticket.error is not None or not ticket.done:
                    self._unlink_tables(files)
        if ticket.error is not None:
            raise ticket.error

    def _spill(self, what: str, steps: list[Step]) -> tuple[list[Step], list[str]]:
        """Write each big table text of `steps` to a synced file of its own (outside any lock)
        and name the file in its step instead; DMError (nothing kept) if that fails."""
        if not any(sql is _PUT_TABLE and len(params[2]) >= BIG_TABLE for sql, params in steps):
            return steps, []
        out: list[Step] = []
        files: list[str] = []
        try:
            os.makedirs(self.table_dir, mode=0o700, exist_ok=True)
            self._has_files = True
            for sql, params in steps:
                if sql is _PUT_TABLE and len(params[2]) >= BIG_TABLE:
                    name = f"{uuid.uuid4().hex}.table"
                    with self._queue_lock:
                        self._inflight.add(name)
                    files.append(name)
                    fd = os.open(os.path.join(self.table_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        with open(fd, "w", encoding="utf-8", closefd=False) as f:
                            f.write(params[2])
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    params = (params[0], params[1], "", params[3], name)
                out.append((sql, params))
            _fsync_dir(self.table_dir)
        except OSError as exc:
            with self._queue_lock:
                self._inflight.difference_update(files)
            self._unlink_tables(files)
            error = store_error(exc, what, self.table_dir)
            log.warning("refused: %s", error)
            raise error from None
        return out, files

    def _unlink_tables(self, names) -> None:
        for name in names:
            try:
                os.unlink(os.path.join(self.table_dir, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", os.path.join(self.table_dir, name), exc)

    def _remove_unnamed_tables(self) -> None:
        """Table files that no row names (under `_lock`, after a commit and at start)."""
        if not self._has_files or self._db is None:
            return
        try:
            present = set(os.listdir(self.table_dir))
        except FileNotFoundError:
            self._has_files = False
            return
        if not present:
            return
        if self._has_column("tables", "file"):
            present -= {row[0] for row in self._db.execute("SELECT file FROM tables WHERE file IS NOT NULL")}
        with self._queue_lock:
            present -= self._inflight
        self._unlink_tables(sorted(present))

    def _commit_batch(self, batch: list[_Ticket]) -> None:
        """Commit the queued changes (under `_lock`) and mark each done, or failed with its error."""
        work = [t for t in batch if t.steps]
        try:
            if work or self._pending:
                self._transaction(work)
                if self._pending:
                    self._pending = []
                    if self._legacy is not None:
                        self._legacy = None
                        self._unlink_legacy()
                        log.info("migrated %s into %s", LEGACY_FILE, self.path)
        except (sqlite3.Error, OSError) as exc:
            for t in batch:
                if t.error is None:
                    t.error = store_error(exc, t.what, self.path)
            log.warning("refused: %s", batch[0].error)
        else:
            self._cleanup()
        finally:
            for t in batch:
                t.done = True

    def _cleanup(self) -> None:
        try:
            self._remove_unnamed_tables()
        except (sqlite3.Error, OSError) as exc:
            log.warning("cannot remove unused table files in %s: %s", self.table_dir, exc)

    def _transaction(self, work: list[_Ticket]) -> None:
        db = self._open()
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in self._pending:
                db.execute(sql, params)
            for t in work:
                db.execute("SAVEPOINT change")
                try:
                    for sql, params in t.steps:
                        db.execute(sql, params)
                except sqlite3.Error as exc:
                    if not db.in_transaction:
                        raise  # SQLite rolled the whole transaction back (a full disk, an I/O error)
                    db.execute("ROLLBACK TO change")
                    t.error = store_error(exc, t.what, self.path)
                    log.warning("refused: %s", t.error)
                db.execute("RELEASE change")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as exc:
                log.warning("closing the state store %s: %s", self.path, exc)

    # ---- files of earlier versions ----------------------------------------------------------

    def _unlink_legacy(self) -> None:
        try:
            os.unlink(os.path.join(self.state_dir, LEGACY_FILE))
        except FileNotFoundError:
            pass
        _fsync_dir(self.state_dir)

    def _remove_stale_temporaries(self) -> None:
        """`devices.json.tmp.PID` files that a killed daemon of an earlier version left behind."""
        for entry in os.listdir(self.state_dir):
            if entry.startswith(LEGACY_FILE + ".tmp."):
                try:
                    os.unlink(os.path.join(self.state_dir, entry))
                except OSError as exc:
                    log.warning("cannot remove %s: %s", entry, exc)


def read_legacy(path: str) -> list[SavedDevice] | None:
    """The devices of a `devices.json` (version 1), or None if it cannot be read (it is kept)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("devices", []), list):
            raise ValueError("not a {'version': 1, 'devices': [...]} document")
        out = []
        taken: set[int] = set()
        for entry in data.get("devices", []):
            minor = entry.get("minor")
            if not isinstance(minor, int) or minor in taken:
                minor = max(taken, default=-1) + 1
            taken.add(minor)
            tables = {}
            for slot in ("live", "inactive"):
                t = entry.get(slot)
                tables[slot] = SavedTable(str(t["text"]), bool(t.get("read_only"))) if isinstance(t, dict) else None
            out.append(SavedDevice(
                str(entry["name"]), minor, entry.get("uuid") or "", bool(entry.get("shared")),
                bool(entry.get("autoclear")), entry.get("max_opens"), bool(entry.get("no_open")),
                bool(entry.get("interpose")), bool(entry.get("suspended")), bool(entry.get("deferred_remove")),
                int(entry.get("event_nr") or 0), tables["live"], tables["inactive"]))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("cannot migrate %s (kept as it is): %s", path, exc)
        return None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
