"""Grading records as JSON, CSV and a terminal table; files are written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Sequence

from edgeretina.atomic import write_text_atomic
from edgeretina.runtime.grader import GradeRecord

CSV_COLUMNS = ("file", "screening", "gradable", "grade", "grade_name", "referable", "referable_probability",
               "p0", "p1", "p2", "p3", "p4", "quality_reasons", "nearest_case", "nearest_grade", "error")


def records_json(records: Sequence[GradeRecord]) -> str:
    return json.dumps([r.to_dict() for r in records], indent=2)


def _csv_row(record: GradeRecord) -> dict:
    probs = record.probabilities or [None] * 5
    nearest = record.neighbors[0] if record.neighbors else {}
    reasons = (record.quality or {}).get("reasons", [])
    return {"file": record.file, "screening": record.screening, "gradable": record.gradable, "grade": record.grade,
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


def format_table(records: Sequence[GradeRecord]) -> str:
    lines = [f"{'file':<40} {'result':<11} {'grade':<33} {'P(referable)':>12}"]
    for r in records:
        name = os.path.basename(r.file)[:40]
        if r.error:
            lines.append(f"{name:<40} {'error':<11} {r.error}")
        elif not r.gradable:
            reasons = ", ".join((r.quality or {}).get("reasons", []))
            lines.append(f"{name:<40} {'ungradable':<11} {reasons}")
        else:
            grade = f"{r.grade} {r.grade_name}"
            lines.append(f"{name:<40} {r.screening:<11} {grade:<33} {r.referable_probability:>12.3f}")
    return "\n".join(lines)
