"""Lesions in the runtime: regions and counts from the patch logits, mapped onto the photo, drawn on the card."""

import cv2
import numpy as np
import pytest

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import FieldOfView, Geometry, map_to_original
from edgeretina.runtime.card import (HEIGHT, LESION_COLOURS, MARGIN, TILE, WIDTH, lesion_summary, render_card,
                                     write_card_png)
from edgeretina.runtime.grader import GradedImage, GradeRecord, lesion_presence
from edgeretina.runtime.lesions import MAX_REGIONS, find_lesions

# A 400 x 300 photo; the model-input square overhangs it by 10 px top and bottom (padded), 16 x 16 patches
# of 20 photo pixels: patch (r, c) spans x 40 + 20c .. 60 + 20c, y -10 + 20r .. 10 + 20r.
GEOMETRY = Geometry(original_size=(300, 400), crop_box=(40.0, -10.0, 360.0, 310.0),
                    fov=FieldOfView(200.0, 150.0, 160.0, found=False, fraction_visible=0.0))
MA, HE, EX, CWS, NV, PRH = range(6)


def _grid() -> np.ndarray:
    logits = np.full((6, 16, 16), -6.0, np.float32)
    logits[HE, 2:4, 3:5] = 4.0                   # blob A: 2 x 2 patches, its peak at (2, 3)
    logits[HE, 2, 3] = 6.0
    logits[HE, 10, 12] = 2.0                     # blob B: one patch, weaker
    logits[MA, 5, 5] = logits[MA, 6, 6] = 3.0    # two patches touching only at a corner
    logits[EX, 8, 8] = -0.5                      # strongest EX patch: p = 0.38, under 0.5
    logits[CWS, 0, 0] = 3.0                      # in the top row, which overhangs the photo
    for k, (r, c) in enumerate((r, c) for r in range(7, 16, 2) for c in range(1, 10, 2)):
        logits[NV, r, c] = 1.0 + 0.1 * k         # 25 separate patches, distinct peaks, clear of the rest
    return logits


@pytest.fixture(scope="module")
def lesions():
    return {entry["code"]: entry for entry in find_lesions(_grid(), GEOMETRY)}


def test_two_separate_blobs_count_twice_and_land_on_the_right_photo_pixels(lesions):
    he = lesions["HE"]
    assert he["present"] and he["count"] == 2 and not he["truncated"]
    first, second = he["regions"]                                     # strongest peak first
    assert first == {"centre": [120.0, 50.0], "box": [100.0, 30.0, 140.0, 70.0],
                     "peak": pytest.approx(1 / (1 + np.exp(-6.0)), abs=1e-4), "patches": 4}
    assert second == {"centre": [290.0, 200.0], "box": [280.0, 190.0, 300.0, 210.0],
                      "peak": pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-4), "patches": 1}
    # the same place the overlay paints: map_to_original puts the patch's probability under the centre
    painted = map_to_original(1 / (1 + np.exp(-_grid()[HE])), GEOMETRY, interpolation="nearest")
    x, y = first["centre"]
    assert painted[int(y), int(x)] == pytest.approx(1 / (1 + np.exp(-4.0)), abs=1e-3)   # a cell of blob A
    x, y = second["centre"]
    assert painted[int(y), int(x)] == pytest.approx(second["peak"], abs=1e-3)


def test_a_blob_touching_diagonally_is_one_region(lesions):
    ma = lesions["MA"]
    assert ma["count"] == 1 and ma["regions"][0]["patches"] == 2
    assert ma["regions"][0]["box"] == [140.0, 90.0, 180.0, 130.0]


def test_below_the_threshold_is_absent_with_no_regions(lesions):
    ex = lesions["EX"]
    assert ex["probability"] == pytest.approx(1 / (1 + np.exp(0.5)), abs=1e-4)
    assert ex["present"] is False and ex["count"] == 0 and ex["regions"] == [] and ex["truncated"] is False
    assert lesions["PRH"]["count"] == 0 and lesions["PRH"]["present"] is False


def test_a_threshold_drops_the_weaker_region():
    he = find_lesions(_grid(), GEOMETRY, threshold=0.9)[HE]
    assert he["present"] and he["count"] == 1 and he["regions"][0]["centre"] == [120.0, 50.0]


def test_boxes_are_clipped_to_the_photo(lesions):
    assert lesions["CWS"]["regions"][0]["box"] == [40.0, 0.0, 60.0, 10.0]     # the patch spans y -10 .. 10


def test_many_regions_are_capped_and_flagged(lesions):
    nv = lesions["NV"]
    assert nv["count"] == 25 and len(nv["regions"]) == MAX_REGIONS and nv["truncated"] is True
    peaks = [r["peak"] for r in nv["regions"]]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] == pytest.approx(1 / (1 + np.exp(-3.4)), abs=1e-4)


def test_keeps_the_presence_keys_and_refuses_bad_input():
    entries = find_lesions(_grid(), GEOMETRY)
    assert [e["code"] for e in entries] == list(LESION_CODES)
    assert [{k: e[k] for k in ("code", "name", "probability")} for e in entries] == lesion_presence(_grid())
    for threshold in (0.0, 1.0):
        with pytest.raises(ConfigError, match="threshold"):
            find_lesions(_grid(), GEOMETRY, threshold=threshold)
    with pytest.raises(ConfigError, match=r"\[L, h, w\]"):
        find_lesions(_grid()[0], GEOMETRY)


# -- the card ---------------------------------------------------------------------------------------------

