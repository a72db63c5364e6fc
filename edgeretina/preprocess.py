"""The one preprocessing of edgeretina: decode, field of view, crop, Ben Graham, resize, normalise.

Training data loading, calibration, export parity checks and the on-device runtime all call this
module, so a model always sees pixels prepared the same way. It needs numpy, OpenCV and Pillow only.

Coordinates. Every position (``FieldOfView.cx``, ``Geometry.crop_box`` ...) is in *continuous*
pixel coordinates of the decoded image: the image covers ``[0, W] x [0, H]``, and the pixel in row
``i``, column ``j`` covers ``[j, j + 1) x [i, i + 1)``, so its centre is ``(j + 0.5, i + 0.5)``.
The same convention holds for the model's input square, so mapping between the two is one scale
and one offset per axis, with no half-pixel fudge anywhere.

Pipeline (``prepare``): detect the circular field of view (FOV) on a small copy; cut the square
circumscribing the circle out of the photo (rounded to whole pixels, padded with black where the
circle leaves the image); resize it to ``image_size`` (``INTER_AREA`` when shrinking); optionally
subtract the local average (Ben Graham); zero everything outside the circle. Ben Graham runs
*after* the resize, at the model resolution: it is ~40x cheaper there, and its sigma is defined as
a fraction of ``image_size`` anyway.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from edgeretina.errors import ConfigError, ImageDecodeError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_PIXELS",
    "PreprocessConfig",
    "FieldOfView",
    "Geometry",
    "decode_image",
    "detect_fov",
    "prepare",
    "normalize",
    "preprocess",
    "map_to_original",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Largest image (width x height) ``decode_image`` accepts, checked from the header before any pixel
#: is decoded. 120 MP is twice the largest fundus camera sensor we know of (~61 MP full-frame
#: DSLR backs); a bigger "photo" is a mistake or a decompression bomb (120 MP RGB = 360 MB).
MAX_PIXELS = 120_000_000


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model's input is prepared. Saved in every checkpoint and bundle manifest.

    ``ben_graham_sigma`` is the Gaussian sigma of the local average as a fraction of
    ``image_size``. The default 0.05 (11.2 px at 224) matches the widely used Kaggle APTOS-2019
    recipe (``sigmaX=10`` at 224 px). Ben Graham's original Kaggle-2015 setting was sigma = radius/30,
    i.e. ~0.017 of the image size: it keeps less of the mid-scale structure (haemorrhages, exudate
    clusters) and more of the fine noise; 0.05 is the gentler, more common choice.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_to_fov: bool = True
    ben_graham: bool = False
    ben_graham_sigma: float = 0.05
    mask_outside_fov: bool = True
    # JPEGs larger than twice this on the long side are decoded at 1/2, 1/4 or 1/8 scale by libjpeg
    # (DCT scaling), keeping at least this many pixels: a 12 MP photo then costs a fraction of the
    # memory and time, and nothing downstream needs more (quality works at 512 px, the model at
    # image_size, overlays at <= 1600 px). 0 decodes at full size.
    decode_max_side: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)):
            raise ConfigError(f"image_size must be an integer, got {self.image_size!r}")
        if not 16 <= int(self.image_size) <= 4096:
            raise ConfigError(f"image_size must be in [16, 4096], got {self.image_size}")
        object.__setattr__(self, "image_size", int(self.image_size))
        for name in ("mean", "std"):
            value = _float_triple(name, getattr(self, name))
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")
        for name in ("crop_to_fov", "ben_graham", "mask_outside_fov"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        sigma = self.ben_graham_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.number)):
            raise ConfigError(f"ben_graham_sigma must be a number, got {sigma!r}")
        if not 0.0 < float(sigma) <= 1.0:
            raise ConfigError(f"ben_graham_sigma must be in (0, 1], got {sigma}")
        object.__setattr__(self, "ben_graham_sigma", float(sigma))
        if isinstance(self.decode_max_side, bool) or not isinstance(self.decode_max_side, (int, np.integer)) \
                or self.decode_max_side < 0:
            raise ConfigError(f"decode_max_side must be a non-negative integer, got {self.decode_max_side!r}")
        object.__setattr__(self, "decode_max_side", int(self.decode_max_side))

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """Inverse of ``to_dict``. Strict: unknown keys or bad values raise ``ConfigError``;
        missing keys take their defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown preprocess config keys: {', '.join(map(str, unknown))}")
        return cls(**d)


