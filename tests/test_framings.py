"""Real camera framings (issue 12): the phantom renders each named framing preset, the field-of-view detection
finds the field in every one, the quality gate accepts the ordinary photographs of each and refuses each
forced fault for its own reason.

Tolerances of the detected field (centre within 1 % of the radius, radius within 2 % of it) are the worst errors
measured on 400 photographs of the presets, rounded up with a quarter to a half to spare (benchmarks/quality_gate.py,
512 px, x86-avx2: centre 0.79 %, on a side_bar photo; radius 1.3 %, on a small field, where it is 1.5 px). They
matter little to the gate: on retina.jpg a radius 2 % off, or a centre 1 % of the radius off, moves focus by at most
0.003, contrast by 0.0002, vessel depth by 0.003, noise by 0.0003 and the mean luma by 0.6 levels (x86-avx2).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from edgeretina.errors import ConfigError
from edgeretina.phantom import DEFAULT_FRAMING_MIX, FAULTS, FRAMINGS, PhantomConfig, render_case
from edgeretina.preprocess import decode_image, detect_fov
from edgeretina.quality import assess_quality

CENTRE_TOL, RADIUS_TOL = 0.01, 0.02   # share of the drawn radius
#: the reason each fault must be refused for (benchmarks/quality_gate.py: EXPECTED_REASON)
FAULT_REASON = {"defocus": "out_of_focus", "under_exposed": "too_dark", "over_exposed": "too_bright",
                "heavy_haze": "media_opacity", "strong_noise": "too_noisy", "lid_artefact": "lid_or_lash_artefact"}


def as_camera_writes_it(case) -> np.ndarray:
    """JPEG at the camera's sampled quality, decoded as the runtime decodes a file."""
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR),
                              [cv2.IMWRITE_JPEG_QUALITY, int(case.camera["jpeg_quality"])])
    assert ok
    return decode_image(buffer.tobytes())


def assert_field_found(case, fov) -> None:
    cx, cy, r = case.fov  # the phantom draws in pixel-centre coordinates, the detector answers in continuous ones
    assert fov.found, (case.framing, case.fov)
    assert math.hypot(fov.cx - (cx + 0.5), fov.cy - (cy + 0.5)) <= CENTRE_TOL * r, (case.framing, fov, case.fov)
    assert abs(fov.radius - r) <= RADIUS_TOL * r, (case.framing, fov, case.fov)


# ---- the presets draw what they say ------------------------------------------------------------------------

def _luma(rgb) -> np.ndarray:
    return rgb.astype(np.float64) @ [0.299, 0.587, 0.114]


def _outside(case, margin: float = 2.0) -> np.ndarray:
    cx, cy, r = case.fov
    h, w = case.image.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 > (r + margin) ** 2


def test_presets_are_selectable_by_name_and_checked():
    assert set(DEFAULT_FRAMING_MIX) == set(FRAMINGS) and "standard" in FRAMINGS
    for name in FRAMINGS:
        assert render_case(3, PhantomConfig(size=96, framing=name)).framing == name
    with pytest.raises(ConfigError):
        PhantomConfig(framing="fisheye")
    with pytest.raises(ConfigError):
        PhantomConfig(faults="sunburn")
    with pytest.raises(ConfigError):
        PhantomConfig(fault_strength=2.0)                      # a strength needs a fault
    with pytest.raises(ConfigError):
        PhantomConfig(faults="defocus", fault_strength=-1.0)
    case = render_case(3, PhantomConfig(size=96, faults="defocus", fault_strength=3.0))
    assert case.fault == "defocus" and case.fault_strength == 3.0 and case.camera["degraded"] == 1.0


def test_grey_frame_is_not_black_and_the_field_is_off_centre():
    for seed in range(6):
        case = render_case(seed, PhantomConfig(size=192, framing="grey_frame", faults="none"))
        h, w = case.image.shape[:2]
        cx, cy, r = case.fov
        frame = np.median(_luma(case.image[_outside(case)]))
        assert 15 - 1 <= frame <= 40 + 1, frame                      # luminance 15-40 (JPEG-free pixels: +-1)
        assert r <= cx <= w - r and r <= cy <= h - r and w > h       # the whole circle inside a wider frame
    offsets = [abs(c.fov[0] - c.image.shape[1] / 2) / c.fov[2] for c in
               (render_case(s, PhantomConfig(size=96, framing="grey_frame", faults="none")) for s in range(10))]
    assert max(offsets) > 0.2


