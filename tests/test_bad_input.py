"""Bad input end to end: every odd file gets a specific error or an ungradable record with the right reason,
good files in the same batch are still graded, and the CLI's JSON and CSV list every file.

The fundus photographs are the real public-domain `skimage.data.retina()` and degradations of it (the
quality gate is calibrated on it, see quality.py); the model is the tiny test bundle.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from edgeretina.bundle import load_bundle
from edgeretina.errors import BundleError, ImageDecodeError
from edgeretina.phantom.damage import png_header_only
from edgeretina.preprocess import MAX_PIXELS, decode_image
from edgeretina.runtime import Grader

skimage_data = pytest.importorskip("skimage.data")

WORK_SIZE = 704  # the retina photo at half size: the quality measures are resolution-independent


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return cv2.resize(skimage_data.retina(), (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def grader(onnx_bundle):
    return Grader(onnx_bundle, threads=1)


def _save(path: Path, rgb: np.ndarray, **params) -> Path:
    Image.fromarray(rgb).save(path, **params)
    return path


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid-looking PNG whose header claims side x side pixels, with a few bytes of data."""
    path.write_bytes(png_header_only(side, side, data_bytes=64))
    return path


def _gain(rgb: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(np.rint(rgb.astype(np.float32) * gain), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, retina) -> dict[str, Path]:
    """name -> file. Good photos in many encodings, degraded photos, and files that are not photos."""
    d = tmp_path_factory.mktemp("bad_input")
    _save(d / "good.png", retina)
    jpeg = _save(d / "good.jpg", retina, quality=95).read_bytes()
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "notes.png").write_text("patient notes, not a photograph\n")
    cv2.imwrite(str(d / "sixteen_bit.png"), retina[..., ::-1].astype(np.uint16) * 257)
    cv2.imwrite(str(d / "sixteen_bit.tif"), retina[..., ::-1].astype(np.uint16) * 257)
    _save(d / "gray.png", cv2.cvtColor(retina, cv2.COLOR_RGB2GRAY))
    _save(d / "rgba.png", np.dstack([retina, np.full(retina.shape[:2], 255, np.uint8)]))
    Image.fromarray(retina).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the pixels are stored rotated the other way
    _save(d / "exif_rotated.png", np.ascontiguousarray(np.rot90(retina, k=1)), exif=exif)
    _save(d / "black.png", np.zeros_like(retina))
    _save(d / "astronaut.png", skimage_data.astronaut())
    # blur sigma 12 px at 1411 px reads focus 0.18 (quality.py table): 6 px at this half size
    _save(d / "blurred.png", cv2.GaussianBlur(retina, (0, 0), 6.0))
    _save(d / "dark.png", _gain(retina, 0.15))
    _save(d / "bright.png", _gain(retina, 3.0))
    _bomb_png(d / "bomb.png")
    # keyed by stem, except the second encoding of a stem, keyed by its full name
    return {p.stem if p.suffix in (".png", ".jpg") and p.name != "good.jpg" else p.name: p
            for p in sorted(d.iterdir())}


DECODE_ERRORS = {"empty": "empty file", "truncated": "truncated or corrupt image", "notes": "not an image",
                 "bomb": "image too large"}
GRADED_LIKE_GOOD = ("sixteen_bit", "rgba", "exif_rotated")
DECODED_FINE = ("gray", "cmyk")
UNGRADABLE = {"black": "no_field_of_view", "astronaut": "no_field_of_view", "blurred": "out_of_focus",
              "dark": "too_dark", "bright": "too_bright"}


def test_decoding_of_the_odd_encodings(photos, retina):
    np.testing.assert_array_equal(decode_image(photos["sixteen_bit"]), retina)            # 16-bit: high byte
    np.testing.assert_array_equal(decode_image(photos["sixteen_bit.tif"]), retina)
    np.testing.assert_array_equal(decode_image(photos["rgba"]), retina)                   # opaque alpha dropped
    np.testing.assert_array_equal(decode_image(photos["exif_rotated"]), retina)           # orientation applied
    gray = decode_image(photos["gray"])
    assert gray.shape == retina.shape and (gray[..., 0] == gray[..., 2]).all()
    cmyk = decode_image(photos["cmyk"])
    assert cmyk.shape == retina.shape and np.abs(cmyk.astype(int) - retina).mean() < 4


def test_every_bad_file_gets_a_specific_answer_and_the_batch_goes_on(grader, photos):
    order = ["empty", "good", "truncated", "sixteen_bit", "sixteen_bit.tif", "notes", "rgba", "exif_rotated",
             "bomb", "gray", "cmyk", *UNGRADABLE, "good.jpg"]
    records = {name: r for name, r in zip(order, grader.grade([photos[n] for n in order], batch_size=4))}
    assert len(records) == len(order)
    for name, message in DECODE_ERRORS.items():
        assert records[name].error and records[name].error.startswith(message), (name, records[name].error)
        assert records[name].grade is None and records[name].screening is None
    good = records["good"]
    assert good.error is None and good.gradable, good.quality
    for name in GRADED_LIKE_GOOD:
        record = records[name]
        assert record.error is None and record.gradable, (name, record.quality)
        assert record.grade == good.grade
        assert record.probabilities == pytest.approx(good.probabilities, abs=1e-5)
    for name in (*DECODED_FINE, "good.jpg"):
        record = records[name]
        assert record.error is None, name
        # decoded fine: the screening answer follows the record's own gradability and referable decision
        expected = ("referable" if record.referable else "negative") if record.gradable else "ungradable"
        assert record.screening == expected, (name, record.screening, record.gradable, record.referable)
    for name, reason in UNGRADABLE.items():
        record = records[name]
        assert record.error is None and record.gradable is False, name
        assert record.screening == "ungradable" and record.grade is None
        assert reason in record.quality["reasons"], (name, record.quality)


