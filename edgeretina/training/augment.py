"""Camera-like augmentation of prepared fundus images that keeps the field of view a circle.

Works on the shared preprocessing's output (uint8 [S, S, 3], black outside the circular field of view)
and moves the patch-grid lesion targets with every geometric change.

- Geometry: a left/right and an up/down flip, a rotation by any angle and a zoom in by up to ~10 %, all
  about the field's centre and composed into one affine (cv2.warpAffine, bilinear, black border). The
  result is multiplied by the *original* field mask: the circle keeps its place and radius, the black
  outside stays black, and only the retina inside moves (a camera turned about its axis, or held closer).
  Zooming out is not offered: it would shrink the circle.
- Photometry: exposure (gain), contrast about the field's mean, colour balance (per-channel gain), gamma
  and, sometimes, a mild Gaussian blur (defocus), all inside the field only.
- Lesion grids [L, h, w] get the same affine in grid coordinates, nearest-neighbour both ways: every
  target cell takes the nearest source cell (no holes in a large lesion area) and every positive source
  cell marks the cell its centre lands in (no lesion lost to rounding at odd angles).

The field's centre is found from the image itself (where it is not black): the rows where the field is
widest give its vertical centre and the columns where it is tallest its horizontal one, which holds for a
circle the photo cut at the top or bottom and for a square prepared without cropping to the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edgeretina.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """How strong each variation is; every setting at 0 / False leaves the image unchanged.

    Standard deviations are of the logarithm of the factor (a log-normal factor around 1).
    max_blur_sigma is a fraction of the image side (0.004: 0.9 px at 224 px).
    Raises ConfigError for negative strengths, max_rotation above 180, max_zoom above 0.25 or a
    blur probability outside [0, 1].
    """

    flip: bool = True                # left/right (the other eye) and up/down, each with probability 1/2
    max_rotation: float = 180.0      # degrees, uniform in [-max, max]; 180: any angle
    max_zoom: float = 0.1            # zoom in by a factor uniform in [1, 1 + max_zoom]
    brightness: float = 0.15
    contrast: float = 0.1
    colour: float = 0.05
    gamma: float = 0.1
    blur_probability: float = 0.2
    max_blur_sigma: float = 0.004

    def __post_init__(self):
        for name in ("max_rotation", "max_zoom", "brightness", "contrast", "colour", "gamma", "max_blur_sigma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.max_rotation > 180.0:
            raise ConfigError(f"augmentation max_rotation is in degrees, at most 180, got {self.max_rotation}")
        if self.max_zoom > 0.25:
            raise ConfigError(f"augmentation max_zoom above 0.25 crops too much of the retina, got {self.max_zoom}")
        if not 0.0 <= self.blur_probability <= 1.0:
            raise ConfigError(f"augmentation blur_probability must lie in [0, 1], got {self.blur_probability}")


NO_AUGMENTATION = AugmentConfig(flip=False, max_rotation=0.0, max_zoom=0.0, brightness=0.0, contrast=0.0,
                                colour=0.0, gamma=0.0, blur_probability=0.0)


@dataclass(frozen=True)
class AugmentParams:
    """One image's draw. The identity: no flips, angle 0, zoom 1, all factors 1, blur 0."""

    flip_x: bool = False
    flip_y: bool = False
    angle: float = 0.0          # degrees, counter-clockwise as cv2.getRotationMatrix2D
    zoom: float = 1.0
    gain: float = 1.0
    contrast: float = 1.0
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    blur_sigma: float = 0.0     # pixels

    @property
    def moves_pixels(self) -> bool:
        return self.flip_x or self.flip_y or self.angle % 360.0 != 0.0 or self.zoom != 1.0


def draw_params(rng: np.random.Generator, config: AugmentConfig, size: int) -> AugmentParams:
    """One image's parameters. Always draws the same count of numbers, so switching one variation off
    leaves the draws of the others as they were."""
    u = rng.random(6)
    normal = rng.normal(0.0, 1.0, size=6)
    return AugmentParams(
        flip_x=config.flip and u[0] < 0.5,
        flip_y=config.flip and u[1] < 0.5,
        angle=float((2.0 * u[2] - 1.0) * config.max_rotation),
        zoom=float(1.0 + u[3] * config.max_zoom),
        gain=float(math.exp(normal[0] * config.brightness)),
        contrast=float(math.exp(normal[1] * config.contrast)),
        colour=tuple(float(math.exp(v * config.colour)) for v in normal[2:5]),
        gamma=float(math.exp(normal[5] * config.gamma)),
        blur_sigma=float(u[5] * config.max_blur_sigma * size) if u[4] < config.blur_probability else 0.0,
    )


