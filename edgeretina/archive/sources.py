"""What an archive run grades: the sources expanded into files, each with the key that says whether it is done.

A source is a folder (searched recursively by the one rule `grade` uses, preprocess/files.py), a file, a glob
pattern, or a manifest: a CSV or Parquet file with a ``path`` column (else ``file``, ``image`` or ``filename``),
relative paths taken from the manifest's folder (a phantom ``labels.csv`` is one). Local paths are made absolute:
Ray workers do not share the driver's working directory.

A source with a scheme (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://`` ...) is listed and, on the
workers, read through pyarrow's filesystems (credentials from the usual environment of each machine). There,
folders are searched by suffix only (``IMAGE_SUFFIXES`` and ``.dcm``/``.dicom``; a DICOM file without a suffix
needs a manifest), and a glob matches like fnmatch (``*`` also crosses ``/``).

The key of a file is (file, bytes, mtime_ns), read when the run starts: a file rewritten in place is a new
file and is graded again; one that cannot be found keeps -1, -1 and gets its error row (and the same key on a
rerun, so it is not retried unless asked). Why not a content hash: it would read the whole archive on the
driver before grading the first image, and again on every resume.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from edgeretina.dataset import IMAGE_SUFFIXES
from edgeretina.errors import DatasetError
from edgeretina.preprocess.dicom import DICOMDIR_NAME
from edgeretina.preprocess.files import PARTIAL_SUFFIXES
from edgeretina.runtime.batch import expand_inputs

MANIFEST_SUFFIXES = frozenset({".csv", ".parquet", ".pq"})
PATH_COLUMNS = ("path", "file", "image", "filename")
REMOTE_IMAGE_SUFFIXES = IMAGE_SUFFIXES | {".dcm", ".dicom"}
MISSING = -1           # bytes and mtime_ns of a file that could not be found when the run started
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ArchiveItem:
    file: str          # absolute local path, or a URI
    bytes: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.file, self.bytes, self.mtime_ns)

    def to_dict(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "mtime_ns": self.mtime_ns}


def is_uri(source: str) -> bool:
    return bool(_SCHEME.match(source))


def expand_sources(sources: Iterable[str]) -> list[ArchiveItem]:
    """Every file the sources name, once, in the order given (a folder's files sorted), with its key."""
    seen: dict[str, ArchiveItem] = {}
    for source in map(str, sources):
        for item in (_expand_remote(source) if is_uri(source) else _expand_local(source)):
            seen.setdefault(item.file, item)
    return list(seen.values())


# ------------------------------------------------------------------------------------------------ local files

def _expand_local(source: str, manifests: bool = True) -> Iterator[ArchiveItem]:
    path = Path(source)
    if manifests and path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
        for entry in read_manifest(path.read_bytes(), path.name):
            yield from _expand_entry(entry, path.parent)
        return
    for found in expand_inputs([source]):
        yield _local_item(os.path.abspath(found))


def _expand_entry(entry: str, base: Path | str) -> Iterator[ArchiveItem]:
    """A manifest row: a URI as it is, a relative path from the manifest's folder (local or remote)."""
    if is_uri(entry):
        yield from _expand_remote(entry, manifests=False)
    elif isinstance(base, str) and not entry.startswith("/"):      # relative to a remote manifest's folder
        yield from _expand_remote(f"{base.rstrip('/')}/{entry}", manifests=False)
    elif isinstance(base, str):                                     # an absolute path: local on every machine
        yield from _expand_local(entry, manifests=False)
    else:
        yield from _expand_local(str(base / entry) if not os.path.isabs(entry) else entry, manifests=False)


def _local_item(path: str) -> ArchiveItem:
    try:
        stat = os.stat(path)
    except OSError:
        return ArchiveItem(path, MISSING, MISSING)
    return ArchiveItem(path, int(stat.st_size), int(stat.st_mtime_ns))


# ------------------------------------------------------------------------------------------------ manifests

def read_manifest(data: bytes, name: str) -> list[str]:
    """The paths a manifest lists, in its order: a CSV (UTF-8, a BOM allowed) or a Parquet file's path column.
    Raises DatasetError when it cannot be read or has no path column."""
    if PurePosixPath(name).suffix.lower() == ".csv":
        return _csv_paths(data, name)
    return _parquet_paths(data, name)


def _csv_paths(data: bytes, name: str) -> list[str]:
    try:
        rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        column = _path_column(rows.fieldnames or [], name)
        return [value.strip() for row in rows if (value := (row.get(column) or "")).strip()]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"manifest {name} is not a readable CSV: {exc}") from None


