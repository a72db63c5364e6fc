"""Damaged image files for robustness testing: seed files of every format the runtime reads, made from one
phantom photograph, and mutation operators that damage them (issue 12, fuzzing).

Seeds (``seed_files``): JPEG (baseline 4:2:0, progressive, with restart markers), PNG (8-bit RGB, 16-bit
RGB, palette), TIFF (uncompressed, LZW, deflate) and DICOM (native RGB, JPEG baseline YBR_FULL_422; needs
the ``dicom`` extra), all of the same small phantom photograph, so each case decodes in milliseconds.

Mutations are plain functions of the bytes and explicit parameters, returning new bytes: ``flip_bits``,
``overwrite``, ``zero_run``, ``truncate``, ``insert``, ``duplicate_segment``, ``remove_segment`` and
``set_field``. ``header_fields`` lists the integer and text fields of a file's header that decide how much
a decoder allocates and how it walks the rest (JPEG SOF size, sampling and segment lengths, PNG IHDR and
chunk lengths, TIFF IFD entries such as ImageWidth and StripByteCounts, DICOM Rows, Columns, NumberOfFrames,
BitsAllocated, element lengths ...); ``segments`` lists the file's structural parts (marker segments and scans,
chunks, IFD entries and strips, data elements and pixel data fragments). ``set_field`` on a PNG and
``repair_png_crcs`` recompute the chunk checksums, so a damaged chunk reaches the decoder instead of being
refused at its CRC. ``mutate`` draws a few of these from a numpy Generator: the random cases of
benchmarks/fuzz_decode.py. ``png_chunk`` and ``png_header_only`` build a PNG by hand (a header that claims
any size, over a few bytes of data).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FORMATS = ("jpeg", "png", "tiff", "dicom")
SUFFIX = {"jpeg": ".jpg", "png": ".png", "tiff": ".tif", "dicom": ".dcm"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEED_SIZE = 160          # px: small enough that a case decodes in milliseconds, large enough for a field of view
SEED_CASE = 7            # the phantom case every seed shows


# ---------------------------------------------------------------------------------------------- seeds

@lru_cache(maxsize=4)
def _photo(size: int, case: int) -> np.ndarray:
    from edgeretina.phantom.config import PhantomConfig
    from edgeretina.phantom.render import render_case

    image = render_case(case, PhantomConfig(size=size, faults="none")).image
    image.setflags(write=False)
    return image


def seed_photo(size: int = SEED_SIZE, case: int = SEED_CASE) -> np.ndarray:
    """The phantom photograph (RGB uint8, read-only) the seeds are made of."""
    return _photo(size, case)


def seed_files(fmt: str, size: int = SEED_SIZE, case: int = SEED_CASE) -> dict[str, bytes]:
    """name -> file bytes, the seeds of one format (``FORMATS``); the same bytes in every run. DICOM raises
    MissingDependencyError without the ``dicom`` extra."""
    return dict(_seed_files(fmt, size, case))


@lru_cache(maxsize=8)
def _seed_files(fmt: str, size: int, case: int) -> dict[str, bytes]:
    rgb = seed_photo(size, case)
    if fmt == "jpeg":
        return {"baseline_420": _pillow(rgb, "JPEG", quality=90, subsampling=2),
                "progressive": _pillow(rgb, "JPEG", quality=90, subsampling=2, progressive=True),
                "restart_markers": _pillow(rgb, "JPEG", quality=90, subsampling=2, restart_marker_blocks=4)}
    if fmt == "png":
        from PIL import Image

        palette = io.BytesIO()
        Image.fromarray(rgb).quantize(64).save(palette, "PNG")
        return {"rgb8": _pillow(rgb, "PNG"), "rgb16": _png16(rgb), "palette": palette.getvalue()}
    if fmt == "tiff":
        return {"raw": _pillow(rgb, "TIFF", compression="raw"), "lzw": _pillow(rgb, "TIFF", compression="tiff_lzw"),
                "deflate": _pillow(rgb, "TIFF", compression="tiff_adobe_deflate")}
    if fmt == "dicom":
        from edgeretina.phantom import dicom_files

        frame = np.array(rgb)
        return {"native_rgb": _dicom_seed(dicom_files.image_dataset([frame], NumberOfFrames=1)),
                "jpeg_ybr_full_422": _dicom_seed(dicom_files.image_dataset([frame], encoding="jpeg", NumberOfFrames=1))}
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _dicom_seed(ds) -> bytes:
    """The file's bytes with fixed UIDs (pydicom draws random ones), so a seed is the same in every run."""
    from pydicom.uid import generate_uid

    from edgeretina.phantom import dicom_files

    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=["edgeretina fuzz seed", keyword]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return dicom_files.to_bytes(ds)


