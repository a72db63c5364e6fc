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
from edgeretina.layouts.common import (ImageFinder, ReadResult, find_or_skip, grade_or_skip, labels_file,
                                       read_table, require_columns)

COLUMNS = (("image_id", "id_code"), ("adjudicated_dr_grade", "diagnosis"), "adjudicated_gradable")
IMAGE_FOLDERS = ("IMAGES", "images", "messidor-2/preprocess", "preprocess", "messidor-2", ".")


def read_messidor2(path: Path, *, check_files: bool = True) -> ReadResult:
    csv_path = labels_file(path, ["messidor_data.csv", "messidor-2.csv"], "Messidor-2",
                           "messidor_data.csv (image_id,adjudicated_dr_grade,adjudicated_dme,"
                           "adjudicated_gradable) and IMAGES/")
    table = read_table(csv_path)
    columns = require_columns(table, COLUMNS, "Messidor-2 (Krause et al.)")
    dme = table.column("adjudicated_dme")
    finder = ImageFinder([csv_path.parent / f for f in IMAGE_FOLDERS], ".png", check_files)
    result = ReadResult()
    for line, row in table.rows:
        where = f"{csv_path}:{line}"
        gradable = row[columns["adjudicated_gradable"]]
        if gradable in ("0", "0.0"):
            result.skip(where, "ungradable (Messidor-2 adjudicated_gradable 0)")
            continue
        grade = grade_or_skip(result, where, row[columns["adjudicated_dr_grade"]],
                              layout="Messidor-2")
        name = row[columns["image_id"]]
        if grade is None:
            continue
        if not name:
            result.skip(where, "no image name")
            continue
        image = find_or_skip(result, finder, name, where)
        if image is not None:
            extra = {"adjudicated_dme": row[dme]} if dme else {}
            result.items.append(LabeledImage(path=image, case_id=Path(name).stem, grade=grade, extra=extra,
                                             source="messidor2"))
    return result
