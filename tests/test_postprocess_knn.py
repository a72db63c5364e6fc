import numpy as np
import pytest

from edgeretina.grades import GradingConfig
from edgeretina.runtime.knn import FeatureBank
from edgeretina.runtime.postprocess import class_probabilities, cumulative_probabilities, grade_results


def test_coral_rule_counts_logits_above_thresholds():
    logits = np.array([[-3.0, -3, -3, -3], [3, -3, -3, -3], [3, 3, 3, -3], [3, 3, 3, 3]])
    results = grade_results(logits, GradingConfig())
    assert [r.grade for r in results] == [0, 1, 3, 4]
    assert [r.referable for r in results] == [False, False, True, True]
    for r in results:
        assert sum(r.probabilities) == pytest.approx(1.0, abs=1e-6)
        assert all(p >= 0 for p in r.probabilities)
        assert int(np.argmax(r.probabilities)) == r.grade


def test_thresholds_and_temperature_come_from_the_config():
    logits = np.array([[0.5, 0.5, -2.0, -2.0]])
    assert grade_results(logits, GradingConfig())[0].grade == 2
    shifted = GradingConfig(thresholds=(0.0, 1.0, 0.0, 0.0))
    assert grade_results(logits, shifted)[0].grade == 1
    soft = cumulative_probabilities(logits, GradingConfig(temperature=4.0))
    sharp = cumulative_probabilities(logits, GradingConfig(temperature=0.5))
    assert soft[0, 0] < sharp[0, 0]
    assert grade_results(logits, GradingConfig(referable_threshold=0.9))[0].referable is False


def test_class_probabilities_repair_non_monotone_cumulatives():
    probs = class_probabilities(np.array([[0.4, 0.7, 0.2, 0.1]]))
    assert probs.min() >= 0 and probs.sum() == pytest.approx(1.0)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_returns_true_top_k_sorted(tmp_path):
    rng = np.random.default_rng(0)
    emb = _unit(rng.normal(size=(500, 16)).astype(np.float32))
    grades = rng.integers(0, 5, 500)
    ids = np.array([f"case{i}" for i in range(500)])
    np.savez(tmp_path / "bank.npz", embeddings=emb.astype(np.float16), grades=grades.astype(np.int8), case_ids=ids)
    bank = FeatureBank.load(tmp_path / "bank.npz")
    query = emb[[7, 42]]
    result = bank.search(query, k=5)
    for q, row, own in zip(query, result, (7, 42)):
        brute = np.argsort(-(bank.embeddings @ q))[:5]
        assert [n.case_id for n in row] == [f"case{i}" for i in brute]
        assert row[0].case_id == f"case{own}"
        sims = [n.similarity for n in row]
        assert sims == sorted(sims, reverse=True)
    assert bank.vote(result[0]) in range(5)


def test_knn_with_k_larger_than_bank(tmp_path):
    bank = FeatureBank(np.eye(3, dtype=np.float32), np.array([0, 1, 2]), np.array(["a", "b", "c"]))
    result = bank.search(np.eye(3, dtype=np.float32)[:1], k=10)
    assert result[0][0].case_id == "a"            # b and c tie at similarity 0
    assert sorted(n.case_id for n in result[0]) == ["a", "b", "c"]


def test_backend_failures_become_backend_errors(onnx_bundle):
    from edgeretina.errors import BackendError
    from edgeretina.runtime.backends import create_runner

    runner = create_runner("onnxruntime", onnx_bundle / "model.onnx")
    with pytest.raises(BackendError, match="onnxruntime failed to run model.onnx"):
        runner.run(np.zeros((1, 3, 17, 17), np.float32))      # wrong spatial size for the graph
    with pytest.raises(BackendError, match="expected float32"):
        runner.run(np.zeros((1, 3, 64, 64), np.float64))
