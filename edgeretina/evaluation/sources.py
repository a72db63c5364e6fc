"""Where the predictions of an evaluation come from: a training checkpoint (torch) or an exported bundle
(the device runtime, quality gate included). Both give the same EvaluationInput, so one report compares
a model before and after export.

- checkpoint: the shared preprocessing prepares every image (no quality gate: a training checkpoint is
  judged on all its images, as a paper reports it); modes "head" (calibrated CORAL head), "prototype"
  (text-prototype softmax) and "knn" (similarity-weighted vote of the checkpoint's feature bank);
- bundle: `Grader.grade` exactly as `edgeretina grade` runs it; images the quality gate refuses and
  files that cannot be read are excluded and counted; modes "head" and "knn" (the bundle's bank).

torch and the runtime are imported only by the source that needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError
from edgeretina.evaluation.report import EvaluationInput, ModePredictions
from edgeretina.grades import (GradingConfig, class_probabilities, cumulative_probabilities, ordinal_grades,
                               prototype_probabilities)

Logger = Callable[[str], None]
DEFAULT_K = 5


def is_bundle(path: Path) -> bool:
    """A bundle is a folder with manifest.json or a zip; anything else is taken for a checkpoint."""
    path = Path(path)
    return (path / "manifest.json").is_file() or path.suffix == ".zip"


def checkpoint_input(checkpoint: Path, items: Sequence[LabeledImage], *, k: int = DEFAULT_K,
                     batch_size: int = 32, workers: int | None = None, log: Logger = print) -> EvaluationInput:
    from edgeretina.runtime.knn import FeatureBank
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.data import prepare_images
    from edgeretina.training.loop import predict

    ckpt = load_checkpoint(checkpoint)
    prepared = prepare_images(items, ckpt.preprocess, workers)
    for path, reason in prepared.skipped:
        log(f"skipped {path}: {reason}")
    kept = [items[i] for i in prepared.indices]
    outputs = predict(ckpt.model, prepared.images, ckpt.preprocess, batch_size)
    modes = [_ordinal_mode("head", outputs["ordinal_logits"], ckpt.grading),
             _prototype_mode(outputs["prototype_logits"], ckpt.grading)]
    if ckpt.bank is not None:
        bank = FeatureBank(ckpt.bank.embeddings, ckpt.bank.grades, np.array(ckpt.bank.case_ids), scorer="numpy")
        neighbours = bank.search(outputs["embedding"], k)
        modes.append(_knn_mode(neighbours, ckpt.grading))
    return EvaluationInput(case_ids=_case_ids(kept), grades=np.array([it.grade for it in kept]),
                           sources=[_source(it) for it in kept], modes=modes,
                           excluded=_excluded({"unreadable": len(prepared.skipped)}),
                           meta={"model": ckpt.model_config.to_dict(), "checkpoint": str(checkpoint),
                                 "grading": ckpt.grading.to_dict(), "knn_k": k if ckpt.bank is not None else None})


def bundle_input(bundle: Path, items: Sequence[LabeledImage], *, backend: str | None = None,
                 batch_size: int = 8, log: Logger = print) -> EvaluationInput:
    from edgeretina.preprocess import ImageRef
    from edgeretina.runtime.grader import Grader
    from edgeretina.runtime.knn import Neighbor, vote_distribution

    grader = Grader(bundle, backend=backend)
    refs = [ImageRef(str(it.path), it.frame) for it in items]
    records = grader.grade(refs, batch_size=batch_size)
    if len(records) != len(items):       # one record per ImageRef with a frame or a single-image file
        raise DatasetError(f"{len(items)} images gave {len(records)} records: give multi-frame DICOM files a frame")
    kept, head, knn, unreadable, ungradable = [], [], [], 0, 0
    for item, record in zip(items, records):
        if record.error:
            unreadable += 1
            log(f"skipped {item.path}: {record.error}")
        elif not record.gradable:
            ungradable += 1
        else:
            kept.append(item)
            head.append(record)
            knn.append(vote_distribution([Neighbor(n["case_id"], n["grade"], n["similarity"]) for n in record.neighbors])
                       if record.neighbors else None)
    if not kept:
        raise DatasetError(f"none of the {len(items)} images was graded ({unreadable} unreadable, {ungradable} ungradable)")
    grading = grader.grading
    probs = np.array([r.probabilities for r in head])
    referable = np.array([r.referable_probability for r in head])
    modes = [ModePredictions(name="head", predicted=np.array([r.grade for r in head]), grade_probs=probs,
                             referable_scores=referable, referable_pred=np.array([r.referable for r in head]))]
    if all(v is not None for v in knn):
        modes.append(_mode_from_distribution("knn", np.array(knn), grading))
    manifest = grader.bundle.manifest
    return EvaluationInput(case_ids=_case_ids(kept), grades=np.array([it.grade for it in kept]),
                           sources=[_source(it) for it in kept], modes=modes,
                           excluded=_excluded({"unreadable": unreadable, "ungradable (quality gate)": ungradable}),
                           meta={"bundle": str(bundle), "backend": grader.backend, "precision": grader.precision,
                                 "model": manifest.model, "grading": grading.to_dict(),
                                 "knn_k": grader.k if len(modes) > 1 else None})


def _ordinal_mode(name: str, ordinal_logits: np.ndarray, grading: GradingConfig) -> ModePredictions:
    cumulative = cumulative_probabilities(ordinal_logits, grading)
    referable = cumulative[:, grading.referable_min_grade - 1]
    return ModePredictions(name=name, predicted=ordinal_grades(ordinal_logits, grading.thresholds),
                           grade_probs=class_probabilities(cumulative), referable_scores=referable,
                           referable_pred=referable >= grading.referable_threshold)


def _prototype_mode(prototype_logits: np.ndarray, grading: GradingConfig) -> ModePredictions:
    return _mode_from_distribution("prototype", prototype_probabilities(prototype_logits, grading), grading)


def _knn_mode(neighbours, grading: GradingConfig) -> ModePredictions:
    from edgeretina.runtime.knn import vote_distribution
    return _mode_from_distribution("knn", np.array([vote_distribution(n) for n in neighbours]), grading)


def _mode_from_distribution(name: str, probs: np.ndarray, grading: GradingConfig) -> ModePredictions:
    """A mode that gives grade probabilities directly: grade = the most probable, P(referable) = the mass
    at the referable grades, referable at 0.5 (these modes have no calibrated operating point)."""
    referable = probs[:, grading.referable_min_grade:].sum(axis=1)
    return ModePredictions(name=name, predicted=probs.argmax(axis=1), grade_probs=probs,
                           referable_scores=referable, referable_pred=referable >= 0.5)


def _case_ids(items: Sequence[LabeledImage]) -> list[str]:
    """Case ids that name one image each: an id that two images share (two sites numbering from 0001, the
    frames of one DICOM) becomes the image's path (and frame)."""
    counts: dict[tuple[str, str], int] = {}
    for it in items:
        counts[(it.case_id, _source(it))] = counts.get((it.case_id, _source(it)), 0) + 1
    return [it.case_id if counts[(it.case_id, _source(it))] == 1
            else f"{it.path}" + (f"#frame={it.frame}" if it.frame else "") for it in items]


def _source(item: LabeledImage) -> str:
    return getattr(item, "source", "") or item.extra.get("source", "") or "unknown"


def _excluded(counts: dict[str, int]) -> dict[str, int]:
    return {reason: n for reason, n in counts.items() if n}

