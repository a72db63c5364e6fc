"""quality.py: the gradability gate on a real fundus photograph and on calibrated degradations of it."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from edgeretina.errors import ConfigError
from edgeretina.preprocess import FieldOfView, decode_image, detect_fov
from edgeretina.quality import REASON_TEXT, REASONS, QualityConfig, QualityReport, assess_quality

skimage_data = pytest.importorskip("skimage.data")

MEASURES = {"fov_found", "fov_fraction_visible", "fov_diameter_px", "mean_luminance", "dark_fraction",
            "saturated_fraction", "focus", "contrast"}


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return skimage_data.retina()


@pytest.fixture(scope="module")
def retina_fov(retina) -> FieldOfView:
    return detect_fov(retina)


@pytest.fixture(scope="module")
def inside(retina) -> np.ndarray:
    return retina.max(axis=2, keepdims=True) > 10  # the illuminated field, for degradations


def gain(rgb: np.ndarray, g: float) -> np.ndarray:
    return np.clip(np.rint(rgb.astype(np.float32) * g), 0, 255).astype(np.uint8)


def blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), sigma)


def add_noise(rgb: np.ndarray, sd: float, where: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sd, rgb.shape) * where
    return np.clip(np.rint(rgb + noise), 0, 255).astype(np.uint8)


def haze(rgb: np.ndarray, amount: float, where: np.ndarray) -> np.ndarray:
    veiled = rgb * (1 - amount) + amount * np.array([230.0, 160.0, 100.0])
    return np.where(where, np.rint(veiled), rgb).astype(np.uint8)


def test_real_fundus_is_gradable(retina, retina_fov):
    report = assess_quality(retina, retina_fov)
    assert report.gradable and report.reasons == (), report
    assert set(report.measures) == MEASURES
    m = report.measures
    assert m["fov_found"] == 1.0 and m["fov_fraction_visible"] > 0.99
    assert m["fov_diameter_px"] == pytest.approx(1394, rel=0.02)
    assert 100 < m["mean_luminance"] < 140 and m["saturated_fraction"] < 0.01
    # detecting the FOV inside gives the same report
    assert assess_quality(retina).measures == pytest.approx(m)


def test_report_is_json_safe(retina, retina_fov):
    d = assess_quality(retina, retina_fov).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["gradable"] is True and d["reasons"] == [] and set(d["measures"]) == MEASURES
    bad = assess_quality(np.zeros((100, 100, 3), np.uint8)).to_dict()
    assert json.loads(json.dumps(bad))["reasons"][0] == "no_field_of_view"


@pytest.mark.parametrize("g", [0.15, 0.1])
def test_under_exposed_is_too_dark_but_not_out_of_focus(retina, retina_fov, g):
    report = assess_quality(gain(retina, g), retina_fov)
    assert report.reasons == ("too_dark",), report


def test_moderately_dark_fundus_stays_gradable(retina, retina_fov):
    report = assess_quality(gain(retina, 0.35), retina_fov)
    assert report.gradable, report
    # the focus measure does not depend on exposure
    sharp = assess_quality(retina, retina_fov).measures["focus"]
    assert report.measures["focus"] == pytest.approx(sharp, rel=0.05)


@pytest.mark.parametrize("g", [3.0, 4.0])
def test_over_exposed_is_too_bright(retina, retina_fov, g):
    report = assess_quality(gain(retina, g), retina_fov)
    assert "too_bright" in report.reasons and not report.gradable, report
    assert report.measures["saturated_fraction"] > 0.3


def test_unevenly_lit_field_is_too_dark(retina, retina_fov):
    """Half the field in shadow (small pupil, misaligned camera): the mean may pass, the field does not."""
    shadowed = retina.copy()
    shadowed[:, :760] = gain(shadowed[:, :760], 0.08)
    report = assess_quality(shadowed, retina_fov)
    assert "too_dark" in report.reasons and report.measures["dark_fraction"] > 0.4, report


@pytest.mark.parametrize("sigma", [8.0, 12.0])
def test_strong_blur_is_out_of_focus(retina, retina_fov, sigma):
    report = assess_quality(blur(retina, sigma), retina_fov)
    assert report.reasons == ("out_of_focus",), report


def test_noise_does_not_pass_for_sharpness(retina, retina_fov, inside):
    report = assess_quality(add_noise(blur(retina, 8.0), 8.0, inside), retina_fov)
    assert "out_of_focus" in report.reasons, report


@pytest.mark.parametrize("case", ["blur2", "noise20", "jpeg10"])
def test_mild_defects_stay_gradable(retina, retina_fov, inside, case):
    if case == "blur2":
        img = blur(retina, 2.0)
    elif case == "noise20":
        img = add_noise(retina, 20.0, inside)
    else:
        ok, buf = cv2.imencode(".jpg", retina[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 10])
        img = decode_image(buf.tobytes())
    report = assess_quality(img, retina_fov)
    assert report.gradable, report


def test_focus_decreases_with_blur(retina, retina_fov):
    values = [assess_quality(blur(retina, s) if s else retina, retina_fov).measures["focus"] for s in (0, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_heavy_haze_is_low_contrast(retina, retina_fov, inside):
    report = assess_quality(haze(retina, 0.6, inside), retina_fov)
    assert report.reasons == ("low_contrast",), report
    assert assess_quality(haze(retina, 0.2, inside), retina_fov).gradable


@pytest.mark.parametrize("size", [700, 400, 192])
def test_measures_do_not_depend_on_resolution(retina, retina_fov, size):
    full = assess_quality(retina, retina_fov).measures
    small = cv2.resize(retina, (size, size), interpolation=cv2.INTER_AREA)
    report = assess_quality(small)
    assert report.gradable, report
    for key in ("focus", "contrast", "mean_luminance"):
        assert report.measures[key] == pytest.approx(full[key], rel=0.1), key
    # and a strong optical blur is caught at every resolution
    blurred = cv2.resize(blur(retina, 9.0), (size, size), interpolation=cv2.INTER_AREA)
    assert "out_of_focus" in assess_quality(blurred).reasons


def test_all_black_has_no_field_of_view():
    report = assess_quality(np.zeros((480, 640, 3), np.uint8))
    assert not report.gradable
    assert report.reasons[:2] == ("no_field_of_view", "too_dark")
    assert report.measures["fov_found"] == 0.0 and report.measures["fov_fraction_visible"] == 0.0


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_ordinary_photographs_are_not_fundus_images(name):
    report = assess_quality(getattr(skimage_data, name)())
    assert "no_field_of_view" in report.reasons and not report.gradable


def test_partial_field_of_view(retina):
    cut = np.ascontiguousarray(retina[:, 780:])  # the camera saw only the right part of the circle
    report = assess_quality(cut)
    assert report.measures["fov_found"] == 1.0, report
    assert report.measures["fov_fraction_visible"] < 0.6
    assert "partial_field_of_view" in report.reasons
    # a circle cut at the top and bottom by design (4:3 sensor) is not "partial"
    band = np.ascontiguousarray(retina[180:-180])
    report = assess_quality(band)
    assert 0.7 < report.measures["fov_fraction_visible"] < 0.9 and report.gradable, report


def test_reasons_are_known_codes_with_text():
    assert set(REASON_TEXT) == set(REASONS)
    assert all(isinstance(t, str) and t for t in REASON_TEXT.values())
    report = QualityReport(gradable=False, reasons=("too_dark",), measures={})
    assert report.text == [REASON_TEXT["too_dark"]]


def test_thresholds_are_configurable(retina, retina_fov):
    strict = QualityConfig(min_focus=0.6)
    assert "out_of_focus" in assess_quality(retina, retina_fov, strict).reasons
    assert QualityConfig.from_dict(QualityConfig().to_dict()) == QualityConfig()
    with pytest.raises(ConfigError):
        QualityConfig.from_dict({"min_focus": 0.3, "max_blur": 1})
    with pytest.raises(ConfigError):
        QualityConfig(min_focus="high")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        QualityConfig(working_diameter=10)
    # the working resolution trades precision for speed, not the verdict
    coarse = assess_quality(retina, retina_fov, QualityConfig(working_diameter=256))
    assert coarse.gradable
    assert coarse.measures["focus"] == pytest.approx(assess_quality(retina, retina_fov).measures["focus"], rel=0.15)


def test_quality_is_fast(retina, retina_fov):
    assess_quality(retina, retina_fov)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assess_quality(retina, retina_fov)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.05  # ~4 ms here; generous for loaded CI machines


def test_phantom_photographs(tmp_path):
    """If the phantom generator is there: ordinary phantoms pass, strongly defocused ones do not."""
    phantom = pytest.importorskip("edgeretina.phantom")
    try:
        cases = [phantom.render_case(seed, phantom.PhantomConfig(size=256), lesions=False) for seed in range(24)]
    except Exception as exc:  # the generator is another module's work in progress
        pytest.skip(f"phantom generator unavailable: {exc}")
    ordinary = [c for c in cases if not c.camera["degraded"]]
    assert ordinary
    for case in ordinary:
        fov = detect_fov(case.image)
        cx, cy, r = case.fov
        assert fov.found and max(abs(fov.cx - cx), abs(fov.cy - cy), abs(fov.radius - r)) < 0.02 * r
        assert assess_quality(case.image, fov).gradable
    defocused = blur(ordinary[0].image, 0.007 * 2 * ordinary[0].fov[2])  # ~10 px at the 1411 px reference
    assert "out_of_focus" in assess_quality(defocused).reasons
