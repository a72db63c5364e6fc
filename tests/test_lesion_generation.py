"""Lesion generation (training/lesion_generation.py) on a few small phantom photographs: Reinhard colour
transfer in lαβ, where pasted lesions go, what changes, the ordinal label rule, determinism."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import PreprocessConfig, decode_image, grid_presence, prepare
from edgeretina.training import lesion_generation as lg

SIZE = 96
PREPROCESS = PreprocessConfig(image_size=SIZE)


@pytest.fixture(scope="module")
def donors(tmp_path_factory):
    """Eight 128 px phantoms prepared at 96 px with their lesion masks in the prepared frame."""
    from edgeretina.phantom import PhantomConfig, generate_dataset

    root = tmp_path_factory.mktemp("lesion_generation")
    labels = generate_dataset(root, n=8, seed=21, workers=1,
                              config=PhantomConfig(size=128, grade_weights=(1, 1, 1, 1, 1), framing="standard",
                                                   faults="none"))
    images, masks, grades, rows = [], [], [], list(csv.DictReader(open(labels)))
    for row in rows:
        images.append(prepare(decode_image(root / row["path"]), PREPROCESS)[0])
        masks.append(lg.prepared_lesion_masks(root / row["path"], _mask_paths(root, row["case_id"]), PREPROCESS))
        grades.append(int(row["grade"]))
    assert 0 in grades and 4 in grades and any(m[LESION_CODES.index("HE")].any() for m in masks)
    return {"root": root, "rows": rows, "images": np.stack(images), "masks": masks, "grades": np.array(grades)}


def _mask_paths(root, case_id):
    return [root / "masks" / code / f"{case_id}.png" for code in LESION_CODES]


def _only(mask: np.ndarray, code: str) -> np.ndarray:
    """A donor mask keeping one lesion type (the caller decides where masks come from)."""
    out = np.zeros_like(mask)
    out[LESION_CODES.index(code)] = mask[LESION_CODES.index(code)]
    return out


def _healthy(donors) -> tuple[np.ndarray, np.ndarray]:
    i = int(np.flatnonzero(donors["grades"] == 0)[0])
    return donors["images"][i], lg.field_of(donors["images"][i]) > 0


def _case_with(donors, code: str) -> int:
    return next(i for i, m in enumerate(donors["masks"]) if m[LESION_CODES.index(code)].any())


# ------------------------------------------------------------------------------------------- colour


def test_lab_round_trip_is_the_identity_and_greys_have_no_chroma():
    rng = np.random.default_rng(0)
    rgb = np.concatenate([rng.integers(0, 256, (5000, 3)), [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 1]]])
    rgb = rgb.astype(np.uint8)
    back = np.rint(lg.lab_to_rgb(lg.rgb_to_lab(rgb)))
    np.testing.assert_array_equal(back, rgb)
    # Reinhard's LMS rows each sum to ~1, so a grey has l = sqrt(3) log10(v / 255) and α = β ~ 0
    grey = lg.rgb_to_lab(np.array([[40, 40, 40], [128, 128, 128], [250, 250, 250]], np.uint8))
    assert np.abs(grey[:, 1:]).max() < 2e-3
    np.testing.assert_allclose(grey[:, 0], np.sqrt(3.0) * np.log10(np.array([40, 128, 250]) / 255.0), atol=2e-3)


def test_reinhard_transfer_moves_lab_mean_and_std_onto_the_target(donors):
    patch = donors["images"][1][30:60, 30:60]           # inside the field of two different photographs
    target = donors["images"][4][20:70, 25:75]
    out = lg.reinhard_transfer(patch, target)
    assert out.dtype == np.uint8 and out.shape == patch.shape
    got, want = lg.rgb_to_lab(out).reshape(-1, 3), lg.rgb_to_lab(target).reshape(-1, 3)
    np.testing.assert_allclose(got.mean(axis=0), want.mean(axis=0), atol=3e-3)
    np.testing.assert_allclose(got.std(axis=0), want.std(axis=0), rtol=0.05, atol=1e-3)
    before = lg.rgb_to_lab(patch).reshape(-1, 3)
    assert np.abs(before.mean(axis=0) - want.mean(axis=0)).max() > 10 * 3e-3   # the check has something to see


def test_reinhard_transfer_takes_statistics_from_the_masks_only(donors):
    patch, target = donors["images"][1][30:60, 30:60], donors["images"][4][20:70, 25:75]
    source_mask = np.zeros(patch.shape[:2], bool)
    source_mask[:, :15] = True
    target_mask = np.zeros(target.shape[:2], bool)
    target_mask[10:30, 10:30] = True
    out = lg.rgb_to_lab(lg.reinhard_transfer(patch, target, source_mask, target_mask))
    want = lg.rgb_to_lab(target)[target_mask]
    np.testing.assert_allclose(out[source_mask].mean(axis=0), want.mean(axis=0), atol=3e-3)
    np.testing.assert_allclose(out[source_mask].std(axis=0), want.std(axis=0), rtol=0.05, atol=1e-3)


# ------------------------------------------------------------------------------------------ pasting


def test_pasted_lesions_stay_inside_the_field_and_nothing_else_changes(donors):
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"])
    image, field = _healthy(donors)
    pasted_total = 0
    for seed in range(12):
        new, _, pasted = lg.generate(image, 0, np.random.default_rng(seed), bank, max_patches=3)
        footprint = pasted.any(axis=0)
        changed = np.any(new != image, axis=2)
        assert not (footprint & ~field).any(), "a lesion was pasted over the black background"
        np.testing.assert_array_equal(new[~field], image[~field])
        assert not (changed & ~footprint).any(), "pixels outside the pasted mask changed"
        assert changed[footprint].mean() > 0.5, "the pasted mask marks pixels the paste did not change"
        assert (new[field].max(axis=1) > 0).all(), "a pasted pixel turned black (reads as outside the field)"
        pasted_total += int(footprint.sum())
    assert pasted_total > 100
    np.testing.assert_array_equal(image, _healthy(donors)[0])      # the input is not modified


def test_a_pasted_pixel_never_turns_black():
    """A dark lesion matched to a dark neighbourhood may come out at or below the field level (0..8), which
    the graph's field weights read as outside the field; it is lifted just above it."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 <= 44 ** 2
    donor = np.where(disc[..., None], np.array([120, 60, 30], np.uint8), 0).astype(np.uint8)
    donor[44:52, 44:52] = (2, 1, 1)                                 # a near-black haemorrhage
    lesions = np.zeros((len(LESION_CODES), SIZE, SIZE), bool)
    lesions[LESION_CODES.index("HE"), 44:52, 44:52] = True
    bank = lg.LesionBank.from_cases(donor[None], [lesions], [2])
    dark = np.where(disc[..., None], np.array([3, 2, 2], np.uint8), 0).astype(np.uint8)
    new, grade, pasted = lg.generate(dark, 0, np.random.default_rng(0), bank, max_patches=1)
    assert pasted.any() and grade == 2
    from edgeretina.preprocess.config import FIELD_LEVEL_U8

    assert (new[disc].max(axis=1) > 0).all()
    footprint = pasted.any(axis=0)
    assert (new[footprint].max(axis=1) > FIELD_LEVEL_U8).all()
    assert (new[footprint].max(axis=1) == FIELD_LEVEL_U8 + 1).any()   # the case the guard is for happened


