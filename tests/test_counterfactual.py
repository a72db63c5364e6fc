"""The disease-to-healthy counterfactual (runtime/counterfactual.py), its strip and `edgeretina explain`.

Two models drive the loop: the tiny exported bundle (real plumbing: backend, geometry, the graph's own
saliency) and a hand-made "green spot" model on the same bundle's runner, whose grade is the number of grid
cells holding a painted green spot and whose saliency is each cell's share of spot pixels — a situation
where the right counterfactual is known: remove the spots, largest first, and the grade falls one by one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeretina.dataset import read_labels
from edgeretina.errors import ConfigError, ImageDecodeError, UngradableImageError
from edgeretina.preprocess import decode_image, detect_fov, prepare
from edgeretina.runtime import Grader
from edgeretina.grades import LESION_CODES
from edgeretina.runtime.counterfactual import (STOP_HEALTHY, STOP_MAX_STEPS, STOP_NOTHING_SALIENT, CounterfactualConfig,
                                               cells_to_pixels, counterfactual, field_mask,
                                               inpaint, removed_region_map, select_cells)
from edgeretina.runtime.lesions import lesion_margins
from edgeretina.runtime.counterfactual_strip import OUTLINE, TILE, strip_size, write_strip_png
from edgeretina.runtime.postprocess import grade_results


@pytest.fixture(scope="module")
def grader(onnx_bundle):
    return Grader(onnx_bundle, threads=1)


@pytest.fixture(scope="module")
def diseased(grader, phantom_test):
    """The phantom test photo the tiny model grades most severe (a counterfactual needs grade > 0)."""
    paths = [item.path for item in read_labels(phantom_test)]
    records = [r for r in grader.grade(paths) if r.gradable]
    worst = max(records, key=lambda r: (r.grade, r.referable_probability))
    assert worst.grade > 0, "the tiny model grades every phantom test photo 0"
    return worst.file


# --- the tiny bundle ----------------------------------------------------------------------------------

def test_real_model_sequence_stays_in_the_field_and_maps_back(grader, diseased):
    config = CounterfactualConfig(max_steps=3)
    cf = counterfactual(grader, diseased, config)
    n = len(cf.steps) - 1
    assert [s.index for s in cf.steps] == list(range(n + 1)) and n <= config.max_steps
    assert cf.stopped in (STOP_HEALTHY, STOP_MAX_STEPS, STOP_NOTHING_SALIENT)
    assert (cf.final.grade == 0) == (cf.stopped == STOP_HEALTHY)
    if cf.stopped == STOP_MAX_STEPS:
        assert n == config.max_steps
    assert all(s.grade > 0 for s in cf.steps[:-1])             # it stops at the first grade 0
    # step 0 is what `grade` says about the photo
    record = grader.grade([diseased])[0]
    assert cf.steps[0].grade == record.grade and cf.steps[0].probabilities == record.probabilities
    again = grade_results(grader.infer_prepared(cf.steps[0].image)["ordinal_logits"], grader.grading)[0]
    assert again.probabilities == pytest.approx(record.probabilities, abs=1e-6)   # infer_prepared = grade's pass
    assert not cf.steps[0].image[~cf.fov_mask].any()       # `prepare` blacked out all that lies outside the field
    touched = np.zeros(cf.fov_mask.shape, bool)
    for step in cf.steps[1:]:
        assert step.removed.any() and not (step.removed & ~cf.fov_mask).any()   # inside the field
        assert not (step.removed & touched).any()                              # never the same pixels twice
        touched |= step.removed
        again = grade_results(grader.infer_prepared(step.image)["ordinal_logits"], grader.grading)[0]
        assert again.grade == step.grade                                       # the grade is of that image
    # only removed pixels ever change
    assert np.array_equal(cf.final.image[~touched], cf.steps[0].image[~touched])
    photo = decode_image(diseased)
    assert cf.union.shape == photo.shape[:2] and cf.union.any() == (n > 0)
    fov = cf.geometry.fov
    ys, xs = np.nonzero(cf.union)
    assert np.all((xs + 0.5 - fov.cx) ** 2 + (ys + 0.5 - fov.cy) ** 2 <= fov.radius ** 2 * 1.0001)
    heat = removed_region_map(cf)
    assert heat.shape == photo.shape[:2] and np.array_equal(heat > 0, cf.union)
    assert cf.to_dict()["grades"] == cf.grades and json.dumps(cf.to_dict())


def test_first_removal_holds_the_real_models_saliency_peak(grader, diseased):
    cf = counterfactual(grader, diseased, CounterfactualConfig(max_steps=1))
    assert len(cf.steps) == 2, cf.stopped
    first = cf.steps[0]
    field_cells = cv2.resize(cf.fov_mask.astype(np.float32), first.saliency.shape[::-1], interpolation=cv2.INTER_AREA) >= 0.5
    peak = np.unravel_index(np.argmax(np.where(field_cells, first.saliency, -1.0)), first.saliency.shape)
    size = cf.fov_mask.shape[0]
    cell_h, cell_w = size // first.saliency.shape[0], size // first.saliency.shape[1]
    centre = (peak[0] * cell_h + cell_h // 2, peak[1] * cell_w + cell_w // 2)
    assert cf.steps[1].removed[centre] and tuple(peak) in cf.steps[1].cells


def test_max_steps_one_removes_at_most_once(grader, diseased):
    cf = counterfactual(grader, diseased, CounterfactualConfig(max_steps=1))
    assert len(cf.steps) <= 2
    assert cf.stopped == (STOP_HEALTHY if cf.final.grade == 0 else STOP_MAX_STEPS)


# --- a hand-made model where the answer is known ------------------------------------------------------

class GreenSpotModel:
    """Wraps the bundle's runner: grade = number of grid cells holding green-spot pixels (at most 4),
    saliency = each cell's share of them; embedding and the rest from the real graph."""

    def __init__(self, runner, preprocess, grading):
        self.runner, self.preprocess, self.grading = runner, preprocess, grading

    def run(self, inputs: np.ndarray) -> dict:
        out = dict(self.runner.run(inputs))
        mean = np.asarray(self.preprocess.mean, np.float32)[None, :, None, None]
        std = np.asarray(self.preprocess.std, np.float32)[None, :, None, None]
        r, g, b = np.moveaxis(inputs * std + mean, 1, 0)
        green = ((g - r > 0.3) & (g - b > 0.3)).astype(np.float32)              # [B, S, S]
        h, w = out["saliency"].shape[1:]
        share = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA) for m in green])
        grades = np.minimum((share > 0.01).reshape(len(share), -1).sum(axis=1), 4)
        steps = np.where(grades[:, None] > np.arange(4)[None, :], 20.0, -20.0)
        out["ordinal_logits"] = (np.asarray(self.grading.thresholds)[None, :] + steps).astype(np.float32)
        out["saliency"] = share.astype(np.float32)
        return out


