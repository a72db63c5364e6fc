"""list_images: the one rule for which files of a folder are images, shared by `grade`, `watch`, export's
reference set, the benchmark and anything else that takes "a folder of photos"."""

from __future__ import annotations

import os
from pathlib import Path

from edgeretina.dataset import IMAGE_SUFFIXES
from edgeretina.errors import DatasetError
from edgeretina.preprocess.dicom import DICOMDIR_NAME, is_dicom_file

# Names a writer uses while a file is still being copied (cameras, rsync, browsers, SMB/FTP clients). Such a
# file carries the DICOM marker from its first bytes, so without this rule a half-copied `scan.dcm.part`
# would be graded, and graded again once renamed.
PARTIAL_SUFFIXES = frozenset({".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".download"})


def is_image_file(path: str | os.PathLike) -> bool:
    """A photograph by its suffix (``IMAGE_SUFFIXES``, any case), or a DICOM file: ``.dcm``/``.dicom``, or any
    other name whose bytes carry the DICOM marker (cameras and archives often write none, or a UID as the
    name). A DICOMDIR (a medium's index) and a file still being written (``PARTIAL_SUFFIXES``, or a name
    ending in ``~``) are not images. Only regular files are looked into."""
    path = Path(path)
    if path.suffix.lower() in PARTIAL_SUFFIXES or path.name.endswith("~"):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return path.name.upper() != DICOMDIR_NAME and path.is_file() and is_dicom_file(path)


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files in ``folder`` (and in its subfolders when ``recursive``), chosen by ``is_image_file``
    and sorted by their path inside ``folder``, so the order is the same on every run and every Python
    version. Raises ``DatasetError`` if ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    entries = root.rglob("*") if recursive else root.iterdir()
    images = (p for p in entries if p.is_file() and is_image_file(p))
    return sorted(images, key=lambda p: p.relative_to(root).parts)
