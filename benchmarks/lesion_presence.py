"""Lesion presence per type on a phantom set: the lesion head's image-level presence (sigmoid of the
max-pooled patch logits >= the type's threshold, as the runtime reports it) against the phantom's lesion counts.

Usage: python benchmarks/lesion_presence.py OUT.json --checkpoint CKPT --data DIR [--threshold 0.5]
DIR is a phantom folder (labels.csv with n_<CODE> columns). The thresholds are the checkpoint's calibrated
grading.lesion_thresholds (what its bundles carry to the runtime), 0.5 for every type when it has none;
--threshold puts one threshold on every type instead. Precision, recall, F1 and support per type, with
the thresholds used, recorded with the machine they ran on.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from edgeretina.atomic import write_text_atomic
from edgeretina.bench import machine_info
from edgeretina.cpu import cpu_class
from edgeretina.grades import LESION_CODES
from edgeretina.layouts import load_data


def presence_scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Binary precision/recall/F1 of one lesion type (0 where undefined), with the counts."""
    tp = int(np.sum(truth & predicted))
    fp = int(np.sum(~truth & predicted))
    fn = int(np.sum(truth & ~predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "support": int(truth.sum()), "predicted": int(predicted.sum()), "n": int(len(truth))}


def lesion_truth(data_dir: Path, paths: list[Path]) -> np.ndarray:
    """[N, L] bool: lesion type present (count > 0) per image, in the order of `paths`."""
    with open(data_dir / "labels.csv", newline="") as handle:
        rows = {str((data_dir / row["path"]).resolve()): row for row in csv.DictReader(handle)}
    return np.array([[int(rows[str(p.resolve())][f"n_{code}"]) > 0 for code in LESION_CODES] for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threshold", type=float, default=None,
                        help="one presence threshold for every type (default: the checkpoint's, else 0.5)")
    args = parser.parse_args()

    from edgeretina.training.calibration import lesion_presence_probabilities
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.data import prepare_images
    from edgeretina.training.loop import predict

    ckpt = load_checkpoint(args.checkpoint)
    items = load_data([f"phantom:{args.data}"]).items
    prepared = prepare_images(items, ckpt.preprocess)
    kept = [items[i].path for i in prepared.indices]
    outputs = predict(ckpt.model, prepared.images, ckpt.preprocess)
    if "lesion_logits" not in outputs:
        raise SystemExit(f"{args.checkpoint} has no lesion head")
    thresholds, source = presence_thresholds(ckpt.grading.lesion_thresholds, args.threshold)
    print(f"thresholds ({source}): " + ", ".join(f"{c} {t:.4f}" for c, t in zip(LESION_CODES, thresholds)))
    predicted = lesion_presence_probabilities(outputs["lesion_logits"]) >= np.asarray(thresholds)[None, :]
    truth = lesion_truth(args.data, kept)
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "threshold_source": source,
              "thresholds": dict(zip(LESION_CODES, thresholds)),
              "cpu_class": cpu_class(), "machine": machine_info(),
              "per_type": {code: presence_scores(truth[:, j], predicted[:, j]) for j, code in enumerate(LESION_CODES)}}
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    for code, scores in result["per_type"].items():
        print(f"{code:4s} F1 {scores['f1']:.3f}  P {scores['precision']:.3f}  R {scores['recall']:.3f}  "
              f"support {scores['support']}/{scores['n']}  threshold {result['thresholds'][code]:.4f}")


def presence_thresholds(calibrated: tuple[float, ...] | None, override: float | None) -> tuple[list[float], str]:
    """The per-type thresholds to score with and where they come from: --threshold on every type, else the
    checkpoint's calibrated ones, else 0.5 on every type (the runtime's rule for such a bundle)."""
    if override is not None:
        return [float(override)] * len(LESION_CODES), "--threshold"
    if calibrated is not None:
        return [float(t) for t in calibrated], "checkpoint grading.lesion_thresholds"
    return [0.5] * len(LESION_CODES), "default 0.5 (the checkpoint has no lesion thresholds)"


if __name__ == "__main__":
    main()