@pytest.fixture
def spot_grader(grader, monkeypatch):
    monkeypatch.setattr(grader, "runner", GreenSpotModel(grader.runner, grader.preprocess, grader.grading))
    return grader


def paint_spots(grader, photo_path, target, spots):
    """Paint green discs on a photo, placed in model-input coordinates: spots = [((row, column), radius in
    photo pixels)]. Returns (path of the PNG written, [disc mask on the photo], the grid)."""
    photo = decode_image(photo_path)
    prepared, geometry = prepare(photo, grader.preprocess, detect_fov(photo))
    size = prepared.shape[0]
    x0, y0, x1, _ = geometry.crop_box
    scale = (x1 - x0) / size
    masks = []
    for (row, column), radius in spots:
        mask = np.zeros(photo.shape[:2], np.uint8)
        cv2.circle(mask, (round(x0 + column * scale), round(y0 + row * scale)), radius, 1, -1)
        photo[mask > 0] = (0, 255, 0)
        masks.append(mask > 0)
    cv2.imwrite(str(target), photo[..., ::-1])
    grid = grader.runner.run(np.zeros((1, 3, size, size), np.float32))["saliency"].shape[1:]
    return str(target), masks, (size // grid[0], size // grid[1])


@pytest.fixture(scope="module")
def spotted(grader, phantom_test, tmp_path_factory):
    """A phantom photo with three green spots of different sizes, each in the middle of its own inner grid
    cell: (path, {cell: spot mask on the photo}), largest spot first."""
    cells, cell = [(1, 2), (2, 1), (1, 1)], 16
    centres = [((i + 0.5) * cell, (j + 0.5) * cell) for i, j in cells]
    path, masks, (cell_h, cell_w) = paint_spots(grader, read_labels(phantom_test)[0].path,
                                                tmp_path_factory.mktemp("spotted") / "spotted.png",
                                                list(zip(centres, (9, 6, 4))))
    assert (cell_h, cell_w) == (cell, cell)           # the tiny model: 64 px input, 16 px patches
    return path, dict(zip(cells, masks))


def test_loop_removes_the_spots_largest_first_until_healthy(spot_grader, spotted):
    path, spots = spotted
    cf = counterfactual(spot_grader, path, CounterfactualConfig(max_steps=8, region_fraction=0.01))
    assert cf.grades == [3, 2, 1, 0] and cf.stopped == STOP_HEALTHY
    assert [step.cells for step in cf.steps[1:]] == [[cell] for cell in spots]   # the saliency peak goes first
    union_spots = np.logical_or.reduce(list(spots.values()))
    assert cf.union[union_spots].all()                # the localisation covers every painted pixel
    x0, _, x1, _ = cf.geometry.crop_box
    cell_side = (x1 - x0) / cf.steps[0].saliency.shape[1]    # in photo pixels
    assert cf.union.sum() == pytest.approx(3 * cell_side ** 2, rel=0.05)   # the three cells, not more
    heat = removed_region_map(cf)
    assert [float(heat[m].min()) for m in spots.values()] == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_a_cell_cut_by_the_field_edge_is_inpainted_inside_the_field_only(spot_grader, phantom_test, tmp_path):
    path, masks, _ = paint_spots(spot_grader, read_labels(phantom_test)[0].path, tmp_path / "rim.png", [((10, 26), 3)])
    cf = counterfactual(spot_grader, path, CounterfactualConfig(region_fraction=0.01))
    assert cf.grades == [1, 0] and cf.steps[1].cells == [(0, 1)]       # a top-row cell the field edge cuts
    removed = cf.steps[1].removed
    assert 0 < removed.sum() < 16 * 16 and not (removed & ~cf.fov_mask).any()
    assert not cf.final.image[~cf.fov_mask].any()                       # the surround stays black
    assert cf.union[masks[0]].all()


def test_step_limit_stops_the_loop_early(spot_grader, spotted):
    cf = counterfactual(spot_grader, spotted[0], CounterfactualConfig(max_steps=2, region_fraction=0.01))
    assert cf.grades == [3, 2, 1] and cf.stopped == STOP_MAX_STEPS


def test_region_fraction_takes_several_cells_per_step(spot_grader, spotted):
    cf = counterfactual(spot_grader, spotted[0], CounterfactualConfig(region_fraction=0.2))   # 3 of 12 field cells
    assert cf.grades == [3, 0] and sorted(cf.steps[1].cells) == sorted(spotted[1])


def test_a_flat_map_has_nothing_salient_to_remove(spot_grader, spotted, monkeypatch):
    model = spot_grader.runner

    def flat(inputs):
        out = GreenSpotModel.run(model, inputs)
        out["saliency"] = np.full_like(out["saliency"], 0.7)
        return out

    monkeypatch.setattr(model, "run", flat)
    cf = counterfactual(spot_grader, spotted[0])
    assert cf.grades == [3] and cf.stopped == STOP_NOTHING_SALIENT and not cf.union.any()
    assert not removed_region_map(cf).any()


# --- driven by the lesion map -------------------------------------------------------------------------

HE = LESION_CODES.index("HE")


@pytest.fixture
def lesion_spot_grader(spot_grader, monkeypatch):
    """The green-spot model with a lesion head: haemorrhage logits on a grid twice as fine as the saliency's,
    +8 on cells holding spot pixels and -8 elsewhere (every other type -8)."""
    model = spot_grader.runner

    def with_lesions(inputs):
        out = GreenSpotModel.run(model, inputs)
        h, w = out["saliency"].shape[1:]
        mean = np.asarray(model.preprocess.mean, np.float32)[None, :, None, None]
        std = np.asarray(model.preprocess.std, np.float32)[None, :, None, None]
        r, g, b = np.moveaxis(inputs * std + mean, 1, 0)
        green = ((g - r > 0.3) & (g - b > 0.3)).astype(np.float32)
        share = np.stack([cv2.resize(m, (2 * w, 2 * h), interpolation=cv2.INTER_AREA) for m in green])
        logits = np.full((len(inputs), len(LESION_CODES), 2 * h, 2 * w), -8.0, np.float32)
        logits[:, HE] = np.where(share > 0.01, 8.0, -8.0)
        out["lesion_logits"] = logits
        return out

    monkeypatch.setattr(model, "run", with_lesions)
    names = list(spot_grader.bundle.manifest.outputs["names"])
    monkeypatch.setitem(spot_grader.bundle.manifest.outputs, "names", [*names, "lesion_logits"])
    return spot_grader


def test_lesion_evidence_removes_the_lesion_cells_of_the_finer_grid(lesion_spot_grader, phantom_test, tmp_path):
    # three small spots, each inside one cell of the lesion grid (8 px) and in its own saliency cell (16 px)
    fine_cells = [(2, 5), (5, 2), (2, 2)]
    path, masks, _ = paint_spots(lesion_spot_grader, read_labels(phantom_test)[0].path, tmp_path / "fine.png",
                                 [(((i + 0.5) * 8, (j + 0.5) * 8), 4) for i, j in fine_cells])
    by_saliency = counterfactual(lesion_spot_grader, path, CounterfactualConfig(region_fraction=0.2,
                                                                                evidence="saliency"))
    cf = counterfactual(lesion_spot_grader, path, CounterfactualConfig(region_fraction=0.2))   # auto: the lesion map
    assert cf.evidence == "lesion" and by_saliency.evidence == "saliency"
    assert cf.grades == [3, 0] and cf.stopped == STOP_HEALTHY
    assert sorted(cf.steps[1].cells) == sorted(fine_cells)
    assert cf.steps[0].saliency.shape == tuple(2 * n for n in by_saliency.steps[0].saliency.shape)
    assert cf.union[np.logical_or.reduce(masks)].all()
    x0, _, x1, _ = cf.geometry.crop_box
    fine_side = (x1 - x0) / cf.steps[0].saliency.shape[1]          # in photo pixels
    assert cf.union.sum() == pytest.approx(3 * fine_side ** 2, rel=0.05)       # the three fine cells, not more
    assert cf.union.sum() == pytest.approx(by_saliency.union.sum() / 4, rel=0.05)   # a quarter of the coarse cells
    assert cf.to_dict()["evidence"] == "lesion" and cf.to_dict()["steps"][0]["grid"] == list(cf.steps[0].saliency.shape)


def test_a_lesion_that_grows_back_into_its_cell_is_removed_again(lesion_spot_grader, spotted):
    # the spots straddle the lesion grid's cell borders: a partial removal is refilled green from the spot
    # around it, and the cell must be allowed to go again (else the loop stopped at grade 1, spot half there)
    path, spots = spotted
    cf = counterfactual(lesion_spot_grader, path, CounterfactualConfig(region_fraction=0.2))
    assert cf.stopped == STOP_HEALTHY and cf.final.grade == 0
    assert cf.union[np.logical_or.reduce(list(spots.values()))].all()
    removed_twice = [cell for cell in cf.steps[-1].cells if any(cell in s.cells for s in cf.steps[1:-1])]
    assert len(cf.steps) > 2 and removed_twice
    # a pixel removed twice counts once, and keeps the step that first removed it
    union_input = cf.removal_order() > 0
    assert cf.to_dict()["removed_field_fraction"] == pytest.approx(union_input.sum() / cf.fov_mask.sum(), abs=1e-6)
    first = cf.steps[1].removed
    assert (cf.removal_order()[first] == 1).all()


def test_grow_widens_each_removal_by_a_disc_of_cells_inside_the_field(lesion_spot_grader, phantom_test, tmp_path):
    fine_cells = [(2, 5), (5, 2), (2, 2)]
    path, masks, _ = paint_spots(lesion_spot_grader, read_labels(phantom_test)[0].path, tmp_path / "fine.png",
                                 [(((i + 0.5) * 8, (j + 0.5) * 8), 4) for i, j in fine_cells])
    tight = counterfactual(lesion_spot_grader, path, CounterfactualConfig(region_fraction=0.2))
    wide = counterfactual(lesion_spot_grader, path, CounterfactualConfig(region_fraction=0.2, grow_cells=1))
    assert wide.steps[1].cells == tight.steps[1].cells               # the same cells are chosen ...
    first_tight, first_wide = tight.steps[1].removed, wide.steps[1].removed
    assert (first_wide >= first_tight).all() and first_wide.sum() > 3 * first_tight.sum()   # ... and widened
    assert not (first_wide & ~wide.fov_mask).any()
    # by one cell (8 px here): a pixel 8 px beside a removed cell goes, one 10 px beside it stays
    rows, cols = np.nonzero(first_tight)
    r, c = int(rows.min()), int(cols.min())
    assert first_wide[r - 8, c + 3] and not first_wide[r - 10, c + 3]
    # a disc, not a square: 7 px up and 7 px left of the cell's corner (9.9 px away) stays
    assert first_wide[r - 5, c - 5] and not first_wide[r - 7, c - 7]


def test_a_cell_the_map_keeps_lit_is_removed_twice_at_most(lesion_spot_grader, spotted, monkeypatch):
    model = lesion_spot_grader.runner
    lit = model.run

    def stuck(inputs):                       # the grade stays 3 and one cell says "lesion" whatever is there
        out = lit(inputs)
        grade_3 = np.asarray(lesion_spot_grader.grading.thresholds) + np.array([20.0, 20.0, 20.0, -20.0])
        out["ordinal_logits"] = np.tile(grade_3, (len(inputs), 1)).astype(np.float32)
        out["lesion_logits"][:] = -8.0
        out["lesion_logits"][:, HE, 3, 3] = 8.0
        return out

    monkeypatch.setattr(model, "run", stuck)
    cf = counterfactual(lesion_spot_grader, spotted[0], CounterfactualConfig(max_steps=8))
    assert [s.cells for s in cf.steps[1:]] == [[(3, 3)], [(3, 3)]]
    assert cf.stopped == STOP_NOTHING_SALIENT and cf.final.grade == 3


def test_the_first_step_uses_the_lesion_logits_the_record_came_from(lesion_spot_grader, spotted, monkeypatch):
    from edgeretina.runtime.counterfactual import counterfactual_from, grade_one

    graded = grade_one(lesion_spot_grader, spotted[0])
    assert graded.lesion_logits is not None                                # grading keeps the head's grid
    assert any(entry["present"] for entry in graded.record.lesions)
    graded.lesion_logits = np.full_like(graded.lesion_logits, -8.0)        # what the record saw: no lesion
    runner, calls = lesion_spot_grader.runner, []
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda inputs: calls.append(len(inputs)) or run(inputs))
    cf = counterfactual_from(lesion_spot_grader, graded, CounterfactualConfig(evidence="lesion"))
    assert cf.stopped == STOP_NOTHING_SALIENT and len(cf.steps) == 1
    assert calls == []                                                     # no second forward pass decided


