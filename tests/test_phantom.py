"""The phantom fundus generator: deterministic, labelled from what it draws, and fit as a test instrument."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES
from edgeretina.phantom import (
    LABEL_COLUMNS,
    PhantomConfig,
    case_id,
    case_seed,
    generate_dataset,
    render_case,
)
from edgeretina.phantom.anatomy import Anatomy
from edgeretina.phantom.grading import grade_placed
from edgeretina.phantom.lesions import PlacedLesion

SMALL = PhantomConfig(size=128)


@pytest.fixture(scope="module")
def small_cases():
    return [render_case(seed, SMALL) for seed in range(40)]


def _first_case(grade: int, config: PhantomConfig, seeds=range(200)):
    for seed in seeds:
        case = render_case(seed, config)
        if case.grade == grade:
            return seed, case
    raise AssertionError(f"no grade {grade} case in seeds {seeds}")


# -- determinism -----------------------------------------------------------------------------------

def test_same_seed_gives_identical_case():
    a, b = render_case(11, SMALL), render_case(11, SMALL)
    assert np.array_equal(a.image, b.image)
    assert all(np.array_equal(a.masks[c], b.masks[c]) for c in LESION_CODES)
    assert (a.grade, a.dme, a.counts, a.fov, a.camera) == (b.grade, b.dme, b.counts, b.fov, b.camera)


def test_different_seeds_give_different_images():
    assert not np.array_equal(render_case(1, SMALL).image, render_case(2, SMALL).image)


def test_case_seed_depends_on_dataset_seed_and_index_only():
    assert case_seed(7, 3) == case_seed(7, 3)
    assert len({case_seed(7, i) for i in range(100)} | {case_seed(8, 0)}) == 101
    assert case_id(7, 12) == "phantom_s7_00012"


# -- the label comes from the lesions placed --------------------------------------------------------

def test_grade_follows_icdr_rules_from_counts(small_cases):
    for case in small_cases:
        n = case.counts
        if n["NV"] or n["PRH"]:
            assert case.grade == 4
        elif case.grade == 3:
            assert n["HE"] >= 4 * 21  # more than 20 in each of 4 quadrants
        elif n["HE"] or n["EX"] or n["CWS"]:
            assert case.grade == 2
        elif n["MA"]:
            assert case.grade == 1
        else:
            assert case.grade == 0
    assert {case.grade for case in small_cases} == {0, 1, 2, 3, 4}


def _anatomy() -> Anatomy:
    return Anatomy(eye=0, dd=20.0, disc_x=150.0, disc_y=100.0, fovea_x=100.0, fovea_y=105.0, cup_ratio=0.3,
                   pigmentation=0.5, fundus_rgb=(0.8, 0.35, 0.15))


def _haemorrhages_in_quadrants(counts: list[int]) -> list[PlacedLesion]:
    """counts[q] haemorrhages in quadrant q = (below fovea) * 2 + (right of fovea)."""
    offsets = [(-30, -30), (30, -30), (-30, 30), (30, 30)]
    return [PlacedLesion("HE", 100 + dx, 105 + dy) for (dx, dy), k in zip(offsets, counts) for _ in range(k)]


def test_severe_needs_more_than_20_haemorrhages_in_every_quadrant():
    anatomy = _anatomy()
    assert grade_placed(_haemorrhages_in_quadrants([21, 21, 21, 21]), anatomy)[0] == 3
    assert grade_placed(_haemorrhages_in_quadrants([20, 40, 40, 40]), anatomy)[0] == 2
    assert grade_placed(_haemorrhages_in_quadrants([60, 60, 60, 0]), anatomy)[0] == 2


def test_grade_rules_and_dme_on_placed_lesions():
    anatomy = _anatomy()
    assert grade_placed([], anatomy)[:2] == (0, False)
    assert grade_placed([PlacedLesion("MA", 60, 60)] * 3, anatomy)[0] == 1
    assert grade_placed([PlacedLesion("MA", 60, 60), PlacedLesion("CWS", 70, 70)], anatomy)[0] == 2
    assert grade_placed([PlacedLesion("NV", 150, 100)], anatomy)[0] == 4
    assert grade_placed([PlacedLesion("PRH", 60, 160)], anatomy)[0] == 4
    # DME: a hard exudate within 1 DD (20 px) of the fovea, not further.
    assert grade_placed([PlacedLesion("EX", 100 + 19, 105)], anatomy)[1] is True
    assert grade_placed([PlacedLesion("EX", 100 + 25, 105)], anatomy)[1] is False


def test_lesion_free_twin_is_grade_0_with_empty_masks():
    seed, case = _first_case(4, SMALL)
    twin = render_case(seed, SMALL, lesions=False)
    assert twin.grade == 0 and not twin.dme and sum(twin.counts.values()) == 0
    assert not any(m.any() for m in twin.masks.values())
    assert twin.image.shape == case.image.shape and twin.fov == case.fov and twin.camera == case.camera


def test_grade_0_case_equals_its_lesion_free_twin():
    seed, case = _first_case(0, SMALL)
    assert np.array_equal(case.image, render_case(seed, SMALL, lesions=False).image)


# -- masks -----------------------------------------------------------------------------------------

def test_masks_present_binary_and_match_counts(small_cases):
    for case in small_cases:
        assert set(case.masks) == set(LESION_CODES) == set(case.counts)
        for code, mask in case.masks.items():
            assert mask.dtype == np.uint8 and mask.shape == case.image.shape[:2]
            assert set(np.unique(mask)) <= {0, 255}
            assert mask.any() == (case.counts[code] > 0), (code, case.counts)


def test_lesions_lie_inside_the_field_of_view(small_cases):
    for case in small_cases:
        cx, cy, r = case.fov
        ys, xs = np.nonzero(np.max(np.stack(list(case.masks.values())), axis=0))
        assert np.all((xs - cx) ** 2 + (ys - cy) ** 2 <= (r + 1) ** 2)


def test_masks_cover_the_pixels_the_lesions_change():
    config = PhantomConfig(size=256, camera_variation=0.0)
    for grade in (1, 2, 3, 4):
        seed, case = _first_case(grade, config)
        twin = render_case(seed, config, lesions=False)
        changed = np.abs(case.image.astype(np.int16) - twin.image).max(axis=2) > 12
        union = np.max(np.stack(list(case.masks.values())), axis=0)
        k = int(0.15 * case.anatomy["dd_px"]) | 1  # soft edges, blur and haze reach a little beyond
        near_mask = cv2.dilate(union, np.ones((k, k), np.uint8)) > 0
        assert changed.any()
        assert (changed & near_mask).sum() >= 0.9 * changed.sum(), grade


def test_dme_flag_has_an_exudate_near_the_fovea(small_cases):
    flagged = [case for case in small_cases if case.dme]
    assert flagged
    for case in flagged:
        ys, xs = np.nonzero(case.masks["EX"])
        distance = np.hypot(xs - case.anatomy["fovea_x"], ys - case.anatomy["fovea_y"])
        assert distance.min() <= case.anatomy["dd_px"] + 2


# -- what a grader sees ----------------------------------------------------------------------------

def _lesion_signal_at_224(seed: int, config: PhantomConfig) -> tuple[float, int]:
    """Mean absolute green difference from the lesion-free twin after downscaling to 224 px high,
    and how many pixels differ by more than 10 grey levels."""
    def at_224(image):
        h, w = image.shape[:2]
        return cv2.resize(image, (round(w * 224 / h), 224), interpolation=cv2.INTER_AREA).astype(np.int16)
    with_lesions = at_224(render_case(seed, config).image)
    without = at_224(render_case(seed, config, lesions=False).image)
    difference = np.abs(with_lesions - without)[:, :, 1]
    return float(difference.mean()), int((difference > 10).sum())


def test_microaneurysms_nearly_vanish_at_224_px_but_pdr_does_not():
    config = PhantomConfig(size=512, camera_variation=0.0)
    mild, _ = _first_case(1, config, seeds=range(100, 200))
    pdr, _ = _first_case(4, config, seeds=range(100, 200))
    mild_mean, mild_pixels = _lesion_signal_at_224(mild, config)
    pdr_mean, pdr_pixels = _lesion_signal_at_224(pdr, config)
    assert mild_mean < 0.05 * pdr_mean
    assert mild_pixels < 60 < 500 < pdr_pixels


# -- camera ----------------------------------------------------------------------------------------

def test_camera_variation_cuts_some_fields_of_view_and_widens_some_images():
    """The standard framing (the other presets have their own tests, tests/test_framings.py)."""
    cases = [render_case(seed, PhantomConfig(size=64, framing="standard")) for seed in range(60)]
    cut = [c for c in cases if c.camera["cut_off"]]
    assert 5 <= len(cut) <= 35
    for c in cut:
        cx, cy, r = c.fov
        assert cy - r < 0 and cy + r > c.image.shape[0]
    assert any(c.image.shape[1] > c.image.shape[0] for c in cases)
    assert all(c.image.shape[0] == 64 and c.image.shape[1] <= round(64 * 4 / 3) for c in cases)
    assert any(c.camera["degraded"] for c in [render_case(seed, PhantomConfig(size=64)) for seed in range(60, 160)])


def test_ideal_camera_is_centred_square_and_clean():
    for seed in range(5):
        case = render_case(seed, PhantomConfig(size=96, camera_variation=0.0))
        assert case.image.shape == (96, 96, 3)
        assert case.fov == pytest.approx((48.0, 48.0, 0.46 * 96))
        assert case.camera["blur_sigma"] == 0 and case.camera["noise_sigma"] == 0 and not case.camera["cut_off"]


def test_image_is_a_plausible_rgb_fundus(small_cases):
    for case in small_cases:
        cx, cy, r = case.fov
        h, w = case.image.shape[:2]
        ys, xs = np.ogrid[:h, :w]
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 < (0.8 * r) ** 2
        outside = (xs - cx) ** 2 + (ys - cy) ** 2 > (r + 2) ** 2
        red, green, blue = (case.image[:, :, i][inside].mean() for i in range(3))
        if not case.camera["degraded"]:
            assert red > green > blue  # orange-red fundus, RGB order
        if outside.any() and case.framing == "standard":
            assert case.image[outside].mean() < 8  # black around the field of view
        elif outside.any():  # the frame of the preset: black or grey, text and bars beside the field
            level = 0.299 * case.surround["level"][0] + 0.587 * case.surround["level"][1] + 0.114 * case.surround["level"][2]
            luma = case.image[outside].astype(float) @ [0.299, 0.587, 0.114]
            assert np.median(luma) == pytest.approx(level, abs=3), case.framing


def test_grade_distribution_follows_weights():
    weights = (0.3, 0.15, 0.25, 0.15, 0.15)
    config = PhantomConfig(size=64, grade_weights=weights)
    grades = np.array([render_case(seed, config).grade for seed in range(200)])
    observed = np.bincount(grades, minlength=5) / len(grades)
    assert np.all(np.abs(observed - np.array(weights)) < 0.08), observed
    only_pdr = PhantomConfig(size=64, grade_weights=(0, 0, 0, 0, 1))
    assert {render_case(seed, only_pdr).grade for seed in range(10)} == {4}


# -- datasets --------------------------------------------------------------------------------------

def _read_rows(labels: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(labels, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def test_dataset_layout_labels_and_pixels(tmp_path):
    config = PhantomConfig(size=96, jpeg=False)
    calls = []
    labels = generate_dataset(tmp_path / "ds", n=6, seed=7, config=config, workers=1,
                              progress=lambda done, total: calls.append((done, total)))
    assert labels == tmp_path / "ds" / "labels.csv"
    columns, rows = _read_rows(labels)
    assert tuple(columns) == LABEL_COLUMNS
    assert calls[-1] == (6, 6) and len(calls) == 6
    for index, row in enumerate(rows):
        assert row["case_id"] == f"phantom_s7_{index:05d}" and row["source"] == "phantom"
        assert row["path"] == f"images/{row['case_id']}.png"
        case = render_case(int(row["seed"]), config)
        assert int(row["seed"]) == case_seed(7, index)
        assert (int(row["grade"]), int(row["dme"])) == (case.grade, int(case.dme))
        assert {c: int(row[f"n_{c}"]) for c in LESION_CODES} == case.counts
        written = cv2.cvtColor(cv2.imread(str(labels.parent / row["path"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(written, case.image)  # lossless PNG, RGB written as RGB
        for code in LESION_CODES:
            mask = cv2.imread(str(labels.parent / "masks" / code / f"{row['case_id']}.png"), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(mask, case.masks[code])
    assert not list(labels.parent.rglob("*.tmp"))


def test_jpeg_dataset_keeps_colours(tmp_path):
    labels = generate_dataset(tmp_path, n=2, seed=1, config=PhantomConfig(size=96), workers=1)
    _, rows = _read_rows(labels)
    for row in rows:
        assert row["path"].endswith(".jpg")
        written = cv2.cvtColor(cv2.imread(str(tmp_path / row["path"])), cv2.COLOR_BGR2RGB).astype(int)
        original = render_case(int(row["seed"]), PhantomConfig(size=96)).image.astype(int)
        assert np.abs(written - original).mean() < 6


def test_serial_and_parallel_generation_are_identical(tmp_path):
    config = PhantomConfig(size=80)
    serial = generate_dataset(tmp_path / "serial", n=8, seed=3, config=config, workers=1)
    parallel = generate_dataset(tmp_path / "parallel", n=8, seed=3, config=config, workers=2)
    assert serial.read_text() == parallel.read_text()
    for path in sorted((tmp_path / "serial").rglob("*.*")):
        twin = tmp_path / "parallel" / path.relative_to(tmp_path / "serial")
        assert path.read_bytes() == twin.read_bytes(), path


def test_failed_generation_leaves_no_labels(tmp_path, monkeypatch):
    import edgeretina.phantom.dataset as dataset

    def failing_render(seed, config):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(dataset, "render_case", failing_render)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path, n=3, config=PhantomConfig(size=64), workers=1)
    assert not (tmp_path / "labels.csv").exists()


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"size": 32},
    {"size": 100.5},
    {"grade_weights": (1, 1, 1, 1)},
    {"grade_weights": (1, 1, 1, 1, -1)},
    {"grade_weights": (0, 0, 0, 0, 0)},
    {"grade_weights": (1, 1, 1, 1, float("nan"))},
    {"camera_variation": 1.5},
    {"camera_variation": -0.1},
])
def test_bad_config_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        PhantomConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": -3}, {"n": 2, "seed": -1}, {"n": 2, "workers": 0}])
def test_bad_dataset_arguments_raise_config_error(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        generate_dataset(tmp_path, config=PhantomConfig(size=64), **kwargs)
    assert not (tmp_path / "labels.csv").exists()


def test_bad_seed_raises_config_error():
    with pytest.raises(ConfigError):
        render_case(-1, SMALL)


def test_phantom_does_not_import_torch():
    code = "import sys, edgeretina.phantom; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