def _graded(lesions: list[dict] | None) -> GradedImage:
    record = GradeRecord(file="photo.png", gradable=True, grade=2, grade_name="moderate NPDR",
                         probabilities=[0.1, 0.2, 0.5, 0.1, 0.1], referable_probability=0.7, referable=True,
                         screening="referable", lesions=lesions)
    return GradedImage(record=record, image=np.full((300, 400, 3), 100, np.uint8), geometry=GEOMETRY)


def test_the_card_boxes_each_region_and_lists_the_counts():
    entries = find_lesions(_grid(), GEOMETRY)
    assert lesion_summary(entries) == "Lesions: MA 1, HE 2, CWS 1, NV 25"
    card = render_card(_graded(entries))
    plain = render_card(_graded(None))
    # the 400 x 300 photo fills the 320 px tile at 0.8 px per photo pixel, letterboxed 40 px from the top:
    # blob A's box x 100..140, y 30..70 -> x 80..111, y 24..55 on the photo's part of the tile
    top, left = MARGIN + 28 + 40, MARGIN
    he = np.all(card == LESION_COLOURS["HE"], axis=-1)
    assert he[top + 24, left + 80:left + 112].all() and he[top + 24:top + 56, left + 80].all()
    assert he[top + 55, left + 80:left + 112].all() and he[top + 24:top + 56, left + 111].all()
    assert not he[top + 26:top + 54, left + 82:left + 110].any()             # a box, not a filled patch
    legend = np.nonzero(he[MARGIN + 28 + TILE:MARGIN + 28 + TILE + 2 * MARGIN, :2 * MARGIN + TILE])
    assert legend[0].size == 64 and legend[1].min() > MARGIN + 20        # its chip (8 x 8 in the rim), after MA
    photo_area = (slice(MARGIN + 28, MARGIN + 28 + TILE), slice(MARGIN, MARGIN + TILE))
    assert not np.all(plain[photo_area] == LESION_COLOURS["HE"], axis=-1).any()
    panel = (slice(0, HEIGHT), slice(3 * MARGIN + 2 * TILE, WIDTH))
    assert not np.array_equal(card[panel], plain[panel])                   # the "Lesions:" line


def test_a_card_without_lesion_regions_renders_as_before():
    none_found = find_lesions(np.full((6, 16, 16), -6.0, np.float32), GEOMETRY)
    assert lesion_summary(none_found) is None
    assert np.array_equal(render_card(_graded(none_found)), render_card(_graded(None)))
    presence_only = lesion_presence(_grid())                                # records from before regions
    assert np.array_equal(render_card(_graded(presence_only)), render_card(_graded(None)))


# -- end to end: a real lesion-head bundle -----------------------------------------------------------------

@pytest.fixture(scope="module")
def he_bundle(phantom_test, tmp_path_factory):
    """A tiny lesion-head model that calls every patch inside the field a haemorrhage and nothing else
    (zero weights, biases +5 / -5): the graph's field-of-view offset alone decides where the region ends."""
    import torch

    from edgeretina.export import ExportConfig, export
    from edgeretina.grades import GradingConfig
    from edgeretina.preprocess import PreprocessConfig
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.checkpoint import Checkpoint, save_checkpoint
    from edgeretina.training.model import GraderModel, ModelConfig

    torch.manual_seed(0)
    model = GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64), lesion_head=True)).eval()
    with torch.no_grad():
        model.lesion_head.weight.zero_()
        model.lesion_head.bias.copy_(torch.tensor([5.0 if code == "HE" else -5.0 for code in LESION_CODES]))
    root = tmp_path_factory.mktemp("he_bundle")
    preprocess = PreprocessConfig(image_size=64, mean=tuple(model.backbone.mean), std=tuple(model.backbone.std))
    checkpoint = save_checkpoint(root / "he.pt", Checkpoint(model=model, preprocess=preprocess,
                                                            grading=GradingConfig(), bank=None))
    return export(ExportConfig(checkpoint=checkpoint, out=root / "bundle", reference_images=phantom_test,
                               reference_count=2), log=lambda _: None)


def test_graded_record_lists_the_region_and_the_card_draws_it(he_bundle, phantom_test, tmp_path):
    from edgeretina.dataset import read_labels
    from edgeretina.runtime import Grader

    grader = Grader(he_bundle, threads=1)
    graded = next(grader.grade_iter([read_labels(phantom_test)[0].path]))
    lesions = {entry["code"]: entry for entry in graded.record.lesions}
    assert not any(lesions[code]["present"] for code in LESION_CODES if code != "HE")
    he = lesions["HE"]
    assert he["present"] and he["count"] == 1
    # the one region covers the field of view: its box is the field's bounding box to within a patch
    fov, (height, width) = graded.geometry.fov, graded.image.shape[:2]
    patch = (graded.geometry.crop_box[2] - graded.geometry.crop_box[0]) / grader.bundle.manifest.saliency["grid"][1]
    field_box = [max(fov.cx - fov.radius, 0), max(fov.cy - fov.radius, 0),
                 min(fov.cx + fov.radius, width), min(fov.cy + fov.radius, height)]
    assert np.allclose(he["regions"][0]["box"], field_box, atol=patch)
    card = cv2.imread(str(write_card_png(tmp_path / "card.png", graded)))[..., ::-1]
    assert card.shape == (HEIGHT, WIDTH, 3)
    photo = card[MARGIN + 28:MARGIN + 28 + TILE, MARGIN:MARGIN + TILE]
    assert np.all(photo == LESION_COLOURS["HE"], axis=-1).sum() > TILE      # the box's outline, at least
