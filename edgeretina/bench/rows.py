"""One table row per configuration: its latency percentiles, throughput, memory and stage medians, and
with a reference bundle its speedup and fidelity against the reference at the same threads and batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeretina.bench.artifacts import model_size_bytes, quantization_scheme
from edgeretina.bench.compare import fidelity_vs_reference
from edgeretina.bench.config import STAGES, BenchConfig
from edgeretina.bench.results import Measurement


def measured_row(m: Measurement) -> dict:
    s = m.setup
    row = {"bundle": s.bundle.name, "path": str(s.bundle), "backend": s.backend, "threads": s.threads, "batch": s.batch}
    if m.skipped:
        return row | {"skipped": m.skipped}
    lat = np.asarray(m.latencies_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(lat, [50, 90, 99]))
    return row | {
        "precision": m.ready.get("precision"),
        "scheme": quantization_scheme(s.bundle, m.ready.get("precision")),
        "compute_precision": m.ready.get("runner", {}).get("inference_precision"),   # OpenVINO: what it ran in
        "knn_scorer": m.ready.get("knn_scorer"),
        "size_mb": round(model_size_bytes(s.bundle, s.backend) / 1e6, 3),
        "load_s": round(m.ready["load_s"], 3),
        "cold_ms": round(m.ready["cold_ms"], 2),
        "p50_ms": round(p50, 3), "p90_ms": round(p90, 3), "p99_ms": round(p99, 3),
        "p50_with_overlay_ms": round(float(np.median(m.with_overlay_ms)), 3),
        "runs": len(lat),
        # Images over the time spent grading them: batch / mean latency.
        "throughput_ips": round(s.batch * len(lat) / (lat.sum() / 1000.0), 2),
        "peak_rss_mb": m.peak_rss_mb,
        "stages_ms": _stage_medians(m.stages),
    }


def _stage_medians(stages: list[dict]) -> dict[str, float]:
    medians = {}
    for stage in STAGES:
        values = [t[stage] for t in stages if stage in t]
        if values:
            medians[stage] = round(float(np.median(values)), 3)
    return medians


def add_reference_ratios(rows: list[dict], measured: list[Measurement], reference: Path) -> None:
    """Speedup and fidelity of every row against the reference bundle at the same threads and batch,
    run with the first listed backend that could run it."""
    for row, m in zip(rows, measured):
        if "skipped" in row:
            continue
        ref_index = next((i for i, r in enumerate(measured) if r.setup.bundle == reference and not r.skipped
                          and r.setup.threads == m.setup.threads and r.setup.batch == m.setup.batch), None)
        if ref_index is None:
            continue
        ref_row, ref = rows[ref_index], measured[ref_index]
        row["reference"] = f"{ref_row['bundle']}/{ref_row['backend']}"
        row["speedup_vs_reference"] = round(ref_row["p50_ms"] / row["p50_ms"], 3)
        if ref.fidelity is not None and m.fidelity is not None:
            row |= fidelity_vs_reference(ref.fidelity, m.fidelity)


def config_summary(config: BenchConfig, image_count: int) -> dict:
    return {"runs": config.runs, "warmup": config.warmup, "rounds": config.rounds, "images": image_count,
            "image_source": str(config.images) if config.images else f"phantom {config.phantom_size}px JPEG",
            "reference": str(config.reference) if config.reference else None}