def test_the_overlay_draws_the_lesion_map_where_the_graph_has_one(lesion_spot_grader, spotted, tmp_path):
    # (with the counterfactual's fixtures: the overlay and the counterfactual read the same lesion margins)
    from edgeretina.runtime.counterfactual import grade_one
    from edgeretina.runtime.lesions import lesion_overlay_map
    from edgeretina.runtime.overlay import render_overlay
    from edgeretina.runtime.visuals import write_visuals

    graded = grade_one(lesion_spot_grader, spotted[0])
    np.testing.assert_allclose(graded.overlay_map, lesion_overlay_map(graded.lesion_logits, 0.5), atol=1e-6)
    assert graded.overlay_map.shape != graded.saliency.shape          # the lesion grid, not the saliency's
    assert graded.overlay_map.max() > 0.99 and np.median(graded.overlay_map) < 0.01
    write_visuals(graded, "spots", tmp_path, None)
    overlay = cv2.imread(graded.record.overlay)[..., ::-1]
    np.testing.assert_array_equal(overlay, render_overlay(graded.image, graded.overlay_map, graded.geometry))
    assert not np.array_equal(overlay, render_overlay(graded.image, graded.saliency, graded.geometry))
    changed = np.abs(overlay.astype(int) - graded.image.astype(int)).sum(axis=-1) > 30
    spot_pixels = np.logical_or.reduce(list(spotted[1].values()))
    assert changed[spot_pixels].mean() > 0.9                          # every spot coloured


