"""bank.npz: the training cases' embeddings for KNN look-up on the device.

The stored format (float16, or int8 codes of the rows minus their mean with a scale per row) is owned by
edgeretina/bank_storage.py, which the runtime reads with. Grades are int8, case ids UTF-8 bytes (np.load
never needs pickle; one byte per ASCII character against four in a unicode array).
"""

from __future__ import annotations

import os

import numpy as np

from edgeretina.bank_storage import dequantized, stored_embeddings
from edgeretina.bundle import describe_artifact
from edgeretina.errors import ExportError
from edgeretina.export.steps import ExportContext
from edgeretina.fidelity import knn_overlap

BANK_FILE = "bank.npz"


def rebuild_bank(ctx: ExportContext) -> None:
    """--bank-data: the feature bank re-embedded from those images with the model being exported (after
    --prune, the pruned one), replacing the checkpoint's, before any gate compares neighbours."""
    import dataclasses

    from edgeretina.training.checkpoint_tools import bank_from_data

    bank, info = bank_from_data(ctx.checkpoint, ctx.config.bank_data, log=ctx.log)
    ctx.checkpoint = dataclasses.replace(ctx.checkpoint, bank=bank)
    ctx.export_info["bank_rebuilt"] = info
    ctx.log(f"feature bank rebuilt from {', '.join(ctx.config.bank_data)}: {info['count']} cases")


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
