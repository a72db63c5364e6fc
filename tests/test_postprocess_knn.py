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
    """P(grade > 1) = 0.7 above P(grade > 0) = 0.4 is impossible: the curve is capped at 0.4, so grade 1
    gets probability 0 instead of a negative one."""
    probs = class_probabilities(np.array([[0.4, 0.7, 0.2, 0.1]]))
    np.testing.assert_allclose(probs, [[0.6, 0.0, 0.2, 0.1, 0.1]], atol=1e-12)


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


def test_int8_bank_is_small_on_disk_and_loads_as_written(tmp_path):
    from edgeretina.bank_storage import dequantized, stored_embeddings

    rng = np.random.default_rng(1)
    emb = _unit(rng.normal(size=(16_000, 512)).astype(np.float32))
    stored = stored_embeddings(emb, "int8")
    assert stored["embeddings"].dtype == np.int8 and stored["scales"].shape == (16_000,)
    ids = np.array([f"case-{i:06d}".encode() for i in range(16_000)], dtype=np.bytes_)
    np.savez(tmp_path / "bank.npz", **stored, grades=rng.integers(0, 5, 16_000).astype(np.int8), case_ids=ids)
    assert (tmp_path / "bank.npz").stat().st_size <= 9_000_000            # the bar for 16,000 x 512
    bank = FeatureBank.load(tmp_path / "bank.npz", threads=1)
    np.testing.assert_array_equal(bank.embeddings, dequantized(stored))
    assert bank.case_ids[5] == "case-000005"                             # bytes ids come back as str
    # INT8 rounding moves a unit vector's similarities by ~1e-3 at most
    assert np.abs(dequantized(stored) @ emb[0] - emb @ emb[0]).max() < 5e-3


def _assert_same_search(bank, reference, queries, k):
    for got, want in zip(bank.search(queries, k), reference.search(queries, k)):
        assert [n.case_id for n in got] == [n.case_id for n in want]
        np.testing.assert_allclose([n.similarity for n in got], [n.similarity for n in want], atol=1e-5)


def _banks(rows, dtype, rng):
    """The prefilter-scored bank and its exhaustive numpy twin over the same stored rows."""
    from edgeretina.bank_storage import stored_embeddings

    stored = stored_embeddings(rows, dtype)
    grades, ids = rng.integers(0, 5, len(rows)), np.array([f"c{i}" for i in range(len(rows))])
    args = (stored["embeddings"], grades, ids, stored.get("scales"), stored.get("offset"))
    return FeatureBank(*args, threads=1), FeatureBank(*args, threads=1, scorer="numpy")


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_int8_prefilter_finds_the_same_neighbours_as_the_exhaustive_search(dtype):
    from edgeretina.runtime.knn import NumpyScorer

    rng = np.random.default_rng(2)
    bank, reference = _banks(_unit(rng.normal(size=(3_000, 64)).astype(np.float32)), dtype, rng)
    assert bank.scorer.name == "onnxruntime-int8-prefilter" and isinstance(reference.scorer, NumpyScorer)
    queries = _unit(rng.normal(size=(20, 64)).astype(np.float32))
    near_rows = _unit(bank.embeddings[:20] + 0.05 * rng.normal(size=(20, 64)).astype(np.float32))
    for k in (1, 10, 64):
        _assert_same_search(bank, reference, queries, k)       # a batch of 20 in one call
        _assert_same_search(bank, reference, near_rows, k)
    np.testing.assert_allclose(bank.embeddings, reference.embeddings, atol=1e-6)


def _assert_exact_top_k(neighbours, reference, query, k):
    """Every neighbour is among the true top k (ties within float32 rounding count) with its true similarity."""
    exact = reference.embeddings @ query
    kth = np.sort(exact)[::-1][k - 1]
    for n in neighbours:
        row = int(n.case_id[1:])
        assert abs(exact[row] - n.similarity) < 1e-6 and exact[row] >= kth - 1e-6, (n, kth)


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_int8_prefilter_stays_exact_on_a_bank_of_near_identical_rows(dtype):
    """Two tight clusters. Stored as float16, the int8 prefilter codes (scaled to the clusters' distance)
    cannot tell a cluster's rows apart: the storage residual dwarfs the gaps, the bound certifies nothing
    and every query is scored exhaustively, with the exact answer (with the margin set to zero, all 20
    queries got rows outside the true top 10). Stored as int8, the codes are the rows themselves and the
    two-part query leaves a margin of ~1e-4: the first 64 candidates are certified."""
    rng = np.random.default_rng(7)
    centres = _unit(rng.normal(size=(2, 96)).astype(np.float32))
    rows = _unit(centres[np.arange(4_000) % 2] + 1e-3 * rng.normal(size=(4_000, 96)).astype(np.float32))
    bank, reference = _banks(rows, dtype, rng)
    queries = _unit(rows[:20] + 1e-3 * rng.normal(size=(20, 96)).astype(np.float32))
    for query in queries:                                        # one at a time, as the grader asks
        _assert_exact_top_k(bank.search(query[None], 10)[0], reference, query, 10)
    assert bank.scorer.fallbacks == (len(queries) if dtype == "float16" else 0)


