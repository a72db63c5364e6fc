"""The saliency evaluation: its metrics against hand-computed values, and `edgeretina evaluate-saliency` end to
end on phantom photographs for a checkpoint and a bundle, where an oracle that draws the true masks in the
model-input frame must score a perfect pointing game and a map that points at the field's edge must miss:
the grid -> photo mapping is proven, not only the metric functions."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from _cli import run_cli
from edgeretina.dataset import read_labels
from edgeretina.errors import ConfigError
from edgeretina.evaluation import saliency
from edgeretina.evaluation.saliency_metrics import (ANY, average_precision, disk_dilate, field_masks, image_scores,
                                                    map_average_precision, mass_fraction, pointing_hit, summarize)
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import prepare

N_IMAGES = 6
TYPES = [*LESION_CODES, ANY]
INTERVAL_KEYS = {"estimate", "low", "high", "n", "n_undefined"}


# --- the metrics on hand-made arrays ----------------------------------------------------------------

def _square_lesion() -> tuple[np.ndarray, np.ndarray]:
    lesion = np.zeros((20, 20), bool)
    lesion[5:7, 5:7] = True
    return lesion, np.ones((20, 20), bool)


def _peak_at(row: int, col: int, shape=(20, 20)) -> np.ndarray:
    heat = np.full(shape, 0.1, np.float32)
    heat[row, col] = 1.0
    return heat


def test_pointing_hits_a_peak_on_the_lesion_and_misses_one_elsewhere():
    lesion, fov = _square_lesion()
    assert pointing_hit(_peak_at(5, 6), lesion, fov, 0.0) == 1.0
    assert pointing_hit(_peak_at(15, 15), lesion, fov, 3.0) == 0.0
    # two pixels below the lesion's last row: a hit at tolerance 2, a miss at 1.9
    assert pointing_hit(_peak_at(8, 5), lesion, fov, 2.0) == 1.0
    assert pointing_hit(_peak_at(8, 5), lesion, fov, 1.9) == 0.0
    # diagonal: (8, 8) is sqrt(8) = 2.83 from the corner pixel (6, 6)
    assert pointing_hit(_peak_at(8, 8), lesion, fov, 2.8) == 0.0
    assert pointing_hit(_peak_at(8, 8), lesion, fov, 2.9) == 1.0


def test_pointing_looks_inside_the_field_only_and_handles_ties_and_constant_maps():
    lesion, fov = _square_lesion()
    fov[:, 12:] = False
    heat = _peak_at(5, 5)
    heat[10, 15] = 5.0                                   # stronger, but outside the field
    assert pointing_hit(heat, lesion, fov, 0.0) == 1.0
    tied = _peak_at(5, 5)
    tied[15, 2] = 1.0                                    # a second maximum, far from the lesion
    assert pointing_hit(tied, lesion, fov, 1.0) == 0.5
    assert pointing_hit(np.full((20, 20), 0.7), lesion, fov, 50.0) == 0.0    # no maximum: a miss
    assert pointing_hit(_peak_at(5, 5), np.zeros((20, 20), bool), fov, 1.0) is None
    with pytest.raises(ValueError):
        pointing_hit(_peak_at(5, 5), lesion, fov, -1.0)


def test_disk_dilation_matches_brute_force_distances():
    rng = np.random.default_rng(3)
    mask = rng.random((17, 23)) > 0.96
    ys, xs = np.nonzero(mask)
    for radius in (0.0, 1.0, 1.5, 2.9, 4.0):
        expected = np.zeros(mask.shape, bool)
        for i in range(mask.shape[0]):
            for j in range(mask.shape[1]):
                expected[i, j] = bool(len(ys)) and ((ys - i) ** 2 + (xs - j) ** 2).min() <= radius * radius
        assert np.array_equal(disk_dilate(mask, radius), expected), radius


def test_average_precision_hand_computed():
    labels = np.array([1, 0, 1, 0], bool)
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0           # perfect
    reversed_scores = np.arange(10, 0, -1, dtype=float)                                 # the 2 positives last
    truth = np.zeros(10, bool)
    truth[-2:] = True
    assert average_precision(reversed_scores, truth) == pytest.approx(0.5 / 9 + 0.5 * 2 / 10)
    # tied scores are one threshold: P = 1/2 at R = 1/2, then P = 2/3 at R = 1
    assert average_precision(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 1], bool)) == pytest.approx(0.25 + 1 / 3)
    assert average_precision(np.full(8, 0.3), np.array([1, 0, 0, 0, 1, 0, 0, 0], bool)) == 0.25   # constant
    assert average_precision(np.array([0.5, 0.2]), np.zeros(2, bool)) is None


def test_map_average_precision_ignores_pixels_outside_the_field():
    lesion, fov = _square_lesion()
    heat = lesion.astype(np.float32)
    assert map_average_precision(heat, lesion, fov) == 1.0
    heat[0, 0] = 9.0
    assert map_average_precision(heat, lesion, fov) < 1.0
    fov[0, 0] = False
    assert map_average_precision(heat, lesion, fov) == 1.0


def test_mass_fraction_exact():
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0], heat[0, 1], heat[3, 3] = 3.0, 1.0, 4.0
    region = np.zeros((4, 4), bool)
    region[0, :2] = True
    fov = np.ones((4, 4), bool)
    assert mass_fraction(heat, region, fov) == pytest.approx(4.0 / 8.0)
    fov[3, 3] = False
    assert mass_fraction(heat, region, fov) == 1.0
    region[3, 3] = True                                  # region outside the field counts for nothing
    assert mass_fraction(heat, region, fov) == 1.0
    assert mass_fraction(np.zeros((4, 4)), region, fov) is None
    with pytest.raises(ValueError, match="non-negative"):
        mass_fraction(-heat, region, np.ones((4, 4), bool))


def test_ring_mass_exact_on_a_hand_drawn_disk():
    # radius 3 about the centre of a 7 x 7 image: pixel (i, j) is (i - 3, j - 3) from it. The field is the
    # 29 lattice points with d^2 <= 9; the ring (d > 0.66 * 3 = 1.98, d^2 > 3.92) the 20 with d^2 in {4, 5, 8, 9}.
    fov, ring = field_masks((7, 7), 3.5, 3.5, 3.0, ring_fraction=0.34)
    assert fov.sum() == 29 and ring.sum() == 20
    assert ring[3, 0] and ring[1, 1] and not ring[2, 2] and not fov[0, 0]
    assert mass_fraction(np.ones((7, 7)), ring, fov) == pytest.approx(20 / 29)
    centre_only = np.zeros((7, 7))
    centre_only[3, 3] = 1.0
    assert mass_fraction(centre_only, ring, fov) == 0.0


def test_per_type_maps_score_their_own_type_class_agnostic_maps_every_type():
    lesion_a, fov = _square_lesion()
    lesion_b = np.zeros_like(lesion_a)
    lesion_b[14:16, 14:16] = True
    masks = {"MA": lesion_a, "HE": lesion_b}
    ring = np.zeros_like(fov)
    at_a, at_b = _peak_at(5, 5), _peak_at(15, 15)
    typed = image_scores(at_a, {"MA": at_a, "HE": at_b}, masks, fov, ring, 0.0)["types"]
    assert typed["MA"]["pointing"] == typed["HE"]["pointing"] == typed[ANY]["pointing"] == 1.0
    agnostic = image_scores(at_a, None, masks, fov, ring, 0.0)["types"]
    assert agnostic["MA"]["pointing"] == 1.0 and agnostic["HE"]["pointing"] == 0.0
    assert image_scores(at_a, None, {"MA": lesion_a, "EX": np.zeros_like(fov)}, fov, ring, 0.0)["types"]["EX"] is None


def test_summary_is_the_mean_with_an_interval_and_counts():
    s = summarize([1.0, 0.0, None, 1.0, 1.0], n_bootstrap=200)
    assert s["estimate"] == 0.75 and s["n"] == 4 and s["n_undefined"] == 1
    assert 0.0 <= s["low"] <= 0.75 <= s["high"] <= 1.0
    assert summarize([None, None]) == {"estimate": None, "low": None, "high": None, "n": 0, "n_undefined": 2}


# --- end to end: test methods that know the answer -----------------------------------------------------

def _in_input_frame(mask: np.ndarray, batch, i: int) -> np.ndarray:
    """A photo-frame mask cropped and resized exactly as the photo was (prepare itself, not the Geometry the
    pipeline maps back with): the fraction of each model-input pixel that is lesion."""
    config = replace(batch.context.preprocess, ben_graham=False)
    rgb = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return prepare(rgb, config, batch.geometries[i].fov)[0][..., 0].astype(np.float32) / 255.0


def _oracle(context, batch):
    """Per lesion type, the true mask at model-input resolution."""
    out = []
    for i, (item, photo) in enumerate(zip(batch.items, batch.photos)):
        masks = saliency.load_masks(item, photo.shape[:2])
        out.append([_in_input_frame(masks[code], batch, i) for code in LESION_CODES])
    return saliency.Maps(per_type=np.asarray(out, np.float32))


def _field_edge(context, batch):
    """One model-input pixel on the rim of the field (found in the prepared image), the rim point farthest
    from any lesion: the ring artefact issue 14 describes, at its worst."""
    grids = np.zeros(batch.prepared.shape[:3], np.float32)
    for i, (item, photo) in enumerate(zip(batch.items, batch.photos)):
        inside = (batch.prepared[i].max(axis=-1) > 8).astype(np.uint8)
        rim = inside.astype(bool) & ~cv2.erode(inside, np.ones((3, 3), np.uint8)).astype(bool)
        union = np.any(list(saliency.load_masks(item, photo.shape[:2]).values()), axis=0)
        far = cv2.distanceTransform((_in_input_frame(union, batch, i) == 0).astype(np.uint8), cv2.DIST_L2, 5)
        row, col = np.unravel_index(np.argmax(np.where(rim, far, -1.0)), rim.shape)
        grids[i, row, col] = 1.0
    return saliency.Maps(grid=grids)


@pytest.fixture(scope="module")
def test_methods(phantom_test):
    """oracle (per type), edge (class-agnostic, on the rim) and union (precomputed on the photo: the union
    of the true masks), registered for this module only."""
    union = {}
    for item in read_labels(phantom_test)[:N_IMAGES]:
        photo_size = cv2.imread(str(item.path)).shape[:2]
        union[item.case_id] = np.any(list(saliency.load_masks(item, photo_size).values()), axis=0).astype(np.float32)
    added = [saliency.Method("oracle", "the true masks in the model-input frame", _oracle),
             saliency.Method("edge", "a point on the field's rim", _field_edge),
             saliency.precomputed_method("union", union, "the true masks on the photo")]
    for method in added:
        saliency.register_method(method)
    yield [m.name for m in added]
    for method in added:
        saliency.METHODS.pop(method.name)


def _run(*args) -> dict:
    code, stdout, stderr = run_cli("evaluate-saliency", *args)
    assert code == 0, stderr
    return json.loads(stdout)


@pytest.fixture(scope="module")
def checkpoint_run(tiny_checkpoint, phantom_test, test_methods, tmp_path_factory):
    out = tmp_path_factory.mktemp("saliency_ckpt")
    files = _run(tiny_checkpoint.checkpoint, "--data", f"phantom:{phantom_test.parent}", "--out", out,
                 "--limit", N_IMAGES, "--bootstrap", 200)               # every method, the test ones too
    return out, files, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def bundle_run(onnx_bundle, phantom_test, test_methods, tmp_path_factory):
    out = tmp_path_factory.mktemp("saliency_bundle")
    files = _run(onnx_bundle, "--data", f"phantom:{phantom_test.parent}", "--out", out, "--limit", N_IMAGES,
                 "--bootstrap", 200, "--methods", "saliency,lesion,gradcam,counterfactual,counterfactual-saliency,oracle,edge,union",
                 "--examples", 2)
    return out, files, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("run", ["checkpoint_run", "bundle_run"])
def test_the_oracle_points_at_every_lesion_type_and_the_field_edge_at_none(run, request):
    report = request.getfixturevalue(run)[2]
    present = [t for t in TYPES if report["lesions"][t]["n_images"] > 0]
    assert len(present) >= 4 and ANY in present                 # the 6 images hold several lesion types
    oracle, edge = report["methods"]["oracle"], report["methods"]["edge"]
    assert oracle["map"] == "per-type" and edge["map"] == "class-agnostic"
    for t in present:
        assert oracle["types"][t]["pointing"]["estimate"] == 1.0, t
        assert oracle["types"][t]["pointing"]["n"] == report["lesions"][t]["n_images"]
        assert edge["types"][t]["pointing"]["estimate"] == 0.0, t
        assert edge["types"][t]["mass_inside"]["estimate"] == 0.0, t
        assert oracle["types"][t]["average_precision"]["estimate"] > 0.6, t
    assert oracle["types"][ANY]["mass_inside"]["estimate"] > 5 * report["lesions"][ANY]["area_fraction"]
    # the edge map's mass lies on the field's edge; the ring is ~10 % of the field's area
    assert edge["edge_ring_mass"]["estimate"] > 0.9 > 0.2 > report["ring_area_fraction"] > 0.05
    assert oracle["edge_ring_mass"]["estimate"] < report["ring_area_fraction"]
    union = report["methods"]["union"]["types"][ANY]
    assert union["pointing"]["estimate"] == 1.0 and union["average_precision"]["estimate"] == 1.0
    for t in TYPES:
        assert report["methods"]["oracle"]["types"][t]["pointing"]["n"] == report["lesions"][t]["n_images"]


def test_checkpoint_report_structure_and_skipped_methods(checkpoint_run, test_methods):
    out, files, report = checkpoint_run
    assert report["schema"] == "edgeretina.saliency_evaluation/1"
    assert report["n_images"] == N_IMAGES and report["excluded"] == {}
    assert report["tolerance"]["fraction_of_field_diameter"] == 0.015 and report["tolerance"]["mean_px"] > 1.0
    methods = report["methods"]
    assert list(methods) == ["saliency", "saliency-deep", "lesion", "gradcam", "gradcam++", "counterfactual",
                             "counterfactual-saliency", *test_methods]
    assert not methods["saliency-deep"]["available"] and "deep map already" in methods["saliency-deep"]["reason"]
    assert not methods["lesion"]["available"] and "lesion head" in methods["lesion"]["reason"]
    assert not methods["counterfactual"]["available"] and "bundle" in methods["counterfactual"]["reason"]
    assert not methods["counterfactual-saliency"]["available"]
    for name in ("saliency", "gradcam", "gradcam++", *test_methods):
        section = methods[name]
        assert section["available"] and section["n_images"] == N_IMAGES
        assert set(section["types"]) == set(TYPES) and set(section["edge_ring_mass"]) == INTERVAL_KEYS
        for t in TYPES:
            assert set(section["types"][t]) == {"pointing", "average_precision", "mass_inside"}
            assert all(set(v) == INTERVAL_KEYS for v in section["types"][t].values())
    assert report["meta"]["checkpoint"] and report["meta"]["cpu_class"]
    assert set(files) == {"report.json", "report.md", "examples.png"}
    markdown = (out / "report.md").read_text()
    assert "| oracle | per-type |" in markdown and "## Not run" in markdown and "no lesion head" in markdown
    figure = cv2.imread(str(out / "examples.png"))
    assert figure is not None and figure.shape[1] >= 200 * (1 + 7)     # photo + the 7 methods that ran


def test_bundle_scores_its_own_maps_and_agrees_with_its_fp32_checkpoint(bundle_run, checkpoint_run):
    _, files, report = bundle_run
    methods = report["methods"]
    assert report["meta"]["bundle"] and report["meta"]["backend"] == "onnxruntime"
    assert "autograd" in methods["gradcam"]["reason"] and not methods["lesion"]["available"]
    assert methods["counterfactual"]["available"] and methods["counterfactual"]["n_images"] == N_IMAGES
    # no lesion head: the counterfactual's evidence is the saliency map, as when it is forced
    assert methods["counterfactual"]["types"] == methods["counterfactual-saliency"]["types"]
    assert cv2.imread(str(files["examples.png"])) is not None
    reference = checkpoint_run[2]["methods"]["saliency"]["types"]
    for t in TYPES:      # an FP32 ONNX bundle: the same maps as the torch model
        ours, theirs = methods["saliency"]["types"][t]["average_precision"], reference[t]["average_precision"]
        assert (ours["estimate"] is None) == (theirs["estimate"] is None)
        if ours["estimate"] is not None:
            assert ours["estimate"] == pytest.approx(theirs["estimate"], abs=1e-3)


# --- the lesion head --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lesion_model(phantom_test, tmp_path_factory):
    """An untrained tiny lesion-head model, as a checkpoint and as an FP32 bundle."""
    import torch

    from edgeretina.export import ExportConfig, export
    from edgeretina.grades import GradingConfig
    from edgeretina.preprocess import PreprocessConfig
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.checkpoint import Checkpoint, save_checkpoint
    from edgeretina.training.model import GraderModel, ModelConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64), lesion_head=True)).eval()
    root = tmp_path_factory.mktemp("lesion_model")
    preprocess = PreprocessConfig(image_size=64, mean=tuple(model.backbone.mean), std=tuple(model.backbone.std))
    checkpoint = save_checkpoint(root / "lesion.pt", Checkpoint(model=model, preprocess=preprocess,
                                                                grading=GradingConfig(), bank=None))
    bundle = export(ExportConfig(checkpoint=checkpoint, out=root / "bundle", reference_images=phantom_test,
                                 reference_count=2), log=lambda _: None)
    return checkpoint, bundle


def test_lesion_maps_are_scored_per_type_on_checkpoint_and_bundle(lesion_model, phantom_test, tmp_path):
    sections = []
    for target in lesion_model:
        config = saliency.SaliencyEvalConfig(target=target, data=(f"phantom:{phantom_test.parent}",),
                                             out=tmp_path / target.name, methods=("lesion",), limit=3,
                                             n_bootstrap=100, examples=0)
        report, files = saliency.evaluate_saliency(config, log=lambda _: None)
        assert set(files) == {"report.json", "report.md"}
        sections.append(report["methods"]["lesion"])
    for section in sections:
        assert section["available"] and section["map"] == "per-type" and section["n_images"] == 3
    for t in TYPES:
        ours, theirs = (s["types"][t]["average_precision"]["estimate"] for s in sections)
        assert (ours is None) == (theirs is None) and (ours is None or math.isclose(ours, theirs, abs_tol=1e-3))


# --- errors and exclusions --------------------------------------------------------------------------

def _copy_dataset(phantom_test, root, rows: int, masks: bool = True):
    """The first `rows` phantom images in a new folder; with masks, their mask files too."""
    items = read_labels(phantom_test)[:rows]
    (root / "images").mkdir(parents=True)
    for item in items:
        (root / "images" / item.path.name).write_bytes(item.path.read_bytes())
        for code in LESION_CODES if masks else ():
            source = phantom_test.parent / "masks" / code / f"{item.case_id}.png"
            (root / "masks" / code).mkdir(parents=True, exist_ok=True)
            (root / "masks" / code / source.name).write_bytes(source.read_bytes())
    lines = ["path,case_id,grade"] + [f"images/{it.path.name},{it.case_id},{it.grade}" for it in items]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return items


def test_data_without_masks_names_the_missing_folder(tiny_checkpoint, phantom_test, tmp_path):
    _copy_dataset(phantom_test, tmp_path / "nomasks", 2, masks=False)
    code, _, stderr = run_cli("evaluate-saliency", tiny_checkpoint.checkpoint, "--data",
                              f"phantom:{tmp_path / 'nomasks'}", "--out", tmp_path / "out")
    assert code == 1 and str(tmp_path / "nomasks" / "masks" / "MA") in stderr and "does not exist" in stderr


def test_unknown_and_unavailable_methods_are_clear_errors(tiny_checkpoint, phantom_test, tmp_path):
    data = ("--data", f"phantom:{phantom_test.parent}", "--out", tmp_path / "out")
    code, _, stderr = run_cli("evaluate-saliency", tiny_checkpoint.checkpoint, *data, "--methods", "saliency,nope")
    assert code == 1 and "'nope'" in stderr and "known: saliency, saliency-deep, lesion, gradcam, gradcam++, counterfactual" in stderr
    code, _, stderr = run_cli("evaluate-saliency", tiny_checkpoint.checkpoint, *data, "--methods", "lesion")
    assert code == 1 and "none of the requested methods can run" in stderr and "no lesion head" in stderr
    code, _, stderr = run_cli("evaluate-saliency", tiny_checkpoint.checkpoint, *data, "--tolerance", "0.9")
    assert code == 1 and "tolerance" in stderr
    with pytest.raises(ConfigError, match="already registered"):
        saliency.register_method(saliency.METHODS["saliency"])


@pytest.mark.parametrize("model", ["tiny_checkpoint", "onnx_bundle"])
def test_images_the_quality_gate_refuses_are_counted_not_scored(model, phantom_test, tmp_path, request):
    target = request.getfixturevalue(model)
    target = getattr(target, "checkpoint", target)
    items = _copy_dataset(phantom_test, tmp_path / "data", 3)
    cv2.imwrite(str(tmp_path / "data" / "images" / items[0].path.name), np.zeros((192, 192, 3), np.uint8))
    (tmp_path / "data" / "images" / items[1].path.name).write_bytes(b"not an image")
    config = saliency.SaliencyEvalConfig(target=target, data=(f"phantom:{tmp_path / 'data'}",),
                                         out=tmp_path / "out", methods=("saliency",), n_bootstrap=100)
    report, _ = saliency.evaluate_saliency(config, log=lambda _: None)
    assert report["n_images"] == 1 and report["methods"]["saliency"]["n_images"] == 1
    assert report["excluded"] == {"ungradable (quality gate)": 1, "unreadable": 1}


def test_a_gated_checkpoint_scores_its_deep_map_beside_the_gated_one(phantom_test, tiny_checkpoint, tmp_path):
    import torch

    from edgeretina.grades import GradingConfig
    from edgeretina.preprocess import PreprocessConfig
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.checkpoint import Checkpoint, save_checkpoint
    from edgeretina.training.model import GraderModel, ModelConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64), saliency="gated")).eval()
    preprocess = PreprocessConfig(image_size=64, mean=tuple(model.backbone.mean), std=tuple(model.backbone.std))
    gated = save_checkpoint(tmp_path / "gated.pt", Checkpoint(model=model, preprocess=preprocess,
                                                              grading=GradingConfig(), bank=None))
    reports = {}
    for name, target in (("gated", gated), ("deep", tiny_checkpoint.checkpoint)):
        config = saliency.SaliencyEvalConfig(target=target, data=(f"phantom:{phantom_test.parent}",),
                                             out=tmp_path / name, methods=("saliency", "saliency-deep"), limit=3,
                                             n_bootstrap=100, examples=0)
        reports[name], _ = saliency.evaluate_saliency(config, log=lambda _: None)
    deep_map, gated_map = (reports["gated"]["methods"][m] for m in ("saliency-deep", "saliency"))
    assert deep_map["available"] and deep_map["n_images"] == 3
    assert deep_map["edge_ring_mass"]["estimate"] != gated_map["edge_ring_mass"]["estimate"]
    skipped = reports["deep"]["methods"]["saliency-deep"]
    assert not skipped["available"] and "deep map already" in skipped["reason"]


@pytest.mark.parametrize("grow", [-0.5, 4.5, float("nan")])
def test_counterfactual_grow_is_checked(grow, tmp_path):
    from edgeretina.errors import ConfigError
    from edgeretina.evaluation import saliency

    with pytest.raises(ConfigError, match="counterfactual_grow"):
        saliency.SaliencyEvalConfig(target=tmp_path, data=("phantom:x",), out=tmp_path, counterfactual_grow=grow)


def test_counterfactual_grow_reaches_the_counterfactual_and_the_report(onnx_bundle, phantom_test, tmp_path):
    from edgeretina.evaluation import saliency

    reports = {}
    for grow in (0.0, 1.0):
        config = saliency.SaliencyEvalConfig(target=onnx_bundle, data=(f"phantom:{phantom_test.parent}",),
                                             out=tmp_path / str(grow), methods=("counterfactual",), limit=3,
                                             n_bootstrap=100, examples=0, counterfactual_grow=grow)
        reports[grow], _ = saliency.evaluate_saliency(config, log=lambda _: None)
        assert reports[grow]["meta"]["counterfactual_grow_cells"] == grow
    mass = {g: r["methods"]["counterfactual"]["edge_ring_mass"]["estimate"] for g, r in reports.items()}
    inside = {g: r["methods"]["counterfactual"]["types"]["any"]["mass_inside"]["estimate"] for g, r in reports.items()}
    assert (mass[0.0], inside[0.0]) != (mass[1.0], inside[1.0])        # widened removals: another map