def test_notch_marks_the_rim():
    kinds = set()
    for seed in range(12):
        case = render_case(seed, PhantomConfig(size=256, framing="notch", faults="none"))
        s, a, tab = case.surround["notch_side"], case.surround["notch_angle"], case.surround["notch_tab"]
        cx, cy, r = case.fov
        assert 0.035 * 2 * r <= s <= 0.07 * 2 * r
        # sample the middle of the marker: just inside the rim (notch) or just outside it (tab)
        d = r + 0.5 * s if tab else r - 0.5 * s
        x, y = int(round(cx + d * math.cos(a))), int(round(cy + d * math.sin(a)))
        if not (0 <= x < case.image.shape[1] and 0 <= y < case.image.shape[0]):
            continue
        red, level = float(case.image[y, x, 0]), case.surround["level"][0]
        if tab:
            assert red > level + 20, (seed, red, level)       # lit like the field's dim rim (red dominates there)
        else:
            assert abs(red - level) < 6, (seed, red, level)   # the frame's colour
        kinds.add(tab)
    assert kinds == {True, False}


def test_cut_sides_cuts_the_circle_left_and_right():
    all_four = 0
    for seed in range(10):
        case = render_case(seed, PhantomConfig(size=128, framing="cut_sides", faults="none"))
        h, w = case.image.shape[:2]
        cx, cy, r = case.fov
        assert cx - r < 0 and cx + r > w
        all_four += cy - r < 0 and cy + r > h
    assert 0 < all_four < 10  # both variants: cut on all four sides, and a narrow crop cut left and right only


def test_bars_and_text_lie_beside_the_field():
    for name, key in (("side_bar", "bars"), ("burned_text", "texts"), ("export_panel", "texts")):
        for seed in range(4):
            case = render_case(seed, PhantomConfig(size=256, framing=name, faults="none"))
            assert case.surround[key], (name, seed)
            bright_outside = (_luma(case.image) > 150) & _outside(case, margin=3)
            assert bright_outside.sum() > 30, (name, seed)        # something bright is drawn outside the field
    for name in ("burned_text", "export_panel", "small_field"):
        for seed in range(6):
            case = render_case(seed, PhantomConfig(size=256, framing=name, faults="none"))
            cx, cy, r = case.fov
            for t in case.surround["texts"]:  # every line's box lies outside the circle (and inside the photo)
                (tw, th), base = cv2.getTextSize(t["text"], cv2.FONT_HERSHEY_SIMPLEX, t["scale"], t["thickness"])
                x0, y0, x1, y1 = t["x"], t["y"] - th, t["x"] + tw, t["y"] + base
                nearest = math.hypot(min(max(cx, x0), x1) - cx, min(max(cy, y0), y1) - cy)
                assert t["text"] and nearest > r, (name, seed, t)
                assert 0 <= x0 and x1 <= case.image.shape[1] and 0 <= y0 and y1 <= case.image.shape[0]


def test_small_field_fills_under_half_the_image():
    for seed in range(8):
        case = render_case(seed, PhantomConfig(size=128, framing="small_field", faults="none"))
        h, w = case.image.shape[:2]
        assert math.pi * case.fov[2] ** 2 < 0.5 * h * w


def test_default_mix_shares_and_standard_pixels():
    """The default mix draws each preset about as often as DEFAULT_FRAMING_MIX says, and a photograph whose
    framing is standard has exactly the pixels of the standard preset (the framing draws from its own stream)."""
    n = 300
    drawn = [render_case(seed, PhantomConfig(size=64)) for seed in range(n)]
    for name, share in DEFAULT_FRAMING_MIX.items():
        observed = sum(c.framing == name for c in drawn) / n
        assert abs(observed - share) < 4 * math.sqrt(share * (1 - share) / n) + 0.01, (name, observed, share)
    standard = [(seed, c) for seed, c in enumerate(drawn) if c.framing == "standard"][:5]
    for seed, case in standard:
        assert np.array_equal(case.image, render_case(seed, PhantomConfig(size=64, framing="standard")).image)
    ideal = [render_case(seed, PhantomConfig(size=64, camera_variation=0.0)).framing for seed in range(20)]
    assert set(ideal) == {"standard"}


# ---- the detection finds the field in every framing; the gate accepts the photographs ----------------------