def test_lesion_evidence_stops_when_no_type_reaches_its_threshold(lesion_spot_grader, spotted, monkeypatch):
    # the grade still says 3, but no cell is a lesion the record would list: nothing salient to remove
    monkeypatch.setattr(lesion_spot_grader, "grading", dataclasses.replace(lesion_spot_grader.grading,
                                                                           lesion_thresholds=[0.9999] * len(LESION_CODES)))
    cf = counterfactual(lesion_spot_grader, spotted[0], CounterfactualConfig(evidence="lesion"))
    assert cf.grades == [3] and cf.stopped == STOP_NOTHING_SALIENT and not cf.union.any()


def test_lesion_evidence_needs_a_graph_with_lesion_logits(grader, diseased):
    assert "lesion_logits" not in grader.bundle.manifest.outputs["names"]
    with pytest.raises(ConfigError, match="lesion_logits"):
        counterfactual(grader, diseased, CounterfactualConfig(evidence="lesion"))
    assert counterfactual(grader, diseased, CounterfactualConfig(max_steps=1)).evidence == "saliency"
    with pytest.raises(ConfigError, match="evidence"):
        CounterfactualConfig(evidence="gradcam")


def test_lesion_margins_are_the_largest_margin_over_each_types_threshold():
    logits = np.array([[[0.0, 2.0]], [[1.0, -3.0]]], np.float32)       # 2 types on a 1 x 2 grid
    margins = lesion_margins(logits, [0.5, 1 / (1 + np.exp(-2.0))])   # logit cuts 0 and 2
    np.testing.assert_allclose(margins, [[0.0, 2.0]], atol=1e-6)       # cell 0: max(0 - 0, 1 - 2); cell 1: 2 - 0
    with pytest.raises(ConfigError):
        lesion_margins(logits, [0.5])


