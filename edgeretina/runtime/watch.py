"""A camera hot-folder: grade every new photograph once, as soon as it is completely written.

Polling, not inotify: it works on every filesystem a camera writes to (SMB/NFS mounts, FAT SD cards)
and needs no extra dependency. Each poll lists the folder; a file is *ready* when its (size, mtime_ns)
is the same as in the previous poll. A ready file that does not decode may still be mid-write by a
camera that pauses; it is retried until it has stayed unchanged and undecodable for
``undecodable_grace_s``, then it gets one error record.

State: ``OUT/results.jsonl`` is the only state. Each record carries ``source`` = (relative path, bytes,
mtime_ns); on start the set of those keys is read back. A separate state file would be a second
commit point that can disagree with the results after a crash; with one file, "recorded" and "done"
are the same event. A rewritten file (new size/mtime) is a new photograph and is graded again; the
earlier record stays, and the new version's overlay and card get names of their own (``<stem>@<mtime_ns>``),
so every record's pictures show the photograph it graded. Lines of results.jsonl that are not our records
(other tools' notes, binary junk) name no image: they are skipped, and kept.

Appending: one ``os.write`` of a complete line to an ``O_APPEND`` descriptor, then ``fsync``. A crash
can at worst leave a torn last line (no newline); it is cut off on the next start and that image is
graded again. Overlays and cards are written (atomically) before the record, so a recorded image
always has its files.

With ``store`` (``--store DIR``), each record also becomes a row of the results store the grading service
uses (runtime/store.py: one schema for both), its overlay and card copied in beside it. The row is
committed before the results.jsonl line: a crash between the two re-grades the file on the next start, and
the row's idempotency key (folder, file version, frame) makes that re-grade find its row instead of adding a
second one. results.jsonl stays what it was: the watcher's state and its complete log.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from edgeretina.errors import ConfigError, EdgeRetinaError
from edgeretina.locks import ExclusiveLock
from edgeretina.preprocess import is_image_file
from edgeretina.runtime.grader import GradedImage, GradeRecord, Grader
from edgeretina.runtime.store import ResultStore
from edgeretina.runtime.verify import VERIFY_MODES, manifest_sha256
from edgeretina.runtime.visuals import CARD_SUFFIX, path_stem, write_visuals
from edgeretina.signing import TrustList

RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".watch.lock"


@dataclass
class WatchConfig:
    folder: Path                       # the hot folder the camera writes into (searched recursively)
    bundle: Path
    out: Path                          # results.jsonl, overlays/, cards/
    interval: float = 1.0              # seconds between polls
    overlays: bool = True              # write OUT/overlays/ and OUT/cards/
    once: bool = False                 # two polls, grade what is ready, exit (cron, tests)
    undecodable_grace_s: float = 10.0  # how long a ready file may stay undecodable before its error record
    backend: str | None = None
    threads: int | None = None
    device: str | None = None
    batch_size: int = 8
    trust: TrustList | str | os.PathLike | None = "environment"   # as Grader(trust=...): signed bundles
    verify: str = "cached"             # as Grader(verify=...): the export gate re-run on this device
    store: Path | None = None          # also write each record to this results store (runtime/store.py)

    def __post_init__(self) -> None:
        self.folder, self.bundle, self.out = Path(self.folder), Path(self.bundle), Path(self.out)
        self.store = Path(self.store) if self.store is not None else None
        # inf would reach Event.wait (OverflowError after the first poll); NaN compares false everywhere
        if not _is_number(self.interval) or not 0 < self.interval < math.inf:
            raise ConfigError(f"interval must be a positive, finite number of seconds, got {self.interval!r}")
        if not _is_number(self.undecodable_grace_s) or not self.undecodable_grace_s >= 0:
            raise ConfigError(f"undecodable_grace_s must be a number of seconds >= 0, got {self.undecodable_grace_s!r}")
        # 0 would never fill a batch: every ready file would go into one unbounded batch
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.verify not in VERIFY_MODES:   # before the bundle is loaded, not after
            raise ConfigError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {self.verify!r}")


@dataclass(frozen=True)
class FileKey:
    path: str          # relative to the watched folder, POSIX
    bytes: int
    mtime_ns: int

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "mtime_ns": self.mtime_ns}


@dataclass
class WatchSummary:
    graded: int = 0
    errors: int = 0
    polls: int = 0
    records: list[dict] = field(default_factory=list)


def watch(config: WatchConfig, stop: threading.Event | None = None,
          on_record: Callable[[dict], None] | None = None) -> WatchSummary:
    """Watch ``config.folder`` until ``stop`` is set (or one pass with ``config.once``).

    Without a ``stop`` event, SIGINT and SIGTERM set one (main thread only), so Ctrl-C ends cleanly
    after the image being graded. Raises ConfigError when the folder is missing or another watcher
    holds OUT, BundleError/BackendError when the bundle cannot be loaded.
    """
    if not config.folder.is_dir():
        raise ConfigError(f"watch folder not found: {config.folder}")
    if stop is None:
        stop = threading.Event()
        _stop_on_signals(stop)
    return Watcher(config).run(stop, on_record)


class Watcher:
    def __init__(self, config: WatchConfig, grader: Grader | None = None):
        self.config = config
        self.grader = grader or Grader(config.bundle, backend=config.backend, threads=config.threads,
                                       device=config.device, trust=config.trust,
                                       verify=config.verify)
        self.results = config.out / RESULTS_NAME
        self._last_seen: dict[str, FileKey] = {}
        self._undecodable_since: dict[FileKey, float] = {}
        self._recorded_paths: set[str] = set()   # paths with a record (of any version) in results.jsonl
        self._bundle_sha256: str | None = None     # the store's bundle identity, hashed once

    def run(self, stop: threading.Event, on_record: Callable[[dict], None] | None = None) -> WatchSummary:
        self.config.out.mkdir(parents=True, exist_ok=True)
        summary = WatchSummary()
        with _watcher_lock(self.config.out / LOCK_NAME):
            done = load_done_keys(self.results)
            self._recorded_paths = {key.path for key in done}
            store = ResultStore(self.config.store) if self.config.store is not None else None
            fd = os.open(self.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                while not stop.is_set():
                    ready = self.poll(done)
                    summary.polls += 1
                    if self.config.once and summary.polls == 1:
                        stop.wait(self.config.interval)   # a second look tells growing files from finished ones
                        continue
                    for record, pictures in self._grade(ready, stop, final=self.config.once):
                        if store is not None:   # the row before the line: see the module docstring
                            self._store(store, record, pictures)
                        append_line(fd, record)
                        done.add(_key_of(record))
                        self._recorded_paths.add(record["source"]["path"])
                        summary.graded += 1
                        summary.errors += bool(record.get("error"))
                        summary.records.append(record)
                        if on_record:
                            on_record(record)
                    if self.config.once:
                        break
                    stop.wait(self.config.interval)
            finally:
                os.close(fd)
                if store is not None:
                    store.close()
        return summary

    def _store(self, store: ResultStore, record: dict, pictures: dict[str, Path]) -> None:
        if self._bundle_sha256 is None:
            self._bundle_sha256 = manifest_sha256(self.grader.bundle)
        source = record["source"]
        frame = (record.get("dicom") or {}).get("frame")
        key = json.dumps(["watch", str(self.config.folder.resolve()), source["path"], source["bytes"],
                          source["mtime_ns"], frame])
        store.add(record, origin="watch", file_name=source["path"], bundle_sha256=self._bundle_sha256,
                  pictures=pictures, key=key)

    def poll(self, done: set[FileKey]) -> list[FileKey]:
        """List the folder; return the files not yet recorded whose size and mtime held since last poll."""
        current = {key.path: key for key in self._scan()}
        ready = [key for path, key in current.items()
                 if key not in done and self._last_seen.get(path) == key]
        self._last_seen = current
        # forget stalls of files that changed or vanished since (a long-running watcher must not grow)
        self._undecodable_since = {k: t for k, t in self._undecodable_since.items() if current.get(k.path) == k}
        return sorted(ready, key=lambda k: k.path)

    def _scan(self) -> Iterator[FileKey]:
        folder, out = self.config.folder, self.config.out.resolve()
        for dirpath, dirnames, filenames in os.walk(folder):
            # Hidden entries are cameras' and copy tools' temporary files; OUT may sit inside the folder.
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and Path(dirpath, d).resolve() != out]
            for name in filenames:
                path = Path(dirpath, name)
                if name.startswith(".") or not is_image_file(path):   # photographs by suffix; DICOM by marker too
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:   # deleted between listing and stat
                    continue
                yield FileKey(path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)

    def _grade(self, ready: list[FileKey], stop: threading.Event, final: bool) -> Iterator[tuple[dict, dict[str, Path]]]:
        """(record, its pictures by kind) per graded image, in order."""
        by_path = {str(self.config.folder / key.path): key for key in ready}
        rewritten: dict[FileKey, bool] = {}   # file versions recorded in this pass -> an earlier version has a record
        for graded in self.grader.grade_iter(list(by_path), self.config.batch_size):
            key = by_path[graded.record.file]
            # a later frame of a DICOM whose first frame is recorded is recorded too: its key is done
            if key not in rewritten and self._maybe_incomplete(graded, key, final):
                continue
            self._undecodable_since.pop(key, None)
            earlier_version = rewritten.setdefault(key, key.path in self._recorded_paths)
            pictures = self._write_images(graded, key, earlier_version) if self.config.overlays else {}
            yield {**graded.record.to_dict(), "source": key.to_dict(), "graded_at": _now()}, pictures
            # finish the current file (every frame of a DICOM: its key is done with the first), leave the rest
            if stop.is_set() and _last_of_file(graded.record):
                return

    def _maybe_incomplete(self, graded: GradedImage, key: FileKey, final: bool) -> bool:
        """A decode failure on a file that has not stayed unchanged long enough: try again later."""
        if graded.image is not None or graded.record.error is None or final:
            return False
        first = self._undecodable_since.setdefault(key, time.monotonic())
        return time.monotonic() - first < self.config.undecodable_grace_s

    def _write_images(self, graded: GradedImage, key: FileKey, rewritten: bool) -> dict[str, Path]:
        """Write the overlay and card; return those written, by kind (what a store row copies in)."""
        stem = _picture_stem(key, graded.record, rewritten)
        cards = self.config.out / "cards"
        write_visuals(graded, stem, self.config.out / "overlays", cards)
        pictures = {"overlay": Path(graded.record.overlay)} if graded.record.overlay else {}
        card = cards / f"{stem}{CARD_SUFFIX}"
        # a card that failed now must not be stood in for by an older file of the same name
        if graded.image is not None and not _card_failure(graded.record.error) and card.is_file():
            pictures["card"] = card
        return pictures


def _card_failure(error: str | None) -> bool:
    """Whether a record's error says its report card could not be written (visuals.write_visuals' words)."""
    return bool(error) and "the report card could not be written" in error


def _picture_stem(key: FileKey, record: GradeRecord, rewritten: bool) -> str:
    """The path's stem, with `_frame<N>` for a frame of a multi-frame DICOM; a later version of a file
    already recorded (rewritten) adds its mtime, so the earlier record's pictures are not replaced by
    pictures of another photograph."""
    stem = path_stem(key.path)
    stem = f"{stem}@{key.mtime_ns}" if rewritten else stem
    dicom = record.dicom or {}
    return f"{stem}_frame{dicom['frame']}" if (dicom.get("frames") or 1) > 1 else stem


def load_done_keys(results: Path) -> set[FileKey]:
    """Keys of every image already recorded; a torn last line (crash mid-write) is cut off first."""
    if not results.exists():
        return set()
    repair_torn_tail(results)
    keys = set()
    for line in results.read_bytes().splitlines():
        key = _recorded_key(line)
        if key is not None:   # else not one of our records: it names no image, so skipping it loses nothing
            keys.add(key)
    return keys


def _recorded_key(line: bytes) -> FileKey | None:
    """The source key of one of our records, or None for any other line (not UTF-8, not JSON, not an
    object, no source, or a source whose fields are not the types we write)."""
    try:
        source = json.loads(line.decode("utf-8"))["source"]
        path, size, mtime_ns = source["path"], source["bytes"], source["mtime_ns"]
    except (ValueError, KeyError, TypeError):   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(path, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, mtime_ns)):
        return None
    return FileKey(path, size, mtime_ns)


def repair_torn_tail(results: Path) -> bool:
    """Truncate a last line without its newline. Returns whether anything was cut."""
    data = results.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    os.truncate(results, data.rfind(b"\n") + 1)
    return True


def append_line(fd: int, record: dict) -> None:
    """One write of a whole line on an O_APPEND descriptor, then fsync: no reader sees half a record."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
    written = os.write(fd, line)
    if written != len(line):   # a full disk: stop here; the next start cuts the partial line off
        raise EdgeRetinaError(f"results could not be appended ({written} of {len(line)} bytes written)")
    os.fsync(fd)


def _key_of(record: dict) -> FileKey:
    source = record["source"]
    return FileKey(str(source["path"]), int(source["bytes"]), int(source["mtime_ns"]))


def _last_of_file(record: GradeRecord) -> bool:
    """Whether no record of the same file follows (a photograph; the last frame of a DICOM; an error)."""
    dicom = record.dicom or {}
    return dicom.get("frame") is None or dicom["frame"] >= (dicom.get("frames") or 1)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _watcher_lock(path: Path) -> ExclusiveLock:
    """Two watchers on one OUT would grade every image twice; the second one is refused."""
    return ExclusiveLock(path, lambda held: ConfigError(f"another watcher is already writing to {held.parent}"))


def _stop_on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
