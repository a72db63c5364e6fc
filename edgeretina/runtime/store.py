"""The results store: one SQLite database and the pictures beside it, one schema for `serve` and `watch`.

Layout under the store folder::

    results.sqlite3 (+ -wal, -shm)     one row per graded image (a DICOM frame is an image)
    files/<id>/overlay.png, card.png   that row's pictures (names fixed here, never from a client)

A row holds the whole grading record as JSON plus the columns a history is filtered and sorted by: id
(uuid4 hex), created (UTC, fixed-width ISO so text order is time order), origin ("serve" | "watch": not
"source", which watch records already use for the file's path, size and mtime), file name as given, screening,
grade, error, the bundle's manifest sha256, the pictures' paths relative to the store, and an optional
idempotency key (watch: the hot folder, file version and frame) so a re-graded file never makes a second row.

Commit order: each picture is copied in atomically (edgeretina/atomic.py) and its folder fsynced BEFORE the
row is inserted and committed, so a committed row never names a missing file. A crash in between leaves a
picture folder without a row; nothing points at it. Opening the store removes such folders once they are
older than ORPHAN_AGE_S (pictures derived from a patient's photo should not outlive their purpose), never a
younger one: another process (a watcher and a server may share one store) may be about to commit it.

SQLite in WAL mode (readers never block the writer, a `watch` and a `serve` can share the store) with
synchronous=FULL: a row is on disk when `add` returns, which is what lets the service answer only after the
commit. Opening runs `PRAGMA quick_check` (the B-trees and their pages; integrity_check also cross-checks every
index, O(N log N)) and checks the schema version, so a damaged or foreign file is a StoreError at start, not a
wrong answer later. stdlib sqlite3 only: the runtime stays lean, and `watch` uses it without the [serve] extra.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from edgeretina.atomic import write_atomic
from edgeretina.errors import ConfigError, StoreError

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite3"
FILES_DIR = "files"
ORIGINS = ("serve", "watch")
SCREENINGS = ("negative", "referable", "ungradable")
PICTURES = ("overlay", "card")
MAX_LIMIT = 1000
BUSY_TIMEOUT_S = 10.0    # another process (a watcher beside the server) holding the write lock
ORPHAN_AGE_S = 3600.0    # a picture folder without a row this old was left by a crash: removed on open
_ID = re.compile(r"[0-9a-f]{32}")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"   # fixed width: ORDER BY created is chronological

_SCHEMA = f"""
CREATE TABLE results (
    id            TEXT PRIMARY KEY CHECK (length(id) = 32),
    created       TEXT NOT NULL,
    origin        TEXT NOT NULL CHECK (origin IN ({", ".join(repr(o) for o in ORIGINS)})),
    file_name     TEXT NOT NULL,
    screening     TEXT CHECK (screening IN ({", ".join(repr(s) for s in SCREENINGS)})),
    grade         INTEGER,
    error         TEXT,
    bundle_sha256 TEXT,
    overlay       TEXT,
    card          TEXT,
    key           TEXT,
    record        TEXT NOT NULL
);
CREATE INDEX results_created ON results (created);
CREATE INDEX results_screening_created ON results (screening, created);
CREATE UNIQUE INDEX results_key ON results (key) WHERE key IS NOT NULL;
PRAGMA user_version = {SCHEMA_VERSION};
"""
_COLUMNS = "id, created, origin, file_name, screening, grade, error, bundle_sha256, overlay, card, record"
_INSERT = ("INSERT INTO results (id, created, origin, file_name, screening, grade, error, bundle_sha256, overlay, "
           "card, key, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True)
class StoredResult:
    id: str
    created: str                     # UTC, e.g. 2026-05-09T07:35:25.123456Z
    origin: str                      # "serve" | "watch"
    file_name: str                   # as the client or the hot folder named it; never used as a path
    screening: str | None            # None: an error row (watch records files that do not decode)
    grade: int | None
    error: str | None
    bundle_sha256: str | None
    pictures: dict[str, str] = field(default_factory=dict)   # "overlay"/"card" -> path relative to the store
    record: dict = field(default_factory=dict)               # the grading record as the producer wrote it


class ResultStore:
    """Open (or create) the store under `root`. Raises StoreError when the database is not one, is damaged,
    has another schema version, or WAL mode is not available there (some network filesystems).

    Thread-safe: one connection behind a lock (a service's request threads and its graders share it)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / DB_NAME
        try:
            (self.root / FILES_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the results store in {self.root}: {exc.strerror or exc}") from None
        self._lock = threading.Lock()
        self._db = self._open()
        self.swept = self.sweep_orphans()

    def sweep_orphans(self, max_age_s: float = ORPHAN_AGE_S, now: float | None = None) -> int:
        """Remove the picture folders no row names that were last changed more than max_age_s ago (a crash
        between the pictures and the commit leaves them); return how many. Younger ones stay: another
        process sharing the store may be about to commit theirs."""
        now = time.time() if now is None else now
        removed = 0
        for folder in (self.root / FILES_DIR).iterdir():
            if not (_ID.fullmatch(folder.name) and folder.is_dir()):
                continue
            try:
                old = now - folder.stat().st_mtime > max_age_s
            except FileNotFoundError:
                continue
            if old and self.get(folder.name) is None:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the results store {self.path}: {exc}") from None
        try:
            _check_integrity(db, self.path)
            _set_wal(db, self.path)
            db.execute("PRAGMA synchronous = FULL")
            _ensure_schema(db, self.path)
        except sqlite3.DatabaseError as exc:   # "file is not a database", "database disk image is malformed"
            db.close()
            raise StoreError(f"{self.path} is not a readable results store ({exc}); move it aside to start "
                             f"a new one") from None
        except StoreError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, record: Mapping, *, origin: str, file_name: str, bundle_sha256: str | None = None,
            pictures: Mapping[str, str | os.PathLike] | None = None, key: str | None = None) -> StoredResult:
        """Store one graded image: copy its pictures in (kind "overlay"/"card" -> a PNG written elsewhere),
        then insert and commit the row. Returns the stored result.

        key: an idempotency key; when a row with it exists, that row is returned and nothing is written
        (watch re-grades a file whose results.jsonl line a crash cut off). Raises StoreError when a picture
        is missing or cannot be copied, or the row cannot be committed; nothing of it is left behind then."""
        if origin not in ORIGINS:
            raise ConfigError(f"origin must be one of {', '.join(ORIGINS)}, not {origin!r}")
        pictures = {kind: Path(path) for kind, path in (pictures or {}).items()}
        unknown = sorted(set(pictures) - set(PICTURES))
        if unknown:
            raise ConfigError(f"unknown picture kind(s) {', '.join(unknown)} (known: {', '.join(PICTURES)})")
        if key is not None and (existing := self.get_by_key(key)) is not None:
            return existing
        result_id = uuid.uuid4().hex
        stored = self._copy_pictures(result_id, pictures)
        screening = record.get("screening")
        result = StoredResult(id=result_id, created=canonical_time(None), origin=origin, file_name=str(file_name),
                              screening=screening if screening in SCREENINGS else None, grade=_int_or_none(record.get("grade")),
                              error=record.get("error"), bundle_sha256=bundle_sha256, pictures=stored,
                              record=dict(record))
        try:
            self._insert(result, key)
        except sqlite3.IntegrityError as exc:
            shutil.rmtree(self.root / FILES_DIR / result_id, ignore_errors=True)
            existing = self.get_by_key(key) if key is not None else None
            if existing is None:
                raise StoreError(f"could not store the result of {file_name}: {exc}") from None
            return existing   # another process stored the same key between our look and our insert
        except BaseException:
            shutil.rmtree(self.root / FILES_DIR / result_id, ignore_errors=True)
            raise
        return result

    def _copy_pictures(self, result_id: str, pictures: Mapping[str, Path]) -> dict[str, str]:
        """Copy each picture to files/<id>/<kind>.png atomically and fsync the folders: on disk before the row."""
        missing = [f"{kind} {path}" for kind, path in pictures.items() if not path.is_file()]
        if missing:
            raise StoreError("picture(s) to store not found: " + ", ".join(missing))
        if not pictures:
            return {}
        folder = self.root / FILES_DIR / result_id
        stored = {}
        try:
            folder.mkdir(parents=True)
            for kind, source in pictures.items():
                target = folder / f"{kind}.png"
                with open(source, "rb") as src:
                    write_atomic(target, lambda fh, src=src: shutil.copyfileobj(src, fh))
                stored[kind] = target.relative_to(self.root).as_posix()
            _fsync_dir(folder)
            _fsync_dir(folder.parent)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise StoreError(f"could not write the pictures into {folder}: {exc.strerror or exc}") from None
        return stored

    def _insert(self, result: StoredResult, key: str | None) -> None:
        row = (result.id, result.created, result.origin, result.file_name, result.screening, result.grade,
               result.error, result.bundle_sha256, result.pictures.get("overlay"), result.pictures.get("card"),
               key, json.dumps(result.record, separators=(",", ":")))
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(_INSERT, row)
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError):
                    raise
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"could not store the result of {result.file_name}: {exc}") from None
                raise

    def get(self, result_id: str) -> StoredResult | None:
        if not isinstance(result_id, str) or not _ID.fullmatch(result_id):
            return None
        return self._one("SELECT " + _COLUMNS + " FROM results WHERE id = ?", (result_id,))

    def get_by_key(self, key: str) -> StoredResult | None:
        return self._one("SELECT " + _COLUMNS + " FROM results WHERE key = ?", (key,))

    def query(self, since: str | _dt.datetime | None = None, screening: str | None = None,
              limit: int = 50, origin: str | None = None) -> list[StoredResult]:
        """History, newest first: rows created at or after `since` (ISO 8601; without a zone it is UTC),
        of one screening outcome and/or origin, at most `limit` (1..MAX_LIMIT). Raises ConfigError on a bad
        filter value."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ConfigError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
        where, args = [], []
        if since is not None:
            where.append("created >= ?")
            args.append(canonical_time(since))
        if screening is not None:
            if screening not in SCREENINGS:
                raise ConfigError(f"screening must be one of {', '.join(SCREENINGS)}, not {screening!r}")
            where.append("screening = ?")
            args.append(screening)
        if origin is not None:
            if origin not in ORIGINS:
                raise ConfigError(f"origin must be one of {', '.join(ORIGINS)}, not {origin!r}")
            where.append("origin = ?")
            args.append(origin)
        sql = ("SELECT " + _COLUMNS + " FROM results" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY created DESC, rowid DESC LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [_result(row) for row in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM results").fetchone()[0]

    def picture_path(self, result_id: str, kind: str) -> Path | None:
        """The file of a row's picture, or None (no such row, no such picture, or it left the store)."""
        result = self.get(result_id)
        if result is None or kind not in result.pictures:
            return None
        path = (self.root / result.pictures[kind]).resolve()
        files = (self.root / FILES_DIR).resolve()
        # the column is ours, but a store edited by hand must not serve files from outside it
        return path if path.is_relative_to(files) and path.is_file() else None

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def _one(self, sql: str, args: tuple) -> StoredResult | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return _result(row) if row is not None else None