# --- the pieces -------------------------------------------------------------------------------------

def test_select_cells_takes_the_top_field_cells_above_the_median():
    saliency = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.4], [0.5, 0.6, 0.7]], np.float32)
    field = np.ones((3, 3), bool)
    field[0, 0] = False                                  # the strongest cell is outside the field
    removed = np.zeros((3, 3), bool)
    removed[1, 1] = True                                 # the next one was removed already
    chosen = select_cells(saliency, field, removed, region_fraction=0.25)   # 2 of 8 field cells
    assert np.argwhere(chosen).tolist() == [[2, 1], [2, 2]]
    # only above the median (0.45): of the field cells not removed, 0.5 0.6 0.7 qualify, at most 8 asked
    assert select_cells(saliency, field, removed, 1.0).sum() == 3


def test_inpainting_at_the_rim_takes_no_colour_from_the_black_outside():
    size = 64
    image = np.zeros((size, size, 3), np.uint8)
    cv2.circle(image, (32, 32), 30, (200, 90, 40), -1)
    image[28:36, 28:36] = (0, 255, 0)                    # a lesion that must go
    fov = np.zeros((size, size), np.uint8)
    cv2.circle(fov, (32, 32), 30, 1, -1)
    fov = fov > 0
    removed = np.zeros_like(fov)
    removed[24:40, 24:40] = True
    removed[26:38, 0:12] = True                          # a region at the rim
    removed &= fov
    out = inpaint(image, removed, fov, CounterfactualConfig())
    assert np.array_equal(out[~removed], image[~removed])
    assert np.abs(out[removed].astype(int) - (200, 90, 40)).max() <= 4


