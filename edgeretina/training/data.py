"""Training data: labels.csv -> images prepared once by the shared preprocessing -> balanced batches
(augmentation: training/augment.py).

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

from edgeretina.choices import TRAINING_SAMPLERS
from edgeretina.dataset import LabeledImage
from edgeretina.errors import ConfigError, DatasetError, EdgeRetinaError
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import PreprocessConfig, decode_image, grid_presence, normalize, prepare
from edgeretina.training.augment import augment  # noqa: F401  (moved to augment.py; kept importable here)


@dataclass
class PreparedSet:
    images: np.ndarray          # uint8 [N, S, S, 3]
    grades: np.ndarray          # int64 [N]
    case_ids: list[str]
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be used
    lesions: np.ndarray | None = None   # uint8 [N, L, h, w] patch-grid lesion targets from masks, or
                                        # [N, L] image-level labels (weak supervision, image_lesion_labels)
    sources: list[str] | None = None    # the dataset of each image (LabeledImage.source), "unknown" when unset
    indices: list[int] | None = None    # the position of each image in the items it was prepared from


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
                       lesions=np.stack([results[i][1] for i in keep]) if lesion_grid else None,
                       sources=[items[i].source or "unknown" for i in keep], indices=keep)


def missing_lesion_masks(items: Sequence[LabeledImage]) -> list[Path]:
    """The lesion mask files (lesion_mask_paths) the items lack: what the lesion head, the lesion thresholds
    and lesion generation each need all of."""
    return [path for item in items for path in lesion_mask_paths(item) if not path.is_file()]


def image_lesion_labels(items: Sequence[LabeledImage]) -> np.ndarray:
    """uint8 [N, L]: whether each image shows each lesion type, from its labels.csv columns — `<CODE>` (0/1)
    or `n_<CODE>` (a count, the phantom's) for every code of LESION_CODES. What a lesion head trains on
    weakly when no pixel masks exist (max-pooled presence, TWLR/CLPI). DatasetError names the first image
    and code without a usable value."""
    labels = np.zeros((len(items), len(LESION_CODES)), np.uint8)
    for row, item in enumerate(items):
        for col, code in enumerate(LESION_CODES):
            labels[row, col] = _lesion_label(item, code)
    return labels


def _lesion_label(item: LabeledImage, code: str) -> int:
    for column in (code, f"n_{code}"):
        value = str(item.extra.get(column, "")).strip()
        if value:
            try:
                return int(float(value) > 0)
            except ValueError:
                raise DatasetError(f"{item.case_id}: lesion label {column}={value!r} is not a number") from None
    raise DatasetError(f"{item.case_id}: no image-level label for {code} (a {code} or n_{code} column of 0/1 or "
                       "a count): image-level lesion training needs one per lesion type")


def _mask_paths(item: LabeledImage) -> list[Path]:
    paths = lesion_mask_paths(item)
    missing = missing_lesion_masks([item])
    if missing:
        raise DatasetError(f"the lesion head needs lesion masks; missing {missing[0]} (and {len(missing) - 1} more)")
    return paths


SAMPLERS = TRAINING_SAMPLERS


class PerGradeBatchSampler:
    """Batches with exactly `per_grade` images of every grade present (batch = per_grade x grades present).

    An epoch runs until every image of the largest grade has been drawn once: ceil(largest / per_grade)
    batches. Each grade's images come from successive fresh permutations, so within an epoch none repeats
    before all of its grade have been drawn; rarer grades cycle (with a reshuffle each time round) and the
    largest grade's last batch is topped up from its next permutation. The schedule is a function of
    (seed, epoch) alone: every process of a distributed run draws the same batches, and resuming at an
    epoch needs no sampler state beyond the epoch.
    """

    def __init__(self, grades: np.ndarray, per_grade: int, seed: int):
        if per_grade < 1:
            raise ConfigError(f"per_grade must be at least 1, got {per_grade}")
        grades = np.asarray(grades)
        self.per_grade, self.seed = int(per_grade), int(seed)
        self.grades_present = [int(g) for g in np.unique(grades)]
        self._members = [np.flatnonzero(grades == g) for g in self.grades_present]
        self.steps_per_epoch = max(math.ceil(len(m) / self.per_grade) for m in self._members)
        self.batch_size = self.per_grade * len(self.grades_present)

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, _PER_GRADE_STREAM, epoch])
        need = self.steps_per_epoch * self.per_grade
        streams = [_cycled_permutations(members, need, rng) for members in self._members]
        for step in range(self.steps_per_epoch):
            part = slice(step * self.per_grade, (step + 1) * self.per_grade)
            yield np.concatenate([stream[part] for stream in streams])

    def state_dict(self) -> dict:
        return {"kind": "per_grade", "per_grade": self.per_grade, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the schedule depends on (seed, epoch) only."""


class WeightedBatchSampler:
    """Indices drawn with replacement, with probability inversely proportional to the frequency of their
    grade (a class-balanced sampler); ceil(N / batch_size) batches an epoch. Draws from its own generator,
    whose state is what a resumed run restores."""

    def __init__(self, grades: np.ndarray, batch_size: int, rng: np.random.Generator):
        self._grades, self.batch_size, self.rng = np.asarray(grades), int(batch_size), rng
        self.steps_per_epoch = steps_per_epoch(len(self._grades), self.batch_size)

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        return balanced_batches(self._grades, self.batch_size, self.steps_per_epoch, self.rng)

    def state_dict(self) -> dict:
        return {"kind": "weighted", "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


_PER_GRADE_STREAM = 7919     # separates the sampler's random stream from the other uses of the seed


def _cycled_permutations(members: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    rounds = math.ceil(count / len(members))
    return np.concatenate([rng.permutation(members) for _ in range(rounds)])[:count]


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


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
