"""What a file's bytes say before any pixel is decoded: the TIFF header size, what an unknown file
looks like, and whether a JPEG or PNG is complete (the structural truncation check)."""

from __future__ import annotations

import struct


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


def _describe_unknown(data: bytes) -> str:
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
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
