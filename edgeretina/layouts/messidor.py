"""Messidor-2 with the adjudicated grades of Krause et al. 2018 (``messidor2``)::

    <PATH>/messidor_data.csv      image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable
    <PATH>/IMAGES/<image_id>      20051020_43808_0100_PP.tif ..., IM002385.JPG ...

The Messidor-2 release ships IMAGES/ (.tif and .JPG); Kaggle mirrors re-encode them (.png under
messidor-2/preprocess/) and some rename the columns id_code,diagnosis: both spellings are read, and an id
matches its file by name or by stem. Rows with adjudicated_gradable 0 carry no grade: they are excluded
and counted. extra["adjudicated_dme"] keeps the macular-oedema grade. PATH is the folder or the csv.
Patients are unknown (the exam pairing lives in a separate spreadsheet).
"""

from __future__ import annotations

from pathlib import Path

from edgeretina.dataset import LabeledImage
from edgeretina.layouts.common import ImageFinder, ReadResult, labeled_rows, labels_file, read_columns

COLUMNS = (("image_id", "id_code"), ("adjudicated_dr_grade", "diagnosis"), "adjudicated_gradable")
IMAGE_FOLDERS = ("IMAGES", "images", "messidor-2/preprocess", "preprocess", "messidor-2", ".")


def read_messidor2(path: Path, *, check_files: bool = True) -> ReadResult:
    csv_path = labels_file(path, ["messidor_data.csv", "messidor-2.csv"], "Messidor-2",
                           "messidor_data.csv (image_id,adjudicated_dr_grade,adjudicated_dme,"
                           "adjudicated_gradable) and IMAGES/")
    table, columns = read_columns(csv_path, COLUMNS, "Messidor-2 (Krause et al.)")
    dme = table.column("adjudicated_dme")
    finder = ImageFinder([csv_path.parent / f for f in IMAGE_FOLDERS], ".png", check_files)
    result = ReadResult()
    for row, grade, name, image in labeled_rows(result, table, columns["image_id"], columns["adjudicated_dr_grade"],
                                                finder, layout="Messidor-2",
                                                excluded=lambda row: _ungradable(row[columns["adjudicated_gradable"]])):
        extra = {"adjudicated_dme": row[dme]} if dme else {}
        result.items.append(LabeledImage(path=image, case_id=Path(name).stem, grade=grade, extra=extra,
                                         source="messidor2"))
    return result


def _ungradable(gradable: str) -> str | None:
    """Adjudicated ungradable photographs carry no grade: excluded, with this reason."""
    return "ungradable (Messidor-2 adjudicated_gradable 0)" if gradable in ("0", "0.0") else None