def _parquet_paths(data: bytes, name: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"manifest {name} is not a readable Parquet file: {exc}") from None
    column = _path_column(table.column_names, name)
    return [str(value).strip() for value in table.column(column).to_pylist() if value is not None and str(value).strip()]


def _path_column(columns: list[str], name: str) -> str:
    lowered = {c.strip().lower(): c for c in columns if c}
    for wanted in PATH_COLUMNS:
        if wanted in lowered:
            return lowered[wanted]
    raise DatasetError(f"manifest {name} has no path column (one of {', '.join(PATH_COLUMNS)}); "
                       f"its columns: {', '.join(columns) or 'none'}")


# ------------------------------------------------------------------------------------------------ URIs

def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI. Raises DatasetError when pyarrow does not know it."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise DatasetError(f"cannot open {uri} with pyarrow's filesystems: {exc}") from None


def _expand_remote(uri: str, manifests: bool = True) -> Iterator[ArchiveItem]:
    import pyarrow.fs as pafs

    if glob.has_magic(uri):
        yield from _remote_glob(uri)
        return
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        yield from _remote_folder(fs, path, uri)
    elif info.type == pafs.FileType.File and manifests and PurePosixPath(path).suffix.lower() in MANIFEST_SUFFIXES:
        with fs.open_input_file(path) as fh:
            data = fh.read()
        base = uri.rsplit("/", 1)[0]
        for entry in read_manifest(data, PurePosixPath(path).name):
            yield from _expand_entry(entry, base)
    elif info.type == pafs.FileType.File:
        yield ArchiveItem(uri, int(info.size), _mtime_ns(info))
    else:
        yield ArchiveItem(uri, MISSING, MISSING)


def _remote_folder(fs, path: str, uri: str) -> Iterator[ArchiveItem]:
    """Images under a remote folder, by suffix, sorted by their path inside it."""
    import pyarrow.fs as pafs

    base = path.rstrip("/")
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        relative = info.path[len(base):].lstrip("/")
        if info.type == pafs.FileType.File and _remote_image_name(relative):
            found.append((relative, info))
    for relative, info in sorted(found, key=lambda pair: pair[0]):
        yield ArchiveItem(f"{uri.rstrip('/')}/{relative}", int(info.size), _mtime_ns(info))


def _remote_glob(uri: str) -> Iterator[ArchiveItem]:
    parts = uri.split("/")
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base_uri = "/".join(parts[:first_magic])
    pattern = "/".join(parts[first_magic:])
    for item in _expand_remote(base_uri, manifests=False):
        relative = item.file[len(base_uri.rstrip("/")):].lstrip("/")
        if fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(relative, pattern.replace("**/", "")):
            yield item


def _remote_image_name(relative: str) -> bool:
    name = PurePosixPath(relative)
    if name.name.endswith("~"):
        return False
    if name.suffix.lower() in PARTIAL_SUFFIXES or name.name.upper() == DICOMDIR_NAME:
        return False
    return name.suffix.lower() in REMOTE_IMAGE_SUFFIXES


def _mtime_ns(info) -> int:
    mtime = getattr(info, "mtime_ns", None)
    return int(mtime) if mtime is not None else MISSING