def test_int8_prefilter_scores_are_exact_integers_at_the_extremes():
    """The largest products the 7-bit query and the int8 codes can form. On x86 without VNNI (this suite
    runs on AVX2 machines too) u8 x s8 pairs are summed in saturating int16: a query stored in all 8 bits
    (255 next to 255 against 127, 127) would clip, and these scores would come out wrong."""
    dim = 64
    alternating = np.where(np.arange(dim) % 2 == 0, 127, -128)
    codes = np.stack([np.full(dim, 127), np.full(dim, -128), alternating, -alternating.clip(-127)]).astype(np.int8)
    bank = FeatureBank(codes, np.zeros(4), np.array(["a", "b", "c", "d"]), scales=np.ones(4), offset=np.zeros(dim))
    for query in (np.ones((1, dim), np.float32), -np.ones((1, dim), np.float32)):   # codes +-63 -> uint8 127 / 1
        approx = bank.scorer.session.run(None, {"query": query, "k": np.array([4], np.int64)})[0]
        expected = codes.astype(np.int64) @ (np.sign(query[0]).astype(np.int64) * 63) / 63.0
        np.testing.assert_allclose(approx[0], expected, rtol=1e-6, atol=1e-3)   # saturation is off by thousands
    assert bank.search(np.ones((1, dim), np.float32), 1)[0][0].case_id == "a"


def test_int8_prefilter_handles_banks_smaller_than_its_candidate_count():
    rng = np.random.default_rng(6)
    bank, reference = _banks(_unit(rng.normal(size=(40, 16)).astype(np.float32)), "int8", rng)
    queries = _unit(rng.normal(size=(3, 16)).astype(np.float32))
    for k in (1, 39, 40, 100):
        _assert_same_search(bank, reference, queries, k)
    assert len(bank.search(queries, 100)[0]) == 40


def test_unknown_knn_scorer_is_refused():
    from edgeretina.errors import BundleError

    with pytest.raises(BundleError, match="KNN scorer must be one of auto, numpy"):
        FeatureBank(np.eye(3, dtype=np.float32), np.zeros(3), np.array(["a", "b", "c"]), scorer="faiss")


def test_int8_bank_with_float_codes_or_a_missing_offset_is_refused():
    from edgeretina.errors import BundleError

    ids = np.array(["a", "b", "c"])
    with pytest.raises(BundleError, match="int8 codes"):
        FeatureBank(np.zeros((3, 4), np.float32), np.zeros(3), ids, scales=np.ones(3), offset=np.zeros(4))
    with pytest.raises(BundleError, match="differ in length"):
        FeatureBank(np.zeros((3, 4), np.int8), np.zeros(3), ids, scales=np.ones(2), offset=np.zeros(4))
    with pytest.raises(BundleError, match="offset of length 4"):
        FeatureBank(np.zeros((3, 4), np.int8), np.zeros(3), ids, scales=np.ones(3))


def test_int8_storage_keeps_the_neighbours_of_a_tightly_clustered_bank():
    """A barely trained model's bank: every row within ~0.003 cosine of the others. Plain per-row int8 kept
    ~0.3 of the top-10 neighbours of such a bank; with the mean removed first the rounding is relative to
    the spread, not to the rows."""
    from edgeretina.bank_storage import dequantized, stored_embeddings

    rng = np.random.default_rng(4)
    rows = _unit(np.ones(128, np.float32) + 0.08 * rng.normal(size=(2_000, 128)).astype(np.float32))
    assert (rows[:100] @ rows[:100].T).mean() > 0.99
    stored = dequantized(stored_embeddings(rows, "int8"))
    queries = rows[:200]
    exact, approx = (np.argsort(-(queries @ bank.T), axis=1)[:, 1:11] for bank in (rows, stored))
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert overlap >= 0.85, overlap


def test_int8_bank_is_scored_by_numpy_when_asked():
    from edgeretina.bank_storage import stored_embeddings
    from edgeretina.runtime.knn import NumpyScorer

    rng = np.random.default_rng(3)
    stored = stored_embeddings(_unit(rng.normal(size=(100, 8)).astype(np.float32)), "int8")
    bank = FeatureBank(stored["embeddings"], np.zeros(100), np.arange(100).astype(str), stored["scales"],
                       stored["offset"], scorer="numpy")
    assert isinstance(bank.scorer, NumpyScorer)
    assert bank.search(bank.embeddings[:1], 1)[0][0].case_id == "0"
