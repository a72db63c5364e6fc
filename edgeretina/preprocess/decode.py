"""decode_image: a path or bytes -> RGB uint8 (H, W, 3), for every format Pillow or OpenCV reads and for
DICOM (dispatched to preprocess/dicom.py); 16-bit, gray, alpha, palette and EXIF orientation handled; bad
files raise ``ImageDecodeError``."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile, UnidentifiedImageError

from edgeretina.errors import ImageDecodeError
from edgeretina.preprocess.dicom import DICOM_SUFFIXES, decode_dicom, has_dicom_magic
from edgeretina.preprocess.formats import _describe_unknown, _missing_end_marker, _rows_missing, _tiff_size

#: Largest image (width x height) ``decode_image`` accepts, checked from the header before any pixel
#: is decoded. 120 MP is twice the largest fundus camera sensor we know of (~61 MP full-frame
#: DSLR backs); a bigger "photo" is a mistake or a decompression bomb (120 MP RGB = 360 MB).
MAX_PIXELS = 120_000_000


def decode_image(source: str | os.PathLike | bytes, max_side: int = 0, frame: int | None = None) -> np.ndarray:
    """Decode a file (path) or its bytes to an RGB uint8 array of shape (H, W, 3), writeable.

    max_side > 0: a JPEG at least twice that on its long side is decoded at a reduced scale
    (1/2, 1/4, 1/8) that keeps the long side >= max_side (``PreprocessConfig.decode_max_side``).

    Handles JPEG, PNG, TIFF, BMP and whatever else Pillow reads; 16-bit images are scaled to 8 bit
    (high byte, as Pillow does for 16-bit RGB), grayscale becomes 3 equal channels, alpha is
    composited on black (transparent = background), palette and CMYK are converted, and the EXIF
    orientation is applied. Only the first frame of multi-frame files is read.

    A DICOM file (the 'DICM' marker, or a ``.dcm``/``.dicom`` name) goes to ``preprocess.dicom``: frame
    (1-based) names the frame of a multi-frame file; its errors are ``DicomError``s. A frame other than 1
    of any other file is an error.

    Raises ``ImageDecodeError`` whose message starts with one of: ``file not found``,
    ``empty file``, ``not an image (...)``, ``truncated or corrupt image``,
    ``image too large (W x H > limit)``. Truncation is an error, never a silently grey image.
    """
    data, where = _read_source(source)
    if len(data) == 0:
        raise ImageDecodeError("empty file" + where)
    if has_dicom_magic(data) or _named_dicom(source):
        return decode_dicom(data, where, frame, MAX_PIXELS, max_side)
    if frame not in (None, 1):
        raise ImageDecodeError(f"no frame {frame!r}: not a DICOM file, it holds one image" + where)
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
    missing = _rows_missing(data, im)
    if missing:
        raise ImageDecodeError(f"truncated or corrupt image ({missing})" + where)
    rgb = None
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        rgb = _strict_jpeg(data, im.size, _jpeg_reduction(max(width, height), max_side), where)
    try:
        if rgb is None:
            im.load()  # strict unless someone set ImageFile.LOAD_TRUNCATED_IMAGES; the marker check covers that
            rgb = _pil_to_rgb8(im)
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageDecodeError(f"truncated or corrupt image ({_pillow_message(e, im.format)})" + where) from None
    rgb = _apply_orientation(rgb, _exif_orientation(im))  # after load: PNG may carry EXIF after the data
    return _owned(rgb)


def _named_dicom(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in DICOM_SUFFIXES


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


def _jpeg_reduction(long_side: int, max_side: int) -> int:
    """The largest libjpeg scale denominator (1, 2, 4, 8) that keeps the long side >= max_side."""
    if max_side <= 0:
        return 1
    return next((r for r in (8, 4, 2) if long_side // r >= max_side), 1)


def _strict_jpeg(data: bytes, size: tuple[int, int], reduction: int, where: str) -> np.ndarray:
    """RGB or gray JPEG through libjpeg-turbo (simplejpeg) in strict mode, at 1/reduction scale.

    Strict: a warning libjpeg raises about the entropy-coded data ("Corrupt JPEG data: premature end of data
    segment", "... extraneous bytes before marker 0xd9", "bad Huffman code") is an error. Without it libjpeg
    fills what it could not decode with flat blocks and prints the warning on stderr, where it lands in the
    middle of a results table (OpenCV's decoder did both). Every such warning counts: in a mutation probe of
    phantom JPEGs even "2 extraneous bytes" came from damaged data (one changed bit, mean error 0.2-5 levels),
    while padding a good file before its end marker gives no warning.

    Same pixels as the libjpeg-turbo of OpenCV and Pillow (ISLOW DCT, fancy upsampling: bit-identical on
    4:2:0, 4:2:2, 4:4:4, progressive, restart markers and gray, at full and reduced scale), and ~20 % faster
    than OpenCV here. The caller applies the EXIF orientation."""
    width, height = size
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_factor=reduction,
                                      min_width=width // reduction, min_height=height // reduction)
    except ValueError as e:
        raise ImageDecodeError(f"truncated or corrupt image (libjpeg: {_one_line(e)})" + where) from None


def _pillow_message(error: Exception, fmt: str | None) -> str:
    """Pillow's libtiff path says only "decoder error -2"; name the codec and what the code means (libtiff's
    own words went to stderr, which the CLI sends to its log)."""
    m = re.fullmatch(r"decoder error (-?\d+)", str(error))
    if m is None:
        return _one_line(error)
    meaning = ImageFile.ERRORS.get(int(m.group(1)), f"error {m.group(1)}")
    return f"{'libtiff' if fmt == 'TIFF' else fmt or 'decoder'}: {meaning}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


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
