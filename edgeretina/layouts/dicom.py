"""A folder of DICOM files graded by SOP Instance UID (``dicom``)::

    <PATH>/**/<any name>[.dcm]     fundus photographs (searched recursively; DICOMDIR is ignored)
    <PATH>/grades.csv              sop_instance_uid,grade[,frame][,patient][,case_id][,...]

The grades CSV is grades.csv, else labels.csv, else the one CSV in PATH with a sop_instance_uid column;
PATH may also be the CSV itself (the DICOM files are then searched under its folder). Headers are read
with pydicom (``dcmread(stop_before_pixels=True)``), so pixels are decoded only when training uses them.

item.path = the DICOM file, item.frame = the CSV's frame (1-based, for multi-frame files), item.source =
"<Manufacturer> <ManufacturerModelName>" when the file says, else "dicom". item.patient = the CSV's
patient column, else a pseudonym of the file's PatientID ("dicom-" + 16 hex digits of its SHA-256): the
split needs to know which images belong together, not who the person is.
Skipped and counted: a CSV row whose UID has no file, a file whose UID has no row, a frame beyond the
file's NumberOfFrames, a row of a multi-frame file without a frame (which image would the grade be
for?), two files with one UID, and files with a .dcm suffix (or none) that pydicom
cannot read. pydicom is the ``dicom`` extra, imported here only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError, MissingDependencyError
from edgeretina.layouts.common import ReadResult, Table, grade_or_skip, read_table, require_columns

COLUMNS = ("sop_instance_uid", "grade")
GRADE_FILES = ("grades.csv", "labels.csv")
NOT_DICOM_SUFFIXES = frozenset({".csv", ".txt", ".json", ".md", ".xml", ".html", ".pdf",
                                ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".zip"})
HEADER_TAGS = ["SOPInstanceUID", "PatientID", "Manufacturer", "ManufacturerModelName", "NumberOfFrames"]
MULTI_FRAME_WITHOUT_FRAME = "multi-frame DICOM without a frame"


@dataclass(frozen=True)
class _Header:
    path: Path
    patient: str | None
    source: str
    frames: int


def read_dicom(path: Path, *, check_files: bool = True) -> ReadResult:
    csv_path = _grades_csv(path)
    table = read_table(csv_path)
    columns = require_columns(table, COLUMNS, "DICOM grades")
    result = ReadResult()
    headers = _scan(csv_path.parent, result)
    graded: set[str] = set()
    for line, row in table.rows:
        where = f"{csv_path}:{line}"
        uid = row[columns["sop_instance_uid"]]
        graded.add(uid)
        grade = grade_or_skip(result, where, row[columns["grade"]], layout="DICOM")
        if grade is None:
            continue
        header = headers.get(uid)
        if header is None:
            result.skip(where, "no DICOM file with this SOP Instance UID", uid)
            continue
        frame = _frame(result, where, table, row, header)
        if frame is not False:
            result.items.append(_item(table, row, uid, grade, frame, header))
    for uid, header in headers.items():
        if uid not in graded:
            result.skip(str(header.path), "no grade for this DICOM file",
                        f"SOP Instance UID {uid} not in {csv_path.name}")
    return result


def _grades_csv(path: Path) -> Path:
    if path.is_file():
        return path
    for name in GRADE_FILES:
        if (path / name).is_file():
            return path / name
    keyed = [p for p in sorted(path.glob("*.csv")) if read_table(p).has("sop_instance_uid")]
    if len(keyed) == 1:
        return keyed[0]
    if keyed:
        raise DatasetError(f"{path}: {len(keyed)} CSVs with a sop_instance_uid column "
                           f"({', '.join(p.name for p in keyed)}): name one, e.g. dicom:{keyed[0]}")
    raise DatasetError(f"{path}: no grades CSV for the DICOM files; expected grades.csv with columns "
                       "sop_instance_uid,grade[,frame][,patient]")


def _scan(folder: Path, result: ReadResult) -> dict[str, _Header]:
    """SOP Instance UID -> header of every DICOM file under `folder`."""
    try:
        from pydicom import dcmread
    except ImportError:
        raise MissingDependencyError("pydicom", "dicom", "reading a folder of DICOM files") from None
    headers: dict[str, _Header] = {}
    for path in _candidates(folder):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            uid = str(ds.get("SOPInstanceUID", "") or "").strip()
            header = _Header(path.resolve(), _pseudonym(ds.get("PatientID")), _source(ds), _frames(ds))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged headers (read lazily too)
            if path.suffix.lower() in ("", ".dcm", ".dicom"):
                result.skip(str(path), "not a readable DICOM file", f"{type(exc).__name__}: {exc}"[:200])
            continue
        if not uid:
            result.skip(str(path), "DICOM file without SOP Instance UID")
        elif uid in headers:
            result.skip(str(path), "duplicate SOP Instance UID", f"{uid} also in {headers[uid].path}")
        else:
            headers[uid] = header
    return headers


def _candidates(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or name.upper() == "DICOMDIR" or path.suffix.lower() in NOT_DICOM_SUFFIXES:
                continue
            yield path


def _pseudonym(patient_id) -> str | None:
    text = str(patient_id or "").strip()
    return "dicom-" + hashlib.sha256(text.encode()).hexdigest()[:16] if text else None


def _source(ds) -> str:
    text = " ".join(str(ds.get(tag, "") or "").strip() for tag in ("Manufacturer", "ManufacturerModelName"))
    return " ".join(text.split()) or "dicom"


def _frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _frame(result: ReadResult, where: str, table: Table, row: dict[str, str], header: _Header):
    """The row's frame (None: the file's only image), or False after recording why the row is skipped."""
    column = table.column("frame")
    text = row[column] if column else ""
    if not text:
        if header.frames > 1:
            result.skip(where, MULTI_FRAME_WITHOUT_FRAME,
                        f"{header.path} has {header.frames} frames: the grades CSV must give the frame "
                        f"(a frame column, 1..{header.frames}), one row per graded frame")
            return False
        return None
    try:
        frame = int(text)
    except ValueError:
        result.skip(where, "bad frame", repr(text))
        return False
    if not 1 <= frame <= header.frames:
        result.skip(where, "bad frame", f"frame {frame} of a file with {header.frames} frame(s) (frames count from 1)")
        return False
    return frame


def _item(table: Table, row: dict[str, str], uid: str, grade: int, frame: int | None, header: _Header) -> LabeledImage:
    fields = {c for c in (table.column(n) for n in ("sop_instance_uid", "grade", "frame", "patient", "case_id")) if c}
    patient_column, case_column = table.column("patient"), table.column("case_id")
    patient = (row[patient_column] if patient_column else "") or header.patient
    case_id = (row[case_column] if case_column else "") or (uid if frame is None else f"{uid}#{frame}")
    return LabeledImage(path=header.path, case_id=case_id, grade=grade, frame=frame, patient=patient,
                        source=header.source, extra={k: v for k, v in row.items() if k not in fields})
