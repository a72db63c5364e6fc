"""Training data: labels.csv -> images prepared once by the shared preprocessing -> augmented batches.

Images are decoded and prepared (FOV crop, resize) a single time into a uint8 array, so an epoch costs
only augmentation and the forward/backward pass; normalisation happens last, on the batch, with the
backbone's mean/std — the same `prepare` + `normalize` the runtime runs on the device.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError, EdgeRetinaError
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import PreprocessConfig, decode_image, grid_presence, normalize, prepare


@dataclass
class PreparedSet:
    images: np.ndarray          # uint8 [N, S, S, 3]
    grades: np.ndarray          # int64 [N]
    case_ids: list[str]
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be used
    lesions: np.ndarray | None = None   # uint8 [N, L, h, w] patch-grid lesion targets, when masks exist


def _mask_at(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A full-resolution mask brought to the size its (possibly scaled-decoded) photo has, keeping
    every lesion pixel: any overlap with a scaled pixel marks it."""
    if mask.shape == tuple(size):
        return mask
    return (cv2.resize((mask > 0).astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)


def lesion_mask_paths(item: LabeledImage) -> list[Path]:
    """Where a labels.csv keeps its lesion masks: masks/<CODE>/<case_id>.png beside it (the phantom's
    layout), one binary PNG per lesion type."""
    root = item.path.parent.parent
    return [root / "masks" / code / f"{item.case_id}.png" for code in LESION_CODES]


def _prepare_one(job: tuple[str, PreprocessConfig, list[Path] | None, tuple[int, int] | None, int | None]):
    path, config, mask_paths, grid, frame = job
    try:
        image, geometry = prepare(decode_image(path, config.decode_max_side, frame=frame), config)
        if mask_paths is None:
            return image, None
        masks = [_mask_at(decode_image(p)[..., 0], geometry.original_size) for p in mask_paths]
        return image, np.stack([grid_presence(m, geometry, grid) for m in masks]).astype(np.uint8)
    except EdgeRetinaError as exc:
        return str(exc)


def prepare_images(items: Sequence[LabeledImage], config: PreprocessConfig, workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   lesion_grid: tuple[int, int] | None = None) -> PreparedSet:
    """Decode and prepare every image once; unreadable files are skipped and reported, not fatal.
    With lesion_grid, each image's lesion masks become patch-grid targets (DatasetError if absent).

    Threads, not processes: OpenCV releases the GIL while decoding and resizing, and forking a process
    that already runs OpenCV's or torch's thread pools can deadlock.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    jobs = [(str(item.path), config, _mask_paths(item) if lesion_grid else None, lesion_grid, item.frame)
            for item in items]
    results: list[tuple | str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(_prepare_one, jobs):
            results.append(result)
            if progress:
                progress(len(results), len(jobs))
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    skipped = [(jobs[i][0], results[i]) for i in range(len(results)) if isinstance(results[i], str)]
    if not keep:
        raise DatasetError(f"none of the {len(items)} images could be read (first: {skipped[0][1]})")
    return PreparedSet(images=np.stack([results[i][0] for i in keep]),
                       grades=np.array([items[i].grade for i in keep], dtype=np.int64),
                       case_ids=[items[i].case_id for i in keep], skipped=skipped,
                       lesions=np.stack([results[i][1] for i in keep]) if lesion_grid else None)


def _mask_paths(item: LabeledImage) -> list[Path]:
    paths = lesion_mask_paths(item)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"the lesion head needs lesion masks; missing {missing[0]} (and {len(missing) - 1} more)")
    return paths


def balanced_batches(grades: np.ndarray, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Indices drawn with probability inversely proportional to class frequency (class-balanced sampler)."""
    counts = np.bincount(grades, minlength=int(grades.max()) + 1).astype(np.float64)
    weights = 1.0 / counts[grades]
    weights /= weights.sum()
    for _ in range(steps):
        yield rng.choice(len(grades), size=batch_size, replace=True, p=weights)


def sequential_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


def to_model_input(images_u8: np.ndarray, config: PreprocessConfig) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> normalised float32 [B, 3, S, S]: preprocess.normalize itself, so training,
    the export gate's torch reference and the device runtime normalise with one function."""
    return torch.from_numpy(normalize(np.ascontiguousarray(images_u8), config))


def augment(images_u8: np.ndarray, rng: np.random.Generator,
            lesions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Camera-like variation on prepared images: flips (left/right eye), rotation, exposure, contrast,
    colour balance. Geometric changes keep the circular field of view inside the square and are applied
    to the lesion grids too."""
    batch = torch.from_numpy(images_u8).float()                       # [B, S, S, 3]
    grids = torch.from_numpy(lesions) if lesions is not None else None  # [B, L, h, w]
    b = batch.shape[0]
    out = torch.empty_like(batch)
    out_grids = torch.empty_like(grids) if grids is not None else None
    for i in range(b):
        img = batch[i]
        grid = grids[i] if grids is not None else None
        flip_x, flip_y, turns = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(0, 4))
        img = torch.rot90(img.flip(1) if flip_x else img, turns, dims=(0, 1))
        img = img.flip(0) if flip_y else img
        if grid is not None:
            grid = torch.rot90(grid.flip(2) if flip_x else grid, turns, dims=(1, 2))
            out_grids[i] = grid.flip(1) if flip_y else grid
        gain = float(np.exp(rng.normal(0.0, 0.15)))
        contrast = float(np.exp(rng.normal(0.0, 0.1)))
        colour = torch.from_numpy(np.exp(rng.normal(0.0, 0.05, size=3))).float()
        inside = (img.sum(dim=-1, keepdim=True) > 0).float()       # keep the black outside the FOV black
        mean = img[inside[..., 0] > 0].mean() if inside.any() else img.mean()
        out[i] = ((img - mean) * contrast + mean) * gain * colour * inside
    images = out.clamp_(0, 255).round_().to(torch.uint8).numpy()
    return images, (out_grids.numpy() if out_grids is not None else None)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
