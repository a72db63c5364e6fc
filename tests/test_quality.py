"""quality.py: the gradability gate on a real fundus photograph and on calibrated degradations of it."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from edgeretina.errors import ConfigError
from edgeretina.preprocess import FieldOfView, decode_image, detect_fov
from edgeretina.quality import REASON_TEXT, REASONS, QualityConfig, QualityReport, assess_quality

skimage_data = pytest.importorskip("skimage.data")

MEASURES = {"fov_found", "fov_fraction_visible", "fov_diameter_px", "mean_luminance", "dark_fraction",
            "saturated_fraction", "focus", "contrast", "vessel_depth", "noise", "lid_shadow", "red_green_ratio",
            "median_luminance", "content_levels"}


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


def lid(rgb: np.ndarray, cover: float, where: np.ndarray, lower: bool = False,
        transmission: float = 0.15) -> np.ndarray:
    """An eyelid's shadow over the share ``cover`` of the field from its top (or bottom): soft (logistic, scale 2 %
    of retina.jpg's field diameter), ``transmission`` of the light left behind it (as benchmarks/quality_gate.py)."""
    yy = np.mgrid[: rgb.shape[0], : rgb.shape[1]][0].astype(np.float32)
    edge = float(np.quantile(yy[where[..., 0]], 1.0 - cover if lower else cover))
    across = np.clip((edge - yy if lower else yy - edge) / (0.02 * 1394.0), -30, 30)
    light = transmission + (1.0 - transmission) / (1.0 + np.exp(-across))
    return np.where(where, np.clip(np.rint(rgb * light[..., None]), 0, 255), rgb).astype(np.uint8)


def vignette(rgb: np.ndarray, loss: float, where: np.ndarray) -> np.ndarray:
    """The field's rim ``loss`` darker than its centre (quadratic falloff), on top of retina.jpg's own."""
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]].astype(np.float32)
    rho2 = ((xx - 705.5) ** 2 + (yy - 705.5) ** 2) / 697.0**2
    light = 1.0 - loss * np.minimum(rho2, 1.0)
    return np.where(where, np.clip(np.rint(rgb * light[..., None]), 0, 255), rgb).astype(np.uint8)


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


@pytest.mark.parametrize("lower", [False, True], ids=["upper", "lower"])
def test_an_eyelid_shadow_is_a_lid_or_lash_artefact(retina, retina_fov, inside, lower):
    """A lid hiding 12 % of the field from the top or the bottom: shadowed 8 % of the measured field (x86-avx2)."""
    report = assess_quality(lid(retina, 0.12, inside, lower=lower), retina_fov)
    assert report.reasons == ("lid_or_lash_artefact",), report
    assert report.measures["lid_shadow"] == pytest.approx(0.081, abs=0.003)
    assert report.triggers == ({"reason": "lid_or_lash_artefact", "measure": "lid_shadow",
                                "value": round(report.measures["lid_shadow"], 4), "threshold": 0.05,
                                "rule": "lid_shadow > 0.05"},)
    assert report.score < 0.5 and report.limited_by == "lid_shadow"
    assert "eyelid" in report.text[0] and "retake" in report.text[0]
    assert assess_quality(lid(retina, 0.05, inside, lower=lower), retina_fov).gradable   # 1.8 % shadowed


@pytest.mark.parametrize("case", ["vignetting 0.6", "gain 0.3", "gain 2", "haze 0.3", "shadow from the side",
                                  "half in shadow"])
def test_vignetting_pigmentation_and_side_shadows_are_not_lid_artefacts(retina, retina_fov, inside, case):
    """A darker rim all round (vignetting), a dark or pale fundus (the measure is relative to each ring of the field)
    and a shadow that enters from the side (small pupil, camera off centre) leave lid_shadow at 0."""
    if case == "vignetting 0.6":
        img = vignette(retina, 0.6, inside)
    elif case.startswith("gain"):
        img = gain(retina, float(case.split()[1]))
    elif case == "haze 0.3":
        img = haze(retina, 0.3, inside)
    else:
        img = retina.copy()
        columns = slice(0, 300) if case == "shadow from the side" else slice(0, 760)
        img[:, columns] = gain(img[:, columns], 0.15 if case == "shadow from the side" else 0.08)
    report = assess_quality(img, retina_fov)
    assert report.measures["lid_shadow"] == 0.0 and "lid_or_lash_artefact" not in report.reasons, report


