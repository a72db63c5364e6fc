"""labels.csv: the dataset format every part reads (path relative to the csv, case_id, grade, ...).

A row's image is a photograph or a DICOM file; a multi-frame DICOM needs the optional ``frame`` column
(1-based) to say which frame the grade is for.

Torch-free so that evaluation on the device (and the demo's held-out check) can read it too.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from edgeretina.errors import DatasetError
from edgeretina.grades import NUM_GRADES

REQUIRED_COLUMNS = ("path", "grade")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})   # what folders are searched for


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    case_id: str
    grade: int
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    frame: int | None = None        # the frame of a multi-frame DICOM (1-based); None: the file's only image


def read_labels(csv_path: str | Path, *, check_files: bool = True) -> list[LabeledImage]:
    """Read a labels.csv; image paths are resolved relative to the csv's folder.

    Raises DatasetError naming the row and the problem (missing column, bad grade, missing image).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"labels file not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}")
            rows = [_parse_row(csv_path, line, row, check_files) for line, row in enumerate(reader, start=2)]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from None
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    return rows


def _parse_row(csv_path: Path, line: int, row: dict[str, str], check_files: bool) -> LabeledImage:
    try:
        grade = int(row["grade"])
    except (TypeError, ValueError):
        raise DatasetError(f"{csv_path}:{line}: grade {row['grade']!r} is not an integer") from None
    if not 0 <= grade < NUM_GRADES:
        raise DatasetError(f"{csv_path}:{line}: grade {grade} outside 0..{NUM_GRADES - 1}")
    if not row.get("path"):                      # a short row leaves the field None
        raise DatasetError(f"{csv_path}:{line}: no image path")
    path = (csv_path.parent / row["path"]).resolve()
    if check_files and not path.is_file():
        raise DatasetError(f"{csv_path}:{line}: image not found: {path}")
    case_id = row.get("case_id") or Path(row["path"]).stem
    extra = {k: v for k, v in row.items() if k not in ("path", "grade", "case_id", "frame")}
    return LabeledImage(path=path, case_id=case_id, grade=grade, extra=extra, frame=_frame(csv_path, line, row))


def _frame(csv_path: Path, line: int, row: dict[str, str]) -> int | None:
    text = (row.get("frame") or "").strip()
    if not text:
        return None
    try:
        frame = int(text)
    except ValueError:
        raise DatasetError(f"{csv_path}:{line}: frame {text!r} is not an integer") from None
    if frame < 1:
        raise DatasetError(f"{csv_path}:{line}: frame {frame} must be >= 1 (DICOM numbers frames from 1)")
    return frame


def grade_counts(items: list[LabeledImage]) -> list[int]:
    counts = [0] * NUM_GRADES
    for item in items:
        counts[item.grade] += 1
    return counts
