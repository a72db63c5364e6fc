"""The evaluation report: structure, intervals, paired comparison, per-source breakdown, Markdown, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeretina.errors import DatasetError, MissingDependencyError
from edgeretina.evaluation import EvaluationInput, ModePredictions, evaluation_report, markdown_report, write_report
from edgeretina.metrics import (accuracy, confusion_matrix, expected_calibration_error, quadratic_weighted_kappa,
                                roc_auc, sensitivity_specificity)

N = 300
SOURCES = ("aptos", "messidor")


def _mode(name: str, grades: np.ndarray, error_rate: float, rng: np.random.Generator) -> ModePredictions:
    """Predictions that miss the true grade on about `error_rate` of the cases, probabilities peaked there."""
    wrong = rng.random(len(grades)) < error_rate
    predicted = np.where(wrong, np.clip(grades + rng.choice([-2, -1, 1, 2], len(grades)), 0, 4), grades)
    logits = rng.normal(size=(len(grades), 5))
    logits[np.arange(len(grades)), predicted] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = probs[:, 2:].sum(axis=1)
    return ModePredictions(name, predicted, probs, scores, scores >= 0.5)


def _input(modes=("head", "knn"), error_rates=(0.5, 0.1), n=N, sources=SOURCES, seed=0, grades=None, **kwargs):
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, n, p=[0.4, 0.2, 0.2, 0.1, 0.1]) if grades is None else np.asarray(grades)
    made = [_mode(name, grades, rate, rng) for name, rate in zip(modes, error_rates)]
    return EvaluationInput([f"case-{i:03d}" for i in range(len(grades))], grades,
                           [sources[i % len(sources)] for i in range(len(grades))], made, **kwargs)


@pytest.fixture(scope="module")
def data():
    return _input(excluded={"ungradable by the quality gate": 3, "no label": 1},
                  meta={"model": "tiny-vit", "cpu": "AMD EPYC (Zen 3)", "seconds": np.float32(1.5)})


@pytest.fixture(scope="module")
def report(data):
    return evaluation_report(data, n_bootstrap=200, seed=1)


@pytest.fixture(scope="module")
def written(report, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    return out, write_report(report, data, out)


def _intervals(report: dict):
    for name, section in report["modes"].items():
        yield f"{name}.qwk", section["qwk"]
        yield f"{name}.accuracy", section["accuracy"]
        for key in ("auc", "sensitivity", "specificity"):
            yield f"{name}.referable.{key}", section["referable"][key]
    for row in report["comparison"]:
        for key in ("qwk", "accuracy", "referable_auc"):
            yield f"{row['mode']}-{row['reference']}.{key}", row[key]


# --- structure and numbers -----------------------------------------------------------------------

def test_report_structure_is_json_ready(report):
    assert set(report) == {"schema", "n", "excluded", "n_excluded", "grade_counts", "referable_min_grade",
                           "n_referable", "sources", "bootstrap", "meta", "modes", "comparison"}
    assert json.loads(json.dumps(report, allow_nan=False)) == report        # plain values only, no NaN
    assert list(report["modes"]) == ["head", "knn"]
    assert report["n"] == N and sum(report["grade_counts"]) == N
    assert report["sources"] == {"aptos": 150, "messidor": 150}
    assert report["bootstrap"] == {"method": "percentile", "unit": "case", "n_resamples": 200, "confidence": 0.95,
                                   "seed": 1}
    assert report["meta"] == {"model": "tiny-vit", "cpu": "AMD EPYC (Zen 3)", "seconds": 1.5}
    section = report["modes"]["head"]
    assert {"n", "qwk", "accuracy", "mae", "off_by_one", "f1_macro", "f1_weighted", "per_class", "confusion_matrix",
            "unacceptable_errors", "ece", "reliability", "referable", "by_source"} == set(section)
    assert len(section["reliability"]["count"]) == 15 and sum(section["reliability"]["count"]) == N
    assert set(section["per_class"]) == {"precision", "recall", "f1", "support"}


def test_mode_numbers_are_the_metrics_on_all_cases(report, data):
    referable_true = data.grades >= 2
    assert report["n_referable"] == int(referable_true.sum())
    for mode in data.modes:
        section = report["modes"][mode.name]
        assert section["qwk"]["estimate"] == pytest.approx(quadratic_weighted_kappa(data.grades, mode.predicted))
        assert section["accuracy"]["estimate"] == pytest.approx(accuracy(data.grades, mode.predicted))
        assert section["confusion_matrix"] == confusion_matrix(data.grades, mode.predicted).tolist()
        assert section["ece"] == pytest.approx(expected_calibration_error(mode.grade_probs, data.grades, 15))
        referable = section["referable"]
        assert referable["auc"]["estimate"] == pytest.approx(roc_auc(referable_true, mode.referable_scores))
        sensitivity, specificity = sensitivity_specificity(referable_true, mode.referable_pred)
        assert referable["sensitivity"]["estimate"] == pytest.approx(sensitivity)
        assert referable["specificity"]["estimate"] == pytest.approx(specificity)
        assert referable["n_positive"] + referable["n_negative"] == N


def test_unacceptable_errors_name_their_cases(report, data):
    for mode in data.modes:
        errors = report["modes"][mode.name]["unacceptable_errors"]
        low_as_high = [i for i in range(N) if data.grades[i] <= 1 and mode.predicted[i] >= 3]
        high_as_low = [i for i in range(N) if data.grades[i] >= 3 and mode.predicted[i] <= 1]
        assert [c["case_id"] for c in errors["cases"]["true_0_1_pred_3_4"]] == [data.case_ids[i] for i in low_as_high]
        assert [c["case_id"] for c in errors["cases"]["true_3_4_pred_0_1"]] == [data.case_ids[i] for i in high_as_low]
        assert errors["true_0_1_pred_3_4"]["count"] == len(low_as_high)
        assert errors["total"]["count"] == len(low_as_high) + len(high_as_low)
    head = report["modes"]["head"]["unacceptable_errors"]
    assert head["total"]["count"] > 0                                    # the noisy mode makes some
    first = head["cases"]["true_3_4_pred_0_1"][0]
    i = data.case_ids.index(first["case_id"])
    assert first == {"case_id": data.case_ids[i], "source": data.sources[i], "true": int(data.grades[i]),
                     "predicted": int(data.modes[0].predicted[i])}
    assert f"{first['case_id']} ({first['source']}, true {first['true']}, graded {first['predicted']})" in \
        markdown_report(report)


def test_one_case_id_may_recur_in_another_source_but_not_in_its_own(data):
    ids = ["img-1", "img-1", "img-2"]
    mode = ModePredictions("head", [0, 1, 2], np.full((3, 5), 0.2), [0.1, 0.2, 0.3], [False, False, True])
    EvaluationInput(ids, [0, 1, 2], ["aptos", "messidor", "aptos"], [mode])
    with pytest.raises(ValueError, match="img-1"):
        EvaluationInput(ids, [0, 1, 2], ["aptos", "aptos", "messidor"], [mode])


def test_every_interval_contains_its_estimate(report):
    for name, interval in _intervals(report):
        assert set(interval) == {"estimate", "low", "high", "n_undefined"}, name
        assert interval["low"] <= interval["estimate"] <= interval["high"], name
        assert interval["n_undefined"] == 0, name
    qwk = report["modes"]["head"]["qwk"]
    assert 0.0 < qwk["high"] - qwk["low"] < 0.3       # N = 300: a real interval, neither a point nor everything


def test_comparison_is_paired_and_its_sign_follows_the_better_mode(report, data):
    (row,) = report["comparison"]
    assert (row["mode"], row["reference"]) == ("knn", "head")
    head, knn = report["modes"]["head"], report["modes"]["knn"]
    assert row["qwk"]["estimate"] == pytest.approx(knn["qwk"]["estimate"] - head["qwk"]["estimate"])
    assert row["qwk"]["low"] > 0.0                    # knn errs on 10% of cases, head on 50%
    assert row["accuracy"]["low"] > 0.0
    reversed_input = EvaluationInput(data.case_ids, data.grades, data.sources, data.modes[::-1])
    (reverse,) = evaluation_report(reversed_input, n_bootstrap=100)["comparison"]
    assert (reverse["mode"], reverse["reference"]) == ("head", "knn")
    assert reverse["qwk"]["high"] < 0.0


def test_a_mode_compared_with_its_own_copy_differs_by_exactly_zero(data):
    head = data.modes[0]
    twin = ModePredictions("head_copy", head.predicted.copy(), head.grade_probs, head.referable_scores.copy(),
                           head.referable_pred)
    (row,) = evaluation_report(EvaluationInput(data.case_ids, data.grades, data.sources, [head, twin]),
                               n_bootstrap=100)["comparison"]
    # Unpaired resamples would scatter around 0; paired ones are 0 every time.
    for key in ("qwk", "accuracy", "referable_auc"):
        assert row[key]["estimate"] == row[key]["low"] == row[key]["high"] == 0.0, key


def test_per_source_breakdown(report, data):
    by_source = report["modes"]["knn"]["by_source"]
    assert list(by_source) == list(SOURCES) and sum(s["n"] for s in by_source.values()) == N
    knn = data.modes[1]
    rows = np.asarray(data.sources) == "messidor"
    assert by_source["messidor"]["qwk"] == pytest.approx(quadratic_weighted_kappa(data.grades[rows],
                                                                                   knn.predicted[rows]))
    assert by_source["messidor"]["accuracy"] == pytest.approx(accuracy(data.grades[rows], knn.predicted[rows]))
    sensitivity, specificity = sensitivity_specificity(data.grades[rows] >= 2, knn.referable_pred[rows])
    assert by_source["messidor"]["referable_sensitivity"] == pytest.approx(sensitivity)
    assert by_source["messidor"]["referable_specificity"] == pytest.approx(specificity)
    single = evaluation_report(_input(sources=("aptos",), n=60), n_bootstrap=20)
    assert single["modes"]["head"]["by_source"] is None
    assert "By source" not in markdown_report(single)


def test_excluded_cases_are_reported_not_scored(report):
    assert report["excluded"] == {"ungradable by the quality gate": 3, "no label": 1}
    assert report["n_excluded"] == 4 and report["n"] == N
    assert "Excluded, not scored: 4 (ungradable by the quality gate: 3, no label: 1)" in markdown_report(report)


def test_referable_grade_is_configurable(data):
    stricter = evaluation_report(data, n_bootstrap=20, referable_min_grade=3)
    assert stricter["n_referable"] == int((data.grades >= 3).sum()) < int((data.grades >= 2).sum())
    head = data.modes[0]
    assert stricter["modes"]["head"]["referable"]["auc"]["estimate"] == pytest.approx(
        roc_auc(data.grades >= 3, head.referable_scores))


def test_undefined_metrics_are_none_and_n_a(tmp_path):
    # No referable case at all: AUC and sensitivity are undefined, on every resample too.
    data = _input(n=40, grades=[0, 1] * 20, sources=("aptos",))
    report = evaluation_report(data, n_bootstrap=30)
    referable = report["modes"]["head"]["referable"]
    assert referable["auc"] == {"estimate": None, "low": None, "high": None, "n_undefined": 30}
    assert referable["sensitivity"]["estimate"] is None and referable["specificity"]["estimate"] is not None
    assert report["comparison"][0]["referable_auc"]["estimate"] is None
    json.dumps(report, allow_nan=False)
    assert "n/a" in markdown_report(report)
    pytest.importorskip("matplotlib")
    assert (write_report(report, data, tmp_path)["roc.png"]).stat().st_size > 0   # no curve to draw, still a plot


# --- Markdown --------------------------------------------------------------------------------------

def test_markdown_holds_the_numbers_with_their_intervals(report):
    text = markdown_report(report)
    for name, section in report["modes"].items():
        qwk = section["qwk"]
        summary_row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{qwk['estimate']:.3f} ({qwk['low']:.3f}–{qwk['high']:.3f})" in summary_row
        auc = section["referable"]["auc"]
        assert f"{auc['estimate']:.3f} ({auc['low']:.3f}–{auc['high']:.3f})" in summary_row
        assert f"| {section['n']} |" in summary_row
        first_row = " | ".join(str(c) for c in section["confusion_matrix"][0])
        assert f"| 0 No apparent retinopathy | {first_row} |" in text
    difference = report["comparison"][0]["qwk"]
    low, high = difference["low"], difference["high"]
    assert f"| knn − head | {difference['estimate']:+.3f} ({low:.3f} to {high:.3f})" in text
    assert "| model | tiny-vit |" in text and "95% percentile bootstrap over cases (200 resamples, seed 1)" in text


# --- files -----------------------------------------------------------------------------------------

def test_write_report_writes_every_file_atomically(written, report):
    pytest.importorskip("matplotlib")
    cv2 = pytest.importorskip("cv2")
    out, paths = written
    expected = {"report.json", "report.md", "roc.png", "confusion_head.png", "confusion_knn.png",
                "reliability_head.png", "reliability_knn.png"}
    assert set(paths) == expected
    assert {p.name for p in out.iterdir()} == expected              # nothing else: no temp file left behind
    assert json.loads(paths["report.json"].read_text()) == report
    assert paths["report.md"].read_text() == markdown_report(report)
    for name in expected - {"report.json", "report.md"}:
        image = cv2.imread(str(paths[name]))
        assert image is not None, name
        height, width = image.shape[:2]
        assert 400 <= height <= 1200 and 400 <= width <= 1200, (name, image.shape)
        assert image.std() > 10, name                                 # drawn, not a blank canvas


def test_write_report_replaces_earlier_files(report, data, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "report.json").write_text("stale")
    paths = write_report(report, data, tmp_path)
    assert json.loads(paths["report.json"].read_text())["n"] == N
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_without_matplotlib_json_and_markdown_are_still_written(report, data, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)               # import -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgeretina\[plot\]'"):
        write_report(report, data, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_evaluation_imports_neither_torch_nor_matplotlib():
    code = ("import sys, edgeretina.evaluation, edgeretina.evaluation.plots; "
            "print([m for m in ('torch', 'matplotlib', 'open_clip') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda d: EvaluationInput(d.case_ids[:-1], d.grades, d.sources, d.modes),               # one id short
    lambda d: EvaluationInput(d.case_ids, d.grades, d.sources[:-1], d.modes),
    lambda d: EvaluationInput(["same"] * N, d.grades, d.sources, d.modes),                    # ids twice a source
    lambda d: EvaluationInput(d.case_ids, d.grades, d.sources, []),                           # no mode
    lambda d: EvaluationInput(d.case_ids, d.grades, d.sources, [d.modes[0], d.modes[0]]),     # duplicate names
    lambda d: EvaluationInput(d.case_ids, d.grades, d.sources, d.modes, excluded={"x": -1}),
    lambda d: EvaluationInput(d.case_ids[:10], d.grades[:10], d.sources[:10], d.modes),       # mode length
    lambda d: ModePredictions("../head", d.modes[0].predicted, d.modes[0].grade_probs,        # not a file name
                              d.modes[0].referable_scores, d.modes[0].referable_pred),
    lambda d: ModePredictions("head", d.modes[0].predicted, d.modes[0].grade_probs[:, :4],    # [N, 4]
                              d.modes[0].referable_scores, d.modes[0].referable_pred),
    lambda d: ModePredictions("head", d.modes[0].predicted, d.modes[0].grade_probs,
                              d.modes[0].referable_scores[:-1], d.modes[0].referable_pred),
    lambda d: ModePredictions("head", d.modes[0].predicted, d.modes[0].grade_probs,          # scores, not 0/1
                              d.modes[0].referable_scores, d.modes[0].referable_scores),
    lambda d: evaluation_report(EvaluationInput(d.case_ids, np.full(N, 7), d.sources, d.modes)),  # grade 7
    lambda d: evaluation_report(d, referable_min_grade=5),
    lambda d: evaluation_report(d, n_bootstrap=0),
    lambda d: evaluation_report(EvaluationInput(d.case_ids, d.grades, d.sources, d.modes, meta={"f": object()})),
])
def test_bad_input_raises_value_error(data, make):
    with pytest.raises(ValueError):
        make(data)


def test_nothing_left_to_score_is_a_dataset_error():
    empty = EvaluationInput([], np.zeros(0, dtype=int), [],
                            [ModePredictions("head", np.zeros(0, int), np.zeros((0, 5)), np.zeros(0), np.zeros(0))],
                            excluded={"ungradable by the quality gate": 12})
    with pytest.raises(DatasetError, match="ungradable by the quality gate: 12"):
        evaluation_report(empty)


def test_write_report_refuses_a_report_of_other_data(report, data, tmp_path):
    other = EvaluationInput(data.case_ids, data.grades, data.sources, data.modes[:1])
    with pytest.raises(ValueError, match="not made from this EvaluationInput"):
        write_report(report, other, tmp_path)
    assert not any(tmp_path.iterdir())