def canonical_time(value: str | _dt.datetime | None) -> str:
    """A time as the store writes it (UTC, microseconds, 'Z'); None: now. A naive time is taken as UTC.
    Raises ConfigError for text that is not ISO 8601."""
    if value is None:
        moment = _dt.datetime.now(_dt.timezone.utc)
    elif isinstance(value, _dt.datetime):
        moment = value
    else:
        try:
            text = str(value).strip()
            # Python 3.10's fromisoformat does not read a trailing Z (3.11 does): the store's own times end in one
            moment = _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
        except ValueError:
            raise ConfigError(f"not an ISO 8601 time: {value!r} (e.g. 2026-05-09T07:35:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.astimezone(_dt.timezone.utc).strftime(_TIME_FORMAT)


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise StoreError(f"the results store {path} is damaged (quick_check: {'; '.join(problems[:3])}); "
                         f"move it aside to start a new one, or recover it with `sqlite3 {path.name} .recover`")


def _set_wal(db: sqlite3.Connection, path: Path) -> None:
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"the results store {path} cannot use WAL mode here (journal mode {mode}): put --data "
                         f"on a local filesystem")


def _ensure_schema(db: sqlite3.Connection, path: Path) -> None:
    """Create the schema in an empty database; accept only our version otherwise. BEGIN IMMEDIATE: two
    processes opening a new store at once create it once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
        elif version != SCHEMA_VERSION or "results" not in tables:
            raise StoreError(f"{path} is not an edgeretina results store of schema version {SCHEMA_VERSION} "
                             f"(user_version {version}, tables {', '.join(sorted(tables)) or 'none'})")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _result(row: tuple) -> StoredResult:
    result_id, created, origin, file_name, screening, grade, error, bundle_sha256, overlay, card, record = row
    pictures = {kind: value for kind, value in (("overlay", overlay), ("card", card)) if value}
    return StoredResult(id=result_id, created=created, origin=origin, file_name=file_name, screening=screening,
                        grade=grade, error=error, bundle_sha256=bundle_sha256, pictures=pictures,
                        record=json.loads(record))


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _fsync_dir(folder: Path) -> None:
    """Make the renames into `folder` durable (a rename is a change of the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
