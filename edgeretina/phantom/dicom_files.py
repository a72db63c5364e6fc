"""DICOM files written with pydicom from phantom photographs, the way fundus cameras write them.

Every file carries a fake patient (``PATIENT``: name, ID, birth date, accession number, institution,
physician), so a test can prove none of it reaches an output. ``image_dataset`` writes photographs in the
encodings cameras use (native RGB, YBR_FULL, JPEG baseline YBR_FULL_422, JPEG lossless, JPEG 2000, RLE);
``pdf_dataset``, ``sr_dataset`` and ``no_pixels_dataset`` the DICOM objects that hold no photograph.
``encode_lossless_jpeg`` is a minimal JPEG Process 14 SV1 encoder (predictor 1, one Huffman table of 5-bit
codes): no installable package writes lossless JPEG.

pydicom is the ``dicom`` extra and is imported on first use: without it every function raises
MissingDependencyError naming the extra.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from edgeretina.errors import MissingDependencyError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

OPHTHALMIC_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPHTHALMIC_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
OCT_VOLUME = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

#: The fake patient every file carries; no part of it may ever reach a grading record.
PATIENT = {"PatientName": "Doe^Jane^Q", "PatientID": "PID-98765-X", "PatientBirthDate": "19480317",
           "AccessionNumber": "ACC-55501", "InstitutionName": "Lakeside Eye Clinic",
           "ReferringPhysicianName": "Okafor^Nneka", "OtherPatientIDs": "ALT-4471"}


def _require_pydicom() -> None:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise MissingDependencyError("pydicom", "dicom", "writing DICOM files") from None


def header(sop_class: str = OPHTHALMIC_8BIT, syntax: str = EXPLICIT_VR_LITTLE_ENDIAN, **tags) -> Dataset:
    """A dataset with file meta, UIDs, the fake patient and `tags`."""
    _require_pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OP"
    ds.StudyDate = "20261201"
    for key, value in {**PATIENT, **tags}.items():
        setattr(ds, key, value)
    return ds


def image_dataset(frames: list[np.ndarray], *, encoding: str = "native", photometric: str | None = None,
                  bits_stored: int | None = None, sop_class: str = OPHTHALMIC_8BIT, **tags) -> Dataset:
    """frames: uint8 (H, W, 3) RGB photos, or uint16/uint8 (H, W) gray. encoding: native | ybr_full |
    jpeg (baseline, YBR_FULL_422) | jpeg_lossless | j2k | rle | mpeg2 (a syntax nobody here decodes).
    `tags` may set any attribute, NumberOfFrames included (set only for several frames otherwise)."""
    _require_pydicom()
    from pydicom.encaps import encapsulate
    from pydicom.pixels import convert_color_space
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, MPEG2MPML, RLELossless

    first = frames[0]
    gray = first.ndim == 2
    syntax = {"jpeg": JPEGBaseline8Bit, "jpeg_lossless": JPEGLosslessSV1, "mpeg2": MPEG2MPML}.get(
        encoding, EXPLICIT_VR_LITTLE_ENDIAN)
    ds = header(sop_class, syntax, **tags)
    ds.Rows, ds.Columns = first.shape[:2]
    ds.SamplesPerPixel = 1 if gray else 3
    allocated = 16 if first.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored = allocated, bits_stored or allocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if not gray:
        ds.PlanarConfiguration = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PhotometricInterpretation = photometric or ("MONOCHROME2" if gray else "RGB")
    if encoding in ("native", "ybr_full", "j2k", "rle"):
        if encoding == "ybr_full":
            ds.PhotometricInterpretation = "YBR_FULL"
            frames = [convert_color_space(f, "RGB", "YBR_FULL") for f in frames]
        ds.PixelData = b"".join(np.ascontiguousarray(f).astype(f"<u{allocated // 8}").tobytes() for f in frames)
        ds["PixelData"].VR = "OW" if allocated == 16 else "OB"
        if encoding == "j2k":
            ds.compress(JPEG2000Lossless)
        elif encoding == "rle":
            ds.compress(RLELossless)
        return ds
    if encoding == "jpeg":
        ds.PhotometricInterpretation = "YBR_FULL_422"
        fragments = [jpeg_bytes(f) for f in frames]
    elif encoding == "jpeg_lossless":
        fragments = [encode_lossless_jpeg(f, ds.BitsStored) for f in frames]
    else:
        fragments = [b"\x00\x00\x01\xb3" + bytes(60)] * len(frames)   # an MPEG-2 sequence header, then nothing
    ds.PixelData = encapsulate(fragments, has_bot=len(fragments) > 1)
    ds["PixelData"].VR = "OB"
    return ds


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Baseline JPEG, 4:2:2 chroma (what DICOM calls YBR_FULL_422), as cameras write it."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality, subsampling=1)
    return buffer.getvalue()


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def uids(ds: Dataset) -> dict:
    return {"study_instance_uid": ds.StudyInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
            "sop_instance_uid": ds.SOPInstanceUID}


def per_frame_laterality(ds: Dataset, eyes: list[str], shared: bool = False) -> Dataset:
    """FrameLaterality in each frame's Frame Anatomy functional group (enhanced multi-frame style), or
    with shared=True one for all frames in the shared functional groups."""
    _require_pydicom()
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    groups = []
    for eye in eyes:
        anatomy = Dataset()
        anatomy.FrameLaterality = eye
        group = Dataset()
        group.FrameAnatomySequence = Sequence([anatomy])
        groups.append(group)
    if shared:
        ds.SharedFunctionalGroupsSequence = Sequence(groups[:1])
    else:
        ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    return ds


def pdf_dataset() -> Dataset:
    ds = header(ENCAPSULATED_PDF, Modality="DOC")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n% a screening letter\n%%EOF\n"
    return ds


def sr_dataset() -> Dataset:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = header(COMPREHENSIVE_SR, Modality="SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "no diabetic retinopathy"
    ds.ContentSequence = Sequence([item])
    return ds


def no_pixels_dataset() -> Dataset:
    """A presentation state: a valid DICOM with no image in it."""
    return header(GRAYSCALE_PRESENTATION_STATE, Modality="PR", ContentLabel="ANNOTATION")


def encode_lossless_jpeg(image: np.ndarray, precision: int = 8) -> bytes:
    """JPEG Process 14, selection value 1 (left neighbour; first row from the left, first column from
    above, the first sample from 2**(P-1)), all components interleaved, one DC Huffman table."""
    samples = (image if image.ndim == 3 else image[..., None]).astype(np.int64)
    height, width, components = samples.shape
    prediction = np.empty_like(samples)
    prediction[0, 0] = 1 << (precision - 1)
    prediction[0, 1:] = samples[0, :-1]
    prediction[1:, 0] = samples[:-1, 0]
    prediction[1:, 1:] = samples[1:, :-1]
    diff = (samples - prediction) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xc3" + struct.pack(">HBHHB", 8 + 3 * components, precision, height, width, components)
    for c in range(components):
        out += bytes([c + 1, 0x11, 0])
    code_lengths = [0] * 16
    code_lengths[4] = 17                         # categories 0..16, 5 bits each
    out += b"\xff\xc4" + struct.pack(">HB", 2 + 1 + 16 + 17, 0) + bytes(code_lengths) + bytes(range(17))
    out += b"\xff\xda" + struct.pack(">HB", 6 + 2 * components, components)
    for c in range(components):
        out += bytes([c + 1, 0])
    out += bytes([1, 0, 0])                      # predictor 1, Se 0, Ah/Al 0
    acc, nbits, data = 0, 0, bytearray()
    for d in diff.reshape(-1).tolist():
        category = 16 if d == 32768 else abs(d).bit_length()
        acc, nbits = (acc << 5) | category, nbits + 5
        if 0 < category < 16:
            acc, nbits = (acc << category) | ((d if d > 0 else d - 1) & ((1 << category) - 1)), nbits + category
        while nbits >= 8:
            nbits -= 8
            data.append((acc >> nbits) & 0xFF)
            if data[-1] == 0xFF:
                data.append(0)                   # byte stuffing
        acc &= (1 << nbits) - 1
    if nbits:
        data.append(((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF)
        if data[-1] == 0xFF:
            data.append(0)
    return bytes(out + data + b"\xff\xd9")
