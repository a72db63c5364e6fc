"""KNN look-up on its own: top-k over an N x D feature bank, per scorer, one thread.

Stores a bank of N random unit vectors the way export does (`--bank-dtype int8`: rows minus their mean,
a scale per row, or `--bank-dtype float16`), loads it the way the runtime does, and times
`FeatureBank.search` for one query at a time with each scorer: `onnxruntime-int8-prefilter` (what every
grader uses) and `numpy-float32` (the exhaustive search it must agree with). Also records the bank's bytes
on disk, whether both scorers return the same neighbours, and how many queries the prefilter's bound
sent to the exhaustive search. Inside a grading process the model's weights evict the bank from the CPU
caches between images, so the `knn` stage of `edgeretina bench` can read slower than this.

Usage: python benchmarks/knn.py OUT.json [--count 16000] [--dim 512] [--k 10] [--runs 400] [--bank-dtype int8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before numpy: one thread, like the grader's setting
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from edgeretina.atomic import write_text_atomic  # noqa: E402
from edgeretina.bank_storage import stored_embeddings  # noqa: E402
from edgeretina.bench import machine_info  # noqa: E402
from edgeretina.runtime.knn import FeatureBank  # noqa: E402


def write_bank(folder: Path, count: int, dim: int, dtype: str = "int8", seed: int = 0) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((count, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    path = folder / "bank.npz"
    np.savez(path, **stored_embeddings(rows, dtype), grades=rng.integers(0, 5, count).astype(np.int8),
             case_ids=np.array([f"case-{i:06d}".encode() for i in range(count)], dtype=np.bytes_))
    return path, rows


def median_search_ms(bank: FeatureBank, queries: np.ndarray, k: int, runs: int) -> float:
    for query in queries[:20]:
        bank.search(query[None], k)
    times = []
    for i in range(runs):
        query = queries[i % len(queries)][None]
        started = time.perf_counter()
        bank.search(query, k)
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=16_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--bank-dtype", choices=("int8", "float16"), default="int8")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path, rows = write_bank(Path(scratch), args.count, args.dim, args.bank_dtype)
        # near-duplicates of 50 bank rows: queries with a clear nearest case, like a re-photographed eye
        picked = rows[:: max(1, args.count // 50)][:50]
        queries = picked + 0.05 * np.random.default_rng(1).standard_normal(picked.shape).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        banks = {"onnxruntime-int8-prefilter": FeatureBank.load(path, threads=1, scorer="auto"),
                 "numpy-float32": FeatureBank.load(path, threads=1, scorer="numpy")}
        result = {"machine": machine_info(), "count": args.count, "dim": args.dim, "k": args.k,
                  "bank_dtype": args.bank_dtype, "bank_bytes_on_disk": path.stat().st_size,
                  "median_ms": {}, "same_neighbours": None, "exhaustive_fallbacks": None}
        for name, bank in banks.items():
            if bank.scorer.name != name:
                result["median_ms"][name] = f"unavailable (got {bank.scorer.name})"
                continue
            result["median_ms"][name] = median_search_ms(bank, queries, args.k, args.runs)
        found = [[[n.case_id for n in row] for row in bank.search(queries, args.k)] for bank in banks.values()]
        result["same_neighbours"] = found[0] == found[1]
        prefilter = banks["onnxruntime-int8-prefilter"].scorer
        result["exhaustive_fallbacks"] = getattr(prefilter, "fallbacks", None)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
