"""DeepDRiD (Liu et al. 2022, ISBI 2020 challenge), its regular fundus photographs (``deepdrid``)::

    regular_fundus_images/regular-fundus-training/regular-fundus-training.csv
        patient_id,image_id,image_path,Overall quality,left_eye_DR_Level,right_eye_DR_Level,
        patient_DR_Level,Clarity,Field definition,Artifact
    regular_fundus_images/regular-fundus-training/Images/<patient_id>/<image_id>.jpg     (1/1_l1.jpg)
    regular_fundus_images/regular-fundus-training/regular-fundus-source-training.csv
        patient_id,image_id,image_path,Source           (Nicheng | Shanghai | Nation)
    regular_fundus_images/regular-fundus-validation/...  (the same, for the validation fold)

Each patient has two photographs per eye; image_id ``<patient>_<l|r><n>`` names the eye, and the grade
is that eye's column (left_eye_DR_Level for ``_l``). A row whose own eye's column is empty is skipped
(the release has a few rows whose grade sits in the other eye's column: which eye is meant is unknown).
Grade 5 (ungradable) is excluded and counted. item.patient = patient_id; extra: eye, split (training |
validation), the quality columns, patient_dr_level, and site from the source CSV when present.
PATH is regular_fundus_images/ (or the DeepDRiD folder above it), one fold's folder, or one labels CSV.
Ultra-widefield photographs are a different modality and are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError
from edgeretina.layouts.common import (IMAGE_NOT_FOUND, ImageFinder, ReadResult, Table, grade_or_skip, read_columns,
                                       read_each, read_table)

EYE_COLUMNS = {"l": "left_eye_DR_Level", "r": "right_eye_DR_Level"}
COLUMNS = ("patient_id", "image_id", *EYE_COLUMNS.values())
QUALITY_COLUMNS = {"Overall quality": "overall_quality", "Clarity": "clarity", "Field definition": "field_definition",
                   "Artifact": "artifact", "patient_DR_Level": "patient_dr_level"}
UNGRADABLE = 5
_EYE = re.compile(r"_(?P<eye>[lr])\d*$", re.IGNORECASE)


def read_deepdrid(path: Path, *, check_files: bool = True) -> ReadResult:
    return read_each(_label_files(path), _read_csv, check_files)


def _label_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    root = path / "regular_fundus_images" if (path / "regular_fundus_images").is_dir() else path
    candidates = sorted(root.glob("*.csv")) + sorted(root.glob("*/*.csv"))
    found = [p for p in candidates if read_table(p).has(*COLUMNS)]
    if not found:
        raise DatasetError(f"{path}: no DeepDRiD labels CSV (columns {', '.join(COLUMNS)}) here or one folder "
                           "down; expected regular-fundus-training/regular-fundus-training.csv and "
                           "regular-fundus-training/Images/<patient_id>/<image_id>.jpg")
    return found


def _sites(csv_path: Path) -> dict[str, str]:
    """image_id -> Source from the fold's regular-fundus-source-*.csv, when it is there."""
    sites: dict[str, str] = {}
    for path in sorted(csv_path.parent.glob("*source*.csv")):
        table = read_table(path)
        image_id, source = table.column("image_id"), table.column("Source")
        if image_id and source:
            sites.update((row[image_id], row[source]) for _, row in table.rows)
    return sites


def _read_csv(csv_path: Path, check_files: bool) -> ReadResult:
    table, columns = read_columns(csv_path, COLUMNS, "DeepDRiD regular fundus")
    split = "validation" if "validation" in csv_path.stem.lower() else "training"
    sites = _sites(csv_path)
    images = csv_path.parent / "Images"
    finders: dict[str, ImageFinder] = {}            # Images/<patient_id>/, listed once per patient
    flat = ImageFinder([images, csv_path.parent], ".jpg", check_files)   # mirrors that drop the patient folders
    result = ReadResult()
    for line, row in table.rows:
        where = f"{csv_path}:{line}"
        patient, image_id = row[columns["patient_id"]], row[columns["image_id"]]
        eye = _EYE.search(image_id)
        if not patient or eye is None:
            result.skip(where, "no patient or eye", f"patient_id {patient!r}, image_id {image_id!r} "
                        "(expected <patient>_<l|r><n>)")
            continue
        eye_column = columns[EYE_COLUMNS[eye["eye"].lower()]]
        if not row[eye_column]:
            result.skip(where, "no grade for this eye", f"{image_id}: {eye_column} is empty")
            continue
        grade = grade_or_skip(result, where, row[eye_column], layout="DeepDRiD", ungradable=UNGRADABLE)
        if grade is None:
            continue
        if patient not in finders:
            finders[patient] = ImageFinder([images / patient, csv_path.parent / patient], ".jpg", check_files)
        image = finders[patient].find(image_id) or (flat.find(image_id) if check_files else None)
        if image is None:
            result.skip(where, IMAGE_NOT_FOUND, str(finders[patient].expected(image_id)))
        else:
            result.items.append(LabeledImage(path=image, case_id=image_id, grade=grade,
                                             extra=_extra(table, row, eye["eye"], split, sites.get(image_id)),
                                             patient=patient, source="deepdrid"))
    return result


def _extra(table: Table, row: dict[str, str], eye: str, split: str, site: str | None) -> dict[str, str]:
    extra = {"eye": "left" if eye.lower() == "l" else "right", "split": split}
    for column, key in QUALITY_COLUMNS.items():
        name = table.column(column)
        if name and row[name]:
            extra[key] = row[name]
    if site:
        extra["site"] = site
    return extra
