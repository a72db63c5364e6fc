"""labels.csv: the dataset format every part reads (path relative to the csv, case_id, grade, ...).

A row's image is a photograph or a DICOM file; a multi-frame DICOM needs the optional ``frame`` column
(1-based) to say which frame the grade is for. The optional ``patient`` column groups the images of one
person (a validation split keeps them on one side) and ``source`` names the corpus or camera a row comes
from; every other column is kept in ``LabeledImage.extra``. The names of these six columns compare as
the layouts' tables compare them (case, padding and "_"/" " aside: "Path", " grade ", "Case ID").

Two readers share one row parser: ``read_labels`` raises at the first bad row (a labels.csv a tool wrote
should have none), ``scan_labels`` skips bad rows and says why (for corpora assembled by hand, see
``edgeretina.layouts``).

Torch-free so that evaluation on the device (and the demo's held-out check) can read it too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from edgeretina.errors import DatasetError
from edgeretina.grades import NUM_GRADES

REQUIRED_COLUMNS = ("path", "grade")
FIELD_COLUMNS = ("path", "grade", "case_id", "frame", "patient", "source")   # the columns LabeledImage holds
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})   # what folders are searched for


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    case_id: str
    grade: int
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    frame: int | None = None        # the frame of a multi-frame DICOM (1-based); None: the file's only image
    patient: str | None = field(default=None, compare=False)   # images of one person share it; None: unknown
    source: str = field(default="", compare=False)             # the corpus, site or camera the image comes from


@dataclass(frozen=True)
class Skipped:
    """An entry of a dataset that was left out, and why.

    where: the labels file and line ("train.csv:7") or the file concerned; reason: a short category that
    summaries count ("image not found", "bad grade", "ungradable (DDR grade 5)"); detail: the specifics
    (the path looked for, the value found)."""

    where: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" + (f": {self.detail}" if self.detail else "")


class _RowProblem(DatasetError):
    """A bad row: read_labels raises it (a DatasetError), scan_labels records it as Skipped."""

    def __init__(self, reason: str, message: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(message)


def read_labels(csv_path: str | Path, *, check_files: bool = True) -> list[LabeledImage]:
    """Read a labels.csv; image paths are resolved relative to the csv's folder.

    Raises DatasetError naming the row and the problem (missing column, bad grade, missing image).
    """
    csv_path = Path(csv_path)
    rows = [_parse_row(csv_path, line, row, check_files) for line, row in _rows(csv_path)]
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    return rows


def scan_labels(csv_path: str | Path, *, check_files: bool = True,
                default_source: str = "") -> tuple[list[LabeledImage], list[Skipped]]:
    """Read a labels.csv like read_labels, but skip a bad row (bad grade, missing image, ...) with the
    reason instead of raising. Rows without a ``source`` get `default_source`.

    Raises DatasetError only for the file itself: missing, not UTF-8, or without the path/grade columns.
    """
    csv_path = Path(csv_path)
    items: list[LabeledImage] = []
    skipped: list[Skipped] = []
    for line, row in _rows(csv_path):
        try:
            item = _parse_row(csv_path, line, row, check_files)
        except _RowProblem as problem:
            skipped.append(Skipped(f"{csv_path}:{line}", problem.reason, problem.detail))
            continue
        items.append(item if item.source or not default_source else _with_source(item, default_source))
    return items, skipped


def _with_source(item: LabeledImage, source: str) -> LabeledImage:
    return LabeledImage(path=item.path, case_id=item.case_id, grade=item.grade, extra=item.extra,
                        frame=item.frame, patient=item.patient, source=source)


def _rows(csv_path: Path):
    """(line number, row) of every row, the known columns' names normalised (`_field_names`); DatasetError for
    a missing or non-UTF-8 file, one without path and grade columns, or one naming a field twice."""
    if not csv_path.is_file():
        raise DatasetError(f"labels file not found: {csv_path}")
    try:
        # utf-8-sig: a spreadsheet's byte-order mark must not become part of the first column's name
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = _field_names(csv_path, reader.fieldnames or [])
            missing = [c for c in REQUIRED_COLUMNS if c not in reader.fieldnames]
            if missing:
                raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}")
            rows = list(enumerate(reader, start=2))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                           "save it as UTF-8") from None
    return rows


def column_key(name: str) -> str:
    """How column names compare: case, padding and "_" versus " " aside ("Case ID" is case_id)."""
    return " ".join(name.replace("_", " ").split()).lower()


_FIELD_BY_KEY = {column_key(c): c for c in FIELD_COLUMNS}


def _field_names(csv_path: Path, header: list[str]) -> list[str]:
    """The header with the columns LabeledImage holds in their canonical spelling ("Path " -> path); other
    columns as they are. DatasetError when two columns name the same field."""
    names = [_FIELD_BY_KEY.get(column_key(name), name) for name in header]
    for field_name in FIELD_COLUMNS:
        spellings = [h for h, n in zip(header, names) if n == field_name]
        if len(spellings) > 1:
            raise DatasetError(f"{csv_path}: columns {', '.join(map(repr, spellings))} all name {field_name}: "
                               "keep one")
    return names


def _parse_row(csv_path: Path, line: int, row: dict[str, str], check_files: bool) -> LabeledImage:
    """Raises _RowProblem (a DatasetError for read_labels) naming the row and what is wrong with it."""
    where = f"{csv_path}:{line}"
    try:
        grade = int(row["grade"])
    except (TypeError, ValueError):
        raise _RowProblem("bad grade", f"{where}: grade {row['grade']!r} is not an integer",
                          repr(row["grade"])) from None
    if not 0 <= grade < NUM_GRADES:
        raise _RowProblem("bad grade", f"{where}: grade {grade} outside 0..{NUM_GRADES - 1}",
                          f"{grade} outside 0..{NUM_GRADES - 1}")
    if not row.get("path"):                      # a short row leaves the field None
        raise _RowProblem("no image path", f"{where}: no image path")
    path = (csv_path.parent / row["path"]).resolve()
    if check_files and not path.is_file():
        raise _RowProblem("image not found", f"{where}: image not found: {path}", str(path))
    case_id = row.get("case_id") or Path(row["path"]).stem
    extra = {k: v for k, v in row.items() if k not in FIELD_COLUMNS and k is not None}
    return LabeledImage(path=path, case_id=case_id, grade=grade, extra=extra, frame=_frame(where, row),
                        patient=(row.get("patient") or "").strip() or None, source=(row.get("source") or "").strip())


def _frame(where: str, row: dict[str, str]) -> int | None:
    text = (row.get("frame") or "").strip()
    if not text:
        return None
    try:
        frame = int(text)
    except ValueError:
        raise _RowProblem("bad frame", f"{where}: frame {text!r} is not an integer", repr(text)) from None
    if frame < 1:
        raise _RowProblem("bad frame", f"{where}: frame {frame} must be >= 1 (DICOM numbers frames from 1)", str(frame))
    return frame


def grade_counts(items: list[LabeledImage]) -> list[int]:
    counts = [0] * NUM_GRADES
    for item in items:
        counts[item.grade] += 1
    return counts
