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
