"""Nearest training cases from the bundle's feature bank (cosine similarity on unit vectors).

The search itself (exact top-k, through an int8 prefilter where ONNX Runtime is installed) lives in
knn_scorers.py; this module loads bank.npz and turns the scores into neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeretina.errors import BundleError
from edgeretina.grades import NUM_GRADES
from edgeretina.runtime.knn_scorers import BankRows, Int8PrefilterScorer, NumpyScorer

SCORERS = ("auto", "numpy")


@dataclass(frozen=True)
class Neighbor:
    case_id: str
    grade: int
    similarity: float

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "grade": self.grade, "similarity": round(self.similarity, 5),
                "distance": round(1.0 - self.similarity, 5)}


class FeatureBank:
    def __init__(self, embeddings: np.ndarray, grades: np.ndarray, case_ids: np.ndarray,
                 scales: np.ndarray | None = None, offset: np.ndarray | None = None, threads: int | None = None,
                 scorer: str = "auto"):
        """embeddings: float [N, D], or int8 codes [N, D] with `scales` [N] and `offset` [D]
        (row = codes * scale + offset). scorer: "auto" (the int8 prefilter where ONNX Runtime is
        installed, else numpy) or "numpy" (exhaustive float32); both give the same neighbours."""
        if not (len(embeddings) == len(grades) == len(case_ids)) or (scales is not None and len(scales) != len(grades)):
            raise BundleError("feature bank arrays differ in length")
        self.grades = np.asarray(grades, dtype=np.int64)
        self.case_ids = np.asarray(case_ids)
        self._dim = int(np.shape(embeddings)[1])
        self.scorer = _make_scorer(embeddings, scales, offset, threads, scorer)

    @classmethod
    def load(cls, path: Path, threads: int | None = None, scorer: str = "auto") -> "FeatureBank":
        try:
            with np.load(path, allow_pickle=False) as data:
                case_ids = data["case_ids"]
                if case_ids.dtype.kind == "S":               # UTF-8 bytes (current writer)
                    case_ids = np.char.decode(case_ids, "utf-8")
                int8 = "scales" in data
                return cls(data["embeddings"], data["grades"], case_ids, data["scales"] if int8 else None,
                           data["offset"] if int8 else None, threads, scorer)
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read feature bank {Path(path).name}: {exc}") from None

    def __len__(self) -> int:
        return len(self.grades)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def embeddings(self) -> np.ndarray:
        """float32 [N, D] as searched (dequantized for an int8 bank)."""
        return self.scorer.dense()

    def search(self, queries: np.ndarray, k: int) -> list[list[Neighbor]]:
        """queries [B, D] (unit vectors) -> the k most similar bank cases per query, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise BundleError(f"query dimension {queries.shape} does not match the bank ({self.dim})")
        values, indices = self.scorer.top_k(queries, min(k, len(self)))
        return [[Neighbor(str(self.case_ids[i]), int(self.grades[i]), float(v)) for v, i in zip(row_v, row_i)]
                for row_v, row_i in zip(values, indices)]

    def vote(self, neighbors: list[Neighbor]) -> int:
        """Similarity-weighted majority grade of the neighbours (an optional second opinion)."""
        return int(np.argmax(vote_distribution(neighbors)))


def vote_distribution(neighbors: list[Neighbor], num_grades: int = NUM_GRADES) -> np.ndarray:
    """The neighbours' similarity-weighted share of each grade ([num_grades], sums to 1; uniform when
    no neighbour is similar at all): the KNN mode's grade probabilities."""
    weights = np.zeros(num_grades)
    for n in neighbors:
        weights[n.grade] += max(n.similarity, 0.0)
    total = weights.sum()
    return weights / total if total > 0 else np.full(num_grades, 1.0 / num_grades)


def _make_scorer(embeddings: np.ndarray, scales: np.ndarray | None, offset: np.ndarray | None,
                 threads: int | None, scorer: str):
    if scorer not in SCORERS:
        raise BundleError(f"KNN scorer must be one of {', '.join(SCORERS)}, not {scorer!r}")
    rows = _bank_rows(np.asarray(embeddings), scales, offset)
    if scorer == "auto":
        try:
            return Int8PrefilterScorer(rows, threads)
        except ImportError:
            pass
    return NumpyScorer(rows.dense())


def _bank_rows(embeddings: np.ndarray, scales: np.ndarray | None, offset: np.ndarray | None) -> BankRows:
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise BundleError(f"feature bank must be a non-empty [N, D] array, not shape {embeddings.shape}")
    if scales is None:
        if embeddings.dtype.kind != "f":
            raise BundleError(f"feature bank without scales must hold float rows, not {embeddings.dtype}")
        return BankRows(embeddings)
    if embeddings.dtype != np.int8:
        raise BundleError(f"feature bank with scales must hold int8 codes, not {embeddings.dtype}")
    if offset is None or np.shape(offset) != (embeddings.shape[1],):
        raise BundleError(f"int8 feature bank needs an offset of length {embeddings.shape[1]}")
    return BankRows(embeddings, scales, offset)
