"""DDR (Li et al. 2019, nkicsl/DDR-dataset), its DR grading part (``ddr``)::

    DR_grading/train.txt          one "<file> <grade>" per line: 007-0004-000.jpg 2
    DR_grading/train/<file>
    DR_grading/valid.txt, valid/, test.txt, test/

Grades 0..4 are ICDR; grade 5 marks an ungradable photograph: it is excluded and counted in the summary.
PATH is the DR_grading folder (every list present is read), the DDR-dataset folder above it, or one .txt
file (images in the folder named after it). extra["split"] keeps the official split; patients are unknown.
"""

from __future__ import annotations

from pathlib import Path

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError
from edgeretina.layouts.common import ImageFinder, ReadResult, find_or_skip, grade_or_skip

SPLITS = ("train", "valid", "test")
UNGRADABLE = 5


def read_ddr(path: Path, *, check_files: bool = True) -> ReadResult:
    result = ReadResult()
    for list_path in _lists(path):
        result.extend(_read_list(list_path, check_files))
    return result


def _lists(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    folder = path / "DR_grading" if (path / "DR_grading").is_dir() else path
    lists = [folder / f"{split}.txt" for split in SPLITS if (folder / f"{split}.txt").is_file()]
    if not lists:
        raise DatasetError(f"{path}: no DDR grading list (train.txt, valid.txt or test.txt) in this folder; "
                           "expected DR_grading/{train,valid,test}.txt with lines '<file> <grade>' and images "
                           "in DR_grading/{train,valid,test}/")
    return lists


def _read_list(list_path: Path, check_files: bool) -> ReadResult:
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{list_path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"{list_path}: cannot read ({exc.strerror or exc})") from None
    finder = ImageFinder([list_path.parent / list_path.stem, list_path.parent], ".jpg", check_files)
    result = ReadResult()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{list_path}:{number}"
        fields = text.split()
        if len(fields) != 2:
            result.skip(where, "malformed line", f"expected '<file> <grade>', got {text.strip()!r}")
            continue
        name, grade_text = fields
        grade = grade_or_skip(result, where, grade_text, layout="DDR", ungradable=UNGRADABLE)
        if grade is None:
            continue
        image = find_or_skip(result, finder, name, where)
        if image is not None:
            result.items.append(LabeledImage(path=image, case_id=Path(name).stem, grade=grade,
                                             extra={"split": list_path.stem}, source="ddr"))
    return result