def test_cells_to_pixels_covers_exactly_the_cell():
    cells = np.zeros((4, 4), bool)
    cells[1, 2] = True
    pixels = cells_to_pixels(cells, 64)
    assert pixels.sum() == 256 and pixels[16:32, 32:48].all()


def test_field_mask_is_the_part_of_the_input_prepare_keeps(grader):
    photo = np.zeros((150, 200, 3), np.uint8)
    cv2.circle(photo, (100, 75), 60, (190, 80, 40), -1)
    prepared, geometry = prepare(photo, grader.preprocess)
    assert geometry.fov.found
    assert np.array_equal(field_mask(geometry, prepared.shape[0]), prepared.any(axis=-1))


def test_field_mask_is_every_pixel_without_a_field(grader):
    photo = np.full((80, 120, 3), 120, np.uint8)
    _, geometry = prepare(photo, grader.preprocess)
    assert not geometry.fov.found and field_mask(geometry, 64).all()


@pytest.mark.parametrize("bad", [dict(max_steps=0), dict(max_steps=True), dict(max_steps=2.5),
                                 dict(region_fraction=0), dict(region_fraction=1.5), dict(region_fraction=float("nan")),
                                 dict(inpaint_radius=0), dict(inpaint_radius="3"), dict(method="blur"),
                                 dict(grow_cells=-1), dict(grow_cells=float("nan")), dict(grow_cells=True),
                                 dict(evidence="gradcam")])