def _pillow(rgb: np.ndarray, fmt: str, **params) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **params)
    return buffer.getvalue()


def _png16(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]).astype(np.uint16) * 257)
    if not ok:
        raise RuntimeError("OpenCV could not write a 16-bit PNG")
    return buffer.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC-32 of type and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, data_bytes: int = 16) -> bytes:
    """A well-formed PNG whose header claims width x height 8-bit RGB pixels over ``data_bytes`` zero bytes of
    image data: what a decompression bomb or a damaged header looks like before any pixel is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * data_bytes))
            + png_chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------ byte mutations

def flip_bits(data: bytes, bits: list[int]) -> bytes:
    """Invert the given bits (bit i is bit i % 8 of byte i // 8; indices wrap around the file)."""
    if not data:
        return data
    out = bytearray(data)
    for bit in bits:
        bit %= 8 * len(out)
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def overwrite(data: bytes, offset: int, payload: bytes) -> bytes:
    """Replace bytes from ``offset`` on with ``payload`` (the file keeps its length)."""
    offset = min(max(offset, 0), len(data))
    payload = payload[:len(data) - offset]
    return data[:offset] + payload + data[offset + len(payload):]


def zero_run(data: bytes, offset: int, length: int) -> bytes:
    """Zero ``length`` bytes from ``offset`` on (a sector that read back as zeros)."""
    offset = min(max(offset, 0), len(data))
    return overwrite(data, offset, bytes(max(0, min(length, len(data) - offset))))


def truncate(data: bytes, length: int) -> bytes:
    """The first ``length`` bytes (an interrupted copy)."""
    return data[:max(0, length)]


def insert(data: bytes, offset: int, payload: bytes) -> bytes:
    """``payload`` inserted before byte ``offset``."""
    offset = min(max(offset, 0), len(data))
    return data[:offset] + payload + data[offset:]


def duplicate_segment(data: bytes, start: int, length: int, at: int) -> bytes:
    """A copy of ``data[start:start + length]`` inserted before byte ``at``."""
    start = min(max(start, 0), len(data))
    return insert(data, at, data[start:start + max(0, length)])


def remove_segment(data: bytes, start: int, length: int) -> bytes:
    """``data`` without ``data[start:start + length]``."""
    start = min(max(start, 0), len(data))
    return data[:start] + data[start + max(0, length):]


# --------------------------------------------------------------------------------- header structure

@dataclass(frozen=True)
class HeaderField:
    """One field of a file's header. encoding: ``be`` / ``le`` (unsigned integer of ``size`` bytes), ``is``
    (a DICOM integer string) or ``text`` (a DICOM string, one of ``choices``); for the two DICOM kinds
    ``offset`` is the value's first byte and its 16-bit length precedes it."""

    name: str
    offset: int
    size: int
    encoding: str
    original: int | str
    choices: tuple[str, ...] = ()

    def edges(self) -> tuple[int | str, ...]:
        """The few values a systematic sweep tries: zero, one, two, the original's neighbours and double, and the
        top of the field's range (every choice of a text field)."""
        if self.encoding == "text":
            return self.choices
        if self.encoding == "is":
            return tuple(sorted({-1, 0, 1, 2, self.original + 1, 65536, 2**31 - 1}))
        top = (1 << (8 * self.size)) - 1
        values = {0, 1, 2, self.original - 1, self.original + 1, self.original * 2, top // 2, top}
        return tuple(sorted(v for v in values if 0 <= v <= top))

    def candidates(self) -> tuple[int | str, ...]:
        """Values worth trying: the edges of the field's range, small counts, and near the original."""
        if self.encoding == "text":
            return self.choices
        top = (1 << (8 * self.size)) - 1 if self.encoding in ("be", "le") else 2**31 - 1
        near = [self.original - 1, self.original + 1, self.original * 2, self.original // 2, self.original * 64]
        values = {0, 1, 2, 3, 4, 7, 8, 9, 12, 15, 16, 17, 255, 256, top, top // 2, top - 1, *near}
        if self.encoding == "is":
            values |= {-1, 65535, 65536, 100_000}
        return tuple(sorted(v for v in values if (self.encoding == "is" or 0 <= v <= top)))


def set_field(data: bytes, field: HeaderField, value: int | str) -> bytes:
    """``data`` with ``field`` set to ``value`` (masked to the field's width). A DICOM string field may change
    length: the element's length follows. On a PNG every chunk CRC is recomputed afterwards."""
    if field.encoding in ("be", "le"):
        raw = (int(value) & ((1 << (8 * field.size)) - 1)).to_bytes(field.size, "big" if field.encoding == "be"
                                                                       else "little")
        out = overwrite(data, field.offset, raw)
    else:
        text = str(value).encode("ascii")
        text += (b"\x00" if field.name.endswith("UID") else b" ") * (len(text) % 2)
        start = field.offset - 2
        if start < 0 or field.offset + field.size > len(data):
            return data
        out = data[:start] + struct.pack("<H", len(text)) + text + data[field.offset + field.size:]
    return repair_png_crcs(out) if out.startswith(PNG_SIGNATURE) else out


def repair_png_crcs(data: bytes) -> bytes:
    """A PNG with every complete chunk's CRC recomputed (damage then reaches zlib and the row filters)."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    out, pos = bytearray(data), len(PNG_SIGNATURE)
    while pos + 12 <= len(out):
        length = int.from_bytes(out[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4:end])) & 0xFFFFFFFF)
        pos = end + 4
    return bytes(out)


def file_format(data: bytes) -> str | None:
    """``jpeg`` / ``png`` / ``tiff`` / ``dicom`` by the file's magic bytes, else None."""
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def header_fields(data: bytes) -> list[HeaderField]:
    """The header fields of a JPEG, PNG, TIFF or DICOM file (by its magic bytes; none for anything else)."""
    parse = {"jpeg": _jpeg_structure, "png": _png_structure, "tiff": _tiff_structure,
             "dicom": _dicom_structure}.get(file_format(data))
    return parse(data)[0] if parse else []


def segments(data: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of the file's structural parts, for ``duplicate_segment`` / ``remove_segment``."""
    parse = {"jpeg": _jpeg_structure, "png": _png_structure, "tiff": _tiff_structure,
             "dicom": _dicom_structure}.get(file_format(data))
    return parse(data)[1] if parse else []


def claim_size(data: bytes, width: int, height: int) -> bytes:
    """The file with its header claiming ``width`` x ``height`` pixels (JPEG SOF, PNG IHDR, TIFF ImageWidth
    and ImageLength, DICOM Columns and Rows; masked to the fields' widths), nothing else changed: the header
    of a decompression bomb."""
    out = data
    for field in header_fields(data):
        dimension = _dimension(field.name)
        if dimension:
            out = set_field(out, field, width if dimension == "width" else height)
    return out


def _dimension(name: str) -> str | None:
    head, _, part = name.partition(".")
    if (head.startswith("SOF") or head == "IHDR") and part in ("width", "height"):
        return part
    return {"ImageWidth": "width", "ImageLength": "height", "Columns": "width", "Rows": "height"}.get(name)


Structure = tuple[list[HeaderField], list[tuple[str, int, int]]]

_JPEG_SOF = {0xC0 + i for i in range(16)} - {0xC4, 0xC8, 0xCC}


def _jpeg_structure(data: bytes) -> Structure:
    fields, spans = [], []
    pos, n, count = 2, len(data), 0
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            spans.append(("EOI", pos, pos + 2))
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = min(pos + 2 + length, n)
        name = _jpeg_name(marker)
        count += 1
        tag = f"{name}#{count}"
        spans.append((tag, pos, end))
        fields.append(HeaderField(f"{tag}.length", pos + 2, 2, "be", length))
        if marker in _JPEG_SOF and pos + 10 <= n:
            fields += [HeaderField(f"{tag}.precision", pos + 4, 1, "be", data[pos + 4]),
                       HeaderField(f"{tag}.height", pos + 5, 2, "be", int.from_bytes(data[pos + 5:pos + 7], "big")),
                       HeaderField(f"{tag}.width", pos + 7, 2, "be", int.from_bytes(data[pos + 7:pos + 9], "big")),
                       HeaderField(f"{tag}.components", pos + 9, 1, "be", data[pos + 9])]
            for c in range(data[pos + 9]):
                at = pos + 10 + 3 * c
                if at + 3 <= n:
                    fields += [HeaderField(f"{tag}.sampling{c}", at + 1, 1, "be", data[at + 1]),
                               HeaderField(f"{tag}.quant_table{c}", at + 2, 1, "be", data[at + 2])]
        elif marker == 0xDD and pos + 6 <= n:
            fields.append(HeaderField(f"{tag}.restart_interval", pos + 4, 2, "be",
                                      int.from_bytes(data[pos + 4:pos + 6], "big")))
        elif marker in (0xC4, 0xDB) and pos + 5 <= n:
            fields.append(HeaderField(f"{tag}.table", pos + 4, 1, "be", data[pos + 4]))
        elif marker == 0xDA and pos + 5 <= n:
            fields.append(HeaderField(f"{tag}.components", pos + 4, 1, "be", data[pos + 4]))
            if end >= pos + 5:
                fields += [HeaderField(f"{tag}.spectral_start", end - 3, 1, "be", data[end - 3]),
                           HeaderField(f"{tag}.spectral_end", end - 2, 1, "be", data[end - 2]),
                           HeaderField(f"{tag}.approximation", end - 1, 1, "be", data[end - 1])]
            scan_end = _jpeg_scan_end(data, end)
            spans.append((f"scan#{count}", end, scan_end))
            end = scan_end
        pos = end
    return fields, spans


def _jpeg_name(marker: int) -> str:
    names = {0xC4: "DHT", 0xDB: "DQT", 0xDA: "SOS", 0xDD: "DRI", 0xFE: "COM"}
    if marker in _JPEG_SOF:
        return f"SOF{marker - 0xC0}"
    if 0xE0 <= marker <= 0xEF:
        return f"APP{marker - 0xE0}"
    return names.get(marker, f"marker{marker:02X}")


def _jpeg_scan_end(data: bytes, pos: int) -> int:
    """Where the entropy-coded data from ``pos`` ends: the next marker other than a stuffed 0xFF or an RST."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1 if following == 0xFF else 2
            continue
        return pos


_PNG_IHDR = (("width", 0, 4), ("height", 4, 4), ("bit_depth", 8, 1), ("colour_type", 9, 1),
             ("compression", 10, 1), ("filter", 11, 1), ("interlace", 12, 1))


def _png_structure(data: bytes) -> Structure:
    fields, spans = [], []
    pos, index = len(PNG_SIGNATURE), 0
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8].decode("latin-1")
        end = min(pos + 12 + length, len(data))
        index += 1
        tag = f"{kind}#{index}"
        spans.append((tag, pos, end))
        fields.append(HeaderField(f"{tag}.length", pos, 4, "be", length))
        if kind == "IHDR":
            for name, at, size in _PNG_IHDR:
                start = pos + 8 + at
                fields.append(HeaderField(f"IHDR.{name}", start, size, "be",
                                          int.from_bytes(data[start:start + size], "big")))
        if kind == "IEND":
            break
        pos = end
    return fields, spans


_TIFF_TAGS = {256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 259: "Compression",
              262: "PhotometricInterpretation", 273: "StripOffsets", 277: "SamplesPerPixel", 278: "RowsPerStrip",
              279: "StripByteCounts", 284: "PlanarConfiguration", 317: "Predictor", 320: "ColorMap",
              322: "TileWidth", 323: "TileLength", 324: "TileOffsets", 325: "TileByteCounts", 338: "ExtraSamples",
              339: "SampleFormat"}
_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}


def _tiff_structure(data: bytes) -> Structure:
    order = "<" if data[:2] == b"II" else ">"
    encoding = "le" if order == "<" else "be"
    fields, spans = [], []

    def number(offset: int, size: int) -> int:
        return int.from_bytes(data[offset:offset + size], "little" if order == "<" else "big")

    if len(data) < 8:
        return fields, spans
    ifd = number(4, 4)
    fields.append(HeaderField("IFD0.offset", 4, 4, encoding, ifd))
    if ifd + 2 > len(data):
        return fields, spans
    count = number(ifd, 2)
    fields.append(HeaderField("IFD0.entries", ifd, 2, encoding, count))
    arrays = {}
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(data):
            break
        tag, kind, values = number(entry, 2), number(entry + 2, 2), number(entry + 4, 4)
        name = _TIFF_TAGS.get(tag, f"tag{tag}")
        spans.append((f"entry.{name}", entry, entry + 12))
        fields.append(HeaderField(f"{name}.count", entry + 4, 4, encoding, values))
        size = _TIFF_TYPE_SIZE.get(kind, 1)
        item = size if kind in (3, 4, 8, 9) else 0
        if values * size <= 4:
            if item:
                fields.append(HeaderField(name, entry + 8, item, encoding, number(entry + 8, item)))
                arrays[name] = [number(entry + 8 + item * j, item) for j in range(values)]
            continue
        pointer = number(entry + 8, 4)
        fields.append(HeaderField(f"{name}.pointer", entry + 8, 4, encoding, pointer))
        if item and pointer + item <= len(data):
            fields.append(HeaderField(f"{name}[0]", pointer, item, encoding, number(pointer, item)))
            arrays[name] = [number(pointer + item * j, item) for j in range(min(values, 4096))
                            if pointer + item * (j + 1) <= len(data)]
    for j, (start, size) in enumerate(zip(arrays.get("StripOffsets", []), arrays.get("StripByteCounts", []))):
        if start < len(data):
            spans.append((f"strip{j}", start, min(start + size, len(data))))
    return fields, spans


_DICOM_US = {(0x0028, 0x0002): "SamplesPerPixel", (0x0028, 0x0006): "PlanarConfiguration",
             (0x0028, 0x0010): "Rows", (0x0028, 0x0011): "Columns", (0x0028, 0x0100): "BitsAllocated",
             (0x0028, 0x0101): "BitsStored", (0x0028, 0x0102): "HighBit", (0x0028, 0x0103): "PixelRepresentation"}
_DICOM_TEXT = {
    (0x0028, 0x0008): ("NumberOfFrames", ()),
    (0x0028, 0x0004): ("PhotometricInterpretation", ("RGB", "YBR_FULL", "YBR_FULL_422", "MONOCHROME1",
                                                     "MONOCHROME2", "PALETTE COLOR", "YBR_RCT", "CMYK", "")),
    (0x0002, 0x0010): ("TransferSyntaxUID", ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                                             "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50",
                                             "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90",
                                             "1.2.840.10008.1.2.5", "1.2.3", "")),
    (0x0008, 0x0016): ("SOPClassUID", ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "1.2.840.10008.5.1.4.1.1.104.1",
                                       "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.1.3.10", "")),
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _dicom_structure(data: bytes) -> Structure:
    """Walks explicit VR little endian data elements (the file meta, and the seeds' data sets) from the end of
    the preamble; stops at the first element it cannot read."""
    fields, spans = [], []
    pos, n = 132, len(data)
    while pos + 8 <= n:
        group, element = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if not vr.isalpha():
            break
        if vr in _LONG_VRS:
            if pos + 12 > n:
                break
            (length,) = struct.unpack_from("<I", data, pos + 8)
            length_at, value = pos + 8, pos + 12
            length_size = 4
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            length_at, value, length_size = pos + 6, pos + 8, 2
        tag = (group, element)
        name = _DICOM_US.get(tag) or _DICOM_TEXT.get(tag, (f"({group:04X},{element:04X})",))[0]
        fields.append(HeaderField(f"{name}.length", length_at, length_size, "le", length))
        if tag in _DICOM_US and length == 2 and value + 2 <= n:
            fields.append(HeaderField(name, value, 2, "le", struct.unpack_from("<H", data, value)[0]))
        elif tag in _DICOM_TEXT and length_size == 2 and value + length <= n:
            text = data[value:value + length].decode("latin-1").strip(" \x00")
            choices = _DICOM_TEXT[tag][1]
            original: int | str = text
            if name == "NumberOfFrames":
                original = int(text) if text.lstrip("-").isdigit() else 1
            fields.append(HeaderField(name, value, length, "is" if name == "NumberOfFrames" else "text", original,
                                      choices))
        if length == 0xFFFFFFFF:         # encapsulated pixel data: a sequence of items up to the end
            spans.append((name, pos, n))
            _dicom_items(data, value, fields, spans)
            break
        end = min(value + length, n)
        spans.append((name, pos, end))
        pos = end
    return fields, spans


def _dicom_items(data: bytes, pos: int, fields: list[HeaderField], spans: list[tuple[str, int, int]]) -> None:
    index = 0
    while pos + 8 <= len(data) and data[pos:pos + 4] in (b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"):
        (length,) = struct.unpack_from("<I", data, pos + 4)
        name = "BasicOffsetTable" if index == 0 else f"fragment{index}"
        fields.append(HeaderField(f"{name}.length", pos + 4, 4, "le", length))
        end = min(pos + 8 + length, len(data))
        spans.append((name, pos, end))
        if data[pos + 2:pos + 4] == b"\xdd\xe0":
            break
        index += 1
        pos = end


# ------------------------------------------------------------------------------------- random cases

#: bytes an overwrite or insertion draws from besides random ones: markers, chunk names, extreme values
TOKENS = (b"\xff", b"\x00", b"\xff\xd8", b"\xff\xd9", b"\xff\xda", b"\xff\xc0", b"\xff\xdd", b"\xff\xd0",
           b"IEND", b"IDAT", b"\x00\x00\x00\x00IEND", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00",
           b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0", b"DICM", b"II*\x00", b"MM\x00*")
OPERATORS = ("flip_bits", "overwrite", "zero_run", "truncate", "insert", "duplicate_segment", "remove_segment",
             "set_field")
_WEIGHTS = np.array([3, 2, 1, 1, 1, 1, 1, 4], float)


def mutate(data: bytes, rng: np.random.Generator, max_operations: int = 3) -> tuple[bytes, list[str]]:
    """1 to ``max_operations`` random damages of ``data`` (header field edits weighted up: they reach the
    allocation and the parsers' loops), and on a PNG, half of the time, the CRCs repaired afterwards.
    Returns the damaged bytes and one line per operation (what a reproducer's name says)."""
    done = []
    png = data.startswith(PNG_SIGNATURE)
    for _ in range(int(rng.integers(1, max_operations + 1))):
        operator = OPERATORS[int(rng.choice(len(OPERATORS), p=_WEIGHTS / _WEIGHTS.sum()))]
        data, what = _random_operation(operator, data, rng)
        done.append(what)
    if png and rng.random() < 0.5:
        data = repair_png_crcs(data)
        done.append("repair_png_crcs()")
    return data, done


def _random_operation(operator: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    n = max(len(data), 1)

    def position() -> int:   # half of the time inside the first 1 KiB: where the headers are
        return int(rng.integers(0, min(n, 1024) if rng.random() < 0.5 else n))

    def payload() -> bytes:
        if rng.random() < 0.4:
            return TOKENS[int(rng.integers(len(TOKENS)))]
        return rng.bytes(int(rng.integers(1, 17)))

    if operator == "flip_bits":
        bits = [int(b) for b in rng.integers(0, 8 * n, int(rng.integers(1, 9)))]
        return flip_bits(data, bits), f"flip_bits({bits})"
    if operator == "overwrite":
        at, value = position(), payload()
        return overwrite(data, at, value), f"overwrite({at}, {value!r})"
    if operator == "zero_run":
        at, length = position(), int(rng.integers(1, 257))
        return zero_run(data, at, length), f"zero_run({at}, {length})"
    if operator == "truncate":
        length = int(rng.integers(0, n))
        return truncate(data, length), f"truncate({length})"
    if operator == "insert":
        at, value = position(), payload()
        return insert(data, at, value), f"insert({at}, {value!r})"
    parts = segments(data)
    if operator in ("duplicate_segment", "remove_segment"):
        if parts and rng.random() < 0.7:
            name, start, end = parts[int(rng.integers(len(parts)))]
            length = end - start
        else:
            name, start, length = "bytes", position(), int(rng.integers(1, 513))
        if operator == "remove_segment":
            return remove_segment(data, start, length), f"remove_segment({start}, {length})  # {name}"
        at = int(rng.choice([start, start + length, position()]))
        return duplicate_segment(data, start, length, at), f"duplicate_segment({start}, {length}, {at})  # {name}"
    fields = header_fields(data)
    if not fields:
        return _random_operation("overwrite", data, rng)
    field = fields[int(rng.integers(len(fields)))]
    values = field.candidates()
    if field.encoding in ("be", "le") and rng.random() < 0.3:
        value: int | str = int(rng.integers(0, 1 << min(8 * field.size, 62)))
    elif values:
        value = values[int(rng.integers(len(values)))]
    else:
        value = field.original
    return set_field(data, field, value), f"set_field({field.name}, {value!r})"