@pytest.mark.parametrize("framing", FRAMINGS)
def test_every_framing_is_found_and_gradable(framing):
    for seed in range(6):
        case = render_case(100 + seed, PhantomConfig(size=384, framing=framing, faults="none"))
        rgb = as_camera_writes_it(case)
        fov = detect_fov(rgb)
        assert_field_found(case, fov)
        report = assess_quality(rgb, fov)
        assert report.gradable and report.score >= 0.5, (framing, seed, report)


@pytest.mark.parametrize("framing", FRAMINGS)
def test_every_framing_at_camera_resolution(framing):
    """The 1411 px photo size of retina.jpg, where detection works on a subsampled copy."""
    case = render_case(7, PhantomConfig(size=1411, framing=framing, faults="none"))
    rgb = as_camera_writes_it(case)
    fov = detect_fov(rgb)
    assert_field_found(case, fov)
    assert assess_quality(rgb, fov).gradable


def test_a_panel_larger_than_the_field_is_not_taken_for_it():
    """A viewer export with a yellow information panel beside a small field: the panel is the largest bright
    region, the field the second, in brightness and in colour alike; the detection tries both and keeps the
    circle."""
    case = render_case(5, PhantomConfig(size=384, framing="small_field", faults="none"))
    cx, cy, r = case.fov
    photo = case.image.copy()
    h, w = photo.shape[:2]
    gap = int(0.05 * h)
    if cx < w / 2:   # the panel fills the side away from the field
        x0, x1 = int(cx + r) + gap, w
    else:
        x0, x1 = 0, int(cx - r) - gap
    photo[:, x0:x1] = (255, 230, 90)
    assert (x1 - x0) * h > 1.3 * math.pi * r * r   # larger than the field
    assert_field_found(case, detect_fov(photo))


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "moon", "coins", "camera", "page",
                                  "hubble_deep_field", "immunohistochemistry", "brick", "gravel"])
def test_scenes_and_round_objects_are_not_fields(name):
    """Relaxing 'nothing bright outside the circle' for bars and text must not make a field of a coin or a cup."""
    skimage_data = pytest.importorskip("skimage.data")
    image = getattr(skimage_data, name)()
    rgb = np.ascontiguousarray(np.dstack([image] * 3) if image.ndim == 2 else image[..., :3])
    assert not detect_fov(rgb).found


# ---- each fault is refused for its reason ------------------------------------------------------------------

@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_is_refused_with_its_reason(fault):
    """Eight photographs of each fault, one in each framing, strengths drawn from the fault's range."""
    assert set(FAULT_REASON) == set(FAULTS)
    for i, framing in enumerate(FRAMINGS):
        case = render_case(200 + i, PhantomConfig(size=384, framing=framing, faults=fault))
        rgb = as_camera_writes_it(case)
        fov = detect_fov(rgb)
        # the field is found even so (measured inside it, not over the frame), if less precisely: a dim
        # field's rim can be darker than a grey frame (worst of 300 fault photographs: centre 4.9 % of the
        # radius, radius 6.7 %, under-exposed; benchmarks/quality_gate.py)
        cx, cy, r = case.fov
        assert fov.found, (fault, framing)
        assert math.hypot(fov.cx - cx - 0.5, fov.cy - cy - 0.5) <= 0.07 * r and abs(fov.radius - r) <= 0.1 * r
        report = assess_quality(rgb, fov)
        assert not report.gradable and FAULT_REASON[fault] in report.reasons, (fault, framing, case.fault_strength,
                                                                              report)
        assert report.score <= 0.5
        trigger = next(t for t in report.triggers if t["reason"] == FAULT_REASON[fault])
        assert trigger["value"] == round(report.measures[trigger["measure"]], 4)


@pytest.mark.parametrize("fault, strength", [("defocus", 2.5), ("under_exposed", 0.25), ("over_exposed", 2.5),
                                             ("strong_noise", 0.12), ("lid_artefact", 0.12)])
def test_faults_at_the_weak_end_of_their_range(fault, strength):
    """At the weakest strength that must still be refused (the gate refuses 78-80 of 80 photographs there,
    benchmarks/quality_gate.py; a lid hiding 12 % of the field 40 of 40); heavy haze is left out: 75 of 80 at
    0.6, its boundary case is the veil on retina.jpg (tests/test_quality.py)."""
    for i, framing in enumerate(FRAMINGS[:4]):
        case = render_case(300 + i, PhantomConfig(size=384, framing=framing, faults=fault, fault_strength=strength))
        report = assess_quality(as_camera_writes_it(case))
        assert FAULT_REASON[fault] in report.reasons, (fault, framing, report)


