"""How the feature bank is searched: the exact cosine top-k, fast on every CPU class.

A query against a 16,000 x 512 bank is memory-bound: numpy's float32 GEMV reads 33 MB and takes 1.8-2.5 ms
on one thread of an AVX2-only AMD EPYC Zen 3 (1.5 ms on an AVX-512 Zen 4). The OpenVINO scorer this
replaced (int8 codes decompressed to f32 inside a fully connected layer) took 1.2-1.7 ms on the Zen 3.

`Int8PrefilterScorer` reads 8 MB instead: ONNX Runtime's MatMulInteger scores the query, quantized in
two 7-bit parts, against int8 codes of the bank's rows (U8S8 whose pair sums cannot saturate, so the integer
scores are the same on AVX2, AVX-512, VNNI and AMX: _prefilter_graph), keeps the best
`candidates` rows, and re-scores those exactly in float32 from the stored rows. A bound on the prefilter's
error then proves that no row outside the candidates can be among the top k; where the proof fails (a
bank of near-identical rows) that query is scored exhaustively. So the neighbours and similarities are
always those of the exhaustive float32 search, as `NumpyScorer` computes them, to float rounding.
Zen 3 AVX2, one thread, 16,000 x 512, top 10 (benchmarks/knn.py, three runs): 0.96-1.20 ms against
numpy's 1.63-1.96 ms, int8 or float16 bank alike. That is reading 8 MB from memory (an 8 MB memcpy took
0.85 ms on that VM at the time); with the bank left in the L3 cache the matrix product takes 0.3 ms.
"""

from __future__ import annotations

import numpy as np

from edgeretina.bank_storage import dequantize_rows, quantize_rows_int8
from edgeretina.runtime.onnx_wire import Node, ValueInfo, model_bytes

# Candidates re-scored exactly, (at least, times k) per stage; the first comes from TopK in the graph, the
# second (numpy's argpartition of the scores) only when the first cannot be certified. TopK(64) costs
# ~0.01 ms in the graph, TopK(256) 0.3 ms: hence the small first stage. Random 16,000 x 512 float16 bank:
# with a one-part 7-bit query 58% of queries needed the second stage, with the two-part query none.
STAGES = ((64, 4), (1024, 16))
QUERY_STEPS = 63           # each 7-bit part of the query: codes in [-63, 63], stored as uint8 [1, 127] around 64
QUERY_ZERO = 64
_CHUNK_ROWS = 4096         # rows converted to float32 at a time (load-time quantization, exhaustive fallback)
_FLOAT_SLACK = 1e-5        # float32 rounding of the scores on both sides of the bound


class BankRows:
    """The bank's rows as stored: float [N, D], or int8 codes with a scale per row and an offset [D]
    (row = codes * scale + offset). Gives exact float32 rows and similarities without holding a
    float32 copy of the whole bank."""

    def __init__(self, stored: np.ndarray, scales: np.ndarray | None = None, offset: np.ndarray | None = None):
        self.stored = stored
        self.scales = None if scales is None else np.asarray(scales, dtype=np.float32)
        self.offset = None if offset is None else np.asarray(offset, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def is_int8(self) -> bool:
        return self.scales is not None

    def take(self, index: np.ndarray) -> np.ndarray:
        if self.is_int8:
            return dequantize_rows(self.stored[index], self.scales[index], self.offset)
        return self.stored[index].astype(np.float32)

    def similarities(self, query: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """query [D] -> similarity to the rows in `index` (default: all, a chunk of rows at a time)."""
        if index is not None:
            return self.take(index) @ query
        return np.concatenate([self.take(np.arange(start, min(start + _CHUNK_ROWS, len(self)))) @ query
                               for start in range(0, len(self), _CHUNK_ROWS)])

    def dense(self) -> np.ndarray:
        return self.take(np.arange(len(self)))


class NumpyScorer:
    """Exhaustive float32 search: one matrix product over the bank held transposed ([D, N])."""

    name = "numpy-float32"

    def __init__(self, embeddings: np.ndarray):
        self.bank_t = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32).T)

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return _top_k_of(queries @ self.bank_t, k)

    def dense(self) -> np.ndarray:
        return self.bank_t.T


