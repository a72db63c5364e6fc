"""The photographs a benchmark grades: a folder's (with its subfolders), a labels.csv's, or phantoms."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgeretina.dataset import read_labels
from edgeretina.errors import ConfigError, EdgeRetinaError
from edgeretina.preprocess import iter_sources, list_images

MAX_CHECK_SIDE = 512   # decode just enough to prove the file is whole (libjpeg's DCT scaling makes it cheap)


def resolve_images(images: Path | None, scratch: Path, count: int, size: int) -> list[Path]:
    """A folder's images (subfolders included, like export's reference set), a labels.csv's images, or
    `count` phantom photographs rendered once into scratch. Raises ConfigError when the path is missing,
    holds no images, or holds files that do not decode (DatasetError for a malformed labels.csv)."""
    if images is None:
        return render_phantom_images(scratch, count, size)
    images = Path(images)
    if not images.exists():
        raise ConfigError(f"--images not found: {images}")
    if images.is_dir():
        found = list_images(images)
    elif images.suffix.lower() == ".csv":
        found = [item.path for item in read_labels(images)]
    else:
        raise ConfigError(f"--images must be a folder of images or a labels.csv, got {images}")
    if not found:
        raise ConfigError(f"no images in {images}")
    _refuse_undecodable(found)
    return found


def _refuse_undecodable(paths: list[Path]) -> None:
    """A file that does not decode would be timed as its error record (a decode attempt, no model) and
    pull the latencies down while the row still says it graded that many images; it is refused instead.
    One decode per image (each frame of a DICOM): less than the fidelity pass, which grades every image
    once per configuration."""
    bad = []
    for source in iter_sources(paths):
        try:
            source.decode(MAX_CHECK_SIDE)
        except EdgeRetinaError as exc:
            bad.append(str(exc))
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ConfigError(f"--images: {len(bad)} of {len(paths)} file(s) do not decode: {shown}")


def render_phantom_images(folder: Path, count: int, size: int) -> list[Path]:
    from edgeretina.phantom import PhantomConfig, render_case

    config = PhantomConfig(size=size)
    paths = []
    for seed in range(count):
        path = folder / f"phantom_{seed:03d}.jpg"
        case = render_case(seed, config)
        if not cv2.imwrite(str(path), np.ascontiguousarray(case.image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise EdgeRetinaError(f"could not write {path}")
        paths.append(path)
    return paths
