"""One Parquet row per graded image: the grade record flattened into columns a query engine reads directly.

Lists stay lists (probabilities, quality reasons, neighbour ids); what would need a nested schema of its own
(lesion findings) is one JSON string. The key columns (file, bytes, mtime_ns) and bundle_sha256 say which file
version was graded with which bundle: what a rerun reads to skip the work already done.
"""

from __future__ import annotations

import json
from functools import lru_cache

TIMINGS = ("decode", "quality", "preprocess", "inference", "postprocess", "knn")
DICOM_FIELDS = ("laterality", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid")
KEY_COLUMNS = ("file", "bytes", "mtime_ns")


@lru_cache(maxsize=1)
def row_schema():
    """The Parquet schema of results and parts (pyarrow imported here: the [scale] extra)."""
    import pyarrow as pa

    return pa.schema([
        ("file", pa.string()),                      # absolute path or URI, as listed
        ("frame", pa.int32()),                      # DICOM frame (1-based); null for photographs
        ("frames", pa.int32()),                     # frames in the DICOM file
        ("bytes", pa.int64()),                      # the file's size and mtime when the run listed it (-1: missing)
        ("mtime_ns", pa.int64()),
        ("gradable", pa.bool_()),
        ("screening", pa.string()),                 # negative | referable | ungradable; null on error
        ("grade", pa.int8()),
        ("grade_name", pa.string()),
        ("probabilities", pa.list_(pa.float64())),  # 5, ICDR 0..4
        ("referable_probability", pa.float64()),
        ("referable", pa.bool_()),
        ("quality_score", pa.float64()),
        ("quality_reasons", pa.list_(pa.string())),
        ("knn_grade", pa.int8()),
        ("neighbor_ids", pa.list_(pa.string())),
        ("neighbor_grades", pa.list_(pa.int8())),
        ("neighbor_similarities", pa.list_(pa.float64())),
        ("lesions", pa.string()),                   # JSON (lesion-head bundles), else null
        *[(name, pa.string()) for name in DICOM_FIELDS],
        *[(f"{name}_ms", pa.float64()) for name in TIMINGS],
        ("read_ms", pa.float64()),                  # fetching a remote file onto the worker; null for local files
        ("error", pa.string()),
        ("bundle_sha256", pa.string()),             # sha256 of the bundle's manifest.json (which hashes every artifact)
        ("node", pa.string()),                      # the machine that graded it
        ("cpu_class", pa.string()),                 # that machine's CPU class (edgeretina.cpu), where the bundle was verified
    ])


def record_row(record: dict, item: dict, worker: dict) -> dict:
    """A row from a GradeRecord's dict, the file's key (``item``) and the worker's identity
    (``worker``: bundle_sha256, node, cpu_class)."""
    dicom = record.get("dicom") or {}
    quality = record.get("quality") or {}
    neighbors = record.get("neighbors") or []
    timings = record.get("timings_ms") or {}
    row = {
        "file": item["file"], "bytes": item["bytes"], "mtime_ns": item["mtime_ns"],
        "frame": dicom.get("frame"), "frames": dicom.get("frames"),
        "gradable": record.get("gradable"), "screening": record.get("screening"),
        "grade": record.get("grade"), "grade_name": record.get("grade_name"),
        "probabilities": record.get("probabilities"),
        "referable_probability": record.get("referable_probability"), "referable": record.get("referable"),
        "quality_score": quality.get("score"), "quality_reasons": quality.get("reasons") if quality else None,
        "knn_grade": record.get("knn_grade"),
        "neighbor_ids": [str(n["case_id"]) for n in neighbors],
        "neighbor_grades": [int(n["grade"]) for n in neighbors],
        "neighbor_similarities": [float(n["similarity"]) for n in neighbors],
        "lesions": json.dumps(record["lesions"]) if record.get("lesions") is not None else None,
        **{name: dicom.get(name) for name in DICOM_FIELDS},
        **{f"{name}_ms": timings.get(name) for name in TIMINGS},
        "read_ms": timings.get("read"),
        "error": record.get("error"),
    }
    row.update(worker)
    return row


def error_row(item: dict, error: str, worker: dict) -> dict:
    """The row of a file that produced no record at all (what the grader raised, caught by the worker)."""
    return record_row({"error": error}, item, worker)


def rows_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=row_schema())
