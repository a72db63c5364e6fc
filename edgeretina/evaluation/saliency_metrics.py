"""How well an explanation map points at lesions: pure numpy functions on one photograph at a time.

Every function takes the map in the ORIGINAL photo's frame (float [H, W], the same size as the lesion
masks; `map_to_original` puts a model-input grid there) and boolean masks of the same size, and looks only
inside the field of view (`fov`): the black surround is no evidence either way.

- pointing game (Zhang et al. 2016, "Top-down neural attention by excitation backprop"): a hit when the
  map's global maximum lies within `tolerance_px` of a lesion pixel. The original uses 15 px on PASCAL /
  COCO photographs; fundus lesions are far smaller than objects (a microaneurysm is ~0.5-1 % of the field
  diameter), so the tolerance here is a fraction of the field diameter, DEFAULT_TOLERANCE = 1.5 %: the same
  15 px on a 1000 px field (a typical fundus photo at the runtime's decode size), and the same anatomical
  distance at any resolution;
- average precision (AUC-PR, step-wise as scikit-learn's average_precision_score) of the map's pixel
  values against a lesion mask;
- mass fraction: the share of the map's total (non-negative) mass that falls in a region: the lesions, or
  the outer ring of the field (`field_masks`), where a map that lights up the field's edge shows up as a
  number.

Ties. Pixels that share the maximum value are all "the maximum": the hit is the fraction of them within
tolerance (the expected hit of breaking the tie at random), so a plateau half on a lesion scores 0.5. A
map constant over the field has no maximum and counts as a miss (0.0). Average precision treats tied
scores as one threshold (a constant map scores the lesions' share of the field).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from edgeretina import metrics

DEFAULT_TOLERANCE = 0.015     # fraction of the field diameter (see the module docstring)
DEFAULT_RING_FRACTION = 0.05  # the outer 5 % of the field's radius
ANY = "any"                   # the union of every lesion type


def field_masks(shape: tuple[int, int], cx: float, cy: float, radius: float,
                ring_fraction: float = DEFAULT_RING_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(field, ring): bool [H, W] masks of the pixels whose centres lie in the field-of-view circle, and of
    those in its outer ring (distance from the centre above (1 - ring_fraction) * radius). Coordinates are
    the preprocessing's continuous ones: pixel (i, j) has its centre at (j + 0.5, i + 0.5)."""
    if not radius > 0:
        raise ValueError(f"the field's radius must be positive, got {radius!r}")
    if not 0.0 < ring_fraction < 1.0:
        raise ValueError(f"ring_fraction must be in (0, 1), got {ring_fraction!r}")
    height, width = shape
    dy = (np.arange(height) + 0.5 - cy)[:, None]
    dx = (np.arange(width) + 0.5 - cx)[None, :]
    squared = dx * dx + dy * dy
    field = squared <= radius * radius
    inner = (1.0 - ring_fraction) * radius
    return field, field & (squared > inner * inner)


def pointing_hit(saliency: np.ndarray, lesion: np.ndarray, fov: np.ndarray, tolerance_px: float) -> float | None:
    """1.0 when the map's maximum inside the field lies within `tolerance_px` (pixel-centre distance) of a
    lesion pixel inside the field, 0.0 when not; a fraction for tied maxima (the share of them within
    tolerance); 0.0 for a map constant over the field (it has no maximum). None when the image has no
    lesion pixel inside the field (the game is not played). Raises ValueError on mismatched shapes, a
    negative tolerance or non-finite map values."""
    saliency, lesion, fov = _checked(saliency, lesion, fov)
    if isinstance(tolerance_px, bool) or not tolerance_px >= 0 or not math.isfinite(tolerance_px):
        raise ValueError(f"tolerance_px must be a finite number >= 0, got {tolerance_px!r}")
    lesion = lesion & fov
    if not lesion.any():
        return None
    values = saliency[fov]
    peak = values.max()
    if peak <= values.min():
        return 0.0
    rows, cols = np.nonzero(fov & (saliency == peak))
    reach = int(math.floor(tolerance_px))
    r0, c0 = max(rows.min() - reach, 0), max(cols.min() - reach, 0)
    r1, c1 = rows.max() + reach + 1, cols.max() + reach + 1
    near = disk_dilate(lesion[r0:r1, c0:c1], tolerance_px)   # only the part the maxima can reach
    return float(near[rows - r0, cols - c0].mean())


