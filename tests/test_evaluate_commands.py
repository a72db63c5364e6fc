"""`edgeretina evaluate`, `calibrate` and `bank build` on the session's tiny checkpoint and bundle, through the
command line: the numbers in the report are the model's own predictions, recalibration lands in the
checkpoint and in a bundle exported from it, the rebuilt bank holds the given images."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from _cli import run_cli
from edgeretina.dataset import read_labels
from edgeretina.grades import ordinal_grades
from edgeretina.metrics import quadratic_weighted_kappa


def _ok(*args) -> str:
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    return stdout


@pytest.fixture(scope="module")
def checkpoint_evaluation(tiny_checkpoint, phantom_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_ckpt")
    files = json.loads(_ok("evaluate", tiny_checkpoint.checkpoint, "--data", f"phantom:{phantom_test.parent}",
                           "--out", out, "--bootstrap", "200"))
    return out, files, json.loads((out / "report.json").read_text())


def _mode(report: dict, name: str) -> dict:
    return report["modes"][name]


def test_checkpoint_report_scores_the_models_own_predictions(checkpoint_evaluation, tiny_checkpoint, phantom_test):
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.data import prepare_images
    from edgeretina.training.loop import predict

    _, _, report = checkpoint_evaluation
    ckpt = load_checkpoint(tiny_checkpoint.checkpoint)
    items = read_labels(phantom_test)
    prepared = prepare_images(items, ckpt.preprocess, workers=1)
    logits = predict(ckpt.model, prepared.images, ckpt.preprocess)["ordinal_logits"]
    expected = quadratic_weighted_kappa(prepared.grades, ordinal_grades(logits, ckpt.grading.thresholds))
    head = _mode(report, "head")
    assert head["n"] == len(items)
    assert head["qwk"]["estimate"] == pytest.approx(expected, abs=1e-9)
    for name in ("prototype", "knn"):
        assert _mode(report, name)["n"] == len(items)


def test_checkpoint_report_files_are_written(checkpoint_evaluation):
    out, files, report = checkpoint_evaluation
    assert {"report.json", "report.md"} <= set(files)
    pngs = [p for p in files if p.endswith(".png")]
    assert any(p.startswith("confusion") for p in pngs) and any(p.startswith("reliability") for p in pngs)
    assert "roc.png" in pngs
    for name in pngs:
        image = cv2.imread(str(out / name))
        assert image is not None and min(image.shape[:2]) > 200
    markdown = (out / "report.md").read_text()
    assert "QWK" in markdown and "knn" in markdown
    assert report["meta"]["cpu_class"] and report["meta"]["data"][0].startswith("phantom:")
    assert [c["mode"] for c in report["comparison"]] == ["prototype", "knn"]


def test_bundle_report_matches_grade(onnx_bundle, phantom_test, tmp_path):
    from edgeretina.runtime.grader import Grader

    out = tmp_path / "eval_bundle"
    _ok("evaluate", onnx_bundle, "--data", f"phantom:{phantom_test.parent}", "--out", out, "--bootstrap", "200")
    report = json.loads((out / "report.json").read_text())
    items = read_labels(phantom_test)
    records = Grader(onnx_bundle).grade([it.path for it in items])
    graded = [(it.grade, r.grade) for it, r in zip(items, records) if r.gradable and not r.error]
    head = _mode(report, "head")
    assert head["n"] == len(graded)
    truth, predicted = zip(*graded)
    assert head["qwk"]["estimate"] == pytest.approx(quadratic_weighted_kappa(truth, predicted), abs=1e-9)
    assert report["n_excluded"] == len(items) - len(graded)
    assert set(report["modes"]) == {"head", "knn"}


def test_calibrate_writes_the_operating_point_into_the_checkpoint_and_the_bundle(tiny_checkpoint, phantom_train,
                                                                                 phantom_test, tmp_path):
    from edgeretina.bundle import load_bundle
    from edgeretina.export import ExportConfig, export
    from edgeretina.training.checkpoint import load_checkpoint

    out = tmp_path / "calibrated.pt"
    report = json.loads(_ok("calibrate", tiny_checkpoint.checkpoint, "--data", f"phantom:{phantom_train.parent}",
                            "--out", out, "--target-sensitivity", "0.9"))
    assert set(report) >= {"ece_ordinal", "ece_prototype", "operating_point", "thresholds"}
    assert report["operating_point"]["sensitivity"] >= 0.9
    ckpt = load_checkpoint(out)
    assert ckpt.grading.target_sensitivity == 0.9
    assert ckpt.grading.referable_threshold == pytest.approx(report["operating_point"]["threshold"])
    assert ckpt.summary["calibration"]["data"] == [f"phantom:{phantom_train.parent}"]
    assert load_checkpoint(tiny_checkpoint.checkpoint).grading.target_sensitivity != 0.9   # the input is kept
    bundle = export(ExportConfig(checkpoint=out, out=tmp_path / "bundle", reference_images=phantom_test,
                                 reference_count=4), log=lambda _: None)
    assert load_bundle(bundle).manifest.grading_config == ckpt.grading


def test_bank_build_replaces_the_bank_with_the_given_images(tiny_checkpoint, phantom_test, tmp_path):
    from edgeretina.training.checkpoint import load_checkpoint

    out = tmp_path / "rebanked.pt"
    info = json.loads(_ok("bank", "build", tiny_checkpoint.checkpoint, "--data", f"phantom:{phantom_test.parent}",
                          "--out", out))
    items = read_labels(phantom_test)
    bank = load_checkpoint(out).bank
    assert info["count"] == len(bank.grades) == len(items)
    assert sorted(bank.case_ids) == sorted(it.case_id for it in items)
    assert bank.sources == ["phantom"] * len(items) and info["sources"] == {"phantom": len(items)}
    assert np.bincount(bank.grades, minlength=5).tolist() == info["grade_counts"]
    original = load_checkpoint(tiny_checkpoint.checkpoint).bank
    assert len(original.grades) != len(bank.grades)            # the input checkpoint is untouched


def test_a_bad_data_spec_is_one_clear_error(tiny_checkpoint, tmp_path):
    code, _, stderr = run_cli("evaluate", tiny_checkpoint.checkpoint, "--data", f"aptoss:{tmp_path}", "--out", tmp_path)
    assert code == 1 and "aptos" in stderr and "Traceback" not in stderr


def test_export_re_embeds_the_bank_with_the_exported_model(tiny_checkpoint, phantom_test, tmp_path):
    from edgeretina.export import ExportConfig, export
    from edgeretina.runtime.grader import Grader

    bundle = export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=tmp_path / "b", reference_images=phantom_test,
                                 reference_count=4, bank_data=(f"phantom:{phantom_test.parent}",)), log=lambda _: None)
    grader = Grader(bundle)
    items = read_labels(phantom_test)
    assert len(grader.bank) == len(items)
    assert grader.bundle.manifest.export["bank_rebuilt"]["count"] == len(items)
    files, _, embeddings = grader.grades_and_embeddings([it.path for it in items])
    assert files, "the quality gate refused every phantom photograph"
    ids = {str(it.path): it.case_id for it in items}
    for file, neighbours in zip(files, grader.bank.search(embeddings, 1)):
        # its own bank row is its nearest case (the bank holds these very images, embedded by this model)
        assert neighbours[0].case_id == ids[file] and neighbours[0].similarity > 0.99


def test_the_bank_is_rebuilt_after_pruning_and_before_any_gate():
    from edgeretina.export.bank import rebuild_bank
    from edgeretina.export.prune import prune_model
    from edgeretina.export.reference import load_reference
    from edgeretina.export.targets import target_steps

    steps = target_steps("cpu", prune=True, rebuild_bank=True)
    assert steps[steps.index(load_reference) + 1:][:2] == [prune_model, rebuild_bank]
    assert rebuild_bank not in target_steps("cpu")


def test_case_ids_shared_by_two_images_become_their_paths(tmp_path):
    from edgeretina.dataset import LabeledImage
    from edgeretina.evaluation.sources import _case_ids

    items = [LabeledImage(tmp_path / "a" / "001.png", "001", 0, source="csv"),
             LabeledImage(tmp_path / "b" / "001.png", "001", 1, source="csv"),
             LabeledImage(tmp_path / "c" / "001.png", "001", 1, source="aptos"),
             LabeledImage(tmp_path / "d.dcm", "d", 2, frame=2, source="dicom")]
    assert _case_ids(items) == [str(tmp_path / "a" / "001.png"), str(tmp_path / "b" / "001.png"), "001", "d"]


def test_training_leaves_the_callers_random_state_and_threads_alone(phantom_train, tmp_path):
    import torch

    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.model import ModelConfig

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    config = TrainConfig(data=phantom_train, out=tmp_path / "m.pt", epochs=1, batch_size=10, workers=1, threads=1,
                         model=ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64)))
    train(config, log=lambda _: None, show_progress=False)
    load_checkpoint(config.out)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)
