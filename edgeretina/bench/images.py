"""The photographs a benchmark grades: a folder's (with its subfolders), a labels.csv's, or phantoms."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgeretina.dataset import read_labels
from edgeretina.errors import ConfigError, EdgeRetinaError
from edgeretina.preprocess import list_images


def resolve_images(images: Path | None, scratch: Path, count: int, size: int) -> list[Path]:
    """A folder's images (subfolders included, like export's reference set), a labels.csv's images, or
    `count` phantom photographs rendered once into scratch. Raises ConfigError when there are none."""
    if images is None:
        return render_phantom_images(scratch, count, size)
    images = Path(images)
    if images.is_dir():
        found = list_images(images)
    elif images.suffix.lower() == ".csv":
        found = [item.path for item in read_labels(images)]
    else:
        raise ConfigError(f"--images must be a folder of images or a labels.csv, got {images}")
    if not found:
        raise ConfigError(f"no images in {images}")
    return found


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
