"""IDRiD (Porwal et al. 2018), its "B. Disease Grading" part (``idrid``)::

    B. Disease Grading/1. Original Images/a. Training Set/IDRiD_001.jpg ... IDRiD_413.jpg
    B. Disease Grading/1. Original Images/b. Testing Set/IDRiD_001.jpg ... IDRiD_103.jpg
    B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
    B. Disease Grading/2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv

The label CSVs: "Image name,Retinopathy grade,Risk of macular edema " (the real header has the trailing
space, and the export trailing empty columns). The testing set reuses the training set's names, so each
CSV reads its own image folder (Training -> a. Training Set, Testing -> b. Testing Set) and the case id is
"train/IDRiD_001" or "test/IDRiD_001". extra: dme_risk (0..2), split. Patients are unknown.
PATH is the "B. Disease Grading" folder (or the IDRiD folder above it, or one of the CSVs).
"""

from __future__ import annotations

from pathlib import Path

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError
from edgeretina.layouts.common import ImageFinder, ReadResult, labeled_rows, read_columns, read_each

GRADING = "B. Disease Grading"
COLUMNS = ("Image name", "Retinopathy grade", "Risk of macular edema")
IMAGE_SETS = {"train": "a. Training Set", "test": "b. Testing Set"}


def read_idrid(path: Path, *, check_files: bool = True) -> ReadResult:
    return read_each(_label_files(path), _read_csv, check_files)


def _label_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    root = path / GRADING if (path / GRADING).is_dir() else path
    truths = root / "2. Groundtruths"
    found = sorted(truths.glob("*.csv")) if truths.is_dir() else sorted(root.glob("*Labels.csv"))
    if not found:
        raise DatasetError(f"{path}: no IDRiD grading labels; expected '{GRADING}/2. Groundtruths/"
                           f"a. IDRiD_Disease Grading_Training Labels.csv' (columns: {', '.join(COLUMNS)}) and "
                           f"images in '{GRADING}/1. Original Images/a. Training Set/'")
    return found


def _split_of(csv_path: Path) -> str:
    return "test" if "test" in csv_path.name.lower() else "train"


def _image_folders(csv_path: Path, split: str) -> list[Path]:
    root = csv_path.parent.parent if csv_path.parent.name == "2. Groundtruths" else csv_path.parent
    originals = root / "1. Original Images"
    return [originals / IMAGE_SETS[split], originals, csv_path.parent]


def _read_csv(csv_path: Path, check_files: bool) -> ReadResult:
    table, columns = read_columns(csv_path, COLUMNS, "IDRiD disease grading")
    split = _split_of(csv_path)
    finder = ImageFinder(_image_folders(csv_path, split), ".jpg", check_files)
    result = ReadResult()
    for row, grade, name, image in labeled_rows(result, table, columns["Image name"], columns["Retinopathy grade"],
                                                finder, layout="IDRiD"):
        extra = {"dme_risk": row[columns["Risk of macular edema"]], "split": split}
        result.items.append(LabeledImage(path=image, case_id=f"{split}/{Path(name).stem}", grade=grade,
                                         extra=extra, source="idrid"))
    return result
