"""list_images: the one rule for which files of a folder are images, shared by export's reference
set, the benchmark and anything else that takes "a folder of photos"."""

from __future__ import annotations

import os
from pathlib import Path

from edgeretina.dataset import IMAGE_SUFFIXES
from edgeretina.errors import DatasetError


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files in ``folder`` (and in its subfolders when ``recursive``), chosen by suffix
    (``IMAGE_SUFFIXES``, any case) and sorted by their path inside ``folder``, so the order is the
    same on every run and every Python version. Raises ``DatasetError`` if ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    entries = root.rglob("*") if recursive else root.iterdir()
    images = (p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(images, key=lambda p: p.relative_to(root).parts)
