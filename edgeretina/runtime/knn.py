"""Nearest training cases from the bundle's feature bank (cosine similarity on unit vectors).

One matrix-vector product over the bank, then top-k: argpartition, and a sort of the k winners only.
A 16,000 x 512 bank is memory-bound at batch 1: numpy's float32 BLAS reads 33 MB per query (1.5 ms on one
thread of the project machine; float16 and integer matmuls in numpy are far slower, shared FACTS.md). An
INT8 bank (bank.npz: int8 codes of the rows minus their mean, a float32 scale per row, the mean as
`offset`) is therefore scored by OpenVINO when the
grader runs on OpenVINO anyway: a fully connected layer with compressed int8 weights reads 8 MB
(0.6 ms for top-10 on one thread, same machine). It runs with f32 activations and no dynamic
quantization, so the similarities are those of the dequantized bank, as numpy would compute them.
Under another backend, numpy scores the float32 bank held transposed ([D, N]): loading OpenVINO's CPU
plugin only for the bank would cost a grading process ~50 MB of resident memory.
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


class NumpyScorer:
    name = "numpy-float32"

    def __init__(self, embeddings: np.ndarray):
        self.bank_t = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32).T)   # [D, N]

    @classmethod
    def from_int8(cls, codes: np.ndarray, scales: np.ndarray, offset: np.ndarray) -> "NumpyScorer":
        """Dequantize straight into the transposed float32 matrix: one allocation, no temporaries
        (a 16,000 x 512 bank would otherwise peak at three 33 MB copies while loading)."""
        scorer = cls.__new__(cls)
        scorer.bank_t = np.empty(codes.shape[::-1], np.float32)
        np.multiply(codes.T, np.asarray(scales, dtype=np.float32)[None, :], out=scorer.bank_t)
        scorer.bank_t += np.asarray(offset, dtype=np.float32)[:, None]
        return scorer

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = queries @ self.bank_t
        n = sims.shape[1]
        idx = np.argpartition(sims, n - k, axis=1)[:, n - k:] if k < n else np.tile(np.arange(n), (len(sims), 1))
        values = np.take_along_axis(sims, idx, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        return np.take_along_axis(values, order, axis=1), np.take_along_axis(idx, order, axis=1)


class OpenVinoInt8Scorer:
    """sims = q @ (codes * scales)^T + q @ offset and top-k in one compiled OpenVINO model per k."""

    name = "openvino-int8"

    def __init__(self, codes: np.ndarray, scales: np.ndarray, offset: np.ndarray, threads: int | None = None):
        import openvino as ov   # ImportError: the caller falls back to numpy
        import openvino.opset13 as ops

        self._ov, self._ops = ov, ops
        self.codes, self.scales = codes, scales.astype(np.float32)
        self.offset = np.asarray(offset, dtype=np.float32)
        self.threads = threads
        self._compiled: dict[int, object] = {}
        self._requests: dict[int, object] = {}

    def _request(self, k: int):
        if k not in self._requests:
            ops = self._ops
            query = ops.parameter([-1, self.codes.shape[1]], np.float32, name="query")
            # shared_memory: the constant points at self.codes (kept alive here) instead of copying 8 MB
            codes = ops.constant(self.codes, shared_memory=True)
            bank = ops.multiply(ops.convert(codes, "f32"), ops.constant(self.scales[:, None]))
            offset = ops.matmul(query, ops.constant(self.offset[:, None]), False, False)      # [B, 1]
            sims = ops.add(ops.matmul(query, bank, False, True), offset)
            top = ops.topk(sims, ops.constant(np.int64(k)), axis=1, mode="max", sort="value")
            model = self._ov.Model([top.output(0), top.output(1)], [query], "knn")
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                      "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = str(self.threads)
            self._compiled[k] = self._ov.Core().compile_model(model, "CPU", config)
            self._requests[k] = self._compiled[k].create_infer_request()
        return self._requests[k], self._compiled[k]

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        request, compiled = self._request(k)
        results = request.infer({"query": queries})
        return np.array(results[compiled.outputs[0]]), np.array(results[compiled.outputs[1]]).astype(np.int64)


class FeatureBank:
    def __init__(self, embeddings: np.ndarray, grades: np.ndarray, case_ids: np.ndarray,
                 scales: np.ndarray | None = None, offset: np.ndarray | None = None, threads: int | None = None,
                 use_openvino: bool = True):
        """embeddings: float [N, D], or int8 codes [N, D] with `scales` [N] and `offset` [D]
        (row = codes * scale + offset). use_openvino: score an int8 bank with OpenVINO when it is
        installed (else numpy)."""
        if not (len(embeddings) == len(grades) == len(case_ids)) or (scales is not None and len(scales) != len(grades)):
            raise BundleError("feature bank arrays differ in length")
        self.grades = np.asarray(grades, dtype=np.int64)
        self.case_ids = np.asarray(case_ids)
        self._dim = int(np.shape(embeddings)[1])
        self.scorer = _make_scorer(embeddings, scales, offset, threads, use_openvino)

    @classmethod
    def load(cls, path: Path, threads: int | None = None, use_openvino: bool = True) -> "FeatureBank":
        try:
            with np.load(path, allow_pickle=False) as data:
                case_ids = data["case_ids"]
                if case_ids.dtype.kind == "S":               # UTF-8 bytes (current writer)
                    case_ids = np.char.decode(case_ids, "utf-8")
                int8 = "scales" in data
                return cls(data["embeddings"], data["grades"], case_ids, data["scales"] if int8 else None,
                           data["offset"] if int8 else None, threads, use_openvino)
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
        if isinstance(self.scorer, NumpyScorer):
            return self.scorer.bank_t.T
        return self.scorer.codes.astype(np.float32) * self.scorer.scales[:, None] + self.scorer.offset[None, :]

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
        weights = np.zeros(int(self.grades.max()) + 1)
        for n in neighbors:
            weights[n.grade] += max(n.similarity, 0.0)
        return int(np.argmax(weights))


def _make_scorer(embeddings: np.ndarray, scales: np.ndarray | None, offset: np.ndarray | None,
                 threads: int | None, use_openvino: bool):
    if scales is None:
        return NumpyScorer(embeddings)
    codes = np.asarray(embeddings)
    if codes.dtype != np.int8:
        raise BundleError(f"feature bank with scales must hold int8 codes, not {codes.dtype}")
    if offset is None or np.shape(offset) != (codes.shape[1],):
        raise BundleError(f"int8 feature bank needs an offset of length {codes.shape[1]}")
    if use_openvino:
        try:
            return OpenVinoInt8Scorer(np.ascontiguousarray(codes), np.asarray(scales), offset, threads)
        except ImportError:
            pass
    return NumpyScorer.from_int8(codes, scales, offset)
