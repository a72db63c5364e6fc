"""Grading records as JSON, CSV and a terminal table; files are written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Sequence

from edgeretina.atomic import write_text_atomic
from edgeretina.runtime.grader import GradeRecord
from edgeretina.text_tables import table_lines

CSV_COLUMNS = ("file", "screening", "gradable", "grade", "grade_name", "referable", "referable_probability",
               "p0", "p1", "p2", "p3", "p4", "quality_reasons", "nearest_case", "nearest_grade", "error",
               # DICOM inputs only (empty for photographs): which frame, which eye, where it is archived
               "frame", "laterality", "study_instance_uid", "series_instance_uid", "sop_instance_uid")
_DICOM_COLUMNS = CSV_COLUMNS[CSV_COLUMNS.index("frame"):]


def records_json(records: Sequence[GradeRecord]) -> str:
    return json.dumps([r.to_dict() for r in records], indent=2)


def _csv_row(record: GradeRecord) -> dict:
    probs = record.probabilities or [None] * 5
    nearest = record.neighbors[0] if record.neighbors else {}
    reasons = (record.quality or {}).get("reasons", [])
    dicom = record.dicom or {}
    return {**{column: dicom.get(column) for column in _DICOM_COLUMNS}, "file": record.file, "screening": record.screening, "gradable": record.gradable, "grade": record.grade,
            "grade_name": record.grade_name, "referable": record.referable,
            "referable_probability": record.referable_probability,
            **{f"p{g}": probs[g] for g in range(5)}, "quality_reasons": ";".join(reasons),
            "nearest_case": nearest.get("case_id"), "nearest_grade": nearest.get("grade"), "error": record.error}


def write_csv(path: str | os.PathLike, records: Sequence[GradeRecord]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for record in records:
        writer.writerow(_csv_row(record))
    write_text_atomic(path, buffer.getvalue())


def summary_cells(record: dict) -> tuple[str, str, str]:
    """A record for people, as (result, what, P(referable)): the one rendering behind `grade`'s table and
    `watch`'s line per photograph. A record that was graded but whose pictures failed keeps its result,
    with the failure beside it."""
    error = record.get("error")
    if error and record.get("screening") is None:
        return "error", str(error), ""
    note = f" ({error})" if error else ""
    if record.get("gradable") is False:
        return "ungradable", ", ".join((record.get("quality") or {}).get("reasons", [])) + note, ""
    return (str(record["screening"]), f"{record['grade']} {record['grade_name']}{note}",
            f"{record['referable_probability']:.3f}")


def format_table(records: Sequence[GradeRecord]) -> str:
    """The grade table: file, result, grade, P(referable)."""
    rows = [(display_name(r), *summary_cells(r.to_dict())) for r in records]
    return "\n".join(table_lines(rows, ("left", "left", "left", "right"), ("file", "result", "grade", "P(referable)")))


def display_name(record: GradeRecord) -> str:
    """The file's name for people; a frame of a multi-frame DICOM says which (`scan.dcm [2/3]`)."""
    return os.path.basename(record.file) + _frame_note(record.dicom)


def _frame_note(dicom: dict | None) -> str:
    dicom = dicom or {}
    return f" [{dicom['frame']}/{dicom['frames']}]" if (dicom.get("frames") or 1) > 1 else ""


def one_line(source: str, record: dict) -> str:
    source += _frame_note(record.get("dicom"))
    result, what, referable = summary_cells(record)
    return f"{source}: {result}" + (f" {what}" if what else "") + (f" P(referable)={referable}" if referable else "")
