"""The two Kaggle competitions: APTOS 2019 Blindness Detection and EyePACS Diabetic Retinopathy Detection.

APTOS 2019 (``aptos``)::

    <PATH>/train.csv              id_code,diagnosis          (diagnosis: ICDR grade 0..4)
    <PATH>/train_images/<id_code>.png

PATH is the folder or a csv in it; a csv ``<name>.csv`` looks for its images in ``<name>_images/``, then
``train_images/``, ``images/`` and beside the csv (re-splits ship ``valid.csv`` + ``val_images/``). The
3,662 photographs come from many clinics with no patient id: each image is its own group in a split.

EyePACS (``eyepacs``)::

    <PATH>/trainLabels.csv        image,level                (level: ICDR grade 0..4)
    <PATH>/train/<image>.jpeg     e.g. 10_left.jpeg, 10_right.jpeg

PATH is the folder or a csv (``retinopathy_solution.csv``, the test labels with a Usage column, looks in
``test/``); images may also lie beside the csv. ``<n>_left`` / ``<n>_right`` are the two eyes of patient
``n``: item.patient = "n", extra["eye"] = left | right, so a split keeps both eyes on one side.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeretina.dataset import LabeledImage
from edgeretina.layouts.common import ImageFinder, ReadResult, labeled_rows, labels_file, read_columns

APTOS_COLUMNS = ("id_code", "diagnosis")
EYEPACS_COLUMNS = ("image", "level")
_EYEPACS_EYE = re.compile(r"^(?P<patient>.+)_(?P<eye>left|right)$", re.IGNORECASE)


def read_aptos(path: Path, *, check_files: bool = True) -> ReadResult:
    csv_path = labels_file(path, ["train.csv"], "APTOS 2019", "train.csv (id_code,diagnosis) and train_images/")
    table, columns = read_columns(csv_path, APTOS_COLUMNS, "APTOS 2019")
    names = [f"{csv_path.stem}_images", "val_images" if csv_path.stem.startswith("val") else None,
             "train_images", "images", "."]
    finder = ImageFinder([csv_path.parent / n for n in names if n], ".png", check_files)
    result = ReadResult()
    for _, grade, image_id, image in labeled_rows(result, table, columns["id_code"], columns["diagnosis"], finder,
                                                  layout="APTOS"):
        result.items.append(LabeledImage(path=image, case_id=Path(image_id).stem, grade=grade, source="aptos"))
    return result


def read_eyepacs(path: Path, *, check_files: bool = True) -> ReadResult:
    csv_path = labels_file(path, ["trainLabels.csv"], "EyePACS", "trainLabels.csv (image,level) and train/")
    table, columns = read_columns(csv_path, EYEPACS_COLUMNS, "EyePACS")
    folder = csv_path.parent
    first = "train" if csv_path.stem.lower().startswith("train") else "test"
    finder = ImageFinder([folder / first, folder / ("test" if first == "train" else "train"), folder],
                         ".jpeg", check_files)
    usage = table.column("Usage")
    result = ReadResult()
    for row, grade, image_id, image in labeled_rows(result, table, columns["image"], columns["level"], finder,
                                                    layout="EyePACS"):
        stem = Path(image_id).stem if Path(image_id).suffix.lower() in (".jpeg", ".jpg", ".png") else image_id
        eye = _EYEPACS_EYE.match(stem)
        extra = {"eye": eye["eye"].lower()} if eye else {}
        if usage and row[usage]:
            extra["usage"] = row[usage]
        result.items.append(LabeledImage(path=image, case_id=stem, grade=grade, extra=extra,
                                         patient=eye["patient"] if eye else None, source="eyepacs"))
    return result