def test_a_dark_patch_counts_only_where_it_reaches_the_top_edge(retina, retina_fov, inside):
    """A shadow enters the field from its edge: the same dark patch above the centre is no lid shadow while
    fundus lies between it and the edge, and is one once it reaches the edge."""
    def patch(top):
        img = retina.copy()
        img[top:550, 550:850] = gain(img[top:550, 550:850], 0.1)
        return assess_quality(img, retina_fov)
    inner = patch(250)   # the measured field begins at row ~78
    assert inner.measures["lid_shadow"] == 0.0 and "lid_or_lash_artefact" not in inner.reasons, inner
    reaching = patch(0)
    assert reaching.measures["lid_shadow"] > 0.05 and "lid_or_lash_artefact" in reaching.reasons, reaching


def test_a_shadow_reaching_the_edge_only_at_the_side_is_not_a_lid(retina, retina_fov):
    """Above the centre but entering the field from its side (an arm from the left edge near the horizontal into a
    dark column that stops short of the top edge): not a lid's shadow; the same column reaching the top is one."""
    def shadow(top):
        img = retina.copy()
        for rows, columns in ((slice(top, 690), slice(600, 810)), (slice(620, 690), slice(0, 600))):
            img[rows, columns] = gain(img[rows, columns], 0.1)
        return assess_quality(img, retina_fov)
    side = shadow(120)   # the measured field begins at row ~78; the arm meets its edge ~50 px above the centre
    assert side.measures["lid_shadow"] == 0.0 and "lid_or_lash_artefact" not in side.reasons, side
    assert shadow(0).measures["lid_shadow"] > 0.05