def disk_dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """bool mask of the pixels whose centre lies within `radius` of the centre of a True pixel of `mask`
    (exact Euclidean disk; one row offset at a time, each a running window sum)."""
    mask = np.asarray(mask, dtype=bool)
    reach = int(math.floor(radius))
    height, width = mask.shape
    padded = np.pad(mask, reach)
    sums = np.zeros((height + 2 * reach, width + 2 * reach + 1), np.int32)
    np.cumsum(padded, axis=1, out=sums[:, 1:])
    out = np.zeros(mask.shape, bool)
    for dy in range(-reach, reach + 1):
        half = int(math.floor(math.sqrt(max(radius * radius - dy * dy, 0.0)) + 1e-9))
        rows = sums[reach + dy: reach + dy + height]
        window = rows[:, reach + half + 1: reach + half + 1 + width] - rows[:, reach - half: reach - half + width]
        out |= window > 0
    return out


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Step-wise area under the precision-recall curve, sum over thresholds of (R_k - R_{k-1}) * P_k, with
    tied scores one threshold (as scikit-learn's average_precision_score). 1.0 when every positive scores
    above every negative; the positives' share for a constant score. None without a positive."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold non-finite values")
    positives = int(labels.sum())
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], np.cumsum(labels[order])
    ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]    # the last index of each distinct score
    true_positives = hits[ends]
    precision = true_positives / (ends + 1.0)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def map_average_precision(saliency: np.ndarray, lesion: np.ndarray, fov: np.ndarray) -> float | None:
    """average_precision of the map's pixels inside the field against the lesion mask there."""
    saliency, lesion, fov = _checked(saliency, lesion, fov)
    return average_precision(saliency[fov], lesion[fov])


def mass_fraction(saliency: np.ndarray, region: np.ndarray, fov: np.ndarray) -> float | None:
    """The share of the map's mass inside the field that lies in `region` (inside the field). None for a
    map with no mass there (all zero). Raises ValueError on negative or non-finite values: mass needs a
    non-negative map (sigmoid maps, ReLU'd CAMs and removal maps all are)."""
    saliency, region, fov = _checked(saliency, region, fov)
    values = saliency[fov].astype(np.float64)
    if (values < 0).any():
        raise ValueError("mass_fraction needs a non-negative map")
    total = values.sum()
    if total <= 0:
        return None
    return float(saliency[fov & region].astype(np.float64).sum() / total)


def image_scores(agnostic: np.ndarray, per_type: dict[str, np.ndarray] | None, masks: dict[str, np.ndarray],
                 fov: np.ndarray, ring: np.ndarray, tolerance_px: float) -> dict[str, Any]:
    """Every score of one image for one method: {"types": {code: {pointing, average_precision,
    mass_inside} or None where the image has no such lesion}, "edge_ring_mass"}.

    masks: lesion code -> bool mask; the union of all of them is scored as ANY. A per-type method gives
    `per_type` (code -> map) and is scored on each type with that type's own map; a class-agnostic one
    (per_type None) with its one map against every type. ANY and the edge ring always use `agnostic`."""
    types: dict[str, dict[str, float | None] | None] = {}
    union = np.zeros(fov.shape, bool)
    for code, mask in masks.items():
        union |= mask
        heat = agnostic if per_type is None else per_type[code]
        types[code] = _lesion_scores(heat, mask, fov, tolerance_px)
    types[ANY] = _lesion_scores(agnostic, union, fov, tolerance_px)
    return {"types": types, "edge_ring_mass": mass_fraction(agnostic, ring, fov)}


def _lesion_scores(heat: np.ndarray, mask: np.ndarray, fov: np.ndarray, tolerance_px: float) -> dict | None:
    if not (mask & fov).any():
        return None
    return {"pointing": pointing_hit(heat, mask, fov, tolerance_px),
            "average_precision": map_average_precision(heat, mask, fov),
            "mass_inside": mass_fraction(heat, mask, fov)}


def summarize(values: Sequence[float | None], *, n_bootstrap: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """Mean over images with a percentile bootstrap interval (metrics.bootstrap_ci over images).

    Returns {"estimate", "low", "high", "n": images with a defined value, "n_undefined": images where the
    metric was undefined (None: e.g. a map with no mass)}; estimate/low/high are None when n is 0."""
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    undefined = len(values) - len(defined)
    if len(defined) == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0, "n_undefined": undefined}
    ci = metrics.bootstrap_ci(np.mean, defined, n_resamples=n_bootstrap, confidence=confidence, seed=seed)
    return {"estimate": ci["estimate"], "low": ci["low"], "high": ci["high"], "n": int(len(defined)),
            "n_undefined": undefined}


def _checked(saliency, mask, fov) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    saliency = np.asarray(saliency)
    mask, fov = np.asarray(mask, dtype=bool), np.asarray(fov, dtype=bool)
    if saliency.ndim != 2 or mask.shape != saliency.shape or fov.shape != saliency.shape:
        raise ValueError(f"map {saliency.shape}, mask {mask.shape} and field {fov.shape} must be the same 2-D shape")
    if not np.isfinite(saliency[fov]).all():
        raise ValueError("the map holds non-finite values inside the field")
    return saliency, mask, fov
