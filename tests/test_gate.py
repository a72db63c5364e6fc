"""The export gate tested directly: `fidelity.compare` and `export.gate.run_gate` on constructed outputs.

Every case below is built by hand so that exactly one check moves, by a small margin a reader can check on
paper, while every other check stays clearly inside its bar. No model, no export: numpy arrays only.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeretina.errors import GateError
from edgeretina.export.gate import GateRun, run_gate
from edgeretina.export.steps import ExportConfig, ExportContext
from edgeretina.fidelity import (FP32_THRESHOLDS, INT8_THRESHOLDS, Check, GateThresholds, checks_table, compare,
                                 knn_overlap)
from edgeretina.grades import GradingConfig

GRADING = GradingConfig()                  # ordinal thresholds all 0: grade = number of positive logits
ALL_CHECKS = ["grade_agreement", "qwk_change", "referable_agreement", "embedding_cosine", "saliency_correlation"]


# ---------------------------------------------------------------------------------------------- builders

def logits_for(grades) -> np.ndarray:
    """[N, 4] ordinal logits whose CORAL grade (under GRADING) is `grades`: +1 for the first g, -1 after."""
    g = np.asarray(grades)[:, None]
    return np.where(np.arange(4)[None, :] < g, 1.0, -1.0).astype(np.float32)


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def outputs(grades, seed: int = 0, d: int = 16, hw: int = 8) -> dict[str, np.ndarray]:
    grades = np.asarray(grades)
    n = len(grades)
    rng = np.random.default_rng(seed + 1)
    return {"ordinal_logits": logits_for(grades),
            "prototype_logits": rng.standard_normal((n, 5)).astype(np.float32),
            "embedding": unit_rows(n, d, seed),
            "saliency": rng.random((n, hw, hw)).astype(np.float32)}


def copy(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in out.items()}


def uniform_grades(n: int = 200) -> np.ndarray:
    return np.arange(n) % 5                # 40 images of each grade 0..4


def by_name(checks) -> dict[str, Check]:
    return {c.name: c for c in checks}


def failed(checks) -> list[str]:
    return [c.name for c in checks if not c.passed]


def correlated(x: np.ndarray, r: float, rng) -> np.ndarray:
    """A map whose Pearson correlation with x is exactly r (to float precision): centred x rotated by
    arccos(r) towards a centred direction orthogonal to it, of the same norm."""
    xc = x.ravel().astype(np.float64) - x.mean()
    z = rng.standard_normal(xc.size)
    z -= z.mean()
    z -= (z @ xc) / (xc @ xc) * xc
    z *= np.linalg.norm(xc) / np.linalg.norm(z)
    return (r * xc + np.sqrt(1 - r * r) * z + 0.5).reshape(x.shape)


def knn_case(n_queries: int = 4):
    """Bank = 20 one-hot rows; each query's similarity to bank row p[j] is 0.2 - 0.005 j (gaps 5x the tie
    tolerance), the rest of its unit norm in a 21st dimension the bank does not see."""
    rng = np.random.default_rng(5)
    values = 0.2 - 0.005 * np.arange(20)
    bank = np.eye(20, 21, dtype=np.float32)
    emb, order = np.zeros((n_queries, 21)), []
    for i in range(n_queries):
        p = rng.permutation(20)
        emb[i, p] = values
        emb[i, 20] = np.sqrt(1 - values @ values)
        order.append(p)
    ref = outputs(np.zeros(n_queries, int))
    ref["embedding"] = emb.astype(np.float32)
    return ref, bank, order


def swap_ranks(emb: np.ndarray, order, query: int, a: int, b: int) -> None:
    p = order[query]
    emb[query, [p[a], p[b]]] = emb[query, [p[b], p[a]]]


# ---------------------------------------------------------------------------------------------- constants

def test_fp32_thresholds_hold_the_documented_bars():
    assert asdict(FP32_THRESHOLDS) == {"grade_agreement": 0.99, "qwk_change": 0.01, "referable_agreement": 0.99,
                                       "embedding_cosine": 0.999, "saliency_correlation": 0.99,
                                       "knn_overlap": 0.9, "max_size_ratio": None}
    assert FP32_THRESHOLDS == GateThresholds()


def test_int8_thresholds_hold_the_issue_acceptance_bars():
    assert asdict(INT8_THRESHOLDS) == {"grade_agreement": 0.98, "qwk_change": 0.01, "referable_agreement": 0.98,
                                       "embedding_cosine": 0.98, "saliency_correlation": 0.95,
                                       "knn_overlap": 0.7, "max_size_ratio": 0.35}


# ---------------------------------------------------------------------------------------------- Check

@pytest.mark.parametrize("higher_is_better", [True, False])
def test_a_check_exactly_at_its_threshold_passes_and_one_ulp_worse_fails(higher_is_better):
    t = 0.99
    worse = np.nextafter(t, -1.0 if higher_is_better else 2.0)
    assert Check("x", t, t, higher_is_better).passed
    assert not Check("x", float(worse), t, higher_is_better).passed


def test_check_requirement_and_failure_text():
    assert Check("grade_agreement", 0.985, 0.99).requirement == "≥ 0.99"
    assert Check("qwk_change", 0.04, 0.01, False).requirement == "≤ 0.01"
    assert Check("qwk_change", 0.0392157, 0.01, False).failure() == "qwk_change = 0.03922 (needs ≤ 0.01)"


def test_a_nan_value_fails_either_way():
    """A NaN from a broken artifact must never read as passing (NaN compares False with >= and <=)."""
    assert not Check("embedding_cosine", float("nan"), 0.999).passed
    assert not Check("qwk_change", float("nan"), 0.01, False).passed


# ---------------------------------------------------------------------------------------------- compare

def test_identical_outputs_pass_every_check_with_perfect_values():
    ref = outputs(uniform_grades())
    checks = compare(ref, copy(ref), GRADING, FP32_THRESHOLDS)
    assert [c.name for c in checks] == ALL_CHECKS        # no bank: no knn check
    assert {c.name: c.value for c in checks} == pytest.approx(
        {"grade_agreement": 1.0, "qwk_change": 0.0, "referable_agreement": 1.0, "embedding_cosine": 1.0,
         "saliency_correlation": 1.0}, abs=1e-6)
    assert failed(checks) == []


def test_grade_agreement_trips_alone_at_three_flips_in_200_and_passes_at_two():
    """0 -> 1 flips stay non-referable; their QWK cost (1 - kappa ~ 0.004) is well under 0.01."""
    ref = outputs(uniform_grades())
    cand = copy(ref)
    zeros = np.flatnonzero(uniform_grades() == 0)
    cand["ordinal_logits"][zeros[:3]] = logits_for([1, 1, 1])
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS)
    assert failed(checks) == ["grade_agreement"]
    assert by_name(checks)["grade_agreement"].value == 197 / 200
    assert by_name(checks)["referable_agreement"].value == 1.0

    cand["ordinal_logits"][zeros[2]] = logits_for([0])[0]          # back to two flips: exactly 0.99
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS)
    assert by_name(checks)["grade_agreement"].value == 0.99
    assert failed(checks) == []


def test_referable_agreement_trips_alone_when_flips_cross_the_referable_grade():
    """Referable agreement can never be below grade agreement, so the grade bar is lowered to 0.98 to
    show the referable check failing by itself: three 1 -> 2 flips in 200 (0.985 < 0.99)."""
    thresholds = replace(FP32_THRESHOLDS, grade_agreement=0.98)
    ref = outputs(uniform_grades())
    cand = copy(ref)
    ones = np.flatnonzero(uniform_grades() == 1)
    cand["ordinal_logits"][ones[:3]] = logits_for([2, 2, 2])
    checks = compare(ref, cand, GRADING, thresholds)
    assert failed(checks) == ["referable_agreement"]
    assert by_name(checks)["referable_agreement"].value == 197 / 200

    cand["ordinal_logits"][ones[2]] = logits_for([1])[0]           # two crossings: exactly 0.99 passes
    checks = compare(ref, cand, GRADING, thresholds)
    assert by_name(checks)["referable_agreement"].value == 0.99
    assert failed(checks) == []


def test_referable_agreement_uses_the_gradings_referable_min_grade():
    """A 2 -> 3 flip crosses the referable line only when referable_min_grade is 3."""
    thresholds = replace(FP32_THRESHOLDS, grade_agreement=0.9)
    ref = outputs(uniform_grades())
    cand = copy(ref)
    twos = np.flatnonzero(uniform_grades() == 2)
    cand["ordinal_logits"][twos[:3]] = logits_for([3, 3, 3])
    assert by_name(compare(ref, cand, GRADING, thresholds))["referable_agreement"].value == 1.0
    min3 = GradingConfig(referable_min_grade=3)
    checks = compare(ref, cand, min3, thresholds)
    assert by_name(checks)["referable_agreement"].value == 197 / 200
    assert failed(checks) == ["referable_agreement"]


def test_grades_come_from_the_gradings_ordinal_thresholds():
    """Logits 0.3 vs 0.6: the same grade (4) at thresholds 0, grades 0 vs 4 at thresholds 0.5; logits 0.3
    vs 0.4 are both grade 0 at thresholds 0.5 (for reference and candidate alike)."""
    ref = outputs(uniform_grades(10))
    cand = copy(ref)
    ref["ordinal_logits"][:] = 0.3
    cand["ordinal_logits"][:] = 0.6
    loose = replace(FP32_THRESHOLDS, qwk_change=1.0)
    assert by_name(compare(ref, cand, GRADING, loose))["grade_agreement"].value == 1.0
    shifted = GradingConfig(thresholds=(0.5, 0.5, 0.5, 0.5))
    assert by_name(compare(ref, cand, shifted, loose))["grade_agreement"].value == 0.0
    cand["ordinal_logits"][:] = 0.4
    assert by_name(compare(ref, cand, shifted, loose))["grade_agreement"].value == 1.0


def test_qwk_change_trips_alone_on_one_far_flip_in_a_narrow_grade_spread():
    """100 grade-2 and 100 grade-3 images, one 2 -> 4 flip: grade agreement 0.995, all still referable;
    1 - kappa = observed 4/16 over expected (50 + 0.5*4 + 49.5 + 0.5)/16 = 0.25 / 6.375 = 2/51 = 0.0392."""
    grades = np.repeat([2, 3], 100)
    ref = outputs(grades)
    cand = copy(ref)
    cand["ordinal_logits"][0] = logits_for([4])[0]
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS)
    assert failed(checks) == ["qwk_change"]
    assert by_name(checks)["qwk_change"].value == pytest.approx(2 / 51, rel=1e-12)
    assert by_name(checks)["grade_agreement"].value == 0.995


def test_qwk_change_against_truth_is_the_change_of_kappa_not_the_disagreement():
    """With truth, two errors swapped between two images of the same true grade leave the confusion
    matrix, hence QWK against truth, unchanged: qwk_change 0 although the grades differ (without truth
    the proxy 1 - kappa(torch, candidate) is > 0)."""
    truth = uniform_grades()
    ones = np.flatnonzero(truth == 1)
    ref_grades, cand_grades = truth.copy(), truth.copy()
    ref_grades[ones[0]] = 2                                  # torch wrong on image a
    cand_grades[ones[1]] = 2                                 # candidate wrong on image b instead
    ref, cand = outputs(ref_grades), outputs(ref_grades)
    cand["ordinal_logits"] = logits_for(cand_grades)
    thresholds = replace(FP32_THRESHOLDS, qwk_change=0.0)
    with_truth = by_name(compare(ref, cand, GRADING, thresholds, truth=truth))
    assert with_truth["qwk_change"].value == 0.0 and with_truth["qwk_change"].passed
    without = by_name(compare(ref, cand, GRADING, thresholds))
    assert without["qwk_change"].value > 0.0 and not without["qwk_change"].passed


def test_qwk_change_against_truth_trips_when_the_candidate_gets_worse():
    """torch == truth; the candidate misgrades one of 100/100 grade-2/3 images as 4: the change is
    1 - kappa(truth, candidate) = 2/51 (same numbers as the proxy case above)."""
    truth = np.repeat([2, 3], 100)
    ref = outputs(truth)
    cand = copy(ref)
    cand["ordinal_logits"][0] = logits_for([4])[0]
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS, truth=truth)
    assert failed(checks) == ["qwk_change"]
    assert by_name(checks)["qwk_change"].value == pytest.approx(2 / 51, rel=1e-12)


def test_embedding_cosine_is_the_minimum_over_images_and_trips_alone():
    """One of 200 embeddings turned to cosine 0.998 (bar 0.999); all others identical."""
    ref = outputs(uniform_grades())
    cand = copy(ref)
    e = ref["embedding"][7].astype(np.float64)
    ortho = np.zeros_like(e)
    ortho[np.argmin(np.abs(e))] = 1.0
    ortho -= (ortho @ e) * e
    ortho /= np.linalg.norm(ortho)
    cand["embedding"][7] = 0.998 * e + np.sqrt(1 - 0.998 ** 2) * ortho
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS)
    assert failed(checks) == ["embedding_cosine"]
    assert by_name(checks)["embedding_cosine"].value == pytest.approx(0.998, abs=1e-6)


def test_embedding_cosine_ignores_the_norm_of_the_rows():
    ref = outputs(uniform_grades(10))
    cand = copy(ref)
    ref["embedding"] *= 2.0
    cand["embedding"] *= 3.0
    assert by_name(compare(ref, cand, GRADING, FP32_THRESHOLDS))["embedding_cosine"].value == pytest.approx(1.0, abs=1e-6)


def test_saliency_correlation_is_the_mean_pearson_and_trips_alone_at_0_985():
    ref = outputs(uniform_grades())
    cand = copy(ref)
    rng = np.random.default_rng(3)
    cand["saliency"] = np.stack([correlated(m, 0.985, rng) for m in ref["saliency"]]).astype(np.float32)
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS)
    assert failed(checks) == ["saliency_correlation"]
    assert by_name(checks)["saliency_correlation"].value == pytest.approx(0.985, abs=1e-6)

    cand["saliency"] = np.stack([correlated(m, 0.995, rng) for m in ref["saliency"]]).astype(np.float32)
    assert failed(compare(ref, cand, GRADING, FP32_THRESHOLDS)) == []


def test_a_flat_saliency_map_is_compared_by_value_not_by_a_nan_correlation():
    """Pearson is undefined for a flat map; the gate compares such maps directly (atol 1e-3): equal -> 1,
    different -> 0. One mismatched flat map in 50 gives 49/50 = 0.98 < 0.99."""
    ref = outputs(np.zeros(50, int))
    ref["saliency"][0] = 0.25
    cand = copy(ref)
    assert by_name(compare(ref, cand, GRADING, FP32_THRESHOLDS))["saliency_correlation"].value == 1.0

    cand["saliency"][0] = 0.2505                                    # within 1e-3: still the same map
    assert by_name(compare(ref, cand, GRADING, FP32_THRESHOLDS))["saliency_correlation"].value == 1.0

    cand["saliency"][0] = 0.30
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS)
    assert failed(checks) == ["saliency_correlation"]
    assert by_name(checks)["saliency_correlation"].value == 49 / 50


def test_a_dead_flat_candidate_saliency_scores_zero():
    """An artifact whose saliency output is all zeros against textured torch maps."""
    ref = outputs(np.zeros(8, int))
    cand = copy(ref)
    cand["saliency"][:] = 0.0
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS)
    assert by_name(checks)["saliency_correlation"].value == 0.0
    assert failed(checks) == ["saliency_correlation"]


def test_knn_overlap_passes_at_exactly_0_9_and_trips_alone_below():
    """Four queries, k=10: swapping ranks 10 and 11 (gap 0.005, 5x the tie tolerance) costs each query one
    neighbour -> 0.9 passes; one query losing a second one -> (0.8 + 3 * 0.9) / 4 = 0.875 fails."""
    ref, bank, order = knn_case()
    cand = copy(ref)
    for q in range(4):
        swap_ranks(cand["embedding"], order, q, 9, 10)
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS, bank=bank)
    assert [c.name for c in checks] == ALL_CHECKS + ["knn_overlap"]
    assert by_name(checks)["knn_overlap"].value == 0.9
    assert failed(checks) == []

    swap_ranks(cand["embedding"], order, 0, 8, 11)
    checks = compare(ref, cand, GRADING, FP32_THRESHOLDS, bank=bank)
    assert by_name(checks)["knn_overlap"].value == pytest.approx(0.875, abs=1e-12)
    assert failed(checks) == ["knn_overlap"]


def test_knn_overlap_uses_the_k_it_is_given():
    """The same swap of ranks 10 and 11 is invisible at k=5."""
    ref, bank, order = knn_case()
    cand = copy(ref)
    for q in range(4):
        swap_ranks(cand["embedding"], order, q, 9, 10)
    assert by_name(compare(ref, cand, GRADING, FP32_THRESHOLDS, bank=bank, k=5))["knn_overlap"].value == 1.0


def test_no_knn_check_without_a_bank_of_at_least_two_rows():
    ref, bank, _ = knn_case()
    assert "knn_overlap" not in by_name(compare(ref, copy(ref), GRADING, FP32_THRESHOLDS, bank=None))
    assert "knn_overlap" not in by_name(compare(ref, copy(ref), GRADING, FP32_THRESHOLDS, bank=bank[:1]))
    assert "knn_overlap" in by_name(compare(ref, copy(ref), GRADING, FP32_THRESHOLDS, bank=bank[:2]))


def test_knn_overlap_function_counts_the_candidates_top_k_kept_by_the_reference():
    ref = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    cand = np.array([[0.9, 0.8, 0.1, 0.6, 0.95]])               # row 2 out, row 4 in
    assert knn_overlap(ref, cand, k=3) == 2 / 3
    assert knn_overlap(ref, ref, k=3) == 1.0


@pytest.mark.parametrize("name", ALL_CHECKS + ["knn_overlap"])
def test_every_check_passes_with_its_threshold_set_to_its_own_value(name):
    """>= / <= semantics through compare: a bar equal to the measured value passes, one ulp stricter fails."""
    ref, bank, order = knn_case(8)
    ref["ordinal_logits"] = logits_for(np.arange(8) % 5)
    cand = copy(ref)
    cand["ordinal_logits"][1] = logits_for([2])[0]              # grade 1 -> 2: grade, referable, qwk move
    swap_ranks(cand["embedding"], order, 0, 9, 10)              # embedding and knn move
    cand["saliency"][2] = correlated(ref["saliency"][2], 0.5, np.random.default_rng(0))
    value = by_name(compare(ref, cand, GRADING, FP32_THRESHOLDS, bank=bank))[name].value
    higher = name != "qwk_change"
    assert value != (1.0 if higher else 0.0)                    # the case really moved this check
    at = by_name(compare(ref, cand, GRADING, replace(FP32_THRESHOLDS, **{name: value}), bank=bank))[name]
    assert at.passed
    stricter = float(np.nextafter(value, 2.0 if higher else -1.0))
    beyond = by_name(compare(ref, cand, GRADING, replace(FP32_THRESHOLDS, **{name: stricter}), bank=bank))[name]
    assert not beyond.passed


# ---------------------------------------------------------------------------------------------- checks_table

def test_checks_table_has_one_line_per_check_with_mark_value_and_requirement():
    checks = [Check("grade_agreement", 0.985, 0.99), Check("qwk_change", 0.00375, 0.01, False),
              Check("size_ratio", 0.36, 0.35, False)]
    assert checks_table(checks) == ["✗ grade_agreement  0.98500  (needs ≥ 0.99)",
                                    "✓ qwk_change       0.00375  (needs ≤ 0.01)",
                                    "✗ size_ratio       0.36000  (needs ≤ 0.35)"]


def test_checks_table_of_a_real_comparison_marks_only_the_failing_check():
    ref = outputs(np.repeat([2, 3], 100))
    cand = copy(ref)
    cand["ordinal_logits"][0] = logits_for([4])[0]
    lines = checks_table(compare(ref, cand, GRADING, FP32_THRESHOLDS))
    assert len(lines) == 5
    assert [line.split()[:2] for line in lines] == [["✓", "grade_agreement"], ["✗", "qwk_change"],
                                                    ["✓", "referable_agreement"], ["✓", "embedding_cosine"],
                                                    ["✓", "saliency_correlation"]]
    assert lines[1].split()[2:] == ["0.03922", "(needs", "≤", "0.01)"]


# ---------------------------------------------------------------------------------------------- run_gate

def make_ctx(tmp_path: Path, reference, gate: str = "fail", bank=None, truth=None, fp32_bytes=None):
    logs: list[str] = []
    ctx = ExportContext(config=ExportConfig(checkpoint=tmp_path / "c.pt", out=tmp_path / "out", gate=gate),
                        staging=tmp_path / "staging", work=tmp_path / "work",
                        checkpoint=SimpleNamespace(grading=GRADING,
                                                   bank=None if bank is None else SimpleNamespace(embeddings=bank)),
                        reference_inputs=np.zeros((len(reference["embedding"]), 3, 4, 4), np.float32),
                        reference_outputs=reference, reference_truth=truth, log=logs.append)
    if fp32_bytes is not None:
        ctx.export_info["fp32_onnx_bytes"] = fp32_bytes
    return ctx, logs


def test_size_ratio_trips_alone_above_the_int8_bar_and_passes_exactly_at_it(tmp_path):
    ref = outputs(uniform_grades())
    ctx, _ = make_ctx(tmp_path, ref, fp32_bytes=100_000)
    with pytest.raises(GateError) as info:
        run_gate(ctx, copy(ref), INT8_THRESHOLDS, "onnx-int8", model_bytes=36_000)
    assert info.value.failures == ["onnx-int8: size_ratio = 0.36000 (needs ≤ 0.35)"]
    assert ctx.export_info["size_ratio"] == 0.36
    assert ctx.gate["onnx-int8"]["checks"]["size_ratio"] == {"value": 0.36, "threshold": 0.35, "passed": False}

    run_gate(ctx, copy(ref), INT8_THRESHOLDS, "onnx-int8", model_bytes=35_000)      # 0.35 exactly: passes
    assert ctx.gate["onnx-int8"]["passed"] is True
    assert ctx.gate["onnx-int8"]["checks"]["size_ratio"]["passed"] is True
    assert ctx.export_info["size_ratio"] == 0.35


def test_size_ratio_uses_the_fp32_onnx_bytes_from_export_info(tmp_path):
    ref = outputs(uniform_grades(10))
    ctx, _ = make_ctx(tmp_path, ref, fp32_bytes=1_000)
    run_gate(ctx, copy(ref), INT8_THRESHOLDS, "onnx-int8", model_bytes=250)
    assert ctx.gate["onnx-int8"]["checks"]["size_ratio"]["value"] == 0.25
    assert ctx.export_info["size_ratio"] == 0.25


@pytest.mark.parametrize("thresholds, model_bytes, fp32_bytes", [
    (FP32_THRESHOLDS, 10_000, 100),          # no size bar for FP32 targets
    (INT8_THRESHOLDS, None, 100),            # the step did not report its model size
    (INT8_THRESHOLDS, 10_000, None),         # no FP32 graph measured
])
def test_no_size_check_unless_bar_model_bytes_and_fp32_bytes_are_all_known(tmp_path, thresholds, model_bytes,
                                                                            fp32_bytes):
    ref = outputs(uniform_grades(10))
    ctx, _ = make_ctx(tmp_path, ref, fp32_bytes=fp32_bytes)
    run_gate(ctx, copy(ref), thresholds, "t", model_bytes=model_bytes)
    assert "size_ratio" not in ctx.gate["t"]["checks"]
    assert "size_ratio" not in ctx.export_info
    assert ctx.gate["t"]["passed"] is True


def test_gate_fail_raises_one_error_naming_every_failing_check_once_and_only_those(tmp_path):
    """Grade flips (0 -> 1, qwk and referable stay in), one bent embedding, one dead flat saliency map of
    50, and a 0.5 size ratio: four failures, one GateError, each named once, none of the passing checks."""
    grades = np.arange(50) % 5
    ref = outputs(grades)
    cand = copy(ref)
    cand["ordinal_logits"][0] = logits_for([1])[0]              # 49/50 = 0.98 < 0.99
    cand["embedding"][3] = unit_rows(1, 16, seed=99)[0]         # random direction: cosine far below 0.999
    cand["saliency"][4] = 0.0                                   # flat vs textured -> 0: mean 0.98 < 0.99
    thresholds = replace(FP32_THRESHOLDS, max_size_ratio=0.35)
    ctx, logs = make_ctx(tmp_path, ref, fp32_bytes=1000)
    with pytest.raises(GateError) as info:
        run_gate(ctx, cand, thresholds, "onnx-int8", model_bytes=500)
    names = [f.split(": ", 1)[1].split(" = ")[0] for f in info.value.failures]
    assert names == ["grade_agreement", "embedding_cosine", "saliency_correlation", "size_ratio"]
    assert all(f.startswith("onnx-int8: ") for f in info.value.failures)
    assert "onnx-int8: grade_agreement = 0.98000 (needs ≥ 0.99)" in info.value.failures
    assert str(info.value).startswith("export gate failed: onnx-int8: grade_agreement")
    record = ctx.gate["onnx-int8"]                               # recorded before raising
    assert record["passed"] is False and record["mode"] == "fail" and record["images"] == 50
    assert {n for n, c in record["checks"].items() if not c["passed"]} == set(names)
    assert record["checks"]["qwk_change"]["passed"] and record["checks"]["referable_agreement"]["passed"]
    assert not any("continuing" in line for line in logs)


def test_gate_fail_with_a_bank_and_truth_reads_them_from_the_context(tmp_path):
    """run_gate takes the bank from ctx.checkpoint.bank.embeddings and truth from ctx.reference_truth."""
    ref, bank, order = knn_case()
    cand = copy(ref)
    for q in range(4):
        swap_ranks(cand["embedding"], order, q, 9, 10)
    swap_ranks(cand["embedding"], order, 0, 8, 11)              # knn 0.875 < 0.9
    ctx, _ = make_ctx(tmp_path, ref, bank=bank, truth=np.zeros(4, int))
    with pytest.raises(GateError) as info:
        run_gate(ctx, cand, FP32_THRESHOLDS, "onnx-fp32")
    assert info.value.failures == ["onnx-fp32: knn_overlap = 0.87500 (needs ≥ 0.9)"]
    assert list(ctx.gate["onnx-fp32"]["checks"]) == ALL_CHECKS + ["knn_overlap"]


def test_run_gate_measures_qwk_change_against_the_contexts_reference_truth(tmp_path):
    """100 grade-2 and 100 grade-3 images; torch and candidate each misgrade a different true-2 image as 4.
    Against truth both have the same confusion matrix (qwk_change 0, gate passes); without truth the proxy
    1 - kappa(torch, candidate) sees two disagreements 2 apart and fails."""
    truth = np.repeat([2, 3], 100)
    ref_grades, cand_grades = truth.copy(), truth.copy()
    ref_grades[0], cand_grades[1] = 4, 4
    ref, cand = outputs(ref_grades), outputs(ref_grades)
    cand["ordinal_logits"] = logits_for(cand_grades)
    ctx, _ = make_ctx(tmp_path, ref, truth=truth)
    run_gate(ctx, cand, FP32_THRESHOLDS, "onnx-fp32")
    assert ctx.gate["onnx-fp32"]["checks"]["qwk_change"] == {"value": 0.0, "threshold": 0.01, "passed": True}
    assert ctx.gate["onnx-fp32"]["passed"] is True
    ctx, _ = make_ctx(tmp_path, ref, truth=None)
    with pytest.raises(GateError) as info:
        run_gate(ctx, cand, FP32_THRESHOLDS, "onnx-fp32")
    assert [f.split(" = ")[0] for f in info.value.failures] == ["onnx-fp32: qwk_change"]


def test_gate_fail_passing_raises_nothing_and_records_everything(tmp_path):
    ref = outputs(uniform_grades())
    ctx, logs = make_ctx(tmp_path, ref)
    cand = copy(ref)
    run_gate(ctx, cand, FP32_THRESHOLDS, "onnx-fp32")
    record = ctx.gate["onnx-fp32"]
    assert record["passed"] is True and record["mode"] == "fail" and record["images"] == 200
    assert list(record["checks"]) == ALL_CHECKS
    assert record["checks"]["grade_agreement"] == {"value": 1.0, "threshold": 0.99, "passed": True}
    assert logs[0] == "gate for onnx-fp32 on 200 images:"
    assert len(logs) == 1 + len(ALL_CHECKS) and all(line.startswith("  ✓ ") for line in logs[1:])
    assert ctx.last_gate == GateRun("onnx-fp32", FP32_THRESHOLDS, cand)


def test_gate_warn_records_the_failure_logs_it_and_does_not_raise(tmp_path):
    ref = outputs(uniform_grades())
    cand = copy(ref)
    zeros = np.flatnonzero(uniform_grades() == 0)
    cand["ordinal_logits"][zeros[:3]] = logits_for([1, 1, 1])  # grade_agreement 0.985
    ctx, logs = make_ctx(tmp_path, ref, gate="warn")
    run_gate(ctx, cand, FP32_THRESHOLDS, "onnx-fp32")          # no raise
    record = ctx.gate["onnx-fp32"]
    assert record["passed"] is False and record["mode"] == "warn"
    assert record["checks"]["grade_agreement"] == {"value": 0.985, "threshold": 0.99, "passed": False}
    assert "  ✗ grade_agreement       0.98500  (needs ≥ 0.99)" in logs
    assert logs[-1] == "gate failed for onnx-fp32, continuing because --gate warn"
    assert ctx.last_gate.label == "onnx-fp32" and ctx.last_gate.outputs is cand


def test_gate_off_skips_the_comparison_records_mode_off_and_never_raises(tmp_path):
    """--gate off compares nothing (a candidate missing every output still goes through), records
    {"mode": "off", "passed": None}, logs one line, and still keeps the run for `verify`."""
    ref = outputs(uniform_grades(10))
    ctx, logs = make_ctx(tmp_path, ref, gate="off", fp32_bytes=100)
    garbage: dict[str, np.ndarray] = {}
    run_gate(ctx, garbage, INT8_THRESHOLDS, "onnx-int8", model_bytes=10_000)
    assert ctx.gate == {"onnx-int8": {"mode": "off", "passed": None}}
    assert logs == ["gate for onnx-int8 skipped (--gate off)"]
    assert "size_ratio" not in ctx.export_info
    assert ctx.last_gate == GateRun("onnx-int8", INT8_THRESHOLDS, garbage)
