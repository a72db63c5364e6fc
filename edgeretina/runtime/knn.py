"""Nearest training cases from the bundle's feature bank (cosine similarity on unit vectors).

The bank is stored in float16 on disk and held in float32 in memory: numpy's float16 matmul is ~30x
slower (shared FACTS.md). Top-k uses argpartition, then sorts only the k winners.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeretina.errors import BundleError


@dataclass(frozen=True)
class Neighbor:
    case_id: str
    grade: int
    similarity: float

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "grade": self.grade, "similarity": round(self.similarity, 5),
                "distance": round(1.0 - self.similarity, 5)}


class FeatureBank:
    def __init__(self, embeddings: np.ndarray, grades: np.ndarray, case_ids: np.ndarray):
        if not (len(embeddings) == len(grades) == len(case_ids)):
            raise BundleError("feature bank arrays differ in length")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.grades = np.asarray(grades, dtype=np.int64)
        self.case_ids = np.asarray(case_ids)

    @classmethod
    def load(cls, path: Path) -> "FeatureBank":
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["embeddings"], data["grades"], data["case_ids"])
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"cannot read feature bank {Path(path).name}: {exc}") from None

    def __len__(self) -> int:
        return len(self.grades)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def search(self, queries: np.ndarray, k: int) -> list[list[Neighbor]]:
        """queries [B, D] (unit vectors) -> the k most similar bank cases per query, best first."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise BundleError(f"query dimension {queries.shape} does not match the bank ({self.dim})")
        k = min(k, len(self))
        sims = queries @ self.embeddings.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(self) else np.tile(np.arange(k), (len(sims), 1))
        results = []
        for row, idx in zip(sims, top):
            order = idx[np.argsort(-row[idx])]
            results.append([Neighbor(str(self.case_ids[i]), int(self.grades[i]), float(row[i])) for i in order])
        return results

    def vote(self, neighbors: list[Neighbor]) -> int:
        """Similarity-weighted majority grade of the neighbours (an optional second opinion)."""
        weights = np.zeros(int(self.grades.max()) + 1)
        for n in neighbors:
            weights[n.grade] += max(n.similarity, 0.0)
        return int(np.argmax(weights))
