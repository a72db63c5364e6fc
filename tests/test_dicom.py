"""DICOM in (issue 12, part 1): decoding, multi-frame records, laterality and UIDs, refusals, and DICOM
through grade, watch, bench and the training loader like any photograph — and no patient data out."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import threading
import time
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import _dicom_fixtures as fx  # skips the module without pydicom

from edgeretina.errors import DicomError, ImageDecodeError, MissingDependencyError
from edgeretina.phantom import PhantomConfig, render_case
from edgeretina.preprocess import ImageRef, decode_image, expand_frames, iter_sources, list_images
from edgeretina.preprocess.dicom import open_dicom

SIZE = 192
# every value the fixtures' fake patient has, whole and by the parts of its names (no short digit runs:
# random UIDs contain them by chance)
PATIENT_STRINGS = list(fx.PATIENT.values()) + ["Doe", "Jane", "Okafor", "Nneka", "Lakeside"]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Four phantom photographs through the ideal camera (gradable), 192 px like the suite's test set."""
    return [render_case(seed, PhantomConfig(size=SIZE, camera_variation=0.0)).image for seed in (101, 102, 103, 104)]


def _png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return path


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


# ---------------------------------------------------------------- decoding: colour spaces and bit depths

def test_uncompressed_rgb_decodes_to_the_photo_exactly_from_a_path_or_bytes(photos, tmp_path):
    ds = fx.image_dataset([photos[0]])
    path = fx.save(ds, tmp_path / "rgb.dcm")
    np.testing.assert_array_equal(decode_image(path), photos[0])
    np.testing.assert_array_equal(decode_image(path.read_bytes()), photos[0])      # recognised by its marker
    np.testing.assert_array_equal(decode_image(fx.save(ds, tmp_path / "IM000001")), photos[0])   # no suffix


@pytest.mark.parametrize("encoding", ["jpeg_lossless", "j2k", "rle"])
def test_lossless_transfer_syntaxes_give_the_photo_exactly(photos, encoding):
    data = fx.to_bytes(fx.image_dataset([photos[1]], encoding=encoding))
    np.testing.assert_array_equal(decode_image(data), photos[1])


def test_ybr_full_is_converted_to_rgb_within_the_rounding_of_the_conversion(photos):
    ds = fx.image_dataset([photos[0]], encoding="ybr_full")
    stored = np.frombuffer(ds.PixelData, np.uint8).reshape(photos[0].shape)
    decoded = decode_image(fx.to_bytes(ds)).astype(int)
    assert np.abs(decoded - photos[0]).max() <= 1      # RGB -> YCbCr -> RGB in 8 bits: one level of rounding
    assert np.abs(decoded - stored).mean() > 10        # and it was converted: YCbCr read as RGB is far off