class Int8PrefilterScorer:
    name = "onnxruntime-int8-prefilter"

    def __init__(self, rows: BankRows, threads: int | None = None):
        import onnxruntime as ort   # ImportError: the caller falls back to numpy

        self.rows = rows
        codes, scales, self.offset, residual_max = _prefilter_codes(rows)
        self.row_norm_max = float((np.linalg.norm(codes.astype(np.float32), axis=1) * scales).max())
        self.residual_max = residual_max
        self.fallbacks = 0          # queries the bound could not certify (scored exhaustively)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(_prefilter_graph(codes, scales, self.offset), options,
                                            providers=["CPUExecutionProvider"])

    def dense(self) -> np.ndarray:
        return self.rows.dense()

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        stages = sorted({min(len(self.rows), max(least, times * k)) for least, times in STAGES})
        approx, _, first_pool, error_sq, norm_sq, dot_offset = self.session.run(
            None, {"query": queries, "k": np.array([stages[0]], np.int64)})
        # exact_i <= approx_i + margin for every row i (see _prefilter_graph)
        margins = (np.sqrt(error_sq[:, 0]) * self.row_norm_max + np.sqrt(norm_sq[:, 0]) * self.residual_max
                   + dot_offset[:, 0] + _FLOAT_SLACK)
        values, indices = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        for row, query in enumerate(queries):
            values[row], indices[row] = self._top_k_one(query, approx[row], first_pool[row], float(margins[row]),
                                                        stages, k)
        return values, indices

    def _top_k_one(self, query: np.ndarray, approx: np.ndarray, pool: np.ndarray, margin: float,
                   stages: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score the best candidates exactly; more of them, then every row, while the k-th is not
        certified: each row outside the pool has approx <= the pool's last, so a k-th exact similarity
        above that plus the margin cannot be beaten by any of them."""
        for stage, count in enumerate(stages):
            if stage:
                pool = _best_first(approx, count)
            exact = self.rows.similarities(query, pool)
            best = np.argsort(-exact, kind="stable")[:k]
            if count == len(approx) or exact[best[-1]] > approx[pool[-1]] + margin:
                return exact[best], pool[best]
        self.fallbacks += 1
        values, index = _top_k_of(self.rows.similarities(query)[None], k)
        return values[0], index[0]


def _seven_bit_part(source: str, tag: str) -> list[Node]:
    """Nodes quantizing `source` to codes in [-63, 63] with one scale (`scale_<tag>`): the uint8 codes
    around 64 (`q8_<tag>`) and their dequantized value (`part<tag>`)."""
    return [Node("Abs", (source,), (f"abs_{tag}",)),
            Node("ReduceMax", (f"abs_{tag}",), (f"max_{tag}",), {"keepdims": 0}),
            Node("Max", (f"max_{tag}", "tiny"), (f"max_safe_{tag}",)),
            Node("Div", (f"max_safe_{tag}", "steps"), (f"scale_{tag}",)),
            Node("Div", (source, f"scale_{tag}"), (f"scaled_{tag}",)),
            Node("Round", (f"scaled_{tag}",), (f"rounded_{tag}",)),
            Node("Clip", (f"rounded_{tag}", "low", "high"), (f"codes_{tag}",)),
            Node("Mul", (f"codes_{tag}", f"scale_{tag}"), (f"part{tag}",)),
            Node("Add", (f"codes_{tag}", "q_zero_float"), (f"shifted_{tag}",)),
            Node("Cast", (f"shifted_{tag}",), (f"q8_{tag}",), {"to": 2})]


def _best_first(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest scores, largest first."""
    index = np.argpartition(scores, len(scores) - count)[len(scores) - count:] if count < len(scores) \
        else np.arange(len(scores))
    return index[np.argsort(-scores[index], kind="stable")]


def _top_k_of(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k per row of `sims`, best first: argpartition, then a sort of the k winners only."""
    n = sims.shape[1]
    index = np.argpartition(sims, n - k, axis=1)[:, n - k:] if k < n else np.tile(np.arange(n), (len(sims), 1))
    values = np.take_along_axis(sims, index, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(index, order, axis=1)


def _prefilter_codes(rows: BankRows) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """int8 codes [N, D], scales [N], offset [D] and the largest storage residual |row - offset - codes*scale|.
    An int8 bank is its own prefilter (residual 0); a float bank is quantized like bank_storage does."""
    if rows.is_int8:
        return np.asarray(rows.stored, dtype=np.int8), rows.scales, rows.offset, 0.0
    offset = np.zeros(rows.stored.shape[1], np.float64)
    for start in range(0, len(rows), _CHUNK_ROWS):
        offset += rows.stored[start:start + _CHUNK_ROWS].astype(np.float64).sum(axis=0)
    offset = (offset / len(rows)).astype(np.float32)
    codes, scales = np.empty(rows.stored.shape, np.int8), np.empty(len(rows), np.float32)
    residual_max = 0.0
    for start in range(0, len(rows), _CHUNK_ROWS):
        centred = rows.stored[start:start + _CHUNK_ROWS].astype(np.float32) - offset
        chunk_codes, chunk_scales = quantize_rows_int8(centred)
        codes[start:start + len(centred)], scales[start:start + len(centred)] = chunk_codes, chunk_scales
        residual = centred - chunk_codes.astype(np.float32) * chunk_scales[:, None]
        residual_max = max(residual_max, float(np.linalg.norm(residual, axis=1).max()))
    return codes, scales, offset, residual_max


def _prefilter_graph(codes: np.ndarray, scales: np.ndarray, offset: np.ndarray) -> bytes:
    """query float [B, D], k -> approximate similarities [B, N] (without the offset) and the k best, best
    first, with what the margin needs per query: |q - q'|^2, |q|^2 and q . offset.

    The query is quantized in two 7-bit parts, q' = s1 c1 + s2 c2 (c1 = round(q / s1), c2 = round of what
    is left over s2; |c| <= 63, one pair of scales per call), about 13 bits in all. Both parts go through
    one MatMulInteger as a [2B, D] uint8 batch stored around 64: ONNX Runtime runs U8S8 against the bank's
    own int8 codes, and since x86 without VNNI sums u8 x s8 pairs with vpmaddubsw into saturating int16,
    2 x 127 x 128 = 32512 keeps it exact: the integer scores are the same on AVX2, AVX-512, VNNI and AMX.
    Zen 3 AVX2, 16,000 x 512, one thread: U8S8 0.73 ms against U8U8 0.86 (the other exact choice); the
    second row adds 0.06 ms (the bank is read once) and shrinks the query's share of the margin ~60x, so
    a float16 bank's first 64 candidates are certified instead of 58% of queries needing the second stage
    with one 7-bit part. approx_i = q' . b_i with b_i = codes_i * scale_i; with the storage residual
    d_i = row_i - offset - b_i (zero for an int8 bank), exact_i = q . b_i + q . d_i + q . offset, so
    exact_i <= approx_i + |q - q'| max|b| + |q| max|d| + q . offset for every row. The bank is a constant
    initializer, so ONNX Runtime pre-packs it once (as a graph input it is re-packed on every call:
    2.5 ms instead of 0.6)."""
    count, dim = codes.shape
    to_float = {"to": 1}
    nodes = [*_seven_bit_part("query", "1"), Node("Sub", ("query", "part1"), ("left_over",)),
             *_seven_bit_part("left_over", "2"),
             Node("Concat", ("q8_1", "q8_2"), ("q8",), {"axis": 0}),
             Node("MatMulInteger", ("q8", "bank", "q_zero", "zero"), ("dot",)),
             Node("Cast", ("dot",), ("dot_float",), to_float),
             Node("Split", ("dot_float",), ("dot_1", "dot_2"), {"axis": 0}),
             Node("Mul", ("dot_1", "scale_1"), ("dot_scaled_1",)),
             Node("Mul", ("dot_2", "scale_2"), ("dot_scaled_2",)),
             Node("Add", ("dot_scaled_1", "dot_scaled_2"), ("dot_query",)),
             Node("Mul", ("dot_query", "scales"), ("approx",)),
             Node("TopK", ("approx", "k"), ("top_values", "top_index"), {"axis": 1, "largest": 1, "sorted": 1}),
             Node("Add", ("part1", "part2"), ("q_dequantized",)),
             Node("Sub", ("query", "q_dequantized"), ("q_error",)),
             Node("Mul", ("q_error", "q_error"), ("q_error_sq",)),
             Node("MatMul", ("q_error_sq", "ones"), ("error_sq",)),
             Node("Mul", ("query", "query"), ("query_sq",)),
             Node("MatMul", ("query_sq", "ones"), ("norm_sq",)),
             Node("MatMul", ("query", "offset"), ("dot_offset",))]
    float32 = np.float32
    initializers = {"bank": np.ascontiguousarray(codes.T), "scales": scales, "zero": np.array(0, np.int8),
                    "q_zero": np.array(QUERY_ZERO, np.uint8), "q_zero_float": np.array(QUERY_ZERO, float32),
                    "steps": np.array(QUERY_STEPS, float32), "low": np.array(-QUERY_STEPS, float32),
                    "high": np.array(QUERY_STEPS, float32), "tiny": np.array(1e-30, float32),
                    "ones": np.ones((dim, 1), float32), "offset": offset.astype(float32)[:, None]}
    per_query = ("batch", 1)
    return model_bytes(nodes, initializers,
                       inputs=[ValueInfo("query", np.float32, ("batch", dim)), ValueInfo("k", np.int64, (1,))],
                       outputs=[ValueInfo("approx", np.float32, ("batch", count)),
                                ValueInfo("top_values", np.float32, ("batch", "k")),
                                ValueInfo("top_index", np.int64, ("batch", "k")),
                                ValueInfo("error_sq", np.float32, per_query),
                                ValueInfo("norm_sq", np.float32, per_query),
                                ValueInfo("dot_offset", np.float32, per_query)],
                       name="knn_prefilter")