def _float_triple(name: str, value) -> tuple[float, float, float]:
    numbers = isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value
    )
    if not numbers or len(value) != 3 or not all(np.isfinite(float(v)) for v in value):
        raise ConfigError(f"{name} must be three finite numbers, got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Decoding


def decode_image(source: str | os.PathLike | bytes, max_side: int = 0) -> np.ndarray:
    """Decode a file (path) or its bytes to an RGB uint8 array of shape (H, W, 3), writeable.

    max_side > 0: a JPEG at least twice that on its long side is decoded at a reduced scale
    (1/2, 1/4, 1/8) that keeps the long side >= max_side (``PreprocessConfig.decode_max_side``).

    Handles JPEG, PNG, TIFF, BMP and whatever else Pillow reads; 16-bit images are scaled to 8 bit
    (high byte, as Pillow does for 16-bit RGB), grayscale becomes 3 equal channels, alpha is
    composited on black (transparent = background), palette and CMYK are converted, and the EXIF
    orientation is applied. Only the first frame of multi-frame files is read.

    Raises ``ImageDecodeError`` whose message starts with one of: ``file not found``,
    ``empty file``, ``not an image (...)``, ``truncated or corrupt image``,
    ``image too large (W x H > limit)``. Truncation is an error, never a silently grey image.
    """
    data, where = _read_source(source)
    if len(data) == 0:
        raise ImageDecodeError("empty file" + where)
    try:
        # Pillow parses the header only. (Between its own 89 MP and our 120 MP limit it emits a
        # DecompressionBombWarning; silencing it would need warnings.catch_warnings, which is not
        # thread-safe, and decoding runs in worker threads.)
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large ({_bomb_pixels(e)} pixels > {MAX_PIXELS})" + where) from None
    except UnidentifiedImageError:
        return _decode_unidentified(data, where)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"truncated or corrupt image ({e})" + where) from None

    width, height = im.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"image too large ({width} x {height} > {MAX_PIXELS} pixels)" + where)
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"truncated or corrupt image (size {width} x {height})" + where)
    if _missing_end_marker(data, im.format):
        raise ImageDecodeError(f"truncated or corrupt image (no {im.format} end marker)" + where)
    reduction = _jpeg_reduction(max(width, height), max_side) if im.format == "JPEG" else 1
    rgb = _fast_jpeg(data, reduction) if im.format == "JPEG" and im.mode in ("RGB", "L") else None
    try:
        if rgb is None:
            im.load()  # strict unless someone set ImageFile.LOAD_TRUNCATED_IMAGES; the marker check covers that
            rgb = _pil_to_rgb8(im)
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageDecodeError(f"truncated or corrupt image ({e})" + where) from None
    rgb = _apply_orientation(rgb, _exif_orientation(im))  # after load: PNG may carry EXIF after the data
    return _owned(rgb)


