"""What an upload is, from its first bytes: the file name and Content-Type are the client's claims, the
magic numbers are the file's. Only what the runtime grades is let through: JPEG, PNG, TIFF, DICOM Part 10."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageKind:
    name: str        # what messages say
    suffix: str      # the staged file's suffix (the decoder's DICOM rule reads it too)
    media_type: str


JPEG = ImageKind("JPEG", ".jpg", "image/jpeg")
PNG = ImageKind("PNG", ".png", "image/png")
TIFF = ImageKind("TIFF", ".tif", "image/tiff")
DICOM = ImageKind("DICOM", ".dcm", "application/dicom")
KINDS = (JPEG, PNG, TIFF, DICOM)

DICOM_MAGIC_AT = 128       # Part 10: a 128-byte preamble, then 'DICM'
SNIFF_BYTES = DICOM_MAGIC_AT + 4
_MAGIC = ((b"\xff\xd8\xff", JPEG), (b"\x89PNG\r\n\x1a\n", PNG), (b"II*\x00", TIFF), (b"MM\x00*", TIFF))


def sniff(head: bytes) -> ImageKind | None:
    """The image type `head` (the first SNIFF_BYTES of a file, or all of a shorter one) starts like, or None.
    A match says where to send the bytes, not that they decode: a truncated JPEG is still a JPEG here."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[DICOM_MAGIC_AT:DICOM_MAGIC_AT + 4] == b"DICM":
        return DICOM
    return None


def describe_head(head: bytes) -> str:
    """A few first bytes for an error message: printable text as text, else hex."""
    first = head[:8]
    if first and all(32 <= b < 127 for b in first):
        return repr(first.decode("ascii"))
    return first.hex(" ")