def augment(images_u8: np.ndarray, rng: np.random.Generator, lesions: np.ndarray | None = None,
            config: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Augment a batch: uint8 [B, S, S, 3] and optional lesion grids uint8 [B, L, h, w] -> new arrays of
    the same shapes (the inputs are not modified)."""
    config = config or AugmentConfig()
    images = np.empty_like(images_u8)
    grids = np.empty_like(lesions) if lesions is not None else None
    for i, image in enumerate(images_u8):
        params = draw_params(rng, config, image.shape[0])
        images[i], grid = apply(image, params, lesions[i] if lesions is not None else None)
        if grids is not None:
            grids[i] = grid
    return images, grids


def apply(image: np.ndarray, params: AugmentParams,
          grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (and its lesion grid [L, h, w]) under `params`; the identity returns equal copies."""
    field = field_mask(image)
    if not field.any():
        return image.copy(), (grid.copy() if grid is not None else None)
    out, out_grid = image, grid
    if params.moves_pixels:
        matrix = _affine(params, field_centre(field))
        out = cv2.warpAffine(image, matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out = cv2.bitwise_and(out, out, mask=field)
        if grid is not None:
            out_grid = warp_grid(grid, matrix, image.shape[0])
    out = _photometric(out, field, params)
    return (out if out is not image else image.copy(),
            (out_grid if out_grid is not grid else grid.copy()) if grid is not None else None)


def field_mask(image: np.ndarray) -> np.ndarray:
    """uint8 [S, S], 255 where any channel is not black (the field of view of a prepared image)."""
    red, green, blue = cv2.split(np.ascontiguousarray(image))
    return (cv2.max(cv2.max(red, green), blue) > 0).astype(np.uint8) * 255


def field_centre(field: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel-index coordinates of a field mask's centre: the mean of the rows where the field is
    widest and of the columns where it is tallest (within a pixel)."""
    inside = field > 0
    widths, heights = inside.sum(axis=1), inside.sum(axis=0)
    rows = np.flatnonzero(widths >= widths.max() - 1)
    cols = np.flatnonzero(heights >= heights.max() - 1)
    return float(cols.mean()), float(rows.mean())


def _affine(params: AugmentParams, centre: tuple[float, float]) -> np.ndarray:
    """2x3 matrix (pixel-index coordinates, forward: source -> target) of flip, then rotation and zoom,
    about `centre`."""
    cx, cy = centre
    flip = np.diag([-1.0 if params.flip_x else 1.0, -1.0 if params.flip_y else 1.0, 1.0])
    flip[0, 2] = 2.0 * cx if params.flip_x else 0.0
    flip[1, 2] = 2.0 * cy if params.flip_y else 0.0
    rotate = np.vstack([cv2.getRotationMatrix2D((cx, cy), params.angle, params.zoom), [0.0, 0.0, 1.0]])
    return (rotate @ flip)[:2]


def warp_grid(grid: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
    """A patch grid [L, h, w] under the image's 2x3 affine `matrix` (pixel-index coordinates of an
    image_size square), nearest-neighbour in both directions (see the module docstring)."""
    _, h, w = grid.shape
    # pixel index x -> grid index g = s * (x + 0.5) - 0.5 per axis, so the grid's affine is C M C^-1
    to_grid = np.array([[w / image_size, 0.0, 0.5 * w / image_size - 0.5],
                        [0.0, h / image_size, 0.5 * h / image_size - 0.5], [0.0, 0.0, 1.0]])
    forward = to_grid @ np.vstack([matrix, [0.0, 0.0, 1.0]]) @ np.linalg.inv(to_grid)
    out = np.zeros_like(grid)
    ii, jj = np.mgrid[0:h, 0:w]
    cells = np.stack([jj.ravel(), ii.ravel(), np.ones(h * w)])               # [3, h*w] as (x, y, 1)
    src = np.rint(np.linalg.inv(forward) @ cells).astype(int)
    inside = (src[0] >= 0) & (src[0] < w) & (src[1] >= 0) & (src[1] < h)
    out[:, ii.ravel()[inside], jj.ravel()[inside]] = grid[:, src[1, inside], src[0, inside]]
    layer, si, sj = np.nonzero(grid)
    if layer.size:
        dst = np.rint(forward @ np.stack([sj, si, np.ones(si.size)])).astype(int)
        keep = (dst[0] >= 0) & (dst[0] < w) & (dst[1] >= 0) & (dst[1] < h)
        out[layer[keep], dst[1, keep], dst[0, keep]] = np.maximum(out[layer[keep], dst[1, keep], dst[0, keep]],
                                                                 grid[layer[keep], si[keep], sj[keep]])
    return out


def _photometric(image: np.ndarray, field: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Contrast, gain, colour and gamma are one pointwise curve per channel (a 256-entry table: cv2.LUT
    is ~20x faster than the float arithmetic); the blur, when drawn, runs in float inside the field."""
    curve = params.gain != 1.0 or params.contrast != 1.0 or params.colour != (1.0, 1.0, 1.0) or params.gamma != 1.0
    if not curve and params.blur_sigma == 0.0:
        return image
    out = image
    if curve:
        levels = np.arange(256, dtype=np.float64)[:, None]
        mean = float(np.mean(cv2.mean(image, mask=field)[:3])) if params.contrast != 1.0 else 0.0
        values = ((levels - mean) * params.contrast + mean) * params.gain * np.asarray(params.colour)[None, :]
        values = 255.0 * (np.clip(values, 0.0, 255.0) / 255.0) ** params.gamma
        table = np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(256, 1, 3)
        out = cv2.LUT(np.ascontiguousarray(image), table)
    if params.blur_sigma > 0.0:
        mask = (field > 0).astype(np.float32)
        # normalised inside the field (blur(f * m) / blur(m)), so the black outside does not darken the rim
        f = out.astype(np.float32) * mask[..., None]
        blurred = cv2.GaussianBlur(f, (0, 0), params.blur_sigma, borderType=cv2.BORDER_CONSTANT)
        weight = cv2.GaussianBlur(mask, (0, 0), params.blur_sigma, borderType=cv2.BORDER_CONSTANT)
        out = np.clip(np.rint(blurred / np.maximum(weight, 1e-3)[..., None]), 0, 255).astype(np.uint8)
    return cv2.bitwise_and(out, out, mask=field)
