"""bank.npz: the training cases' embeddings for KNN look-up on the device.

Stored as float16 (default) or int8 (a quarter of the FP32 bytes: a 16,000 x 512 bank is 8.5 MB
instead of 16.4 MB): the rows minus their mean (`offset`), one float32 scale per row. Subtracting the
mean first matters for tightly clustered banks (a barely trained model): the tiny test model's bank
(mean pairwise cosine 0.997) kept 0.27 of its top-10 neighbours with plain per-row int8 and 0.91 with
the mean removed; the demo bank (mean cosine 0.09) 0.88 / 0.87. The runtime computes in float32 because
numpy float16/int8 matmul is slow (shared FACTS.md). Grades are int8, case ids UTF-8 bytes (np.load
never needs pickle; one byte per ASCII character against four in a unicode array).
"""

from __future__ import annotations

import os

import numpy as np

from edgeretina.bundle import describe_artifact
from edgeretina.errors import ConfigError, ExportError
from edgeretina.export.steps import ExportContext
from edgeretina.fidelity import knn_overlap

BANK_FILE = "bank.npz"
BANK_DTYPES = ("float16", "int8")


def quantize_rows_int8(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row INT8: row ≈ codes * scale, scale = max|row| / 127 (unit rows keep ~1e-3 cosine)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    scales = np.maximum(np.abs(embeddings).max(axis=1), 1e-12) / 127.0
    codes = np.clip(np.rint(embeddings / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


def stored_embeddings(embeddings: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The arrays bank.npz holds for `dtype` (embeddings; for int8 also scales and offset)."""
    if dtype == "float16":
        return {"embeddings": embeddings.astype(np.float16)}
    if dtype == "int8":
        offset = np.asarray(embeddings, dtype=np.float32).mean(axis=0)
        codes, scales = quantize_rows_int8(embeddings - offset)
        return {"embeddings": codes, "scales": scales, "offset": offset}
    raise ConfigError(f"bank dtype must be one of {', '.join(BANK_DTYPES)}, not {dtype!r}")


def dequantized(stored: dict[str, np.ndarray]) -> np.ndarray:
    """float32 embeddings as the runtime will hold them."""
    embeddings = stored["embeddings"].astype(np.float32)
    if "scales" in stored:
        embeddings = embeddings * stored["scales"][:, None] + stored["offset"][None, :]
    return embeddings


def write_bank(ctx: ExportContext) -> None:
    bank = ctx.checkpoint.bank
    if bank is None:
        ctx.log("checkpoint has no feature bank: the bundle will grade without nearest cases")
        return
    if bank.embeddings.shape[1] != ctx.reference_outputs["embedding"].shape[1]:
        raise ExportError("feature bank dimension does not match the model's embedding")
    dtype, k = ctx.config.bank_dtype, ctx.config.knn_k
    stored = stored_embeddings(bank.embeddings, dtype)
    path = ctx.staging / BANK_FILE
    tmp = ctx.staging / f".{BANK_FILE}.tmp.npz"
    np.savez(tmp, **stored, grades=bank.grades.astype(np.int8),
             case_ids=np.array([c.encode("utf-8") for c in bank.case_ids], dtype=np.bytes_))
    os.replace(tmp, path)
    counts = np.bincount(bank.grades, minlength=5).tolist()
    ctx.bank_info = {"file": BANK_FILE, "count": int(len(bank.grades)), "dim": int(bank.embeddings.shape[1]),
                     "dtype": dtype, "metric": "cosine", "k": k, "label_counts": counts,
                     "storage_fidelity": _storage_fidelity(ctx, bank.embeddings, dequantized(stored), k)}
    ctx.artifacts.append(describe_artifact(ctx.staging, BANK_FILE, fmt="npz", role="bank",
                                           precision="fp16" if dtype == "float16" else dtype, target=ctx.config.target))
    ctx.log(f"feature bank: {len(bank.grades)} x {bank.embeddings.shape[1]} {dtype}, "
            f"{path.stat().st_size / 1e6:.2f} MB, top-{k} agreement with the float32 bank "
            f"{ctx.bank_info['storage_fidelity']['topk_overlap']:.3f}")


def _storage_fidelity(ctx: ExportContext, exact: np.ndarray, stored: np.ndarray, k: int) -> dict:
    """How much the on-disk rounding moves the neighbours of the reference images (queries: their torch
    embeddings): mean top-k overlap (tie-aware, as in the gate) and the largest similarity change."""
    queries = ctx.reference_outputs["embedding"].astype(np.float32)
    k = min(k, len(exact))
    exact_sims, stored_sims = queries @ exact.T, queries @ stored.T
    return {"topk_overlap": round(knn_overlap(exact_sims, stored_sims, k), 4),
            "max_similarity_error": float(np.abs(exact_sims - stored_sims).max())}
