"""Small drawing helpers shared by the anatomy, vessel and lesion painters (OpenCV, no per-pixel Python).

Speed notes (the phantom should draw a 512 px photograph in a few tens of milliseconds):
the picture is kept as three contiguous float32 colour planes, because numpy is slow at broadcasting
over a trailing axis of 3, and every update works in place inside the bounding box of what changed,
because fresh full-size temporaries cost more in page faults than the arithmetic itself.
Masks and lesion opacity layers are uint8 canvases that OpenCV draws on directly (255 = opaque).
"""

from __future__ import annotations

import cv2
import numpy as np

SHIFT = 4  # OpenCV fixed-point bits: coordinates are drawn with 1/16 px precision
ONE = 1 << SHIFT


def fixed(x: float, y: float) -> tuple[int, int]:
    return int(round(x * ONE)), int(round(y * ONE))


def fixed_points(points: np.ndarray) -> np.ndarray:
    """Nx2 float points -> int32 array in fixed point, as cv2.polylines/fillPoly want."""
    return np.round(np.asarray(points, np.float64) * ONE).astype(np.int32).reshape(-1, 1, 2)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """float32 noise of the given (h, w), roughly unit variance, with features about h/cells across."""
    h, w = shape
    gh = max(2, int(round(cells)))
    gw = max(2, int(round(cells * w / h)))
    grid = rng.standard_normal((gh + 2, gw + 2)).astype(np.float32)
    # Interpolate a grid one cell larger on each side, then crop: bicubic edges are pinned otherwise.
    oy, ox = -(-h // gh), -(-w // gw)
    big = cv2.resize(grid, (w + 2 * ox, h + 2 * oy), interpolation=cv2.INTER_CUBIC)
    return big[oy:oy + h, ox:ox + w]


def blur(layer: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(layer, (0, 0), sigma) if sigma > 0.2 else layer


def bounding_box(layer: np.ndarray) -> tuple[slice, slice] | None:
    """Slices of the smallest box holding the non-zero pixels of a uint8 layer (None when empty)."""
    x, y, w, h = cv2.boundingRect(layer)
    if w == 0 or h == 0:
        return None
    return slice(y, y + h), slice(x, x + w)


class Canvas:
    """The retina's reflectance as three float32 planes (R, G, B), changed in place."""

    def __init__(self, planes: np.ndarray):
        self.planes = planes                      # (3, H, W) float32, C-contiguous
        self.scratch = np.empty(planes.shape[1:], np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.planes.shape[1], self.planes.shape[2]

    def darken(self, alpha: np.ndarray, absorption) -> None:
        """Blood absorbs light: plane *= 1 - alpha * absorption (alpha: uint8 layer, 255 = opaque).

        Multiplicative, so a haemorrhage looks right on a pale or a dark fundus and over the disc.
        """
        box = bounding_box(alpha)
        if box is None:
            return
        a, s = alpha[box], self.scratch[box]
        for plane, k in zip(self.planes, absorption):
            np.multiply(a, np.float32(-k / 255.0), out=s)
            s += 1.0
            plane[box] *= s

    def paint(self, alpha: np.ndarray, colour) -> None:
        """Opaque material (exudate, cotton wool, fibrous tissue): plane = lerp(plane, colour, alpha)."""
        box = bounding_box(alpha)
        if box is None:
            return
        a, s = alpha[box], self.scratch[box]
        for plane, c in zip(self.planes, colour):
            region = plane[box]
            np.subtract(np.float32(c), region, out=s)
            s *= a
            s *= np.float32(1 / 255.0)
            region += s

    def brighten(self, alpha: np.ndarray, gain: float) -> None:
        """plane *= 1 + gain * alpha, e.g. the light reflex along an arteriole."""
        box = bounding_box(alpha)
        if box is None:
            return
        s = self.scratch[box]
        np.multiply(alpha[box], np.float32(gain / 255.0), out=s)
        s += 1.0
        for plane in self.planes:
            plane[box] *= s
