"""Lesions from the graph's patch logits: which types are present, how many separate regions, and where
they lie on the original photograph (numpy + OpenCV).

The lesion head gives per-patch logits [L, h, w] over the model-input patch grid (the graph already
pushes patches outside the fundus field to very low logits). Presence is the image-level max pooling the
head was trained with (CLPI, SiAN); a region is one 8-connected group of patches at or above the
threshold, so a lesion that straddles two patches corner to corner counts once. Locations go through the
preprocessing geometry, in the continuous pixel coordinates of the photo as the grader decoded it (pixel
(i, j) spans x in [j, j + 1], y in [i, i + 1], as `Geometry.crop_box`), clipped to it. That is the frame the
overlay and the card are drawn in: a large JPEG is decoded at 1/2, 1/4 or 1/8 scale (at most the bundle's
decode_max_side, 1024 px by default, on its long side), so a region's coordinates on the full-resolution
file are these times the file's size over `Geometry.original_size`.

Threshold: one per lesion type from the manifest's grading (lesion_thresholds, fitted for F1 on held-out
images by training/calibration.py: a rare or small type's probabilities can rank well yet stay under 0.5),
or DEFAULT_THRESHOLD, the operating point the head's sigmoid loss was trained towards, for every type
when the bundle has none. The same threshold decides presence and which patches form regions.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from edgeretina.errors import ConfigError
from edgeretina.grades import LESIONS
from edgeretina.preprocess import Geometry

DEFAULT_THRESHOLD = 0.5
# A record lists at most this many regions per type (strongest first); `count` stays the full number and
# `truncated` says that some were left out. 20 is more than a card can label and keeps a record small.
MAX_REGIONS = 20


def lesion_presence(lesion_logits: np.ndarray) -> list[dict]:
    """[L, h, w] patch logits -> image-level presence per lesion type by global max pooling (CLPI, SiAN):
    a lesion is in the image when it is in any patch."""
    peak = lesion_logits.reshape(len(lesion_logits), -1).max(axis=1)
    probability = _sigmoid(peak)
    return [{"code": lesion.code, "name": lesion.name, "probability": round(float(p), 4)}
            for lesion, p in zip(LESIONS, probability)]


def find_lesions(lesion_logits: np.ndarray, geometry: Geometry,
                 threshold: float | Sequence[float] = DEFAULT_THRESHOLD, max_regions: int = MAX_REGIONS) -> list[dict]:
    """Per lesion type (edgeretina.grades.LESIONS order): the `lesion_presence` entry (code, name,
    probability) plus
      present    probability >= threshold (the unrounded probability, so present exactly when count > 0)
      count      8-connected regions of patches whose probability is >= threshold
      regions    up to max_regions of them, highest peak first: {centre [x, y], box [x0, y0, x1, y1]} on
                 the original photo (see the module doc for the frame), peak (probability), patches (area)
      truncated  True when count > len(regions)

    lesion_logits: float [L, h, w] over the model-input grid; geometry: how that grid sits on the photo
    (from `prepare`); threshold: one for every type, or one per type (GradingConfig.lesion_thresholds).
    Raises ConfigError for a threshold outside (0, 1), a sequence whose length is not L, or a logit array
    that is not 3-D."""
    logits = np.asarray(lesion_logits, dtype=np.float32)
    if logits.ndim != 3:
        raise ConfigError(f"lesion logits must be [L, h, w], got shape {logits.shape}")
    thresholds = per_type_thresholds(threshold, len(logits))
    entries = lesion_presence(logits)
    for entry, grid, t in zip(entries, _sigmoid(logits), thresholds):
        regions = _regions(grid, t, geometry)
        entry["present"] = bool(grid.max() >= t)
        entry["count"] = len(regions)
        entry["regions"] = regions[:max_regions]
        entry["truncated"] = len(regions) > max_regions
    return entries


def per_type_thresholds(threshold: float | Sequence[float], types: int) -> list[float]:
    """One threshold per lesion type, each checked to lie in (0, 1)."""
    thresholds = [float(threshold)] * types if np.ndim(threshold) == 0 else [float(t) for t in threshold]
    if len(thresholds) != types:
        raise ConfigError(f"need one lesion threshold per type ({types}), got {len(thresholds)}")
    for t in thresholds:
        if not 0.0 < t < 1.0:
            raise ConfigError(f"lesion threshold must lie strictly between 0 and 1, got {t}")
    return thresholds


def _regions(probability: np.ndarray, threshold: float, geometry: Geometry) -> list[dict]:
    """The 8-connected regions of one type's probability grid, strongest peak first."""
    mask = (probability >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    to_photo = _GridToPhoto(probability.shape, geometry)
    regions = []
    for label in range(1, n):                      # label 0 is the background
        rows, cols = np.nonzero(labels == label)
        left, top, width, height = (int(v) for v in stats[label, :4])
        regions.append({
            "centre": to_photo.point(cols.mean() + 0.5, rows.mean() + 0.5),
            "box": to_photo.box(left, top, left + width, top + height),
            "peak": round(float(probability[rows, cols].max()), 4),
            "patches": int(stats[label, cv2.CC_STAT_AREA]),
        })
    regions.sort(key=lambda r: -r["peak"])
    return regions


class _GridToPhoto:
    """Grid coordinates (cell (r, c) spans [c, c + 1] x [r, r + 1]) -> photo pixel coordinates, the same
    affine map `map_to_original` uses, clipped to the photo (the crop box may overhang it where padded)."""

    def __init__(self, grid_shape: tuple[int, int], geometry: Geometry):
        gh, gw = grid_shape
        self.x0, self.y0, x1, y1 = (float(v) for v in geometry.crop_box)
        self.ax, self.ay = (x1 - self.x0) / gw, (y1 - self.y0) / gh
        self.height, self.width = geometry.original_size

    def point(self, gx: float, gy: float) -> list[float]:
        x = min(max(self.x0 + gx * self.ax, 0.0), float(self.width))
        y = min(max(self.y0 + gy * self.ay, 0.0), float(self.height))
        return [round(x, 1), round(y, 1)]

    def box(self, c0: int, r0: int, c1: int, r1: int) -> list[float]:
        return self.point(c0, r0) + self.point(c1, r1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # clipped: a logit of -1e4 (masked out) would overflow exp and warn; sigmoid(+-60) is 0 or 1 anyway
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -60.0, 60.0)))


def lesion_margins(lesion_logits: np.ndarray, thresholds: float | Sequence[float]) -> np.ndarray:
    """float32 [h, w]: per cell the largest margin of a type's logit [L, h, w] over logit(its threshold);
    > 0 exactly where some type's probability reaches its threshold (a cell the runtime calls a lesion)."""
    logits = np.asarray(lesion_logits, np.float32)
    if logits.ndim != 3:
        raise ConfigError(f"lesion margins need [L, h, w] logits, got shape {logits.shape}")
    t = np.asarray(per_type_thresholds(thresholds, len(logits)), np.float64)   # one per type, each in (0, 1)
    cut = np.log(t / (1.0 - t)).astype(np.float32)[:, None, None]
    return (logits - cut).max(axis=0)


def lesion_overlay_map(lesion_logits: np.ndarray, thresholds: float | Sequence[float]) -> np.ndarray:
    """float32 [h, w] in 0..1 for the overlay: sigmoid of `lesion_margins`, 0.5 where the strongest type sits at
    its threshold, near 0 on healthy cells (the overlay stays uncoloured there), near 1 on clear lesions."""
    return _sigmoid(lesion_margins(lesion_logits, thresholds)).astype(np.float32)
