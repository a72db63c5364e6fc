"""How bank.npz stores the training cases' embeddings: written by export, read by the runtime.

float16 (default) or int8 (a quarter of the FP32 bytes: a 16,000 x 512 bank is 8.5 MB instead of
16.4 MB): the rows minus their mean (`offset`), one float32 scale per row. Subtracting the mean first
matters for tightly clustered banks (a barely trained model): the tiny test model's bank (mean pairwise
cosine 0.997) kept 0.27 of its top-10 neighbours with plain per-row int8 and 0.91 with the mean removed;
the demo bank (mean cosine 0.09) 0.88 / 0.87. The runtime's int8 prefilter quantizes a float bank the same
way at load (runtime/knn_scorers.py).
"""

from __future__ import annotations

import numpy as np

from edgeretina.choices import BANK_DTYPES
from edgeretina.errors import ConfigError


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


def dequantize_rows(codes: np.ndarray, scales: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float32 rows of an int8 bank: codes * scale + offset (any subset of rows, with their scales)."""
    rows = codes.astype(np.float32)
    rows *= np.asarray(scales, dtype=np.float32)[:, None]
    rows += np.asarray(offset, dtype=np.float32)
    return rows


def dequantized(stored: dict[str, np.ndarray]) -> np.ndarray:
    """float32 embeddings as the runtime searches them."""
    if "scales" in stored:
        return dequantize_rows(stored["embeddings"], stored["scales"], stored["offset"])
    return stored["embeddings"].astype(np.float32)