def test_jpeg_baseline_ybr_422_gives_the_pixels_of_the_same_stream_saved_as_a_jpg(photos):
    """The DICOM's JPEG is decoded by libjpeg-turbo (Pillow), as every .jpg is (OpenCV): the same stream
    gives the same pixels whichever container it arrives in."""
    ds = fx.image_dataset([photos[2]], encoding="jpeg")
    stream = bytes(fx.pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
    np.testing.assert_array_equal(decode_image(fx.to_bytes(ds)), decode_image(stream))


def test_a_large_jpeg_frame_is_decoded_at_reduced_scale_like_a_jpg(photos, tmp_path):
    """decode_max_side applies to a JPEG in DICOM as to a .jpg: libjpeg-turbo's DCT scaling, same pixels."""
    big = cv2.resize(photos[2], (480, 480), interpolation=cv2.INTER_CUBIC)
    ds = fx.image_dataset([big], encoding="jpeg")
    stream = next(fx.pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    reduced = decode_image(fx.to_bytes(ds), max_side=200)
    assert reduced.shape == (240, 240, 3)
    np.testing.assert_array_equal(reduced, decode_image(stream, max_side=200))
    [source] = iter_sources([fx.save(ds, tmp_path / "big.dcm")])           # the grader's way in
    np.testing.assert_array_equal(source.decode(200), reduced)


# Files other writers made (dcmtk, GDCM, dcmjs, ...), shipped inside pydicom: JPEG with and without colour
# transform, Adobe markers, every chroma subsampling, RLE, JPEG 2000 (RCT), JPEG-LS, big endian, multi-frame.
OTHER_WRITERS = ["SC_jpeg_no_color_transform.dcm", "SC_jpeg_no_color_transform_2.dcm", "SC_rgb_dcmtk_+eb+cr.dcm",
                 "SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
                 "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_jpeg_app14_dcmd.dcm",
                 "SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb_small_odd_jpeg.dcm", "examples_ybr_color.dcm",
                 "SC_rgb_rle_2frame.dcm", "examples_jpeg2k.dcm", "SC_rgb_jls_lossy_line.dcm", "SC_rgb_jpeg_gdcm.dcm",
                 "SC_ybr_full_422_uncompressed.dcm", "ExplVR_BigEnd.dcm"]


@pytest.mark.parametrize("name", OTHER_WRITERS)
def test_colour_files_other_writers_made_decode_as_pydicom_decodes_them(name):
    from pydicom.data import get_testdata_file
    from pydicom.pixels import pixel_array

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in this pydicom's bundled test files")
    ds = fx.pydicom.dcmread(path)
    baseline = ds.file_meta.TransferSyntaxUID == fx.JPEGBaseline8Bit
    for index in range(min(int(ds.get("NumberOfFrames", 1)), 3)):
        expected = pixel_array(ds, index=index, decoding_plugin="pillow" if baseline else "")
        np.testing.assert_array_equal(decode_image(path, frame=index + 1), expected)


@pytest.mark.parametrize("bits_stored, shift", [(12, 4), (16, 8), (10, 2)])
def test_monochrome2_16_bit_is_scaled_by_its_stored_bit_depth(photos, bits_stored, shift):
    gray = _gray(photos[0])
    noise = np.random.default_rng(0).integers(0, 1 << shift, gray.shape)
    stored = ((gray.astype(np.uint16) << shift) | noise).astype(np.uint16)      # low bits below 8-bit precision
    data = fx.to_bytes(fx.image_dataset([stored], bits_stored=bits_stored, sop_class=fx.OPHTHALMIC_16BIT))
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded, np.repeat(gray[..., None], 3, axis=2))


def test_a_dark_16_bit_photo_stays_dark_it_is_not_stretched_to_its_maximum():
    dark = np.full((32, 32), 1000, np.uint16)          # a quarter of the 12-bit range
    dark[8:24, 8:24] = 1500
    decoded = decode_image(fx.to_bytes(fx.image_dataset([dark], bits_stored=12)))
    assert decoded.max() == 1500 >> 4 and decoded.min() == 1000 >> 4


def test_8_bit_monochrome2_is_gray_and_monochrome1_is_inverted(photos):
    gray = _gray(photos[1])
    np.testing.assert_array_equal(decode_image(fx.to_bytes(fx.image_dataset([gray]))),
                                  np.repeat(gray[..., None], 3, axis=2))
    decoded = decode_image(fx.to_bytes(fx.image_dataset([255 - gray], photometric="MONOCHROME1")))
    np.testing.assert_array_equal(decoded[..., 0], gray)
    stored12 = ((4095 - (gray.astype(np.uint16) << 4))).astype(np.uint16)
    decoded12 = decode_image(fx.to_bytes(fx.image_dataset([stored12], photometric="MONOCHROME1", bits_stored=12)))
    np.testing.assert_array_equal(decoded12[..., 0], gray)


def test_palette_colour_goes_through_its_lookup_table():
    index = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = fx.image_dataset([index], photometric="PALETTE COLOR")
    lut = np.arange(256, dtype=np.uint16)
    for name, values in (("Red", lut * 257), ("Green", (255 - lut) * 257), ("Blue", np.full(256, 0x8000, np.uint16))):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", values.astype("<u2").tobytes())
    decoded = decode_image(fx.to_bytes(ds))
    np.testing.assert_array_equal(decoded[..., 0], index)
    np.testing.assert_array_equal(decoded[..., 1], 255 - index)
    assert (decoded[..., 2] == 0x80).all()


# ---------------------------------------------------------------- frames, laterality, identifiers

def test_a_multi_frame_file_is_one_source_per_frame_in_order_with_its_own_laterality(photos, tmp_path):
    ds = fx.per_frame_laterality(fx.image_dataset(photos[:3]), ["R", "L", "R"])
    path = fx.save(ds, tmp_path / "stereo.dcm")
    sources = list(iter_sources([path]))
    assert [s.ref for s in sources] == [ImageRef(str(path), n) for n in (1, 2, 3)]
    assert [s.label for s in sources] == [f"{path}#frame={n}" for n in (1, 2, 3)]
    for n, (source, photo) in enumerate(zip(sources, photos), start=1):
        np.testing.assert_array_equal(source.decode(), photo)
        assert source.dicom == {"frame": n, "frames": 3, "laterality": "RLR"[n - 1], **fx.uids(ds),
                                "sop_class_uid": fx.OPHTHALMIC_8BIT}
    # one frame asked for: that frame only; a frame the file does not have: its own error
    only = list(iter_sources([ImageRef(str(path), 2)]))
    assert len(only) == 1 and np.array_equal(only[0].decode(), photos[1])
    with pytest.raises(DicomError, match="no frame 4 in this DICOM"):
        list(iter_sources([ImageRef(str(path), 4)]))[0].decode()
    assert expand_frames([path, tmp_path / "x.jpg"]) == [ImageRef(str(path), n) for n in (1, 2, 3)] + \
        [ImageRef(str(tmp_path / "x.jpg"))]


def test_decode_image_needs_the_frame_of_a_multi_frame_file_named(photos):
    data = fx.to_bytes(fx.image_dataset(photos[:2]))
    with pytest.raises(DicomError, match=r"multi-frame DICOM \(2 frames\): name the frame"):
        decode_image(data)
    np.testing.assert_array_equal(decode_image(data, frame=2), photos[1])
    with pytest.raises(ImageDecodeError, match="not a DICOM file"):
        decode_image(cv2.imencode(".png", photos[0])[1].tobytes(), frame=2)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")     # the fixture writes ' r ' on purpose
@pytest.mark.parametrize("tags, frame_eyes, shared, expected", [
    ({"ImageLaterality": "L", "Laterality": "R"}, ["R"], False, "L"),     # the image's own laterality first
    ({"Laterality": "R"}, ["L"], False, "R"),                            # then the series'
    ({}, ["L"], False, "L"),                                             # then the frame's
    ({}, ["R"], True, "R"),                                              # or the frames' shared one
    ({"ImageLaterality": "B"}, ["R"], False, "R"),                       # "both" says nothing about this frame
    ({"ImageLaterality": "U"}, None, False, None),                       # unpaired: no eye
    ({"ImageLaterality": " r "}, None, False, "R"),
])
def test_laterality_comes_from_the_image_then_the_series_then_the_frame(tags, frame_eyes, shared, expected):
    ds = fx.image_dataset([np.zeros((8, 8, 3), np.uint8)], **tags)
    if frame_eyes:
        fx.per_frame_laterality(ds, frame_eyes, shared=shared)
    assert open_dicom(fx.to_bytes(ds)).record(1)["laterality"] == expected


def test_the_record_carries_identifiers_and_nothing_of_the_patient(photos):
    ds = fx.image_dataset([photos[0]], ImageLaterality="R")
    record = open_dicom(fx.to_bytes(ds)).record(1)
    assert set(record) == {"frame", "frames", "laterality", "study_instance_uid", "series_instance_uid",
                           "sop_instance_uid", "sop_class_uid"}
    text = json.dumps(record)
    assert not [s for s in PATIENT_STRINGS if s in text]


# ---------------------------------------------------------------- refusals: each names its problem

def _truncated_native(photos) -> bytes:
    data = fx.to_bytes(fx.image_dataset([photos[0]]))
    return data[: len(data) * 2 // 3]


def _truncated_jpeg(photos) -> bytes:
    data = fx.to_bytes(fx.image_dataset([photos[0]], encoding="jpeg"))
    return data[:-40]


def _header_only(photos) -> bytes:
    ds = fx.image_dataset([photos[0]])
    del ds.PixelData
    return fx.to_bytes(ds)


def _wrong_size(photos) -> bytes:
    ds = fx.image_dataset([photos[0]], encoding="jpeg")
    ds.Rows = 100
    return fx.to_bytes(ds)


def _garbage(_photos) -> bytes:
    return bytes(128) + b"DICM" + np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes()


REFUSALS = {
    "pdf": (lambda p: fx.to_bytes(fx.pdf_dataset()), r"^not an image: an encapsulated PDF document in DICOM \(Encapsulated PDF Storage\)"),
    "sr": (lambda p: fx.to_bytes(fx.sr_dataset()), r"^not an image: a DICOM structured report \(Comprehensive SR Storage\)"),
    "no_pixels": (lambda p: fx.to_bytes(fx.no_pixels_dataset()), r"^DICOM without pixel data \(Grayscale Softcopy Presentation State Storage\)"),
    "mpeg2": (lambda p: fx.to_bytes(fx.image_dataset([p[0]], encoding="mpeg2")),
              r"^unsupported DICOM transfer syntax: MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)"),
    "oct": (lambda p: fx.to_bytes(fx.image_dataset([p[0]], sop_class=fx.OCT_VOLUME)), r"^not a fundus photograph: an OCT volume"),
    "truncated_native": (_truncated_native, r"^truncated or corrupt DICOM \(element \(7FE0,0010\) needs 110592 bytes"),
    "truncated_jpeg": (_truncated_jpeg, r"^truncated or corrupt DICOM \(no data element could be read"),
    "header_only": (_header_only, r"^truncated or corrupt DICOM \(it describes a 192 x 192 image but holds no pixel data\)"),
    "garbage": (_garbage, r"^truncated or corrupt DICOM"),
    "wrong_size": (_wrong_size, r"^truncated or corrupt DICOM \(frame 1 is a 192 x 192 JPEG, the header says 192 x 100\)"),
    "unsupported_photometric": (lambda p: fx.to_bytes(fx.image_dataset([p[0]], photometric="HSV")),
                                r"^unsupported DICOM photometric interpretation 'HSV'"),
    "no_marker": (lambda p: fx.to_bytes(fx.image_dataset([p[0]]))[132:], r"^not a DICOM file \(no 'DICM' marker"),
    "empty": (lambda p: b"", r"^empty file"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_names_its_problem(photos, tmp_path, case):
    make, message = REFUSALS[case]
    path = tmp_path / f"{case}.dcm"
    path.write_bytes(make(photos))
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(path)
    [source] = list(iter_sources([path]))
    with pytest.raises(ImageDecodeError, match=message):
        source.decode()


def test_a_refused_file_still_says_which_study_it_belongs_to(tmp_path):
    ds = fx.sr_dataset()
    with pytest.raises(DicomError) as caught:
        decode_image(fx.save(ds, tmp_path / "report.dcm"))
    assert {k: caught.value.dicom[k] for k in fx.uids(ds)} == fx.uids(ds)
    assert not [s for s in PATIENT_STRINGS if s in json.dumps(caught.value.dicom)]


def test_too_large_a_frame_is_refused_from_the_header(monkeypatch):
    import edgeretina.preprocess.decode as decode

    monkeypatch.setattr(decode, "MAX_PIXELS", 100)
    with pytest.raises(DicomError, match=r"image too large \(16 x 16 > 100 pixels\)"):
        decode_image(fx.to_bytes(fx.image_dataset([np.zeros((16, 16, 3), np.uint8)])))


def test_signed_samples_are_shifted_into_the_unsigned_range():
    stored = np.array([[-2048, -1], [0, 2047]], np.int16)          # 12-bit two's complement extremes
    ds = fx.image_dataset([stored.view(np.uint16)], bits_stored=12)
    ds.PixelRepresentation = 1
    np.testing.assert_array_equal(decode_image(fx.to_bytes(ds))[..., 0], [[0, 127], [128, 255]])


@pytest.mark.parametrize("encoding, message", [
    ("native", r"5 frame\(s\) need 552960 bytes of pixels, it holds 221184"),
    ("jpeg", r"5 frames in 2 pixel data fragment\(s\)"),
])
def test_a_header_promising_more_frames_than_the_pixel_data_holds_is_corrupt(photos, encoding, message):
    ds = fx.image_dataset(photos[:2], encoding=encoding)
    ds.NumberOfFrames = 5
    with pytest.raises(DicomError, match=r"^truncated or corrupt DICOM \(" + message):
        open_dicom(fx.to_bytes(ds))


def test_a_failing_first_plugin_falls_back_to_the_next(monkeypatch):
    """An RGB-coded JPEG (dcmtk's, no colour transform) goes through pydicom's plugins, Pillow first; when
    Pillow fails, pylibjpeg decodes it."""
    from pydicom.data import get_testdata_file
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders.base import Decoder

    path = get_testdata_file("SC_jpeg_no_color_transform.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's bundled test files are not installed")
    expected = pixel_array(fx.pydicom.dcmread(path), decoding_plugin="pylibjpeg")
    real, asked = Decoder.as_array, []

    def pillow_fails(self, src, **kwargs):
        asked.append(kwargs.get("decoding_plugin"))
        if kwargs.get("decoding_plugin") == "pillow":
            raise RuntimeError("pillow cannot")
        return real(self, src, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", pillow_fails)
    np.testing.assert_array_equal(decode_image(path), expected)
    assert asked == ["pillow", ""]


def test_pydicom_warnings_do_not_reach_the_console(photos):
    """A truncated encapsulated file makes pydicom warn ("End of file reached before delimiter"); the error
    says it, the console does not."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DicomError, match="truncated"):
            decode_image(_truncated_jpeg(photos))
    assert [str(w.message) for w in caught] == []


def test_without_pydicom_a_dicom_file_names_the_extra(photos, tmp_path, monkeypatch):
    path = fx.save(fx.image_dataset([photos[0]]), tmp_path / "a.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)          # import pydicom -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pydicom is not installed .*edgeretina\[dicom\]"):
        decode_image(path)


def test_without_the_jpeg_plugin_a_lossless_jpeg_names_the_package_and_the_extra(photos, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    data = fx.to_bytes(fx.image_dataset([photos[0]], encoding="jpeg_lossless"))
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(MissingDependencyError, match=r"pylibjpeg-libjpeg is not installed .*edgeretina\[dicom\]"):
        decode_image(data)


def test_the_runtime_imports_pydicom_only_when_a_dicom_arrives():
    code = ("import sys, edgeretina.runtime, edgeretina.runtime.batch, edgeretina.cli; "
            "from edgeretina.preprocess import list_images, iter_sources; sys.exit('pydicom' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- folders

def test_folders_list_dicom_by_suffix_or_marker_but_not_a_dicomdir(photos, tmp_path):
    ds = fx.image_dataset([photos[0]])
    for name in ("a.DCM", "b.dicom", "series/IM000001", "series/1.2.840.99.7", "DICOMDIR"):
        fx.save(ds, tmp_path / name)
    _png(tmp_path / "c.png", photos[0])
    (tmp_path / "notes.txt").write_text("not an image\n" * 20)
    (tmp_path / "readme").write_bytes(bytes(300))
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.DCM", "b.dicom", "c.png", "series/1.2.840.99.7", "series/IM000001"]


# ---------------------------------------------------------------- grading

@pytest.fixture(scope="module")
def grader(onnx_bundle):
    from edgeretina.runtime import Grader

    return Grader(onnx_bundle, threads=1)


RESULT_KEYS = ("gradable", "quality", "grade", "probabilities", "referable_probability", "referable", "screening",
               "neighbors", "knn_grade", "error")


def _result(record) -> dict:
    return {k: getattr(record, k) for k in RESULT_KEYS}


def _max_probability_gap(a, b) -> float:
    return float(np.max(np.abs(np.subtract(a.probabilities, b.probabilities))))


def test_lossless_dicom_grades_exactly_like_the_png(grader, photos, tmp_path):
    pngs = [_png(tmp_path / f"p{i}.png", p) for i, p in enumerate(photos)]
    dicoms = []
    for i, photo in enumerate(photos):
        for encoding in ("native", "jpeg_lossless", "j2k"):
            dicoms.append(fx.save(fx.image_dataset([photo], encoding=encoding), tmp_path / f"p{i}_{encoding}.dcm"))
    by_png = grader.grade(pngs)
    assert sum(r.gradable for r in by_png) >= 3, "the quality gate rejected the ideal-camera phantoms"
    by_dicom = grader.grade(dicoms)
    for i, png in enumerate(by_png):
        for record in by_dicom[3 * i: 3 * i + 3]:
            assert record.error is None and record.dicom["frame"] == 1
            assert _result(record) == _result(png)


def test_ybr_and_jpeg_dicom_grade_like_the_png_within_what_their_encoding_changes(grader, photos, tmp_path):
    """JPEG baseline (q95, 4:2:2): exactly the record of the same stream saved as a .jpg (same decoder), and
    from the PNG only as far as JPEG compression itself moves it; YBR_FULL: one level of rounding.

    The tolerance, measured over 40 ideal-camera phantoms with this tiny model: q95 4:2:2 moves pixels by
    1.16 levels on average (1.59 for the worst photo), the prepared 64 px input by 0.90, and the grade
    probabilities by at most 0.0025 (median 0.0004); YBR rounding by at most 0.0021; no grade changed.
    0.005 is twice the largest. It is a sanity bound, not the proof: this model's probabilities differ
    between two *different* photographs by a median of only 0.0105, so the exact pixel tests above and the
    exact .jpg twin carry the proof, and `test_a_wrong_colour_space_would_be_caught` shows what a real
    decoding bug does (ungradable, or a gap >= 0.13)."""
    pngs = [_png(tmp_path / f"p{i}.png", p) for i, p in enumerate(photos)]
    jpgs, ybrs, jpeg_dicoms = [], [], []
    for i, photo in enumerate(photos):
        ds = fx.image_dataset([photo], encoding="jpeg")
        jpeg_dicoms.append(fx.save(ds, tmp_path / f"p{i}_jpeg.dcm"))
        jpg = tmp_path / f"p{i}.jpg"
        jpg.write_bytes(next(fx.pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
        jpgs.append(jpg)
        ybrs.append(fx.save(fx.image_dataset([photo], encoding="ybr_full"), tmp_path / f"p{i}_ybr.dcm"))
    by_png, by_jpg = grader.grade(pngs), grader.grade(jpgs)
    for png, jpg, jpeg_dicom, ybr in zip(by_png, by_jpg, grader.grade(jpeg_dicoms), grader.grade(ybrs)):
        assert _result(jpeg_dicom) == _result(jpg)
        for record in (jpeg_dicom, ybr):
            assert record.gradable == png.gradable
            if png.gradable:
                assert record.grade == png.grade and _max_probability_gap(record, png) < 0.005


def test_a_wrong_colour_space_would_be_caught(grader, photos, tmp_path):
    """The other side of the tolerance above: YCbCr samples read as if they were RGB move the
    probabilities well beyond it, so the tolerance cannot hide a colour-space bug."""
    photo = photos[0]
    png = grader.grade([_png(tmp_path / "p.png", photo)])[0]
    wrong = grader.grade([_png(tmp_path / "wrong.png", fx.convert_color_space(photo, "RGB", "YBR_FULL"))])[0]
    assert png.gradable and (not wrong.gradable or _max_probability_gap(wrong, png) > 0.05)


def test_monochrome_dicom_grades_like_the_gray_png(grader, photos, tmp_path):
    gray = _gray(photos[3])
    png = grader.grade([_png(tmp_path / "gray.png", cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))])[0]
    stored = (gray.astype(np.uint16) << 4) | 9
    dicom = grader.grade([fx.save(fx.image_dataset([stored], bits_stored=12), tmp_path / "gray16.dcm")])[0]
    assert dicom.error is None and _result(dicom) == _result(png)


@pytest.fixture(scope="module")
def mixed_folder(photos, tmp_path_factory):
    """JPEG, PNG and DICOM (uncompressed, JPEG, YBR, 16-bit gray, a 3-frame stereo set, a file without a
    suffix) and every refusal, as a camera export folder might hold them."""
    root = tmp_path_factory.mktemp("mixed")
    cv2.imwrite(str(root / "a_photo.jpg"), photos[0][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    _png(root / "b_photo.png", photos[1])
    files = {
        "c_rgb.dcm": fx.image_dataset([photos[2]], ImageLaterality="R"),
        "d_jpeg.dcm": fx.image_dataset([photos[3]], encoding="jpeg", ImageLaterality="L"),
        "e_stereo.dcm": fx.per_frame_laterality(fx.image_dataset(photos[:3]), ["L", "R", "L"]),
        "f_ybr.dcm": fx.image_dataset([photos[1]], encoding="ybr_full", Laterality="R"),
        "g_gray16.dcm": fx.image_dataset([(_gray(photos[0]).astype(np.uint16) << 4)], bits_stored=12),
        "h_pdf.dcm": fx.pdf_dataset(),
        "i_report.dcm": fx.sr_dataset(),
        "j_nopixels.dcm": fx.no_pixels_dataset(),
        "k_mpeg2.dcm": fx.image_dataset([photos[0]], encoding="mpeg2"),
        "IM000007": fx.image_dataset([photos[3]], ImageLaterality="R"),
    }
    for name, ds in files.items():
        fx.save(ds, root / name)
    (root / "l_truncated.dcm").write_bytes(_truncated_native(photos))
    return root, {name: fx.uids(ds) for name, ds in files.items()}


# what each file of the mixed folder gives, in listing order: (name, frame, laterality, error pattern)
MIXED_EXPECTED = [
    ("IM000007", 1, "R", None),      # sorted by path: upper case first
    ("a_photo.jpg", None, None, None),
    ("b_photo.png", None, None, None),
    ("c_rgb.dcm", 1, "R", None),
    ("d_jpeg.dcm", 1, "L", None),
    ("e_stereo.dcm", 1, "L", None),
    ("e_stereo.dcm", 2, "R", None),
    ("e_stereo.dcm", 3, "L", None),
    ("f_ybr.dcm", 1, "R", None),
    ("g_gray16.dcm", 1, None, None),
    ("h_pdf.dcm", None, None, "encapsulated PDF"),
    ("i_report.dcm", None, None, "structured report"),
    ("j_nopixels.dcm", None, None, "DICOM without pixel data"),
    ("k_mpeg2.dcm", None, None, "unsupported DICOM transfer syntax: MPEG2"),
    ("l_truncated.dcm", None, None, "truncated or corrupt DICOM"),
]


def test_a_mixed_folder_gives_one_record_per_image_or_frame_in_a_stable_order(grader, mixed_folder):
    from edgeretina.runtime.batch import grade_paths

    root, written = mixed_folder
    records = grade_paths(grader, [root], batch_size=4)
    assert [(Path(r.file).name, (r.dicom or {}).get("frame"), (r.dicom or {}).get("laterality")) for r in records] \
        == [(name, frame, eye) for name, frame, eye, _ in MIXED_EXPECTED]
    for record, (name, _, _, error) in zip(records, MIXED_EXPECTED):
        if error is None:
            assert record.error is None and record.screening is not None, (name, record.error)
        else:
            assert error in record.error and record.screening is None, (name, record.error)
        if name in written:                                  # every DICOM the header of which was readable
            assert {k: record.dicom[k] for k in written[name]} == written[name]
        elif name.endswith((".jpg", ".png")):
            assert record.dicom is None
    assert [r.dicom["frames"] for r in records if Path(r.file).name == "e_stereo.dcm"] == [3, 3, 3]
    again = grade_paths(grader, [root], batch_size=3)       # another batching, the same records in the same order
    assert [(r.file, r.dicom, r.grade, r.error) for r in again] == [(r.file, r.dicom, r.grade, r.error) for r in records]


def _cli(*args):
    exe = Path(sys.executable).with_name("edgeretina")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_grade_on_a_folder_with_dicom_end_to_end_without_patient_data(onnx_bundle, mixed_folder, tmp_path):
    root, written = mixed_folder
    out_csv = tmp_path / "results.csv"
    result = _cli("grade", root, "--bundle", onnx_bundle, "--json", "--csv", out_csv, "--cards", tmp_path / "cards")
    assert result.returncode == 3, result.stderr            # the refused files are errors; the batch went on
    records = json.loads(result.stdout)
    assert [(Path(r["file"]).name, (r["dicom"] or {}).get("frame")) for r in records] == \
        [(name, frame) for name, frame, _, _ in MIXED_EXPECTED]
    assert sum(r["error"] is None for r in records) == 10
    csv_text = out_csv.read_text()
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [(Path(r["file"]).name, r["frame"], r["laterality"]) for r in rows] == \
        [(name, str(frame or ""), eye or "") for name, frame, eye, _ in MIXED_EXPECTED]
    assert [r["sop_instance_uid"] for r in rows if r["file"].endswith("c_rgb.dcm")] == \
        [written["c_rgb.dcm"]["sop_instance_uid"]]
    table = _cli("grade", root / "e_stereo.dcm", "--bundle", onnx_bundle)
    assert table.returncode == 0, table.stderr
    assert [line.split()[1] for line in table.stdout.splitlines() if "e_stereo.dcm" in line] == ["[1/3]", "[2/3]", "[3/3]"]
    for text in (result.stdout, result.stderr, csv_text, table.stdout):
        assert not [s for s in PATIENT_STRINGS if s in text]


def test_watch_grades_every_frame_of_a_dicom_once_with_its_own_pictures(onnx_bundle, photos, tmp_path):
    from edgeretina.runtime.watch import RESULTS_NAME, WatchConfig, watch

    camera = tmp_path / "camera"
    fx.save(fx.image_dataset(photos[:2], ImageLaterality="R"), camera / "stereo.dcm")
    fx.save(fx.image_dataset([photos[2]], ImageLaterality="L"), camera / "day1" / "IM000001")
    (camera / "day1" / "report.dcm").write_bytes(fx.to_bytes(fx.sr_dataset()))
    config = WatchConfig(folder=camera, bundle=onnx_bundle, out=tmp_path / "out", interval=0.05, once=True,
                         undecodable_grace_s=0.0)
    summary = watch(config)
    lines = (config.out / RESULTS_NAME).read_text()
    records = [json.loads(line) for line in lines.splitlines()]
    assert [(r["source"]["path"], (r["dicom"] or {}).get("frame")) for r in records] == \
        [("day1/IM000001", 1), ("day1/report.dcm", None), ("stereo.dcm", 1), ("stereo.dcm", 2)]
    assert summary.graded == 4 and summary.errors == 1
    assert "structured report" in records[1]["error"]
    cards = sorted(p.name for p in (config.out / "cards").iterdir())
    assert cards == ["day1__IM000001_card.png", "stereo_frame1_card.png", "stereo_frame2_card.png"]
    assert not [s for s in PATIENT_STRINGS if s in lines]
    assert watch(config).graded == 0                          # every frame is recorded: nothing again


def test_watch_stopped_mid_file_still_records_every_frame_of_it(onnx_bundle, photos, tmp_path):
    """Ctrl-C finishes the file being graded: a DICOM's key is done with its first frame, so stopping
    between its frames would lose the rest for good."""
    from edgeretina.runtime.watch import RESULTS_NAME, WatchConfig, watch

    camera = tmp_path / "camera"
    fx.save(fx.image_dataset(photos[:3]), camera / "a_stereo.dcm")
    _png(camera / "b_next.png", photos[3])
    config = WatchConfig(folder=camera, bundle=onnx_bundle, out=tmp_path / "out", interval=0.05, once=True,
                         batch_size=8)
    stop = threading.Event()
    watch(config, stop=stop, on_record=lambda record: stop.set())     # stop asked at the first record
    records = [json.loads(line) for line in (config.out / RESULTS_NAME).read_text().splitlines()]
    assert [(r["source"]["path"], r["dicom"]["frame"]) for r in records] == [("a_stereo.dcm", n) for n in (1, 2, 3)]


def test_watch_records_a_later_frame_that_fails_at_once_not_after_a_grace(onnx_bundle, grader, photos, tmp_path):
    """A frame that does not decode in a file whose first frame did is damaged, not mid-write: waiting for
    it would lose it (the file's key is done)."""
    from edgeretina.runtime.watch import RESULTS_NAME, Watcher, WatchConfig

    ds = fx.image_dataset(photos[:2], encoding="jpeg")
    good = next(fx.pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=2))
    ds.PixelData = fx.encapsulate([good, b"\xff\xd8\xff\xe0" + bytes(64)], has_bot=True)
    camera = tmp_path / "camera"
    fx.save(ds, camera / "damaged.dcm")
    config = WatchConfig(folder=camera, bundle=onnx_bundle, out=tmp_path / "out", interval=0.05,
                         undecodable_grace_s=60.0, overlays=False)
    stop = threading.Event()
    thread = threading.Thread(target=Watcher(config, grader).run, args=(stop,), daemon=True)
    thread.start()
    results, deadline = config.out / RESULTS_NAME, time.monotonic() + 20
    while time.monotonic() < deadline and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["dicom"]["frame"], r["error"] is None) for r in records] == [(1, True), (2, False)]
    assert "truncated or corrupt DICOM pixel data (frame 2" in records[1]["error"]


def test_the_watch_line_names_the_frame():
    from edgeretina.runtime.report import one_line

    record = {"dicom": {"frame": 2, "frames": 3}, "error": "boom", "screening": None}
    assert one_line("cam/x.dcm", record) == "cam/x.dcm [2/3]: error boom"
    assert one_line("cam/y.dcm", {**record, "dicom": {"frame": 1, "frames": 1}}) == "cam/y.dcm: error boom"


def test_export_reads_reference_and_calibration_images_from_dicom(photos, tmp_path):
    from edgeretina.export.reference import load_images
    from edgeretina.preprocess import PreprocessConfig, prepare

    config = PreprocessConfig(image_size=64)
    folder = tmp_path / "calibration"
    fx.save(fx.image_dataset(photos[:3]), folder / "stereo.dcm")
    _png(folder / "one.png", photos[3])
    images, source = load_images(folder, 10, config, 0)
    expected = [prepare(p, config)[0] for p in (photos[3], photos[0], photos[1], photos[2])]
    np.testing.assert_array_equal(images, np.stack(expected))
    (folder / "labels.csv").write_text("path,grade,frame\nstereo.dcm,1,3\none.png,0,\n")
    images, _ = load_images(folder / "labels.csv", 10, config, 0)
    np.testing.assert_array_equal(images, np.stack([expected[3], expected[0]]))


def test_bench_images_accept_dicom_and_a_batch_is_batch_frames(onnx_bundle, photos, tmp_path):
    from edgeretina.bench.images import resolve_images
    from edgeretina.bench.worker import Worker
    from edgeretina.errors import ConfigError

    folder = tmp_path / "images"
    fx.save(fx.image_dataset(photos[:3]), folder / "stereo.dcm")
    _png(folder / "one.png", photos[3])
    found = resolve_images(folder, tmp_path, 0, 0)
    assert [p.name for p in found] == ["one.png", "stereo.dcm"]
    worker = Worker(str(onnx_bundle), "onnxruntime", 1, 2, [str(p) for p in found])
    assert len(worker.images) == 4                               # the PNG and three frames
    runs = worker.timed_runs(2)
    assert len(runs["stages"]) == 4                              # two runs of two images each
    fidelity = worker.fidelity()
    assert sorted(fidelity["files"]) == sorted([str(found[0])] + [f"{found[1]}#frame={n}" for n in (1, 2, 3)])
    (folder / "report.dcm").write_bytes(fx.to_bytes(fx.sr_dataset()))
    with pytest.raises(ConfigError, match="1 of 3 file.*structured report"):
        resolve_images(folder, tmp_path, 0, 0)


def test_training_reads_dicom_rows_and_their_frames(photos, tmp_path):
    from edgeretina.dataset import read_labels
    from edgeretina.errors import DatasetError
    from edgeretina.preprocess import PreprocessConfig, prepare
    from edgeretina.training.data import prepare_images

    root = tmp_path / "set"
    fx.save(fx.image_dataset(photos[:2]), root / "images" / "stereo.dcm")
    fx.save(fx.image_dataset([photos[2]], encoding="jpeg_lossless"), root / "images" / "one.dcm")
    (root / "labels.csv").write_text("path,case_id,grade,frame\nimages/stereo.dcm,s1,2,2\n"
                                     "images/one.dcm,o1,1,\nimages/stereo.dcm,s0,0,\n")
    items = read_labels(root / "labels.csv")
    assert [(i.case_id, i.frame) for i in items] == [("s1", 2), ("o1", None), ("s0", None)]
    assert all("frame" not in i.extra for i in items)
    config = PreprocessConfig(image_size=64)
    prepared = prepare_images(items, config, workers=1)
    assert prepared.case_ids == ["s1", "o1"] and list(prepared.grades) == [2, 1]
    np.testing.assert_array_equal(prepared.images[0], prepare(photos[1], config)[0])
    np.testing.assert_array_equal(prepared.images[1], prepare(photos[2], config)[0])
    [(path, reason)] = prepared.skipped                         # a multi-frame row must say which frame
    assert path.endswith("stereo.dcm") and "multi-frame DICOM (2 frames): name the frame" in reason
    (root / "bad.csv").write_text("path,grade,frame\nimages/one.dcm,1,0\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: frame 0 must be >= 1"):
        read_labels(root / "bad.csv")


def test_damaged_dicom_bytes_raise_only_the_librarys_errors(photos):
    """A short mutation probe (cuts, byte edits, inserts) of every fixture kind: each file decodes or is
    refused with an ImageDecodeError, never another exception, and never more frames than it holds."""
    kinds = [fx.image_dataset([photos[0][:48, :48]], encoding=e) for e in ("native", "jpeg", "jpeg_lossless", "rle")]
    kinds += [fx.per_frame_laterality(fx.image_dataset([photos[0][:48, :48]] * 2), ["L", "R"]), fx.sr_dataset()]
    rng = np.random.default_rng(7)
    outcomes = {"decoded": 0, "refused": 0}
    for ds in kinds:
        data = fx.to_bytes(ds)
        for _ in range(40):
            mutated = bytearray(data)
            where = int(rng.integers(132, len(data)))
            choice = rng.integers(3)
            if choice == 0:
                mutated = mutated[:where]
            elif choice == 1:
                mutated[where:where + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
            else:
                mutated[where:where] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
            try:
                image = open_dicom(bytes(mutated))
                assert image.frames <= 2
                for frame in range(1, image.frames + 1):
                    assert image.decode_frame(frame).dtype == np.uint8
                outcomes["decoded"] += 1
            except ImageDecodeError:
                outcomes["refused"] += 1
    assert outcomes["decoded"] and outcomes["refused"]
