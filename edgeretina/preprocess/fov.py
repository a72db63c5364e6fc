"""detect_fov: the circular field of view of a fundus photograph (sub-pixel edge points, robust
circle fit, plausibility checks) in any framing a camera exports (offset in a grey frame, notched, cut
on any side, with bars or text beside it, small), and the RGB input check every pixel step shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class FieldOfView:
    """The circular field of view, in the decoded image's continuous pixel coordinates.

    The circle may extend past the image (sensors often cut the top and bottom off).
    ``fraction_visible`` is the fraction of the circle's area inside the image. When ``found`` is
    False the circle is a neutral fallback — the inscribed circle of the centred square — and
    ``fraction_visible`` is 0.0; nothing should be masked with it.
    """

    cx: float
    cy: float
    radius: float
    found: bool
    fraction_visible: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Detection works on a copy subsampled by an integer factor to a long side of 320-639 px: ~3 ms at
# 1500 px, and the sub-pixel edge interpolation keeps the circle within ~0.5 % of its radius.
_FOV_WORK_SIZE = 320


def detect_fov(rgb: np.ndarray) -> FieldOfView:
    """Find the circular field of view of a fundus photograph.

    Method (on a copy with long side 320-639 px): brightest channel -> threshold at 15 % of the way
    from the frame's own level (2nd percentile: black, or the 15-40 of a grey frame) to the fundus level
    (98th percentile) -> the largest connected bright regions (up to three: the field, and beside it a
    bar or panel of graphics as large; text is smaller) -> for each, its left/right extent on every row
    and top/bottom extent on every column, located to sub-pixel precision, leaving out extents that lie
    on the image edge (where the sensor cut the circle off, on any side) -> robust circle fit on those
    boundary points (algebraic fit, started from the row extents only so that flat top/bottom cuts
    inside the image cannot bias it, then iteratively trimmed: a notch, a tab or text touching the rim
    are outliers) -> the most plausible circle (below). When the brightness finds nothing (a dim field
    in a grey frame, no brighter than the frame at its rim), the same is tried on the colour (brightest - darkest channel): a fundus is orange-red, such frames grey.

    A fit is accepted (``found=True``) only if it is a plausible fundus field of view: enough edge
    points on the circle covering at least 90 degrees of it, the bright region agrees with the circle
    (IoU >= 0.8; >= 0.5 for a field partly hidden by a lid, whose bright region lies wholly inside the
    circle), most of the frame outside it is dark (<= 50 % bright: bars, panels and text beside
    the field pass, a scene around a round object does not), the radius is within reason and at least a quarter of
    the circle is inside the image (its centre may be outside). Photos without any dark border
    (full-frame, e.g. an ordinary photograph, or a fundus cropped inside its circle) have no visible
    circle edge and return ``found=False``, as do all-black and uniform images: the field of view
    is what proves the photo is a fundus image, and without it the quality gate says
    ``no_field_of_view``; ``prepare`` still works (centred square).

    Measured (benchmarks/quality_gate.py, x86-avx2): on 400 phantom photographs of eight camera
    framings at 512 px the centre is within 0.8 % of the radius and the radius within 1.3 %; none of 12
    scikit-image pictures (scenes, coins, the moon, a cup) is taken for a field.
    """
    rgb = _check_rgb(rgb)
    height, width = rgb.shape[:2]
    fallback = _fallback_fov(height, width)
    # Every k-th pixel (the median filter below removes the noise this keeps): reads 1/k of the
    # photo, 3x faster than an INTER_AREA decimation, and as accurate here (sub-pixel edges).
    # Working pixel j is photo pixel j * k + k // 2; the last rows/columns just count as "edge".
    k = max(1, max(height, width) // _FOV_WORK_SIZE)
    hs, ws = height // k, width // k
    if hs == 0 or ws == 0:  # a sliver (e.g. 2 x 3000 px) has no working copy, and no room for a circle
        return fallback
    small = rgb if k == 1 else rgb[k // 2 :: k, k // 2 :: k][:hs, :ws]
    shift = k // 2 + 0.5 - k / 2.0  # working (j + 0.5) * k + shift = photo pixel centre
    brightest = np.maximum(np.maximum(small[..., 0], small[..., 1]), small[..., 2])
    fit = _fit_field(brightest)
    if fit is None:
        # A dim field in a grey frame (an under-exposed shot, a sensor black level of 15-40) can be no
        # brighter than the frame at its rim, but a fundus is orange-red and such frames are grey: look
        # for the field in the colour (brightest - darkest channel) instead.
        darkest = np.minimum(np.minimum(small[..., 0], small[..., 1]), small[..., 2])
        fit = _fit_field(cv2.subtract(brightest, darkest))
    if fit is None:
        return fallback
    cx, cy, r = fit
    cx_o, cy_o, r_o = cx * k + shift, cy * k + shift, r * k
    return FieldOfView(
        cx=float(cx_o),
        cy=float(cy_o),
        radius=float(r_o),
        found=True,
        fraction_visible=_fraction_inside(cx_o, cy_o, r_o, width, height),
    )


def _fit_field(channel: np.ndarray) -> tuple[float, float, float] | None:
    """The field-of-view circle in one uint8 feature channel of the working copy (working pixels)."""
    v8 = cv2.medianBlur(channel, 5)
    cdf = np.cumsum(np.bincount(v8.ravel(), minlength=256)) / v8.size
    lo, hi = float(np.searchsorted(cdf, 0.02)), float(np.searchsorted(cdf, 0.98))
    v = v8.astype(np.float32)
    if hi - lo < 12.0:  # all black, uniform, or nothing brighter than the noise
        return None
    return _find_circle(v, lo + 0.15 * (hi - lo))


def _fallback_fov(height: int, width: int) -> FieldOfView:
    return FieldOfView(cx=width / 2.0, cy=height / 2.0, radius=min(height, width) / 2.0, found=False,
                       fraction_visible=0.0)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {desc}")
    # Any decoded photo, however small (decode_image returns 1 x 1 images): it has no field of view, and the
    # quality gate says so; only an empty array is not an image.
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"empty image: {rgb.shape[1]} x {rgb.shape[0]}")
    return rgb


# Bright regions tried as the field, largest first: the field, and beside it at most a bar or a panel of
# graphics as large (text and notches are far smaller than 2 % of the photo).
_MAX_CANDIDATES = 3


def _find_circle(v: np.ndarray, t: float) -> tuple[float, float, float] | None:
    """The most plausible field-of-view circle among the largest regions brighter than ``t``."""
    bright = v > t
    best = None
    for region in _candidate_regions(bright):
        x, y, from_rows = _edge_points(v, region, t)
        if x.size < 20:
            continue
        fit = _robust_circle_fit(x, y, from_rows)
        if fit is None:
            continue
        cx, cy, r, inliers = fit
        score = _plausibility(cx, cy, r, x, y, inliers, region, bright)
        if score is not None and (best is None or score > best[0]):
            best = (score, cx, cy, r)
    return None if best is None else best[1:]


def _candidate_regions(mask: np.ndarray) -> list[np.ndarray]:
    """The largest 8-connected components of ``mask`` (each >= 2 % of it), holes filled (a dark fovea
    stays inside)."""
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")
    regions = []
    for label in order[:_MAX_CANDIDATES]:
        if stats[label, cv2.CC_STAT_AREA] < 0.02 * mask.size:
            break
        x, y, w, h = stats[label, :4]
        component = (labels[y:y + h, x:x + w] == label).astype(np.uint8)
        contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros(mask.shape, np.uint8)
        cv2.drawContours(filled[y:y + h, x:x + w], contours, -1, 1, thickness=cv2.FILLED)
        regions.append(filled.astype(bool))
    return regions


def _edge_points(v: np.ndarray, region: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-pixel boundary points of ``region`` from its row and column extents.

    Extents on the image edge are dropped (the circle continues beyond the sensor there). The edge
    position is where ``v`` crosses ``t`` between the last outside and first inside pixel centre.
    Returns x, y and a flag that is True for points from row (left/right) extents.
    """
    hs, ws = region.shape
    xs, ys, rows = [], [], []

    def crossings(profile: np.ndarray, region_t: np.ndarray, transpose: bool) -> None:
        # profile/region_t: lines along axis 1. Left edge: first inside index j >= 1.
        has = region_t.any(axis=1)
        idx = np.flatnonzero(has)
        first = np.argmax(region_t[idx], axis=1)
        last = region_t.shape[1] - 1 - np.argmax(region_t[idx, ::-1], axis=1)
        n = region_t.shape[1]
        for inner, outer in ((first, first - 1), (last, last + 1)):
            ok = (outer >= 0) & (outer < n)
            li, inner_i, outer_i = idx[ok], inner[ok], outer[ok]
            vin, vout = profile[li, inner_i], profile[li, outer_i]
            frac = np.clip((t - vout) / np.maximum(vin - vout, 1e-3), 0.0, 1.0)
            # the crossing lies between the outer and inner pixel centres (outer + 0.5, inner + 0.5)
            pos = outer_i + 0.5 + (inner_i - outer_i) * frac
            line = li + 0.5
            if transpose:
                xs.append(line), ys.append(pos)
            else:
                xs.append(pos), ys.append(line)
            rows.append(np.full(li.shape, not transpose))

    crossings(v, region, transpose=False)
    crossings(v.T, region.T, transpose=True)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(rows)


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic (Kasa) least-squares circle, on centred coordinates for conditioning."""
    if x.size < 3:
        return None
    mx, my = x.mean(), y.mean()
    u, w = x - mx, y - my
    a = np.stack([u, w, np.ones_like(u)], axis=1)
    b = -(u * u + w * w)
    try:
        (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    except np.linalg.LinAlgError:
        return None
    cu, cw = -d / 2.0, -e / 2.0
    r2 = cu * cu + cw * cw - f
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cu + mx), float(cw + my), float(np.sqrt(r2))


def _robust_circle_fit(x: np.ndarray, y: np.ndarray, from_rows: np.ndarray):
    start = _fit_circle(x[from_rows], y[from_rows]) if from_rows.sum() >= 10 else None
    fit = start or _fit_circle(x, y)
    if fit is None:
        return None
    inliers = np.ones(x.shape, bool)
    for _ in range(6):
        cx, cy, r = fit
        resid = np.abs(np.hypot(x - cx, y - cy) - r)
        spread = 1.4826 * np.median(resid[inliers]) if inliers.any() else np.median(resid)
        new = resid <= max(3.0 * spread, 0.75)
        if new.sum() < 10:
            return None
        refit = _fit_circle(x[new], y[new])
        if refit is None:
            return None
        converged = np.array_equal(new, inliers)
        fit, inliers = refit, new
        if converged:
            break
    cx, cy, r = fit
    inliers = np.abs(np.hypot(x - cx, y - cy) - r) <= max(0.02 * r, 1.0)
    return cx, cy, r, inliers


#: The least a partly hidden field may fill its circle (a lid over half the field: 0.5).
_MIN_SHADOWED_IOU = 0.5


def _plausibility(cx, cy, r, x, y, inliers, region, bright) -> float | None:
    """How well the fitted circle is the edge of a fundus field of view rather than any bright blob:
    None when it is not one, else the overlap (IoU) of the circle and the bright region."""
    hs, ws = region.shape
    xi, yi = x[inliers], y[inliers]
    # most edge points lie on the circle (flat cuts and labels touching the rim stay below 50 %)
    if xi.size < 20 or xi.size < 0.5 * x.size:
        return None
    if not 0.15 * min(ws, hs) <= r <= 1.5 * max(ws, hs):
        return None
    # the points on the circle cover at least 90 degrees of it (not a short, nearly straight arc)
    angles = np.arctan2(yi - cy, xi - cx)
    bins = np.unique(np.floor((angles + np.pi) / (2 * np.pi) * 36).astype(int))
    if bins.size < 9 or _fraction_inside(cx, cy, r, ws, hs) < 0.25:  # the centre may lie outside
        return None
    yy, xx = np.ogrid[:hs, :ws]
    d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    circle = d2 <= r * r
    # the bright region fills the circle ...
    iou = np.count_nonzero(circle & region) / max(np.count_nonzero(circle | region), 1)
    # ... and most of the frame outside it is dark: bars, panels and text beside the field are allowed
    # (HEAD allowed 10 %: a 6 % wide white bar in a 4:3 export already broke that), scenery is not
    outside = d2 > (1.03 * r) ** 2
    n_out = np.count_nonzero(outside)
    bright_out = np.count_nonzero(bright & outside) / n_out if n_out else 0.0
    if bright_out > 0.5 or (iou < 0.8 and not _shadowed_field(circle, region, iou)):
        return None
    return float(iou)


def _shadowed_field(circle: np.ndarray, region: np.ndarray, iou: float) -> bool:
    """A field partly hidden (an eyelid's shadow over a fifth to a half of it): the bright region fills less of
    the circle, but lies wholly inside it. Accepted so that the quality gate can say what hides the field
    (lid_or_lash_artefact) instead of no_field_of_view."""
    region_px = np.count_nonzero(region)
    return iou >= _MIN_SHADOWED_IOU and np.count_nonzero(region & ~circle) <= 0.03 * region_px


def _fraction_inside(cx: float, cy: float, r: float, width: float, height: float) -> float:
    """Area of the circle inside [0, W] x [0, H] over the circle's area (midpoint rule, 2048 strips)."""
    if r <= 0:
        return 0.0
    n = 2048
    xs = cx - r + (np.arange(n) + 0.5) * (2 * r / n)
    half = np.sqrt(np.maximum(r * r - (xs - cx) ** 2, 0.0))
    inside_x = (xs >= 0) & (xs <= width)
    chord = np.clip(np.minimum(cy + half, height) - np.maximum(cy - half, 0.0), 0.0, None)
    area = float(np.sum(chord * inside_x) * (2 * r / n))
    return float(min(1.0, area / (np.pi * r * r)))
