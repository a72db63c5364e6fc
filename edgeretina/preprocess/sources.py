"""What is graded, in input order: each photograph file is one image, each frame of a DICOM file is one.

``iter_sources`` turns paths (or ``ImageRef``s naming one frame) into ``ImageSource``s, one per image to
grade, decoded on demand. A DICOM file is parsed once for all of its frames, and decoded one frame at a
time, so a long multi-frame file never sits in memory as pixels. A file that cannot be opened is still
one source: decoding it raises the error, so it gets its error record in its place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from edgeretina.errors import EdgeRetinaError
from edgeretina.preprocess.decode import MAX_PIXELS, _read_source, decode_image
from edgeretina.preprocess.dicom import DicomImage, is_dicom_file, open_dicom


@dataclass(frozen=True)
class ImageRef:
    """One image: a photograph file, or frame ``frame`` (1-based, as DICOM counts) of a DICOM file.
    A DICOM path without a frame stands for every frame of the file."""

    path: str
    frame: int | None = None


class ImageSource:
    """One image of the input. ``ref`` names it (a DICOM frame always has its number); ``dicom`` is what
    its record says about the DICOM it comes from (frame, laterality, UIDs), None for photographs."""

    def __init__(self, ref: ImageRef, image: DicomImage | None = None, error: EdgeRetinaError | None = None):
        self.ref = ref
        self._image = image
        self._error = error

    @property
    def dicom(self) -> dict | None:
        if self._image is not None:
            return self._image.record(self.ref.frame)
        return getattr(self._error, "dicom", None)

    @property
    def label(self) -> str:
        """A name unique within the input: the path, with ``#frame=N`` for a frame of a multi-frame file."""
        multi = self._image.frames > 1 if self._image is not None else self.ref.frame is not None
        return f"{self.ref.path}#frame={self.ref.frame}" if multi and self.ref.frame is not None else self.ref.path

    def decode(self, max_side: int = 0) -> np.ndarray:
        """RGB uint8 (H, W, 3); raises ImageDecodeError (DicomError for DICOM) or MissingDependencyError."""
        if self._error is not None:
            raise self._error
        if self._image is not None:
            return self._image.decode_frame(self.ref.frame, max_side)
        return decode_image(self.ref.path, max_side, frame=self.ref.frame)


def iter_sources(items: Iterable[str | os.PathLike | ImageRef]) -> Iterator[ImageSource]:
    """One source per image, in input order; a DICOM file's frames in their order."""
    for item in items:
        ref = item if isinstance(item, ImageRef) else ImageRef(os.fspath(item))
        if not is_dicom_file(ref.path):
            yield ImageSource(ref)
            continue
        try:
            data, where = _read_source(ref.path)
            image = open_dicom(data, where, MAX_PIXELS)
        except EdgeRetinaError as exc:
            yield ImageSource(ref, error=exc)
            continue
        del data   # the dataset holds what it needs
        for frame in (range(1, image.frames + 1) if ref.frame is None else [ref.frame]):
            yield ImageSource(ImageRef(ref.path, frame), image=image)


def expand_frames(items: Iterable[str | os.PathLike | ImageRef]) -> list[ImageRef]:
    """The images among ``items``: photographs as they are, DICOM files as one ref per frame."""
    return [source.ref for source in iter_sources(items)]
