"""What every layout reader shares: the result type, tolerant CSV tables, grade parsing, image lookup."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from edgeretina.dataset import IMAGE_SUFFIXES, LabeledImage, Skipped, column_key
from edgeretina.errors import DatasetError
from edgeretina.grades import NUM_GRADES

#: Suffix preference when one stem has several files (x.png beside x.jpg): the first wins.
SUFFIX_ORDER = (".png", ".jpeg", ".jpg", ".tif", ".tiff", ".bmp")
IMAGE_NOT_FOUND = "image not found"


@dataclass
class ReadResult:
    """What a layout reader returns: the items it could use and every entry it left out, with why."""

    items: list[LabeledImage] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def extend(self, other: ReadResult) -> None:
        self.items.extend(other.items)
        self.skipped.extend(other.skipped)

    def skip(self, where: str, reason: str, detail: str = "") -> None:
        self.skipped.append(Skipped(where, reason, detail))


@dataclass(frozen=True)
class Table:
    """A CSV read tolerantly: byte-order mark, CRLF, padded header names ("Risk of macular edema "),
    trailing empty columns and blank rows (IDRiD's export has all of them)."""

    path: Path
    columns: tuple[str, ...]                 # stripped header names, empty ones dropped
    rows: tuple[tuple[int, dict[str, str]], ...]   # (line number, {column: stripped value})

    def has(self, *names: str) -> bool:
        return all(self.column(n) is not None for n in names)

    def column(self, name: str) -> str | None:
        """The table's spelling of column `name`, compared case- and space-insensitively."""
        wanted = column_key(name)
        return next((c for c in self.columns if column_key(c) == wanted), None)

    def first_column(self, *names: str) -> str | None:
        return next((c for c in map(self.column, names) if c is not None), None)


def read_table(path: Path) -> Table:
    """Raises DatasetError for a missing, unreadable or non-UTF-8 file."""
    if not path.is_file():
        raise DatasetError(f"labels file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            raw = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header = [name.strip() for name in raw[0]] if raw else []
    keep = [i for i, name in enumerate(header) if name]
    rows = []
    for line, values in enumerate(raw[1:], start=2):
        if not any(v.strip() for v in values):
            continue
        rows.append((line, {header[i]: (values[i].strip() if i < len(values) else "") for i in keep}))
    return Table(path, tuple(header[i] for i in keep), tuple(rows))


def require_columns(table: Table, expected: Sequence[str | tuple[str, ...]], layout: str) -> dict[str, str]:
    """Map each expected column (a name, or a tuple of accepted spellings) to the table's own spelling.

    Raises DatasetError naming the file, the missing columns and the columns the layout expects."""
    found, missing = {}, []
    for want in expected:
        names = (want,) if isinstance(want, str) else want
        column = table.first_column(*names)
        if column is None:
            missing.append(" or ".join(repr(n) for n in names))
        else:
            found[names[0]] = column
    if missing:
        expected_text = ", ".join(" | ".join(w) if isinstance(w, tuple) else w for w in expected)
        raise DatasetError(f"{table.path}: not a {layout} labels file: missing column(s) {', '.join(missing)} "
                           f"(expected columns: {expected_text}; found: {', '.join(table.columns) or 'none'})")
    return found


def read_columns(path: Path, expected: Sequence[str | tuple[str, ...]], layout: str) -> tuple[Table, dict[str, str]]:
    """read_table, then require_columns: the table and its spelling of each expected column."""
    table = read_table(path)
    return table, require_columns(table, expected, layout)


def read_each(paths: Iterable[Path], read_one: Callable[[Path, bool], ReadResult], check_files: bool) -> ReadResult:
    """One result for a layout that spreads its labels over several files (training / testing CSVs)."""
    result = ReadResult()
    for path in paths:
        result.extend(read_one(path, check_files))
    return result


def parse_grade(text: str, *, ungradable: int | None = None) -> int | str:
    """The ICDR grade in `text` ("2", "2.0"), "ungradable" for the layout's ungradable code, or a
    reason string for anything else."""
    try:
        number = float(text)
    except ValueError:
        return "bad grade"
    if not number.is_integer():              # 1.5, nan, inf
        return "bad grade"
    grade = int(number)
    if ungradable is not None and grade == ungradable:
        return "ungradable"
    if not 0 <= grade < NUM_GRADES:
        return "bad grade"
    return grade


def grade_or_skip(result: ReadResult, where: str, text: str, *, layout: str,
                  ungradable: int | None = None) -> int | None:
    """The grade, or None after recording why the entry is skipped."""
    grade = parse_grade(text, ungradable=ungradable)
    if grade == "ungradable":
        result.skip(where, f"ungradable ({layout} grade {ungradable})")
        return None
    if isinstance(grade, str):
        result.skip(where, grade, f"{text!r} is not a grade 0..{NUM_GRADES - 1}" if text else "empty grade")
        return None
    return grade


class ImageFinder:
    """Finds an image named in a labels file among the files of some folders.

    Real releases disagree with their own labels: ids with or without the extension, .jpeg/.jpg/.png
    re-encodings (Kaggle mirrors), upper-case .JPG. A name matches a file of the same name, else a file
    of the same stem with any image suffix, both case-insensitively; earlier folders win. Each folder is
    listed once (one scandir beats several stat calls per row on 35,000 EyePACS images).
    With check_files=False nothing is listed: the path is the first existing folder / the id (with
    `default_suffix` when it has none)."""

    def __init__(self, folders: Iterable[Path], default_suffix: str, check_files: bool = True):
        self.folders = [f.resolve() for f in folders]
        self.default_suffix = default_suffix
        self.check_files = check_files
        self._names: dict[str, Path] | None = None
        self._stems: dict[str, Path] = {}
        self._with_images: set[Path] = set()
        self._existing: Path | None = None

    def find(self, name: str) -> Path | None:
        if not self.check_files:
            return self.expected(name)
        self._index()
        key = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
        if key in self._names:
            return self._names[key]
        stem = key[: -len(Path(key).suffix)] if Path(key).suffix in IMAGE_SUFFIXES else key
        return self._stems.get(stem)

    def expected(self, name: str) -> Path:
        """Where the image would be, what a 'not found' message names: in the first folder that holds
        images (the first that exists, without listing), else in the layout's main folder."""
        if self.check_files:
            self._index()
            folder = next((f for f in self.folders if f in self._with_images), self.folders[0])
        else:
            if self._existing is None:
                self._existing = next((f for f in self.folders if f.is_dir()), self.folders[0])
            folder = self._existing
        file = name if Path(name).suffix.lower() in IMAGE_SUFFIXES else name + self.default_suffix
        return folder / file

    def _index(self) -> None:
        if self._names is not None:
            return
        self._names = {}
        by_stem: dict[str, list[Path]] = {}
        for folder in self.folders:
            for path in _image_files(folder):
                self._with_images.add(folder)
                key = path.name.lower()
                if key not in self._names:
                    self._names[key] = path
                    by_stem.setdefault(Path(key).stem, []).append(path)
        for stem, paths in by_stem.items():
            # first folder first, then the preferred suffix within it
            self._stems[stem] = paths[0] if len(paths) == 1 else min(
                paths, key=lambda p: (self.folders.index(p.parent), SUFFIX_ORDER.index(p.suffix.lower())))


def _image_files(folder: Path) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
            yield Path(entry.path)


def find_or_skip(result: ReadResult, finder: ImageFinder, name: str, where: str) -> Path | None:
    path = finder.find(name)
    if path is None:
        result.skip(where, IMAGE_NOT_FOUND, str(finder.expected(name)))
    return path


class LabeledRow(NamedTuple):
    """A table row that names a grade and an image that was found."""

    row: dict[str, str]
    grade: int
    name: str
    image: Path


def labeled_rows(result: ReadResult, table: Table, name_column: str, grade_column: str, finder: ImageFinder, *,
                 layout: str, ungradable: int | None = None,
                 excluded: Callable[[dict[str, str]], str | None] | None = None) -> Iterator[LabeledRow]:
    """The rows of a one-image-a-row table that a reader can use; every other row is recorded in `result`.

    Checks in this order, the first failure being the row's one reason: `excluded(row)` (a reason, or
    None to keep the row), the grade (grade_or_skip), a non-empty image name, the image (find_or_skip)."""
    for line, row in table.rows:
        where = f"{table.path}:{line}"
        reason = excluded(row) if excluded is not None else None
        if reason is not None:
            result.skip(where, reason)
            continue
        grade = grade_or_skip(result, where, row[grade_column], layout=layout, ungradable=ungradable)
        if grade is None:
            continue
        name = row[name_column]
        if not name:
            result.skip(where, "no image name")
            continue
        image = find_or_skip(result, finder, name, where)
        if image is not None:
            yield LabeledRow(row, grade, name, image)


def labels_file(path: Path, names: Sequence[str], layout: str, expected: str) -> Path:
    """`path` itself when it is a file, else the first of `names` in the folder `path`.

    Raises DatasetError saying which files were looked for."""
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise DatasetError(f"{path}: no {layout} labels file ({' or '.join(names)}) in this folder; "
                       f"expected {expected}")