def test_bomb_header_is_refused_before_decoding(photos):
    with pytest.raises(ImageDecodeError, match=r"image too large \(10000000000 pixels > 120000000\)"):
        decode_image(photos["bomb"])


def test_cli_lists_every_file_in_json_and_csv(onnx_bundle, photos, tmp_path):
    names = ["good", "empty", "bomb", "astronaut", "blurred", "notes", "cmyk"]
    out_csv = tmp_path / "results.csv"
    result = _cli("grade", *[photos[n] for n in names], "--bundle", onnx_bundle, "--json", "--csv", out_csv)
    assert result.returncode == 3, result.stderr        # some files failed
    records = json.loads(result.stdout)
    assert [Path(r["file"]).stem for r in records] == names
    by_name = dict(zip(names, records))
    assert [n for n in names if by_name[n]["error"]] == ["empty", "bomb", "notes"]
    assert by_name["astronaut"]["screening"] == "ungradable"
    rows = list(csv.DictReader(out_csv.open()))
    assert [Path(r["file"]).stem for r in rows] == names
    assert rows[names.index("blurred")]["quality_reasons"] == "out_of_focus"
    assert rows[names.index("empty")]["error"].startswith("empty file")
    assert rows[0]["grade"] in {"0", "1", "2", "3", "4"}


# ---- a huge photograph -------------------------------------------------------------------------------------

HUGE = (12000, 9000)  # 108 MP: under MAX_PIXELS, so the runtime must grade it without exploding


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    """The retina photo at 9000 px in a 12000 x 9000 frame. Written from a uint8 array once (324 MB for a
    second), then freed."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    width, height = HUGE
    frame = cv2.copyMakeBorder(cv2.resize(skimage_data.retina()[..., ::-1], (height, height)), 0, 0,
                               (width - height) // 2, (width - height) // 2, cv2.BORDER_CONSTANT, value=0)
    assert cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 80])
    del frame
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, above 89 MP
def test_huge_jpeg_is_graded_from_a_reduced_decode(grader, huge_jpeg):
    """Graded from a 1/8-scale decode (libjpeg's DCT scaling, PreprocessConfig.decode_max_side): the
    full-size frame (324 MB) never exists. What that saves in peak memory is measured by
    benchmarks/runtime_costs.py (x86-avx2: 120 MB for the whole grading process, 720 MB decoding at full size)."""
    assert HUGE[0] * HUGE[1] <= MAX_PIXELS
    assert grader.preprocess.decode_max_side == 1024   # 12000 // 8 >= 1024: the largest reduction applies
    graded = next(grader.grade_iter([huge_jpeg]))
    record = graded.record
    assert record.error is None and record.gradable and record.grade in range(5), record
    assert graded.image.shape == (HUGE[1] // 8, HUGE[0] // 8, 3)
    assert graded.geometry.original_size == (HUGE[1] // 8, HUGE[0] // 8)


# ---- tampered bundles --------------------------------------------------------------------------------------

def _tamper(onnx_bundle: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    root = tmp_path / f"bundle-{how}"
    shutil.copytree(onnx_bundle, root)
    manifest_path = root / "manifest.json"
    if how == "sha_mismatch":
        bank = root / "bank.npz"
        data = bytearray(bank.read_bytes())
        data[-1] ^= 0xFF
        bank.write_bytes(bytes(data))
    elif how == "missing_file":
        (root / "model.onnx").unlink()
    elif how == "unknown_schema":
        manifest = json.loads(manifest_path.read_text())
        manifest["schema_version"] = 999
        manifest_path.write_text(json.dumps(manifest))
    return root


TAMPERED = {"sha_mismatch": "sha256", "missing_file": "model.onnx", "unknown_schema": "unknown manifest schema_version"}


@pytest.mark.parametrize("how", sorted(TAMPERED))
def test_tampered_bundle_is_refused(onnx_bundle, photos, tmp_path, how):
    root = _tamper(Path(onnx_bundle), tmp_path, how)
    with pytest.raises(BundleError, match=TAMPERED[how]):
        Grader(root)
    with pytest.raises(BundleError):
        load_bundle(root)
    result = _cli("grade", photos["good"], "--bundle", root)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and TAMPERED[how] in lines[0], result.stderr
    assert result.stdout == ""


def _cli(*args):
    exe = Path(sys.executable).with_name("edgeretina")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("EDGERETINA_DEBUG", None)
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)