def test_the_lesion_keeps_its_contrast_and_its_rim_is_feathered():
    """Flat donor surround A with a lesion B, pasted on a flat neighbourhood C: Reinhard takes the
    statistics from the surround, so the core lands at C + (B - A) in lαβ, and the rim lies between."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 <= 44 ** 2
    donor = np.where(disc[..., None], np.array([150, 80, 40], np.uint8), 0).astype(np.uint8)
    donor[40:51, 40:51] = (90, 30, 20)
    lesions = np.zeros((len(LESION_CODES), SIZE, SIZE), bool)
    lesions[LESION_CODES.index("HE"), 40:51, 40:51] = True
    config = lg.LesionGenerationConfig(feather=0.04, transform_patches=False)
    bank = lg.LesionBank.from_cases(donor[None], [lesions], [2], config=config)
    dest = np.where(disc[..., None], np.array([200, 120, 70], np.uint8), 0).astype(np.uint8)
    new, _, pasted = lg.generate(dest, 0, np.random.default_rng(3), bank, max_patches=1)
    ys, xs = np.nonzero(pasted[LESION_CODES.index("HE")])
    assert len(ys) == 121
    lab = lg.rgb_to_lab(new)
    core = lab[ys.min() + 5, xs.min() + 5]
    shift = lg.rgb_to_lab(donor[45, 45]) - lg.rgb_to_lab(donor[10, 48])
    np.testing.assert_allclose(core, lg.rgb_to_lab(dest[48, 48]) + shift, atol=0.01)
    rim = lab[ys.min(), xs.min() + 5, 0]
    assert core[0] + 0.02 < rim < lg.rgb_to_lab(dest[48, 48])[0] - 0.02


def test_prepared_masks_never_leave_the_field(donors, tmp_path):
    import cv2

    row = donors["rows"][0]
    photo = decode_image(donors["root"] / row["path"])
    everywhere = tmp_path / "all.png"
    cv2.imwrite(str(everywhere), np.full(photo.shape[:2], 255, np.uint8))
    mask = lg.prepared_lesion_masks(donors["root"] / row["path"], [everywhere], PREPROCESS)
    field = lg.field_of(prepare(photo, PREPROCESS)[0]) > 0
    np.testing.assert_array_equal(mask[0], field)


def test_a_given_field_mask_bounds_where_lesions_go(donors):
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"])
    image, _ = _healthy(donors)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    small = (yy - 48) ** 2 + (xx - 48) ** 2 <= 20 ** 2
    for seed in range(8):
        new, _, pasted = lg.generate(image, 0, np.random.default_rng(seed), bank, max_patches=3, field_mask=small)
        assert not (np.any(new != image, axis=2) & ~small).any()
        assert not (pasted.any(axis=0) & ~small).any()


def test_generation_is_deterministic_for_a_seeded_rng(donors):
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"])
    image, _ = _healthy(donors)
    first = lg.generate(image, 0, np.random.default_rng(5), bank, max_patches=3)
    again = lg.generate(image, 0, np.random.default_rng(5), bank, max_patches=3)
    other = lg.generate(image, 0, np.random.default_rng(6), bank, max_patches=3)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[2], again[2])
    assert first[1] == again[1]
    assert not np.array_equal(first[2], other[2])


# ------------------------------------------------------------------------------------------- labels


def test_each_lesion_type_implies_the_icdr_grade_the_phantom_grades_it_with():
    from edgeretina.phantom.grading import icdr_grade

    for code in LESION_CODES:
        counts = {c: int(c == code) for c in LESION_CODES}
        assert lg.LESION_MIN_GRADE[code] == icdr_grade(counts, [int(code == "HE"), 0, 0, 0]), code


def test_the_ordinal_label_rule():
    assert lg.mixed_grade(0, [("MA", 4)]) == 1          # a microaneurysm alone is mild NPDR, not its donor's 4
    assert lg.mixed_grade(0, [("HE", 3)]) == 2          # a few haemorrhages do not make severe NPDR
    assert lg.mixed_grade(1, [("NV", 4)]) == 4
    assert lg.mixed_grade(0, [("HE", 1)]) == 1          # bounded by the donor's grade
    assert lg.mixed_grade(3, [("MA", 4), ("EX", 2)]) == 3   # pasting never lowers a grade
    assert lg.mixed_grade(0, [(None, 4)]) == 1          # a lesion of unknown type: some DR
    assert lg.mixed_grade(0, [(None, 0)]) == 0
    assert lg.mixed_grade(2, []) == 2


@pytest.mark.parametrize("code, donor_grade, dest_grade, expected", [
    ("MA", None, 0, 1), ("HE", None, 0, 2), ("HE", 1, 0, 1), ("NV", None, 0, 4), ("MA", None, 3, 3)])
def test_generate_applies_the_rule_and_marks_the_pasted_type(donors, code, donor_grade, dest_grade, expected):
    i = _case_with(donors, code)
    grade = int(donors["grades"][i]) if donor_grade is None else donor_grade
    bank = lg.LesionBank.from_cases(donors["images"][i:i + 1], [_only(donors["masks"][i], code)], [grade])
    assert len(bank) > 0 and {p.code for p in bank.patches} == {code}
    image, _ = _healthy(donors)
    new, new_grade, pasted = lg.generate(image, dest_grade, np.random.default_rng(0), bank, max_patches=2)
    layer = LESION_CODES.index(code)
    assert pasted[layer].any() and not np.delete(pasted, layer, axis=0).any()
    assert new_grade == expected


def test_without_raise_grade_only_lesions_within_the_grade_are_pasted(donors):
    config = lg.LesionGenerationConfig(raise_grade=False)
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"], config=config)
    image, _ = _healthy(donors)
    seen = set()
    for dest_grade in range(5):
        at_this_grade = set()
        for seed in range(6):
            new, grade, pasted = lg.generate(image, dest_grade, np.random.default_rng(seed), bank, max_patches=3)
            assert grade == dest_grade
            codes = {LESION_CODES[k] for k in np.flatnonzero(pasted.reshape(len(LESION_CODES), -1).any(axis=1))}
            assert all(lg.LESION_MIN_GRADE[c] <= dest_grade for c in codes)
            if dest_grade == 0:
                np.testing.assert_array_equal(new, image)
            at_this_grade |= codes
        assert at_this_grade or dest_grade == 0, f"nothing pasted into a grade-{dest_grade} image"
        seen |= at_this_grade
    assert {"MA", "HE"} <= seen


def test_no_paste_keeps_the_grade(donors):
    image, _ = _healthy(donors)
    empty = lg.LesionBank()
    new, grade, pasted = lg.generate(image, 2, np.random.default_rng(0), empty)
    assert grade == 2 and not pasted.any()
    np.testing.assert_array_equal(new, image)


# --------------------------------------------------------------------------------------------- bank


def test_only_correctly_graded_cases_donate(donors):
    n = len(donors["grades"])
    correct = np.zeros(n, bool)
    keep = _case_with(donors, "HE")
    correct[keep] = True
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"], correct=correct)
    assert len(bank) > 0 and {p.case for p in bank.patches} == {keep}
    assert all(p.grade == donors["grades"][keep] for p in bank.patches)
    full = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"])
    assert len({p.case for p in full.patches}) > 1
    assert {p.case for p in full.where_correct(correct).patches} == {keep}


def test_bank_patches_are_components_with_their_margin(donors):
    config = lg.LesionGenerationConfig(margin=0.05)
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"], config=config)
    for p in bank.patches:
        assert p.rgb.shape[:2] == p.lesion.shape == p.alpha.shape == p.surround.shape
        np.testing.assert_array_equal(p.alpha > 0, p.lesion)
        assert p.alpha.max() == pytest.approx(1.0)
        assert not (p.surround & p.lesion).any()
        assert p.lesion.sum() >= config.min_area


def test_config_validation():
    assert lg.LesionGenerationConfig().probability == 0.0           # off by default
    for bad in ({"probability": 1.5}, {"probability": -0.1}, {"max_patches": 0}, {"margin": 0.5},
                {"codes": ("XX",)}, {"codes": ()}, {"max_std_ratio": 0.5}, {"max_side": 0.0}, {"min_area": 0}):
        with pytest.raises(ConfigError):
            lg.LesionGenerationConfig(**bad)
    assert lg.LesionGenerationConfig(codes=("HE", "MA")).codes == ("MA", "HE")


def test_the_bank_keeps_only_the_configured_types(donors):
    config = lg.LesionGenerationConfig(codes=("EX",))
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"], config=config)
    assert len(bank) > 0 and {p.code for p in bank.patches} == {"EX"}


def test_balance_codes_draws_each_type_alike(donors):
    def nv_share(balance: bool) -> float:
        config = lg.LesionGenerationConfig(balance_codes=balance)
        bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"], config=config)
        rng = np.random.default_rng(0)
        return float(np.mean([bank.draw(rng).code == "NV" for _ in range(600)])), len({p.code for p in bank.patches})

    natural, _ = nv_share(False)
    balanced, types = nv_share(True)
    assert natural < 0.5 / types < balanced < 1.5 / types


# ---------------------------------------------------------------------------------------- training


def test_generate_batch_updates_grades_and_lesion_grids(donors):
    config = lg.LesionGenerationConfig(probability=1.0, max_patches=2)
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"], config=config)
    images, grades = donors["images"], donors["grades"]
    grids = np.zeros((len(images), len(LESION_CODES), 6, 6), np.uint8)
    new_images, new_grades, new_grids = lg.generate_batch(images, grades, np.random.default_rng(1), bank, grids)
    assert (new_grades >= grades).all() and (new_grades > grades).any()
    assert new_grids.any() and not grids.any()                     # inputs untouched
    changed = np.any(new_images != images, axis=3)
    for i in range(len(images)):
        cells = lg.pasted_grid(changed[i][None].repeat(len(LESION_CODES), 0), (6, 6)).any(axis=0)
        assert not (cells & ~new_grids[i].any(axis=0).astype(bool)).any()
    off = lg.LesionBank(config=lg.LesionGenerationConfig(probability=0.0), patches=bank.patches)
    same = lg.generate_batch(images, grades, np.random.default_rng(1), off, grids)
    np.testing.assert_array_equal(same[0], images)
    np.testing.assert_array_equal(same[1], grades)


def test_generate_batch_draws_images_with_the_configured_probability(donors):
    config = lg.LesionGenerationConfig(probability=0.5, max_patches=1)
    bank = lg.LesionBank.from_cases(donors["images"], donors["masks"], donors["grades"], config=config)
    images = np.repeat(donors["images"], 4, axis=0)                  # 32 images
    grades = np.repeat(donors["grades"], 4)
    new_images, _, _ = lg.generate_batch(images, grades, np.random.default_rng(2), bank)
    changed = np.any(new_images != images, axis=(1, 2, 3)).mean()
    assert 0.2 < changed < 0.8


def test_prepared_masks_lie_where_the_lesion_targets_are(donors):
    """The masks in the prepared frame fall in the grid cells data.py's targets mark (grid_presence), and
    cover about the lesion area the full-resolution masks have, scaled (a pixel counts when half covered)."""
    root = donors["root"]
    got = expected = 0.0
    for row, mask in zip(donors["rows"], donors["masks"]):
        _, geometry = prepare(decode_image(root / row["path"]), PREPROCESS)
        side = geometry.crop_box[2] - geometry.crop_box[0]
        for layer, path in zip(mask, _mask_paths(root, row["case_id"])):
            full = decode_image(path)[..., 0]
            target = grid_presence(full, geometry, (12, 12))
            cells = lg.pasted_grid(layer[None], (12, 12))[0].astype(bool)
            assert not (cells & ~target).any()
            if layer.sum() > 20:
                assert cells.sum() >= 0.5 * target.sum()
            got += layer.sum()
            expected += (full > 0).sum() * (SIZE / side) ** 2
    assert 0.8 < got / expected < 1.2


def test_training_with_lesion_generation_pastes_lesions_and_records_it(phantom_train, tmp_path, cli):
    """`train --lesion-generation 1.0`: the bank is built from the training masks, every training batch
    goes through generation (grades can only rise), and the checkpoint's summary records it."""
    import numpy as np

    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.data import prepare_images
    from edgeretina.training.lesion_generation import LesionGenerationConfig
    from edgeretina.training.loop import TrainConfig, _ImageInputs, _lesion_bank
    from edgeretina.dataset import read_labels
    from edgeretina.preprocess import PreprocessConfig

    code, out, err = cli("train", str(phantom_train), "--out", str(tmp_path / "g.pt"), "--epochs", "1",
                         "--batch-size", "16", "--image-size", "64", "--lesion-generation", "1.0", "--threads", "1")
    assert code == 0, err
    summary = load_checkpoint(tmp_path / "g.pt").summary["schedule"]["lesion_generation"]
    assert summary["probability"] == 1.0 and summary["raise_grade"] and summary["donor_lesions"] > 0

    items = read_labels(phantom_train)[:12]
    preprocess = PreprocessConfig(image_size=64)
    data = prepare_images(items, preprocess, 1)
    bank = _lesion_bank(LesionGenerationConfig(probability=1.0), items, data, preprocess, log=lambda _: None)
    inputs = _ImageInputs(data, preprocess, None, np.random.default_rng(0), _tiny_model(), "cpu", bank)
    idx = np.arange(len(data.grades))
    (x,), _, grades = inputs.batch(idx)
    (plain_x,), _, plain_grades = _ImageInputs(data, preprocess, None, np.random.default_rng(0), _tiny_model(),
                                            "cpu").batch(idx)
    assert np.all(grades.numpy() >= data.grades) and not torch_equal(x, plain_x)
    np.testing.assert_array_equal(plain_grades.numpy(), data.grades)


def _tiny_model():
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.model import GraderModel, ModelConfig

    return GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64)), for_checkpoint=True)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_lesion_generation_without_masks_is_one_clear_dataset_error(phantom_train, tmp_path):
    import shutil

    import pytest

    from edgeretina.errors import DatasetError
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.lesion_generation import LesionGenerationConfig

    copy = tmp_path / "no_masks"
    shutil.copytree(phantom_train.parent, copy, ignore=shutil.ignore_patterns("masks"))
    config = TrainConfig(data=copy / "labels.csv", out=tmp_path / "x.pt", epochs=1, batch_size=16, workers=1,
                         lesion_generation=LesionGenerationConfig(probability=0.5))
    with pytest.raises(DatasetError, match="--lesion-generation needs lesion masks"):
        train(config, log=lambda _: None, show_progress=False)