def _owned(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.flags.c_contiguous and rgb.flags.writeable else np.array(rgb, order="C")


def _decode_unidentified(data: bytes, where: str) -> np.ndarray:
    """Pillow does not know the file. TIFF variants it cannot read (e.g. float RGB) go to OpenCV's
    libtiff, after our own header size check; anything else is not an image."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        raise ImageDecodeError(f"not an image ({_describe_unknown(data)})" + where)
    size = _tiff_size(data)
    if size is None:
        raise ImageDecodeError("truncated or corrupt image (unreadable TIFF header)" + where)
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"image too large ({width} x {height} > {MAX_PIXELS} pixels)" + where)
    rgb = _cv2_decode(data)
    if rgb is None:
        raise ImageDecodeError("truncated or corrupt image (TIFF variant not readable)" + where)
    return _owned(rgb)


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first IFD of a classic TIFF, without decoding anything."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, offset)
        found = {}
        for i in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", data, offset + 2 + 12 * i)
            if tag in (256, 257):
                fmt = order + ("H" if kind == 3 else "I")
                found[tag] = struct.unpack_from(fmt, value)[0]
    except struct.error:
        return None
    if 256 not in found or 257 not in found:
        return None
    return int(found[256]), int(found[257])


def _read_source(source) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), ""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"decode_image takes a path or bytes, got {type(source).__name__}")
    path = Path(source)
    where = f": {path}"
    try:
        return path.read_bytes(), where
    except FileNotFoundError:
        raise ImageDecodeError("file not found" + where) from None
    except IsADirectoryError:
        raise ImageDecodeError("not an image (a directory)" + where) from None
    except PermissionError:
        raise ImageDecodeError("not readable (permission denied)" + where) from None
    except OSError as e:
        raise ImageDecodeError(f"not readable ({e.strerror or e})" + where) from None


def _bomb_pixels(error: Exception) -> str:
    m = re.search(r"\((\d+) pixels\)", str(error))
    return m.group(1) if m else "too many"


def _describe_unknown(data: bytes) -> str:
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if b"DICM" == data[128:132]:
        return "a DICOM file; export the photo as JPEG/PNG/TIFF"
    try:
        text = head.decode("utf-8")
        if text and all(c.isprintable() or c.isspace() for c in text):
            return "looks like text"
    except UnicodeDecodeError:
        pass
    return f"unrecognised format, starts with {data[:8]!r}"


def _missing_end_marker(data: bytes, fmt: str | None) -> bool:
    """Structural truncation check, independent of Pillow's global LOAD_TRUNCATED_IMAGES and of
    OpenCV (which decodes a truncated JPEG into a grey-bottomed image with only a warning)."""
    if fmt in ("JPEG", "MPO"):
        return not _jpeg_complete(data)
    if fmt == "PNG":
        return not _png_complete(data)
    return False


def _jpeg_complete(data: bytes) -> bool:
    """Walk the marker segments to the first top-level Start-Of-Scan (skipping APPn segments, which
    may hold a whole thumbnail JPEG), then require an End-Of-Image after it. Entropy-coded data
    byte-stuffs 0xFF, so FFD9 cannot occur there by chance; bytes after EOI (trailers) are fine."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:
            return data.find(b"\xff\xd9", pos) != -1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _png_complete(data: bytes) -> bool:
    """Walk the chunks; a complete PNG reaches IEND with all its bytes present."""
    pos, n = 8, len(data)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + length
    return False


_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10


def _jpeg_reduction(long_side: int, max_side: int) -> int:
    """The largest libjpeg scale denominator (1, 2, 4, 8) that keeps the long side >= max_side."""
    if max_side <= 0:
        return 1
    return next((r for r in (8, 4, 2) if long_side // r >= max_side), 1)


_REDUCED_BGR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _fast_jpeg(data: bytes, reduction: int = 1) -> np.ndarray | None:
    """RGB or gray JPEG through OpenCV's libjpeg-turbo: 2-3x faster here than Pillow's decode plus
    array copy, bit-identical output. The caller applies the EXIF orientation."""
    buf = np.frombuffer(data, np.uint8)
    if reduction > 1:
        bgr = cv2.imdecode(buf, _REDUCED_BGR[reduction] | cv2.IMREAD_IGNORE_ORIENTATION)
        return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if _IMREAD_RGB is not None:
        return cv2.imdecode(buf, _IMREAD_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF must not make a good photo unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (same result as ``PIL.ImageOps.exif_transpose``)."""
    if orientation == 2:
        return rgb[:, ::-1]
    if orientation == 3:
        return rgb[::-1, ::-1]
    if orientation == 4:
        return rgb[::-1]
    if orientation == 5:
        return rgb.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(rgb, k=-1)
    if orientation == 7:
        return rgb.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(rgb, k=1)
    return rgb


def _pil_to_rgb8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode == "L":
        return cv2.cvtColor(np.asarray(im), cv2.COLOR_GRAY2RGB)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return cv2.cvtColor(_to_uint8(np.asarray(im)), cv2.COLOR_GRAY2RGB)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        return _composite_on_black(np.asarray(im.convert("RGBA")))
    return np.asarray(im.convert("RGB"))  # P, 1, CMYK, YCbCr, LAB, HSV, ...


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or 32-bit int / float) samples to 8 bit. Integers are treated as 16-bit
    (keep the high byte, like Pillow's own 16-bit RGB path); floats in [0, 1] as fractions."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        peak = 1.0 if a.max(initial=0.0) <= 1.0 else 65535.0
        return np.clip(a * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
    return (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _cv2_decode(data: bytes) -> np.ndarray | None:
    """OpenCV decode of any depth and channel count to RGB uint8 (EXIF orientation not applied)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if arr is None or arr.size == 0:
        return None
    if arr.ndim == 2:
        return cv2.cvtColor(_to_uint8(arr), cv2.COLOR_GRAY2RGB)
    if arr.shape[2] == 4:
        return _composite_on_black(cv2.cvtColor(_to_uint8(arr), cv2.COLOR_BGRA2RGBA))
    return cv2.cvtColor(_to_uint8(arr[..., :3]), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------
# Field of view


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
    from the dark border level (2nd percentile) to the fundus level (98th percentile) -> largest
    connected bright region -> its left/right extent on every row and top/bottom extent on every
    column, located to sub-pixel precision, leaving out extents that lie on the image edge (where
    the sensor cut the circle off) -> robust circle fit (algebraic fit, started from the row extents
    only so that flat top/bottom cuts inside the image cannot bias it, then iteratively trimmed).

    The fit is accepted (``found=True``) only if it is a plausible fundus field of view: enough
    edge points on the circle covering at least 90 degrees of it, the bright region agrees with the
    circle (IoU >= 0.8), little is bright outside it, the radius is within reason and at least a
    quarter of the circle is inside the image (its centre may be outside). Photos without any dark border
    (full-frame, e.g. an ordinary photograph, or a fundus cropped inside its circle) have no visible
    circle edge and return ``found=False``, as do all-black and uniform images: the field of view
    is what proves the photo is a fundus image, and without it the quality gate says
    ``no_field_of_view``; ``prepare`` still works (centred square).
    """
    rgb = _check_rgb(rgb)
    height, width = rgb.shape[:2]
    fallback = _fallback_fov(height, width)
    # Every k-th pixel (the median filter below removes the noise this keeps): reads 1/k of the
    # photo, 3x faster than an INTER_AREA decimation, and as accurate here (sub-pixel edges).
    # Working pixel j is photo pixel j * k + k // 2; the last rows/columns just count as "edge".
    k = max(1, max(height, width) // _FOV_WORK_SIZE)
    hs, ws = height // k, width // k
    small = rgb if k == 1 else rgb[k // 2 :: k, k // 2 :: k][:hs, :ws]
    shift = k // 2 + 0.5 - k / 2.0  # working (j + 0.5) * k + shift = photo pixel centre
    v8 = cv2.medianBlur(np.maximum(np.maximum(small[..., 0], small[..., 1]), small[..., 2]), 5)
    cdf = np.cumsum(np.bincount(v8.ravel(), minlength=256)) / v8.size
    lo, hi = float(np.searchsorted(cdf, 0.02)), float(np.searchsorted(cdf, 0.98))
    v = v8.astype(np.float32)
    if hi - lo < 12.0:  # all black, uniform, or nothing brighter than the noise
        return fallback
    t = lo + 0.15 * (hi - lo)
    bright = v > t
    region = _largest_region(bright)
    if region is None:
        return fallback

    x, y, from_rows = _edge_points(v, region, t)
    if x.size < 20:
        return fallback
    fit = _robust_circle_fit(x, y, from_rows)
    if fit is None:
        return fallback
    cx, cy, r, inliers = fit
    if not _plausible_fov(cx, cy, r, x, y, inliers, region, bright):
        return fallback
    cx_o, cy_o, r_o = cx * k + shift, cy * k + shift, r * k
    return FieldOfView(
        cx=float(cx_o),
        cy=float(cy_o),
        radius=float(r_o),
        found=True,
        fraction_visible=_fraction_inside(cx_o, cy_o, r_o, width, height),
    )


def _fallback_fov(height: int, width: int) -> FieldOfView:
    return FieldOfView(cx=width / 2.0, cy=height / 2.0, radius=min(height, width) / 2.0, found=False,
                       fraction_visible=0.0)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {desc}")
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ValueError(f"image too small: {rgb.shape[1]} x {rgb.shape[0]}")
    return rgb


def _largest_region(mask: np.ndarray) -> np.ndarray | None:
    """Largest 8-connected component of ``mask``, holes filled (a dark fovea stays inside)."""
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[best, cv2.CC_STAT_AREA] < 0.02 * mask.size:
        return None
    component = (labels == best).astype(np.uint8)
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(component)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


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


def _plausible_fov(cx, cy, r, x, y, inliers, region, bright) -> bool:
    """Is the fitted circle the edge of a fundus field of view rather than any bright blob?"""
    hs, ws = region.shape
    xi, yi = x[inliers], y[inliers]
    # most edge points lie on the circle (flat cuts and labels touching the rim stay below 50 %)
    if xi.size < 20 or xi.size < 0.5 * x.size:
        return False
    if not 0.15 * min(ws, hs) <= r <= 1.5 * max(ws, hs):
        return False
    # the points on the circle cover at least 90 degrees of it (not a short, nearly straight arc)
    angles = np.arctan2(yi - cy, xi - cx)
    bins = np.unique(np.floor((angles + np.pi) / (2 * np.pi) * 36).astype(int))
    if bins.size < 9 or _fraction_inside(cx, cy, r, ws, hs) < 0.25:  # the centre may lie outside
        return False
    yy, xx = np.ogrid[:hs, :ws]
    d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
    circle = d2 <= r * r
    # the bright region fills the circle ...
    iou = np.count_nonzero(circle & region) / max(np.count_nonzero(circle | region), 1)
    # ... and outside it the photo is dark (a notch, a tab or a label is allowed; scenery is not)
    outside = d2 > (1.03 * r) ** 2
    n_out = np.count_nonzero(outside)
    bright_out = np.count_nonzero(bright & outside) / n_out if n_out else 0.0
    return iou >= 0.8 and bright_out <= 0.1


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


# --------------------------------------------------------------------------------------------
# Prepare, normalise, map back


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

    mask = None
    if fov.found:
        scale = size / side
        fcx, fcy, fr = (fov.cx - x0) * scale, (fov.cy - y0) * scale, fov.radius * scale
        mask = _disc_mask(size, fcx, fcy, fr)
    if config.ben_graham:
        # average only over pixels 2 px inside the rim: the anti-aliased rim itself is darker
        support = _disc_mask(size, fcx, fcy, fr - 2.0) if mask is not None else None
        out = _ben_graham(out, config.ben_graham_sigma * size, support)
    if config.mask_outside_fov and mask is not None:
        out[~mask] = 0
    geometry = Geometry(
        original_size=(height, width),
        crop_box=(float(x0), float(y0), float(x0 + side), float(y0 + side)),
        fov=fov,
    )
    return out, geometry


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
