"""prepare, normalize, preprocess: a decoded photo -> the model's input square (FOV crop, resize,
Ben Graham, mask outside the FOV) -> normalised float32, with the Geometry that maps it back."""

from __future__ import annotations

import cv2
import numpy as np

from edgeretina.preprocess.config import PreprocessConfig
from edgeretina.preprocess.fov import FieldOfView, _check_rgb, _fallback_fov, detect_fov
from edgeretina.preprocess.geometry import Geometry


def prepare(rgb: np.ndarray, config: PreprocessConfig, fov: FieldOfView | None = None) -> tuple[np.ndarray, Geometry]:
    """Prepare a decoded photo for the model: uint8 (S, S, 3) RGB at ``config.image_size``.

    Steps: FOV crop (the square circumscribing the circle, black padding where the circle leaves
    the image), resize (INTER_AREA when shrinking, bilinear when enlarging), Ben Graham if enabled,
    zero outside the FOV if enabled. Pass ``fov`` to reuse a detection (e.g. from the quality
    gate). If the FOV is not found, the centred square of the whole image is used and nothing is
    masked; this never raises on a valid array — deciding gradability is the quality gate's job.
    """
    rgb = _check_rgb(rgb)
    height, width = rgb.shape[:2]
    if fov is None:
        need = config.crop_to_fov or config.mask_outside_fov
        fov = detect_fov(rgb) if need else _fallback_fov(height, width)
    size = config.image_size

    if config.crop_to_fov and fov.found:
        cx, cy, side = fov.cx, fov.cy, max(1, int(round(2.0 * fov.radius)))
    else:
        cx, cy, side = width / 2.0, height / 2.0, min(height, width)
    # Shrinking by k >= 2: grow the square to a multiple of k so that a first, exact integer box
    # filter (OpenCV's fast INTER_AREA path) takes it to between 1x and 2x the output size; a
    # second INTER_AREA finishes. ~4x faster than one fractional INTER_AREA, and the same kind of
    # anti-aliased box filtering (not bit-identical to it: this two-step IS the definition here).
    k = side // size
    if k >= 2:
        side = -(-side // k) * k
    x0, y0 = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))

    crop = _crop_padded(rgb, x0, y0, side)
    if k >= 2:
        crop = cv2.resize(crop, (side // k, side // k), interpolation=cv2.INTER_AREA)
    if crop.shape[0] == size:
        out = np.array(crop, order="C")  # own, writeable memory (never a view of the caller's photo)
    else:
        interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
        out = cv2.resize(crop, (size, size), interpolation=interp)

    geometry = Geometry(
        original_size=(height, width),
        crop_box=(float(x0), float(y0), float(x0 + side), float(y0 + side)),
        fov=fov,
    )
    mask = input_field_mask(geometry, size) if fov.found else None
    if config.ben_graham:
        # average only over pixels 2 px inside the rim: the anti-aliased rim itself is darker
        support = input_field_mask(geometry, size, inset=2.0) if mask is not None else None
        out = _ben_graham(out, config.ben_graham_sigma * size, support)
    if config.mask_outside_fov and mask is not None:
        out[~mask] = 0
    return out, geometry


def input_field_mask(geometry: Geometry, size: int, inset: float = 0.0) -> np.ndarray:
    """bool [size, size]: the model-input pixels whose centres lie in the field-of-view circle (`inset`
    pixels inside its rim) — the pixels `prepare` keeps. The geometry must have found a field."""
    x0, y0, x1, _ = geometry.crop_box
    scale = size / (x1 - x0)
    fov = geometry.fov
    return _disc_mask(size, (fov.cx - x0) * scale, (fov.cy - y0) * scale, fov.radius * scale - inset)


def _crop_padded(rgb: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """``rgb[y0:y0+side, x0:x0+side]`` with black where the square leaves the image (a view when
    it does not)."""
    height, width = rgb.shape[:2]
    x1, y1 = x0 + side, y0 + side
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return rgb[y0:y1, x0:x1]
    out = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


def _disc_mask(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Pixels of a size x size grid whose centres lie inside the circle."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return ((c[None, :] - cx) ** 2 + (c[:, None] - cy) ** 2) <= r * r


def _ben_graham(img: np.ndarray, sigma: float, mask: np.ndarray | None) -> np.ndarray:
    """4 * (img - local average) + 128, clipped (B. Graham, Kaggle DR 2015).

    The local average is a *normalised* Gaussian inside the FOV (blur(img * m) / blur(m)), so the
    black outside does not bleed in: the classic recipe leaves a bright ring at the rim and hides
    it by masking at 90 % of the radius; this keeps the whole field.
    """
    f = img.astype(np.float32)
    if mask is not None:
        m = mask.astype(np.float32)
        num = cv2.GaussianBlur(f * m[..., None], (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
        den = cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
        local = num / np.maximum(den, 1e-3)[..., None]
    else:
        local = cv2.GaussianBlur(f, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    out = 4.0 * (f - local) + 128.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def normalize(images: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (H, W, 3) or (N, H, W, 3) -> C-contiguous float32 (3, H, W) or (N, 3, H, W):
    ``(x / 255 - mean) / std`` per channel (computed as one multiply-add in float32)."""
    ok = isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4)
    if not ok or images.shape[-1] != 3:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"normalize expects uint8 (H, W, 3) or (N, H, W, 3), got {desc}")
    single = images.ndim == 3
    batch = images[None] if single else images
    n, h, w, _ = batch.shape
    out = np.empty((n, 3, h, w), np.float32)
    for c in range(3):
        scale = np.float32(1.0 / (255.0 * config.std[c]))
        offset = np.float32(config.mean[c] / config.std[c])
        np.multiply(batch[..., c], scale, out=out[:, c], dtype=np.float32)
        out[:, c] -= offset
    return out[0] if single else out


def preprocess(rgb: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, Geometry]:
    """``prepare`` then ``normalize``: float32 (3, S, S) ready for the model, and the geometry."""
    prepared, geometry = prepare(rgb, config)
    return normalize(prepared, config), geometry
