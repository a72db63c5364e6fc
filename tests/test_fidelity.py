"""The gate's KNN overlap is tie-aware: a neighbour tied with the k-th counts as kept, a real swap does not."""

import numpy as np

from edgeretina.fidelity import KNN_TIE_TOLERANCE, knn_overlap


def test_a_neighbour_tied_with_the_kth_counts_as_kept():
    # reference similarities: rows 0, 1 clearly first; rows 2 and 3 tie for the 3rd place (1e-5 apart)
    ref = np.array([[0.90, 0.80, 0.50001, 0.50000, 0.10]])
    candidate_picks_the_other_tie = np.array([[0.90, 0.80, 0.49990, 0.50010, 0.10]])
    assert knn_overlap(ref, candidate_picks_the_other_tie, k=3) == 1.0
    assert knn_overlap(ref, candidate_picks_the_other_tie, k=3, tolerance=0.0) == 2 / 3   # plain overlap


def test_a_real_swap_costs_the_neighbour():
    ref = np.array([[0.90, 0.80, 0.70, 0.50, 0.10]])
    far_row_promoted = np.array([[0.90, 0.80, 0.40, 0.50, 0.95]])    # row 4 (0.10 in the reference) enters
    assert knn_overlap(ref, far_row_promoted, k=3) == 2 / 3
    assert 0.70 - 0.50 > KNN_TIE_TOLERANCE                          # row 3 was no tie either


def test_overlap_is_averaged_over_queries_and_k_is_capped_by_the_bank():
    ref = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert knn_overlap(ref, ref, k=10) == 1.0
    swapped = np.array([[0.9, 0.1], [0.8, 0.2]])
    assert knn_overlap(ref, swapped, k=1) == 0.5


def _outputs(logits):
    logits = np.asarray(logits, np.float32)
    n = len(logits)
    return {"ordinal_logits": logits, "embedding": np.eye(n, 8, dtype=np.float32) + 1.0,
            "saliency": np.tile(np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4), (n, 1, 1)) + np.arange(n)[:, None, None]}


def test_a_coin_toss_flip_is_left_out_of_the_grade_checks_a_real_flip_is_not():
    from edgeretina.fidelity import COIN_TOSS_MARGIN, GateThresholds, compare
    from edgeretina.grades import GradingConfig

    base = [[1.0, 0.5, -0.5, -1.0], [1.0, 0.3, -0.4, -1.2], [2.0, 1.0, 0.6, -0.7], [0.9, 0.6, -0.3, -1.1]]
    grading = GradingConfig()
    thresholds = GateThresholds()

    def agreement(reference, candidate):
        checks = {c.name: c for c in compare(_outputs(reference), _outputs(candidate), grading, thresholds)}
        return checks["grade_agreement"].value, checks["referable_agreement"].value

    toss = [row[:] for row in base]
    toss[1][1] = COIN_TOSS_MARGIN / 2             # torch says just above the threshold ...
    flipped = [row[:] for row in toss]
    flipped[1][1] = -COIN_TOSS_MARGIN / 2         # ... the candidate just below: a coin toss
    assert agreement(toss, flipped) == (1.0, 1.0)
    real = [row[:] for row in base]
    real[2][2] = -0.6                             # 0.6 from the threshold, crossed: a real flip
    assert agreement(base, real) == (0.75, 1.0)    # grade 3 -> 2: still referable
    everything_close = [[0.001, -0.001, -0.005, -0.01]] * 4
    assert agreement(everything_close, [[-0.001, -0.001, -0.005, -0.01]] * 4) == (0.0, 1.0)   # nothing to leave out
