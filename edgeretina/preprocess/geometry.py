"""Geometry: where the model's input square lies on the decoded photo, and the two maps across it
(``map_to_original``: grid -> photo; ``grid_presence``: photo mask -> grid)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgeretina.errors import ConfigError
from edgeretina.preprocess.fov import FieldOfView


@dataclass(frozen=True)
class Geometry:
    """Maps the model's input square back onto the decoded photo.

    ``crop_box`` is the square ``(x0, y0, x1, y1)`` in the photo's continuous pixel coordinates that
    the model input covers (whole pixels; may extend beyond the image, where it was padded black).
    """

    original_size: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    fov: FieldOfView

    def to_dict(self) -> dict:
        return {
            "original_size": list(self.original_size),
            "crop_box": list(self.crop_box),
            "fov": self.fov.to_dict(),
        }


_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
_RESIZE_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST_EXACT, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def map_to_original(grid_map: np.ndarray, geometry: Geometry, interpolation: str = "linear") -> np.ndarray:
    """Place a map over the model input square (any (h, w), e.g. a 14 x 14 saliency grid) onto
    the decoded photo: float32 (H, W), interpolated over the crop box, zero outside the crop box
    and (when the FOV was found) outside the FOV circle.

    Grid cell (i, j) covers the same part of the photo as the model-input pixels it came from;
    values are interpolated between cell centres and held constant in the outer half cells.
    ``interpolation``: "linear" (default), "nearest" or "cubic".
    """
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    grid = np.asarray(grid_map)
    if grid.ndim != 2 or grid.shape[0] < 1 or grid.shape[1] < 1:
        raise ValueError(f"grid_map must be a 2-D array, got shape {grid.shape}")
    grid = np.ascontiguousarray(grid, dtype=np.float32)
    height, width = geometry.original_size
    out = np.zeros((height, width), np.float32)
    x0, y0, x1, y1 = geometry.crop_box
    # photo pixels whose centres fall inside the crop box
    c0, c1 = max(0, int(np.ceil(x0 - 0.5))), min(width, int(np.ceil(x1 - 0.5)))
    r0, r1 = max(0, int(np.ceil(y0 - 0.5))), min(height, int(np.ceil(y1 - 0.5)))
    if c1 <= c0 or r1 <= r0:
        return out
    gh, gw = grid.shape
    whole = all(float(v).is_integer() for v in geometry.crop_box)
    if whole:
        # prepare() makes whole-pixel boxes: cv2.resize uses the same centre-aligned mapping and
        # clamps at the border, and is ~5x faster than warpAffine.
        flag = _RESIZE_INTERPOLATIONS[interpolation]
        full = cv2.resize(grid, (int(x1 - x0), int(y1 - y0)), interpolation=flag)
        region = full[r0 - int(y0) : r1 - int(y0), c0 - int(x0) : c1 - int(x0)]
    else:
        ax, ay = (x1 - x0) / gw, (y1 - y0) / gh
        # grid index g -> photo continuous x0 + (g + 0.5) * ax -> region pixel index (that - 0.5 - c0)
        m = np.array([[ax, 0.0, x0 + 0.5 * ax - 0.5 - c0], [0.0, ay, y0 + 0.5 * ay - 0.5 - r0]], np.float64)
        region = cv2.warpAffine(
            grid, m, (c1 - c0, r1 - r0), flags=_INTERPOLATIONS[interpolation], borderMode=cv2.BORDER_REPLICATE
        )
    out[r0:r1, c0:c1] = region
    fov = geometry.fov
    if fov.found:
        _zero_outside_circle(out, fov.cx, fov.cy, fov.radius)
    return out


def _zero_outside_circle(img: np.ndarray, cx: float, cy: float, r: float) -> None:
    """In place: zero pixels whose centres lie outside the circle, row by row (exact, no HxW temporaries)."""
    height, width = img.shape[:2]
    ys = np.arange(height) + 0.5 - cy
    half = np.sqrt(np.maximum(r * r - ys * ys, 0.0))
    inside_row = ys * ys <= r * r
    # pixel j inside  <=>  |j + 0.5 - cx| <= half  <=>  ceil(cx - half - 0.5) <= j <= floor(cx + half - 0.5)
    first = np.clip(np.ceil(cx - half - 0.5), 0, width).astype(int)
    last = np.clip(np.floor(cx + half - 0.5) + 1, 0, width).astype(int)
    for i in range(height):
        if not inside_row[i] or first[i] >= last[i]:
            img[i] = 0
        else:
            img[i, : first[i]] = 0
            img[i, last[i] :] = 0


def grid_presence(mask: np.ndarray, geometry: Geometry, grid: tuple[int, int]) -> np.ndarray:
    """A binary mask over the decoded photo -> bool [h, w]: which cells of the model's patch grid hold
    any of it. The inverse direction of `map_to_original`; gives patch-level lesion targets."""
    if mask.ndim != 2 or mask.shape != tuple(geometry.original_size):
        raise ValueError(f"mask shape {mask.shape} does not match the photo {tuple(geometry.original_size)}")
    x0, y0, x1, y1 = (int(round(v)) for v in geometry.crop_box)
    side = x1 - x0
    crop = np.zeros((side, side), np.float32)
    height, width = mask.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0:sy1, sx0:sx1] > 0
    h, w = grid
    # Area averaging: a cell is positive when any lesion pixel falls inside it, however small.
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA) > 0