def test_focus_decreases_with_blur(retina, retina_fov):
    values = [assess_quality(blur(retina, s) if s else retina, retina_fov).measures["focus"] for s in (0, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_heavy_haze_is_low_contrast_and_media_opacity(retina, retina_fov, inside):
    report = assess_quality(haze(retina, 0.6, inside), retina_fov)
    assert report.reasons == ("low_contrast", "media_opacity"), report
    assert assess_quality(haze(retina, 0.2, inside), retina_fov).gradable


@pytest.mark.parametrize("size", [700, 400, 192])
def test_measures_do_not_depend_on_resolution(retina, retina_fov, size):
    full = assess_quality(retina, retina_fov).measures
    small = cv2.resize(retina, (size, size), interpolation=cv2.INTER_AREA)
    report = assess_quality(small)
    assert report.gradable, report
    # Measured (working diameter 384, x86-avx2): full size focus 0.520, contrast 0.0626, luma 120.59;
    # at 700 / 400 / 192 px focus +0.011 / -0.012 / +0.007, contrast within 0.0003, luma within 0.06.
    # The tolerances are those deviations, rounded up.
    tolerance = {"focus": 0.015, "contrast": 0.0005, "mean_luminance": 0.1}
    for key, abs_tol in tolerance.items():
        assert report.measures[key] == pytest.approx(full[key], abs=abs_tol), key
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


# ---- every threshold of QualityConfig at its boundary, from both sides ------------------------------------
#
# Exposure thresholds on constructed photographs whose measure is known exactly: a uniformly lit disc on
# black, its field of view given (not detected), and chosen pixels changed. The gate measures the pixels
# within ``measure_radius`` of the centre, so the k pixels nearest the centre are measured whenever k < n
# (n: how many it measures), and a share is exactly k / n. Focus, contrast and the detected field of view
# are continuous measures of the real photograph: degradations of it measured just either side of the
# default threshold (found by stepping the degradation), then the comparison itself at the measured value.

FLAT = 300  # px: the disc's FOV diameter (~200) is below the working diameter, so no pixel is resampled


@dataclasses.dataclass(frozen=True)
class FlatDisc:
    fov: FieldOfView
    inside: np.ndarray        # the lit disc
    order: np.ndarray         # flat pixel indices, nearest the centre first
    n: int                    # pixels the gate measures: exactly order[:n]

    def image(self, level: int, k: int = 0, colour=(0, 0, 0)) -> np.ndarray:
        img = np.zeros((FLAT, FLAT, 3), np.uint8)
        img[self.inside] = level
        img.reshape(-1, 3)[self.order[:k]] = colour
        return img

    def report(self, level: int, k: int = 0, colour=(0, 0, 0)) -> QualityReport:
        return assess_quality(self.image(level, k, colour), self.fov)


def _flat_disc(radius: float) -> FlatDisc:
    yy, xx = np.mgrid[:FLAT, :FLAT]
    d2 = (xx + 0.5 - FLAT / 2) ** 2 + (yy + 0.5 - FLAT / 2) ** 2
    fov = FieldOfView(FLAT / 2, FLAT / 2, float(radius), found=True, fraction_visible=1.0)
    disc = FlatDisc(fov, d2 <= radius**2, np.argsort(d2.ravel(), kind="stable"), 0)
    probe = disc.report(100, 1)  # one black pixel at the centre: dark_fraction = 1 / n
    return dataclasses.replace(disc, n=round(1.0 / probe.measures["dark_fraction"]))


@pytest.fixture(scope="module")
def flat() -> FlatDisc:
    """A disc whose measured pixel count n is a multiple of 10, so that 0.4 n and 0.1 n are whole pixels."""
    disc = next(d for d in map(_flat_disc, range(100, 150)) if d.n % 10 == 0)
    everything = disc.report(100, disc.n)  # the n nearest pixels black: every measured pixel is dark
    assert everything.measures["dark_fraction"] == 1.0 and everything.measures["mean_luminance"] == 0.0
    assert disc.report(100, disc.n + 1).measures == everything.measures  # pixel n + 1 is not measured
    return disc


def exposure(report: QualityReport) -> set[str]:
    return set(report.reasons) & {"too_dark", "too_bright"}


def test_mean_luminance_thresholds_exactly(flat):
    """too_dark below a mean luma of 34 (not at it), too_bright above 200 (not at it).

    Issue 12 moved both (were 25 and 215): the phantom's under- and over-exposure faults (0.25 and 2.5 times
    a metered exposure, benchmarks/quality_gate.py) read up to 32.7 and down to 190 (x86-avx2); on
    retina.jpg gain 0.28 (33.8) now fails and 0.3 (36.2) passes, gain 2 (189.6) passes and 2.25 (203) fails."""
    at_dark = flat.report(34)
    assert at_dark.measures["mean_luminance"] == 34.0 and exposure(at_dark) == set(), at_dark
    below = flat.report(34, 1, (33, 33, 33))  # one measured pixel a level darker: mean 34 - 1/n
    assert below.measures["mean_luminance"] == pytest.approx(34.0 - 1.0 / flat.n, abs=1e-9)
    assert exposure(below) == {"too_dark"}, below
    assert exposure(flat.report(33)) == {"too_dark"}
    at_bright = flat.report(200)
    assert at_bright.measures["mean_luminance"] == 200.0 and exposure(at_bright) == set(), at_bright
    above = flat.report(200, 1, (201, 201, 201))
    assert above.measures["mean_luminance"] == pytest.approx(200.0 + 1.0 / flat.n, abs=1e-9)
    assert exposure(above) == {"too_bright"}, above
    assert exposure(flat.report(201)) == {"too_bright"}


def test_dark_fraction_threshold_exactly(flat):
    """too_dark when more than 40 % of the field has luma < 20, whatever the mean (here >= 60)."""
    k = flat.n * 4 // 10
    at = flat.report(100, k)
    assert at.measures["dark_fraction"] == 0.4 and at.measures["mean_luminance"] == pytest.approx(60.0, abs=1e-9)
    assert exposure(at) == set(), at
    over = flat.report(100, k + 1)
    assert over.measures["dark_fraction"] == (k + 1) / flat.n and exposure(over) == {"too_dark"}, over
    # the dark level: luma 19 is unlit, 20 is not
    assert flat.report(100, k + 1, (19, 19, 19)).measures["dark_fraction"] == (k + 1) / flat.n
    assert exposure(flat.report(100, k + 1, (19, 19, 19))) == {"too_dark"}
    lit = flat.report(100, k + 1, (20, 20, 20))
    assert lit.measures["dark_fraction"] == 0.0 and exposure(lit) == set(), lit


@pytest.mark.parametrize("colour", [(255, 250, 0), (250, 0, 255), (0, 255, 250), (250, 250, 250)])
def test_saturated_fraction_threshold_exactly(flat, colour):
    """too_bright when more than 10 % of the field has two channels >= 250 (mean luma stays ~110)."""
    k = flat.n // 10
    at = flat.report(100, k, colour)
    assert at.measures["saturated_fraction"] == 0.1 and exposure(at) == set(), at
    over = flat.report(100, k + 1, colour)
    assert over.measures["saturated_fraction"] == (k + 1) / flat.n and exposure(over) == {"too_bright"}, over


@pytest.mark.parametrize("colour", [(255, 249, 0), (249, 0, 255), (0, 255, 249), (255, 0, 0), (249, 249, 249)])
def test_one_clipped_channel_is_not_saturation(flat, colour):
    """A clipped red channel is normal in a well exposed fundus: only a second channel at >= 250 counts."""
    report = flat.report(100, flat.n // 10 + 1, colour)
    assert report.measures["saturated_fraction"] == 0.0 and exposure(report) == set(), report


# The lid shadow on a constructed photograph: a uniformly lit disc whose FOV diameter is exactly the working
# diameter (384 px: the working copy is the photo's square [8, 392), unresampled, and the measure's 64 x 64 grid
# cells are its 6 x 6 px blocks), the first k blocks in row-major order darkened to a tenth: a shadow that enters
# from the top edge and grows one cell at a time. Its share is (shadowed cells inside the region) / (cells inside),
# exactly, so measure_radius is chosen to make the cell count a multiple of 20 and 0.05 a reachable value.

LID_PHOTO = 400


@dataclasses.dataclass(frozen=True)
class LidDisc:
    config: QualityConfig
    fov: FieldOfView = FieldOfView(200.0, 200.0, 192.0, found=True, fraction_visible=1.0)

    def report(self, k: int, level: int = 10) -> QualityReport:
        yy, xx = np.mgrid[:LID_PHOTO, :LID_PHOTO]
        lit = (xx + 0.5 - 200) ** 2 + (yy + 0.5 - 200) ** 2 <= 192**2
        block = np.where((np.minimum(xx, yy) >= 8) & (np.maximum(xx, yy) < 392), (yy - 8) // 6 * 64 + (xx - 8) // 6,
                         1 << 30)
        img = np.zeros((LID_PHOTO, LID_PHOTO, 3), np.uint8)
        img[lit] = 100
        img[lit & (block < k)] = level
        return assess_quality(img, self.fov, self.config)

    def crossing(self) -> tuple[QualityReport, QualityReport]:
        """The reports with the most blocks darkened whose shadow is still <= 0.05, and with one block more
        (the shadow grows with k: bisection)."""
        lo, hi = 0, 64 * 64
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.report(mid).measures["lid_shadow"] > 0.05 else (mid, hi)
        return self.report(lo), self.report(hi)


@pytest.fixture(scope="module")
def lid_crossing() -> tuple[QualityReport, QualityReport, int]:
    for radius in np.arange(0.80, 0.95, 0.01):
        at, over = LidDisc(QualityConfig(measure_radius=round(float(radius), 2))).crossing()
        cells = round(1.0 / (over.measures["lid_shadow"] - at.measures["lid_shadow"]))
        if cells % 20 == 0:
            return at, over, cells
    raise AssertionError("no measure_radius in 0.80-0.94 gives a cell count that is a multiple of 20")


def test_lid_shadow_threshold_exactly(lid_crossing):
    """lid_or_lash_artefact when more than 5 % of the measured field is shadowed from its top, not at 5 %."""
    at, over, cells = lid_crossing
    assert at.measures["lid_shadow"] == 0.05 and "lid_or_lash_artefact" not in at.reasons, at
    assert over.measures["lid_shadow"] == (cells // 20 + 1) / cells and "lid_or_lash_artefact" in over.reasons, over
    # a shadow is what is under half of its ring's level (its 75th percentile: the unshadowed 100): 48 is, 52 is
    # not (the 8-bit cell means of the cells the region's edge cuts are within 2 % of the level)
    disc = LidDisc(QualityConfig())
    k = 700  # well past 5 % at the default measure radius
    assert disc.report(k, 48).measures["lid_shadow"] == disc.report(k, 10).measures["lid_shadow"] > 0.05
    assert disc.report(k, 52).measures["lid_shadow"] == 0.0 and disc.report(0).measures["lid_shadow"] == 0.0


def test_lid_shadow_comparison_is_strict_on_a_shadowed_photo(retina, retina_fov, inside):
    """As test_each_comparison_is_strict_at_the_measured_value, at a shadow that is not zero (retina.jpg's own is)."""
    shadowed = lid(retina, 0.12, inside)
    value = assess_quality(shadowed, retina_fov).measures["lid_shadow"]
    assert value > 0.05
    assert assess_quality(shadowed, retina_fov, QualityConfig(max_lid_shadow=value)).reasons == ()
    past = QualityConfig(max_lid_shadow=float(np.nextafter(value, -np.inf)))
    assert assess_quality(shadowed, retina_fov, past).reasons == ("lid_or_lash_artefact",)


def test_fov_fraction_threshold_exactly(retina, retina_fov):
    """partial_field_of_view below 70 % of the circle inside the photo, not at 70 %."""
    at = assess_quality(retina, dataclasses.replace(retina_fov, fraction_visible=0.7))
    assert at.measures["fov_fraction_visible"] == 0.7 and at.reasons == (), at
    below = assess_quality(retina, dataclasses.replace(retina_fov, fraction_visible=np.nextafter(0.7, 0.0)))
    assert below.reasons == ("partial_field_of_view",), below
    lost = assess_quality(retina, dataclasses.replace(retina_fov, found=False, fraction_visible=0.0))
    assert lost.reasons[0] == "no_field_of_view" and "partial_field_of_view" not in lost.reasons, lost


# (degradation of the real photograph, its parameter, the measure, the band it reads in, the reasons): each band
# ends at the default threshold and is 0.07 % (fov fraction), 0.02 % (focus), 0.04 % (contrast), 0.1 % / 0.7 %
# (vessel depth: the 8-bit veil moves it in steps of ~5e-4), 0.1 % (noise) or 1.0 % / 0.5 % (lid shadow: one grid
# cell is 0.8 % of 0.05) of it wide, so moving a threshold by more than that changes a verdict. Found by stepping
# the parameter; measured on x86-avx2 (values in the comments), at least 500x further from the threshold than
# OpenCV's float filters differ between ISAs (~1e-7 of the value).
NEAR_THRESHOLD = [
    ("cut", 480, "fov_fraction_visible", (0.7000, 0.7005), ()),                          # 0.70038
    ("cut", 481, "fov_fraction_visible", (0.6995, 0.7000), ("partial_field_of_view",)),  # 0.69979
    ("blur", 6.475, "focus", (0.30000, 0.30005), ()),                                    # 0.300022
    ("blur", 6.476, "focus", (0.29995, 0.30000), ("out_of_focus",)),                     # 0.299982
    # a 44.6 % veil is past the vessel-depth threshold (issue 12) too: media_opacity from 34.1 % on (below)
    ("haze", 0.4455, "contrast", (0.025000, 0.025010), ("media_opacity",)),              # 0.0250073
    ("haze", 0.446, "contrast", (0.024990, 0.025000), ("low_contrast", "media_opacity")),  # 0.0249965
    ("haze", 0.341, "vessel_depth", (0.09000, 0.09010), ()),                             # 0.090059
    ("haze", 0.342, "vessel_depth", (0.08940, 0.09000), ("media_opacity",)),             # 0.089506
    ("noise", 23.95, "noise", (0.04995, 0.05000), ()),                                   # 0.0499878
    ("noise", 23.97, "noise", (0.05000, 0.05005), ("too_noisy",)),                       # 0.0500393
    # lid_shadow moves in steps of one cell of 64 x 64 (1 / 2607 here): the nearest values either side of 0.05
    ("lid", 0.086, "lid_shadow", (0.04940, 0.05000), ()),                                # 0.049482 (129 cells)
    ("lid", 0.0863, "lid_shadow", (0.05000, 0.05030), ("lid_or_lash_artefact",)),        # 0.050249 (131 cells)
]


def smooth_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur in float, rounded once: continuous in sigma (OpenCV's 8-bit blur quantises its kernel,
    and focus then moves in steps of ~0.0004 near the threshold)."""
    return np.clip(np.rint(cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), sigma)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("how, amount, measure, band, reasons", NEAR_THRESHOLD,
                         ids=[f"{c[0]}-{c[1]}" for c in NEAR_THRESHOLD])
def test_continuous_measures_just_either_side_of_the_default(retina, retina_fov, inside, how, amount, measure,
                                                             band, reasons):
    if how == "cut":   # the camera saw the circle only right of column `amount`; the FOV is detected
        report = assess_quality(np.ascontiguousarray(retina[:, amount:]))
    elif how == "blur":
        report = assess_quality(smooth_blur(retina, amount), retina_fov)
    elif how == "noise":
        report = assess_quality(add_noise(retina, amount, inside), retina_fov)
    elif how == "lid":
        report = assess_quality(lid(retina, amount, inside), retina_fov)
    else:
        report = assess_quality(haze(retina, amount, inside), retina_fov)
    low, high = band
    assert low < report.measures[measure] < high and report.reasons == reasons, report


# (threshold, the measure it reads, the reason, +1 when the reason is for values above the threshold)
THRESHOLDS = [
    ("min_fov_fraction_visible", "fov_fraction_visible", "partial_field_of_view", -1),
    ("min_mean_luminance", "mean_luminance", "too_dark", -1),
    ("max_dark_fraction", "dark_fraction", "too_dark", +1),
    ("max_mean_luminance", "mean_luminance", "too_bright", +1),
    ("max_saturated_fraction", "saturated_fraction", "too_bright", +1),
    ("min_focus", "focus", "out_of_focus", -1),
    ("min_contrast", "contrast", "low_contrast", -1),
    ("min_vessel_depth", "vessel_depth", "media_opacity", -1),
    ("max_noise", "noise", "too_noisy", +1),
    ("max_lid_shadow", "lid_shadow", "lid_or_lash_artefact", +1),
]
# judged only when no field of view is found (a photograph without one: the astronaut)
NO_FIELD_THRESHOLDS = ["min_red_green_ratio", "min_content_levels"]


def test_every_threshold_has_a_test():
    fields = {f.name for f in dataclasses.fields(QualityConfig)} - {"working_diameter", "measure_radius"}
    assert {t[0] for t in THRESHOLDS} | set(NO_FIELD_THRESHOLDS) == fields


@pytest.mark.parametrize("threshold, measure, reason, side", THRESHOLDS, ids=[t[0] for t in THRESHOLDS])
def test_each_comparison_is_strict_at_the_measured_value(retina, retina_fov, threshold, measure, reason, side):
    """The threshold set to the photograph's own measure passes it; one float step further fails it."""
    value = assess_quality(retina, retina_fov).measures[measure]
    assert assess_quality(retina, retina_fov).measures[measure] == value  # the measures are deterministic
    at = assess_quality(retina, retina_fov, QualityConfig(**{threshold: value}))
    assert at.reasons == (), at
    past = QualityConfig(**{threshold: float(np.nextafter(value, -side * np.inf))})
    assert assess_quality(retina, retina_fov, past).reasons == (reason,)


def test_not_a_fundus_photo_thresholds_exactly():
    """Without a field of view: not_a_fundus_photo when the photo has content (a luma range of at least
    min_content_levels) and its red / green ratio is below min_red_green_ratio; each strictly."""
    astronaut = skimage_data.astronaut()
    m = assess_quality(astronaut).measures
    assert m["fov_found"] == 0.0 and m["red_green_ratio"] < 1.5 <= m["content_levels"] / 100, m
    at = QualityConfig(min_red_green_ratio=m["red_green_ratio"])
    assert assess_quality(astronaut, config=at).reasons == ("no_field_of_view",)
    past = QualityConfig(min_red_green_ratio=float(np.nextafter(m["red_green_ratio"], np.inf)))
    assert assess_quality(astronaut, config=past).reasons == ("no_field_of_view", "not_a_fundus_photo")
    content_at = QualityConfig(min_content_levels=m["content_levels"])
    assert "not_a_fundus_photo" in assess_quality(astronaut, config=content_at).reasons
    content_past = QualityConfig(min_content_levels=float(np.nextafter(m["content_levels"], np.inf)))
    assert assess_quality(astronaut, config=content_past).reasons == ("no_field_of_view",)


@pytest.mark.parametrize("level, reasons", [(34, ()), (33, ("too_dark",)), (200, ()), (201, ("too_bright",))])
def test_without_a_field_exposure_is_judged_on_the_median(level, reasons):
    """A uniform photo has no field: only an unlit or blown-out photo adds an exposure reason, judged on the
    median luma (the frame's own thresholds), and no content means it is not called 'not a fundus photo'."""
    report = assess_quality(np.full((120, 160, 3), level, np.uint8))
    assert report.measures["median_luminance"] == level and report.measures["content_levels"] == 0
    assert report.reasons == ("no_field_of_view", *reasons), report


def test_a_bright_bar_beside_an_unfound_field_does_not_make_it_too_bright():
    """The mean of a frame with a white bar in it is high; its median is not (issue 12: exposure was judged
    over the whole image, frame included)."""
    photo = np.full((300, 400, 3), 30, np.uint8)
    photo[:, 300:360] = 255   # a white panel edge, 15 % of the photo
    report = assess_quality(photo)
    assert report.measures["mean_luminance"] > 60 and report.measures["median_luminance"] == 30
    assert "too_dark" in report.reasons and "too_bright" not in report.reasons, report


def test_triggers_name_the_measure_and_threshold(retina, retina_fov, inside):
    report = assess_quality(haze(retina, 0.6, inside), retina_fov)
    assert [t["reason"] for t in report.triggers] == ["low_contrast", "media_opacity"]
    contrast, veil = report.triggers
    assert contrast == {"reason": "low_contrast", "measure": "contrast", "value": round(report.measures["contrast"], 4),
                        "threshold": 0.025, "rule": "contrast < 0.025"}
    assert veil["measure"] == "vessel_depth" and veil["threshold"] == 0.09 and veil["rule"] == "vessel_depth < 0.09"
    assert veil["value"] == round(report.measures["vessel_depth"], 4) < 0.09
    # two triggers of one reason: both listed, in the order of the checks
    dark = assess_quality(gain(retina, 0.05), retina_fov)
    assert dark.reasons == ("too_dark",)
    assert [t["measure"] for t in dark.triggers] == ["mean_luminance", "dark_fraction"]
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d and d["triggers"] == [dict(t) for t in report.triggers]


def test_score_is_half_at_a_threshold_and_orders_photographs(retina, retina_fov):
    sharp = assess_quality(retina, retina_fov)
    assert sharp.score == 1.0 and sharp.limited_by == ""
    value = sharp.measures["focus"]
    at = assess_quality(retina, retina_fov, QualityConfig(min_focus=value))
    assert at.score == 0.5 and at.limited_by == "focus" and at.gradable
    past = assess_quality(retina, retina_fov, QualityConfig(min_focus=value + 0.01))
    assert past.score == pytest.approx(0.5 - 0.5 * 0.01 / 0.1) and not past.gradable
    # blur lowers the score step by step; a photo without a field scores 0
    scores = [assess_quality(blur(retina, s), retina_fov).score for s in (4, 6, 8, 12)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[1] > 0.5 > scores[2]
    assert assess_quality(np.zeros((64, 64, 3), np.uint8)).score == 0.0
