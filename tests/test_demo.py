"""The demo end to end at tiny settings (60 + 20 phantoms of 128 px, one epoch): what it writes is checked
against what it says. metrics.json must be the metrics of test_results.csv against the test set's labels
(recomputed here, QWK and accuracy also by scikit-learn), the test set must be the held-out seed's and
share no case with training, the bundle must load with its gate passed, and the printed summary must carry
the numbers of metrics.json."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from edgeretina.bundle import load_bundle
from edgeretina.dataset import read_labels
from edgeretina.demo import DemoConfig, format_summary, run_demo
from edgeretina.metrics import grading_report
from edgeretina.training.checkpoint import load_checkpoint

N_TRAIN, N_TEST = 60, 20


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    config = DemoConfig(workdir=workdir, n_train=N_TRAIN, n_test=N_TEST, photo_size=128, epochs=1,
                        train_minutes=2.0, threads=1)
    threads = torch.get_num_threads()
    try:
        metrics = run_demo(config, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)          # train(threads=1) sets it process-wide
    return config, metrics


def _results(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_metrics_json_is_what_the_demo_returned(demo_run):
    config, metrics = demo_run
    saved = json.loads((config.workdir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["timings_s"]) == {"synthesise phantom data", "train", "export",
                                       "grade held-out set on the runtime"}


def _graded(config):
    """(truth, predicted grade, P(referable), referable decision) of every graded row of test_results.csv,
    with the rows and the test labels."""
    items = read_labels(config.workdir / "test" / "labels.csv")
    rows = _results(config.workdir / "test_results.csv")
    graded = [(item.grade, row) for item, row in zip(items, rows) if row["grade"] != ""]
    return (np.array([g for g, _ in graded]), np.array([int(row["grade"]) for _, row in graded]),
            np.array([float(row["referable_probability"]) for _, row in graded]),
            np.array([row["referable"] == "True" for _, row in graded]), items, rows)


def test_metrics_are_those_of_the_written_results_against_the_test_labels(demo_run):
    config, metrics = demo_run
    truth, predicted, referable_p, referable, items, rows = _graded(config)
    assert len(items) == len(rows) == N_TEST
    assert [row["file"] for row in rows] == [str(item.path) for item in items]      # one row per test photo, in order
    assert metrics["n"] == len(truth) > 0
    assert metrics["n_total"] == N_TEST
    assert metrics["n_ungradable"] == sum(row["gradable"] == "False" for row in rows)
    assert metrics["n_errors"] == sum(row["error"] != "" for row in rows)
    assert metrics["n"] + metrics["n_ungradable"] + metrics["n_errors"] == N_TEST
    expected = grading_report(truth, predicted, referable_scores=referable_p, referable_pred=referable)
    assert {k: metrics[k] for k in expected} == expected
    assert np.bincount(truth, minlength=5).tolist() == metrics["per_class"]["support"]


def test_headline_metrics_agree_with_scikit_learn(demo_run):
    """Independent oracles for the numbers the summary prints, on the same written results."""
    sk = pytest.importorskip("sklearn.metrics")
    config, metrics = demo_run
    truth, predicted, referable_p, _, _, _ = _graded(config)
    assert metrics["qwk"] == pytest.approx(_sk_qwk(sk, truth, predicted), abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted), abs=1e-12)
    assert metrics["confusion_matrix"] == sk.confusion_matrix(truth, predicted, labels=range(5)).tolist()
    if 0 < (truth >= 2).sum() < len(truth):
        assert metrics["referable_auc"] == pytest.approx(sk.roc_auc_score(truth >= 2, referable_p), abs=1e-12)


def _sk_qwk(sk, truth, predicted):
    """scikit-learn returns nan where both raters give one single grade; edgeretina's convention is then
    1.0 for full agreement (metrics.quadratic_weighted_kappa)."""
    value = sk.cohen_kappa_score(truth, predicted, weights="quadratic", labels=range(5))
    return (1.0 if (truth == predicted).all() else 0.0) if math.isnan(value) else value


def test_test_set_is_held_out_and_the_checkpoint_is_the_one_trained(demo_run):
    config, metrics = demo_run
    train_items = read_labels(config.workdir / "train" / "labels.csv")
    test_items = read_labels(config.workdir / "test" / "labels.csv")
    assert len(train_items) == N_TRAIN and len(test_items) == N_TEST
    assert not {i.case_id for i in train_items} & {i.case_id for i in test_items}
    ckpt = load_checkpoint(config.workdir / "checkpoint.pt")
    assert ckpt.model.backbone.kind == "resnet"                              # the demo's tower, tiny-rn
    assert ckpt.summary["train"]["data"] == [f"phantom:{config.workdir / 'train'}"]
    assert ckpt.summary["train"]["n"] + ckpt.summary["val"]["n"] == N_TRAIN
    assert ckpt.summary["schedule"]["epochs_run"] == 1
    assert metrics["val_qwk_torch"] == ckpt.summary["val_metrics"]["qwk"]


def test_bundle_loads_with_its_gate_passed_and_its_size_reported(demo_run):
    config, metrics = demo_run
    bundle = load_bundle(config.workdir / "bundle")
    gate = bundle.manifest.export["gate"]
    assert gate["onnx-fp32"]["passed"] is True
    size = sum(p.stat().st_size for p in (config.workdir / "bundle").rglob("*") if p.is_file()) / 1e6
    assert metrics["bundle_mb"] == round(size, 2)


def test_summary_states_the_numbers(demo_run):
    _, metrics = demo_run
    summary = format_summary(metrics)
    assert (f"n = {metrics['n']} gradable of {N_TEST} ({metrics['n_ungradable']} ungradable, "
            f"{metrics['n_errors']} errors)") in summary
    assert f"QWK {metrics['qwk']:.3f}   accuracy {metrics['accuracy']:.3f}" in summary
    sens, spec = metrics["referable_sensitivity"], metrics["referable_specificity"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    assert f"referable sensitivity {fmt(sens)} / specificity {fmt(spec)}" in summary
    assert f"bundle {metrics['bundle_mb']} MB" in summary
    assert f"train {metrics['timings_s']['train']} s" in summary
