"""edgeretina's own labels.csv, as a layout: ``phantom`` and ``csv``.

``phantom``: a folder written by ``edgeretina.phantom.generate_dataset``::

    <PATH>/labels.csv     path,case_id,grade,dme,source,seed,n_MA,n_HE,n_EX,n_CWS,n_NV,n_PRH
    <PATH>/images/<case_id>.jpg, masks/<CODE>/<case_id>.png

source "phantom"; extra keeps dme, seed and the n_* lesion counts. Each case is its own group.

``csv``: any labels CSV in edgeretina's format (``edgeretina.dataset``)::

    path,grade[,case_id][,frame][,patient][,source][,...]     paths relative to the CSV

PATH is the CSV (or a folder holding labels.csv). Rows without a source get "csv". Other columns go to
extra. A bad row (grade, missing image, frame) is skipped with the reason, not raised.
"""

from __future__ import annotations

from pathlib import Path

from edgeretina.dataset import scan_labels
from edgeretina.layouts.common import ReadResult, labels_file, read_table, require_columns

COLUMNS = ("path", "grade")


def read_phantom(path: Path, *, check_files: bool = True) -> ReadResult:
    return _read(path, "phantom", "phantom dataset", check_files)


def read_csv_labels(path: Path, *, check_files: bool = True) -> ReadResult:
    return _read(path, "csv", "edgeretina labels", check_files)


def _read(path: Path, source: str, layout: str, check_files: bool) -> ReadResult:
    csv_path = labels_file(path, ["labels.csv"], layout, "labels.csv (path,grade[,patient][,source]) "
                           "with image paths relative to it")
    require_columns(read_table(csv_path), COLUMNS, layout)     # the message a wrong file deserves
    items, skipped = scan_labels(csv_path, check_files=check_files, default_source=source)
    return ReadResult(items, skipped)