def test_config_is_validated(bad):
    with pytest.raises(ConfigError):
        CounterfactualConfig(**bad)


def test_bad_and_ungradable_photos_raise(grader, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photograph\n")
    with pytest.raises(ImageDecodeError):
        counterfactual(grader, notes)
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((128, 128, 3), 128, np.uint8))
    with pytest.raises(UngradableImageError, match="ungradable"):
        counterfactual(grader, grey)


# --- the strip and the command ------------------------------------------------------------------------

def test_strip_has_one_panel_per_step_and_the_outlined_original(spot_grader, spotted, tmp_path):
    cf = counterfactual(spot_grader, spotted[0], CounterfactualConfig(region_fraction=0.01))
    target = write_strip_png(tmp_path / "strip.png", cf)
    strip = cv2.imread(str(target))[..., ::-1]
    assert strip.shape[:2] == strip_size(len(cf.steps)) == (strip_size(0)[0], 12 + (len(cf.steps) + 1) * (TILE + 12))
    last = strip[:, -(TILE + 12):]
    assert np.all(last == OUTLINE, axis=-1).sum() > 20          # the union's outline on the original
    assert not list(tmp_path.glob(".*tmp*"))                   # written atomically: no temporary left


def test_cli_explain_writes_overlay_card_strip_and_steps(cli, onnx_bundle, diseased, tmp_path):
    code, out, err = cli("explain", diseased, "--bundle", onnx_bundle, "--counterfactual", "--max-steps", 2,
                         "--out", tmp_path / "cf", "--json")
    assert code == 0, err
    result = json.loads(out)
    files = {name: Path(path) for name, path in result["files"].items()}
    assert set(files) == {"overlay", "card", "strip", "steps"} and all(p.is_file() for p in files.values())
    steps = json.loads(files["steps"].read_text())
    assert steps["grades"][0] == result["record"]["grade"] and 1 <= len(steps["grades"]) <= 3
    assert cv2.imread(str(files["strip"])).shape[:2] == strip_size(len(steps["grades"]))
    code, out, err = cli("explain", diseased, "--bundle", onnx_bundle, "--out", tmp_path / "plain")
    assert code == 0, err
    assert sorted(p.name.rsplit("_", 1)[-1] for p in (tmp_path / "plain").iterdir()) == ["card.png", "saliency.png"]
    assert "grade" in out


def test_cli_explain_fails_in_one_line_on_a_bad_or_ungradable_photo(cli, onnx_bundle, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photograph\n")
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((128, 128, 3), 128, np.uint8))
    for path, words in ((notes, "not an image"), (grey, "ungradable")):
        code, out, err = cli("explain", path, "--bundle", onnx_bundle, "--counterfactual", "--out", tmp_path / "o")
        assert code == 1 and err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
