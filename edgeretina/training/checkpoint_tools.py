"""Post-hoc updates of a trained checkpoint, without retraining: recalibration on held-out data
(`edgeretina calibrate`) and a rebuilt feature bank (`edgeretina bank build`).

Both run the checkpoint's model over images read with the dataset layouts (edgeretina/layouts) and
prepared by the shared preprocessing, and write a new checkpoint atomically (the input one is kept
unless `out` is the same path). Whatever they change is recorded in the checkpoint's summary.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeretina.errors import DatasetError
from edgeretina.training.calibration import DEFAULT_TARGET_SENSITIVITY, calibrate
from edgeretina.training.checkpoint import Checkpoint, TrainingBank, load_checkpoint, save_checkpoint
from edgeretina.training.data import PreparedSet, prepare_images
from edgeretina.training.loop import lesion_truth_grid, predict

Logger = Callable[[str], None]


def recalibrate(checkpoint: Path, data: Sequence[str], out: Path | None = None, *,
                target_sensitivity: float | None = DEFAULT_TARGET_SENSITIVITY, workers: int | None = None,
                batch_size: int = 32, log: Logger = print) -> dict:
    """Fit ordinal thresholds, temperatures and the referable operating point on `data` (held-out images,
    never the training set) and write them into the checkpoint; with a lesion head and lesion masks beside
    every image, the per-type lesion presence thresholds too (without masks they stay as they were).
    Returns the calibration report."""
    ckpt = load_checkpoint(checkpoint)
    prepared, sources = _prepare(ckpt, data, workers, log, lesions=True)
    outputs = predict(ckpt.model, prepared.images, ckpt.preprocess, batch_size)
    result = calibrate(outputs["ordinal_logits"], prepared.grades, base=ckpt.grading,
                       prototype_logits=outputs["prototype_logits"], target_sensitivity=target_sensitivity,
                       lesion_logits=outputs.get("lesion_logits"), lesion_targets=prepared.lesions)
    skipped = result.report.get("operating_point", {}).get("skipped")
    if skipped:
        raise DatasetError(f"{skipped}; calibrate on held-out data with referable cases, "
                           "or pass --keep-referable-threshold")
    report = {**result.report, "data": list(data), "sources": sorted(set(sources))}
    summary = {**ckpt.summary, "calibration": report}
    save_checkpoint(out or checkpoint, replace(ckpt, grading=result.grading, summary=summary))
    return report


def rebuild_bank(checkpoint: Path, data: Sequence[str], out: Path | None = None, *, workers: int | None = None,
                 batch_size: int = 32, log: Logger = print) -> dict:
    """Replace the checkpoint's KNN feature bank by the embeddings of `data` (case ids, grades, sources).
    Returns what the bank holds (count, grade counts, per-source counts)."""
    ckpt = load_checkpoint(checkpoint)
    bank, info = bank_from_data(ckpt, data, workers=workers, batch_size=batch_size, log=log)
    save_checkpoint(out or checkpoint, replace(ckpt, bank=bank, summary={**ckpt.summary, "bank": info}))
    return info


def bank_from_data(ckpt: Checkpoint, data: Sequence[str], *, workers: int | None = None, batch_size: int = 32,
                   log: Logger = print) -> tuple[TrainingBank, dict]:
    """The embeddings of `data` through the checkpoint's model (whatever model it holds now: export's
    --prune replaces it by the pruned one) as a feature bank, and a description of it."""
    prepared, sources = _prepare(ckpt, data, workers, log)
    embeddings = predict(ckpt.model, prepared.images, ckpt.preprocess, batch_size)["embedding"]
    bank = TrainingBank(embeddings=embeddings.astype(np.float32), grades=prepared.grades.copy(),
                        case_ids=list(prepared.case_ids), sources=sources)
    info = {"data": list(data), "count": len(bank.grades),
            "grade_counts": np.bincount(bank.grades, minlength=5).tolist(),
            "sources": {s: sources.count(s) for s in sorted(set(sources))}, "skipped": len(prepared.skipped)}
    return bank, info


def _prepare(ckpt: Checkpoint, data: Sequence[str], workers: int | None, log: Logger,
             lesions: bool = False) -> tuple[PreparedSet, list[str]]:
    """The images of `data` prepared for the checkpoint's model, and the source of each; with `lesions`,
    their patch-grid lesion targets where the model has a lesion head and every image its masks."""
    from edgeretina.layouts import load_data

    loaded = load_data(data)
    for line in loaded.summary.lines():
        log(line)
    if not loaded.items:
        raise DatasetError(f"no images loaded from {', '.join(map(str, data))}")
    grid = lesion_truth_grid(ckpt.model, loaded.items) if lesions else None
    prepared = prepare_images(loaded.items, ckpt.preprocess, workers, lesion_grid=grid)
    for path, reason in prepared.skipped:
        log(f"skipped {path}: {reason}")
    return prepared, prepared.sources
