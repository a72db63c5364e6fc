"""Public dataset layouts as training data: ``--data FORMAT:PATH``, repeatable to merge corpora.

    from edgeretina.layouts import load_data, split_items
    data = load_data(["aptos:/data/aptos2019", "eyepacs:/data/eyepacs", "ddr:/data/DDR-dataset/DR_grading"])
    print("\\n".join(data.summary.lines()))
    train, val = split_items(data.items, val_fraction=0.1, seed=0)

Formats and what each expects on disk (the reader modules say more, with the real file names):

``aptos``      APTOS 2019 Kaggle: train.csv (id_code,diagnosis) + train_images/<id_code>.png. No patients.
``eyepacs``    Kaggle DR detection: trainLabels.csv (image,level) + train/<image>.jpeg; 10_left/10_right are
               the eyes of patient "10".
``ddr``        DDR DR_grading/{train,valid,test}.txt ("<file> <grade>") + {train,valid,test}/; grade 5
               (ungradable) is excluded and counted. PATH: the DR_grading folder or one .txt.
``idrid``      IDRiD "B. Disease Grading": 2. Groundtruths/*.csv (Image name, Retinopathy grade, Risk of
               macular edema) + 1. Original Images/{a. Training Set,b. Testing Set}/<name>.jpg;
               extra["dme_risk"].
``messidor2``  Messidor-2 with Krause et al.'s grades: messidor_data.csv (image_id, adjudicated_dr_grade,
               adjudicated_dme, adjudicated_gradable) + IMAGES/; ungradable rows excluded and counted.
``deepdrid``   DeepDRiD regular fundus: regular-fundus-*.csv (patient_id, image_id, left_eye_DR_Level,
               right_eye_DR_Level, ...) + Images/<patient_id>/<image_id>.jpg; the grade is the eye's own.
``phantom``    a folder written by edgeretina.phantom.generate_dataset (labels.csv).
``dicom``      a folder of DICOM files (recursive) + grades.csv (sop_instance_uid,grade[,frame][,patient]).
``csv``        edgeretina's labels CSV: path,grade[,patient][,source], paths relative to the CSV.

Every item gets ``source`` (the format, the csv's source column, or the DICOM manufacturer and model)
and ``patient`` when the layout knows it; ``extra`` keeps layout-specific labels. A bad entry (a grade
that is not 0..4, a missing image, an ungradable photograph, an image already loaded by an earlier
spec) is skipped and counted with its reason, never raised; a missing or unreadable labels file, or one
without the layout's columns, is a DatasetError naming the file and the columns expected.
Images are matched by name or stem, case-insensitively (ids with or without .png/.jpeg/.jpg, re-encoded
Kaggle mirrors), so the lists may name .jpeg where the folder holds .png.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeretina.dataset import LabeledImage, Skipped
from edgeretina.errors import ConfigError, DatasetError
from edgeretina.layouts.common import ReadResult
from edgeretina.layouts.ddr import read_ddr
from edgeretina.layouts.deepdrid import read_deepdrid
from edgeretina.layouts.dicom import read_dicom
from edgeretina.layouts.idrid import read_idrid
from edgeretina.layouts.kaggle import read_aptos, read_eyepacs
from edgeretina.layouts.labels import read_csv_labels, read_phantom
from edgeretina.layouts.messidor import read_messidor2
from edgeretina.layouts.split import split_items
from edgeretina.layouts.summary import LoadSummary, SpecSummary

Reader = Callable[..., ReadResult]

READERS: dict[str, Reader] = {
    "aptos": read_aptos, "eyepacs": read_eyepacs, "ddr": read_ddr, "idrid": read_idrid,
    "messidor2": read_messidor2, "deepdrid": read_deepdrid, "phantom": read_phantom, "dicom": read_dicom,
    "csv": read_csv_labels,
}
FORMATS: tuple[str, ...] = tuple(READERS)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
DUPLICATE = "duplicate image"


@dataclass(frozen=True)
class DataSpec:
    """One ``--data FORMAT:PATH``."""

    format: str
    path: Path

    def __str__(self) -> str:
        return f"{self.format}:{self.path}"


@dataclass
class LoadedData:
    """The merged items of every spec, in spec order, and what the load did."""

    items: list[LabeledImage]
    summary: LoadSummary


def parse_data_spec(text: str) -> DataSpec:
    """"aptos:/data/aptos" -> DataSpec("aptos", Path("/data/aptos")). The format is case-insensitive and
    may be written with a dash ("messidor-2"); the path may hold colons ("aptos:C:\\data").

    Raises ConfigError naming the formats for a missing or unknown format or an empty path; a bare
    Windows path ("C:\\data") is reported as a missing format, not as format "c"."""
    text = str(text).strip()
    hint = f"write FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}"
    if text.lower() in READERS:
        raise ConfigError(f"--data {text!r}: no path after the format; write {text}:PATH")
    if _WINDOWS_DRIVE.match(text) or ":" not in text:
        raise ConfigError(f"--data {text!r}: no format given; {hint} (e.g. aptos:{text or '/data/aptos2019'})")
    name, path = text.split(":", 1)
    format = name.strip().lower().replace("-", "").replace("_", "")
    if format not in READERS:
        close = difflib.get_close_matches(format, FORMATS, n=1)
        suggestion = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--data {text!r}: unknown format {name!r}{suggestion}; {hint}")
    if not path.strip():
        raise ConfigError(f"--data {text!r}: no path after '{name}:'; {hint}")
    return DataSpec(format, Path(path.strip()).expanduser())


def load_data(specs: Sequence[str | DataSpec], *, check_files: bool = True, allow_empty: bool = False) -> LoadedData:
    """Read every spec with its layout's reader and merge them, in order.

    An image (path and frame) already loaded by an earlier spec, or listed twice, is skipped as a
    duplicate. check_files=False trusts the labels (no folder listing, no existence checks; DICOM headers
    are read anyway, the UIDs are in them).
    Raises ConfigError for a bad spec or none; DatasetError for a PATH that does not exist, a labels file
    that is missing, unreadable or lacks its columns, and (unless allow_empty) a spec that loads no image,
    with the summary lines saying why."""
    parsed = [spec if isinstance(spec, DataSpec) else parse_data_spec(spec) for spec in specs]
    if not parsed:
        raise ConfigError(f"no dataset given: pass --data FORMAT:PATH (formats: {', '.join(FORMATS)})")
    items: list[LabeledImage] = []
    summary = LoadSummary()
    first_spec: dict[tuple[Path, int | None], str] = {}
    for spec in parsed:
        if spec.format not in READERS:
            raise ConfigError(f"--data {spec}: unknown format {spec.format!r}; formats: {', '.join(FORMATS)}")
        if not spec.path.exists():
            raise DatasetError(f"--data {spec}: {spec.path} does not exist")
        result = READERS[spec.format](spec.path, check_files=check_files)
        kept = _without_duplicates(result, str(spec), first_spec)
        items.extend(kept)
        summary.specs.append(SpecSummary.of(str(spec), spec.format, kept, result.skipped))
    empty = [s for s in summary.specs if s.loaded == 0]
    if empty and not allow_empty:
        names = ", ".join(s.spec for s in empty)
        raise DatasetError(f"no images loaded from {names}:\n  " + "\n  ".join(summary.lines()))
    return LoadedData(items, summary)


def _without_duplicates(result: ReadResult, spec: str, first_spec: dict) -> list[LabeledImage]:
    kept = []
    for item in result.items:
        key = (item.path, item.frame)
        if key in first_spec:
            frame = f" frame {item.frame}" if item.frame else ""
            result.skipped.append(Skipped(str(item.path), DUPLICATE,
                                          f"{item.path}{frame} already loaded from {first_spec[key]}"))
            continue
        first_spec[key] = spec
        kept.append(item)
    return kept


__all__ = ["FORMATS", "READERS", "DataSpec", "LoadSummary", "LoadedData", "SpecSummary", "Skipped",
           "load_data", "parse_data_spec", "split_items"]
