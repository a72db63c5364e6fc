"""bank.npz: the training cases' embeddings for KNN look-up on the device.

Stored as float16 (half the bytes; the runtime computes in float32 because numpy float16 matmul is
slow, shared FACTS.md), grades as int8, case ids as a fixed-width unicode array so that np.load never
needs pickle.
"""

from __future__ import annotations

import os

import numpy as np

from edgeretina.bundle import describe_artifact
from edgeretina.errors import ExportError
from edgeretina.export.steps import ExportContext

BANK_FILE = "bank.npz"
DEFAULT_K = 5


def write_bank(ctx: ExportContext) -> None:
    bank = ctx.checkpoint.bank
    if bank is None:
        ctx.log("checkpoint has no feature bank: the bundle will grade without nearest cases")
        return
    if bank.embeddings.shape[1] != ctx.reference_outputs["embedding"].shape[1]:
        raise ExportError("feature bank dimension does not match the model's embedding")
    path = ctx.staging / BANK_FILE
    tmp = ctx.staging / f".{BANK_FILE}.tmp.npz"
    np.savez(tmp, embeddings=bank.embeddings.astype(np.float16), grades=bank.grades.astype(np.int8),
             case_ids=np.array(bank.case_ids, dtype=np.str_))
    os.replace(tmp, path)
    counts = np.bincount(bank.grades, minlength=5).tolist()
    ctx.bank_info = {"file": BANK_FILE, "count": int(len(bank.grades)), "dim": int(bank.embeddings.shape[1]),
                     "dtype": "float16", "metric": "cosine", "k": DEFAULT_K, "label_counts": counts}
    ctx.artifacts.append(describe_artifact(ctx.staging, BANK_FILE, fmt="npz", role="bank", precision="fp16",
                                           target=ctx.config.target))