@pytest.mark.parametrize("cover", [0.25, 0.3, 0.4])
def test_a_lid_over_a_quarter_or_more_of_the_field_is_named(cover):
    """Past the fault's range the lid's shadow leaves less of the circle bright (IoU with the bright region under
    0.8); the field is still found, as a bright region wholly inside its circle, and the gate names the lid
    instead of answering no_field_of_view (benchmarks/quality_gate.py, 40 photographs each, x86-avx2: 40, 40 and
    35 named at 0.25, 0.3, 0.4, against 37, 26 and 9 before)."""
    named = 0
    for i, framing in enumerate(FRAMINGS[:4]):
        case = render_case(600 + i, PhantomConfig(size=384, framing=framing, faults="lid_artefact",
                                                 fault_strength=cover))
        rgb = as_camera_writes_it(case)
        fov = detect_fov(rgb)
        if fov.found:
            cx, cy, r = case.fov
            assert math.hypot(fov.cx - cx - 0.5, fov.cy - cy - 0.5) <= 0.07 * r and abs(fov.radius - r) <= 0.1 * r
        report = assess_quality(rgb, fov)
        assert not report.gradable, (cover, framing, report)
        named += "lid_or_lash_artefact" in report.reasons
    assert named >= (4 if cover <= 0.3 else 3), (cover, named)


def test_mild_faults_of_the_same_kind_stay_gradable():
    """Below the fault ranges a grader still accepts the photograph, and so does the gate."""
    mild = {"defocus": 1.0, "under_exposed": 0.5, "over_exposed": 1.6, "heavy_haze": 0.2, "strong_noise": 0.03,
            "lid_artefact": 0.04}
    for fault, strength in mild.items():
        for seed in range(3):
            case = render_case(400 + seed, PhantomConfig(size=384, framing="standard", faults=fault,
                                                         fault_strength=strength))
            report = assess_quality(as_camera_writes_it(case))
            assert report.gradable, (fault, strength, seed, report)


def test_lid_artefact_shadows_the_share_of_the_field_it_is_drawn_to_hide():
    """The eyelid (fault lid_artefact) darkens a band that enters the field from its top (upper lid) or bottom
    (lower lid) and hides the drawn share of the visible field (counted where the light is below the middle of
    the penumbra); behind it the light falls to the lid's transmission, in some photographs a bright rim or lit
    lashes are brighter than the eye; everything else is the same eye through the same camera as without it."""
    sides, glints = set(), 0
    for seed in range(12):
        case = render_case(500 + seed, PhantomConfig(size=256, framing="standard", faults="lid_artefact"))
        twin = render_case(500 + seed, PhantomConfig(size=256, framing="standard", faults="none"))
        lid = case.surround["lid"]
        assert lid["cover"] == case.fault_strength and 0.12 <= lid["cover"] <= 0.2
        assert case.camera == {**twin.camera, "degraded": 1.0} and case.anatomy == twin.anatomy
        cx, cy, r = case.fov
        h, w = case.image.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        field = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) & (_luma(twin.image) > 10)
        ratio = (_luma(case.image) + 0.5) / (_luma(twin.image) + 0.5)
        # measured (x86-avx2): within 0.01 of the cover, the darkest 1 % within 0.02 of the transmission
        behind = field & (ratio < (1 + lid["transmission"]) / 2)
        assert abs(np.count_nonzero(behind) / np.count_nonzero(field) - lid["cover"]) < 0.02, (seed, lid["cover"])
        assert abs(np.percentile(ratio[field], 1) - lid["transmission"]) < 0.03, seed
        assert (yy[behind].mean() < cy) == (lid["side"] < 0), seed   # from the top or from the bottom
        assert np.median(ratio[field & ~behind]) == pytest.approx(1.0, abs=0.01)
        sides.add(lid["side"])
        if lid["rim"] > 0 or lid["bright_lashes"]:
            assert np.count_nonzero(field & (ratio > 1.25)) > 20, seed
            glints += 1
    assert sides == {-1, 1} and glints > 0
    again = render_case(505, PhantomConfig(size=256, framing="standard", faults="lid_artefact"))
    assert np.array_equal(again.image, render_case(505, PhantomConfig(size=256, framing="standard",
                                                                     faults="lid_artefact")).image)
