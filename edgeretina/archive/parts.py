"""The output folder: part files as results arrive, what a rerun skips, and the merged results.

``DIR/parts/part-<run>-<seq>.parquet``: the driver buffers the rows that stream back from the workers and writes
them as one part every ``part_rows`` rows or ``part_seconds`` (and at the end, and on Ctrl-C/SIGTERM), each
written to a temporary name and renamed (edgeretina/atomic.py): a part exists whole or not at all, so a killed
run keeps every part it finished and loses at most the rows still buffered. A worker's output for one batch
is never split between parts, so a DICOM file's frames land together.

Parts are the state; nothing else records progress. A rerun reads their key columns and skips every file
(file, bytes, mtime_ns) with a complete set of rows graded by the same bundle (manifest sha256): one row for a
photograph or an error, every frame for a DICOM. ``results.parquet`` is then rebuilt from the parts: one row
per image of this run's sources, from the latest grading of each file with this bundle, sorted by file and
frame. Parts of other bundles, and of files no longer in the sources, stay in parts/ untouched.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from edgeretina.archive.rows import KEY_COLUMNS, row_schema
from edgeretina.atomic import write_atomic
from edgeretina.errors import ArchiveError
from edgeretina.locks import ExclusiveLock

PART_GLOB = "part-*.parquet"
_STATE_COLUMNS = (*KEY_COLUMNS, "frame", "frames", "error", "bundle_sha256")


def run_id() -> str:
    """Sorts in the order runs started: part names order every row by when it was written."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + f"-{os.getpid()}"


class PartWriter:
    """Buffers result tables and writes them as part files (atomically)."""

    def __init__(self, folder: Path, run: str, rows_per_part: int, seconds_per_part: float):
        self.folder, self.run = Path(folder), run
        self.rows_per_part, self.seconds_per_part = rows_per_part, seconds_per_part
        self.buffer: list = []
        self.buffered_rows = 0
        self.first_buffered: float | None = None
        self.written: list[Path] = []
        self.rows_written = 0

    def add(self, table) -> Path | None:
        """Buffer one worker output; write a part when the buffer is full or old enough. Returns the part."""
        if table.num_rows == 0:
            return None
        self.buffer.append(table)
        self.buffered_rows += table.num_rows
        self.first_buffered = self.first_buffered or time.monotonic()
        if self.buffered_rows >= self.rows_per_part or time.monotonic() - self.first_buffered >= self.seconds_per_part:
            return self.flush()
        return None

    def flush(self) -> Path | None:
        if not self.buffer:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables(self.buffer).cast(row_schema())
        path = self.folder / f"part-{self.run}-{len(self.written):06d}.parquet"
        write_atomic(path, lambda fh: pq.write_table(table, fh, compression="zstd"))
        self.written.append(path)
        self.rows_written += table.num_rows
        self.buffer, self.buffered_rows, self.first_buffered = [], 0, None
        return path


@dataclass
class PartsState:
    """What the parts say about one bundle: the files done, and parts that could not be read."""

    done: set[tuple[str, int, int]] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)


def read_state(folder: Path, bundle_sha256: str, retry_errors: bool = False) -> PartsState:
    """The keys of files with a complete grading by this bundle (retry_errors: a file with an error row is not
    done). A part that cannot be read is listed, never fatal: its files are graded again."""
    state = PartsState()
    rows: dict[tuple, list[tuple]] = defaultdict(list)
    for path, table in _read_parts(folder, list(_STATE_COLUMNS), state.unreadable):
        data = table.to_pydict()
        for i, sha in enumerate(data["bundle_sha256"]):
            if sha == bundle_sha256:
                key = (data["file"][i], data["bytes"][i], data["mtime_ns"][i])
                rows[key].append((data["frame"][i], data["frames"][i], data["error"][i]))
    for key, graded in rows.items():
        if _complete(graded) and not (retry_errors and any(error for _, _, error in graded)):
            state.done.add(key)
    return state


def _complete(graded: list[tuple]) -> bool:
    """One row without frames (a photograph, or a file that failed as a whole), or every frame of a DICOM."""
    frames = {frames for _, frames, _ in graded if frames}
    if not frames:
        return True
    wanted = max(frames)
    return {frame for frame, _, _ in graded if frame} >= set(range(1, wanted + 1))


def merge_results(folder: Path, bundle_sha256: str, keys: list[tuple[str, int, int]]):
    """One table of this bundle's rows for ``keys``: per file the rows of its latest grading, sorted by file
    and frame, in row_schema."""
    import pyarrow as pa

    wanted = set(keys)
    tables, latest = [], {}
    for index, (path, table) in enumerate(_read_parts(folder, None, [])):
        data = table.select(["file", "bytes", "mtime_ns", "bundle_sha256"]).to_pydict()
        mask = []
        for file, size, mtime, sha in zip(data["file"], data["bytes"], data["mtime_ns"], data["bundle_sha256"]):
            key = (file, size, mtime)
            keep = sha == bundle_sha256 and key in wanted
            mask.append(keep)
            if keep:
                latest[key] = index          # parts are read in the order they were written
        tables.append((index, table.filter(pa.array(mask, pa.bool_())).cast(row_schema())))
    kept = []
    for index, table in tables:
        data = table.select(["file", "bytes", "mtime_ns"]).to_pydict()
        mask = [latest.get(key) == index for key in zip(data["file"], data["bytes"], data["mtime_ns"])]
        kept.append(table.filter(pa.array(mask, pa.bool_())))
    merged = pa.concat_tables(kept) if kept else row_schema().empty_table()
    return merged.sort_by([("file", "ascending"), ("frame", "ascending")])


def write_results(path: Path, table) -> Path:
    import pyarrow.parquet as pq

    return write_atomic(path, lambda fh: pq.write_table(table, fh, compression="zstd"))


def _read_parts(folder: Path, columns: list[str] | None, unreadable: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in sorted(Path(folder).glob(PART_GLOB)):
        try:
            yield path, pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError):
            unreadable.append(str(path))


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary part files a killed run left (never renamed: never results)."""
    for path in Path(folder).glob(".part-*.parquet.tmp-*"):
        path.unlink(missing_ok=True)


def OutputLock(path: Path) -> ExclusiveLock:   # noqa: N802 - used as `with OutputLock(...)`
    """One run writes to an output folder at a time."""
    return ExclusiveLock(path, lambda held: ArchiveError(f"another grade-archive run is writing to {held.parent}"))
