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
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError, EdgeRetinaError
from edgeretina.preprocess import PreprocessConfig, decode_image, prepare


@dataclass
class PreparedSet:
    images: np.ndarray          # uint8 [N, S, S, 3]
    grades: np.ndarray          # int64 [N]
    case_ids: list[str]
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be used


def _prepare_one(args: tuple[str, PreprocessConfig]) -> np.ndarray | str:
    path, config = args
    try:
        return prepare(decode_image(path), config)[0]
    except EdgeRetinaError as exc:
        return str(exc)


def prepare_images(items: Sequence[LabeledImage], config: PreprocessConfig, workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> PreparedSet:
    """Decode and prepare every image once; unreadable files are skipped and reported, not fatal.

    Threads, not processes: OpenCV releases the GIL while decoding and resizing, and forking a process
    that already runs OpenCV's or torch's thread pools can deadlock.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    jobs = [(str(item.path), config) for item in items]
    results: list[np.ndarray | str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(_prepare_one, jobs):
            results.append(result)
            if progress:
                progress(len(results), len(jobs))
    keep = [i for i, r in enumerate(results) if isinstance(r, np.ndarray)]
    skipped = [(jobs[i][0], results[i]) for i in range(len(results)) if not isinstance(results[i], np.ndarray)]
    if not keep:
        raise DatasetError(f"none of the {len(items)} images could be read (first: {skipped[0][1]})")
    return PreparedSet(images=np.stack([results[i] for i in keep]),
                       grades=np.array([items[i].grade for i in keep], dtype=np.int64),
                       case_ids=[items[i].case_id for i in keep], skipped=skipped)


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
    """uint8 [B, S, S, 3] -> normalised float32 [B, 3, S, S], identical to preprocess.normalize."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-like variation on prepared images: flips (left/right eye), rotation, exposure, contrast,
    colour balance. Geometric changes keep the circular field of view inside the square."""
    batch = torch.from_numpy(images_u8).float()                       # [B, S, S, 3]
    b = batch.shape[0]
    out = torch.empty_like(batch)
    for i in range(b):
        img = batch[i]
        if rng.random() < 0.5:
            img = img.flip(1)
        if rng.random() < 0.5:
            img = img.flip(0)
        img = torch.rot90(img, int(rng.integers(0, 4)), dims=(0, 1))
        gain = float(np.exp(rng.normal(0.0, 0.15)))
        contrast = float(np.exp(rng.normal(0.0, 0.1)))
        colour = torch.from_numpy(np.exp(rng.normal(0.0, 0.05, size=3))).float()
        inside = (img.sum(dim=-1, keepdim=True) > 0).float()       # keep the black outside the FOV black
        mean = img[inside[..., 0] > 0].mean() if inside.any() else img.mean()
        out[i] = ((img - mean) * contrast + mean) * gain * colour * inside
    return out.clamp_(0, 255).round_().to(torch.uint8).numpy()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
