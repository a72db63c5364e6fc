"""What a training run's calibration and its frozen-backbone cache are worth, measured.

1. Calibration on held-out images: the checkpoint's model graded on DATA with the plain CORAL rule
   (thresholds 0, temperature 1, referable at P >= 0.5) and with the calibration the run fitted on its
   validation set (thresholds, temperatures, the referable operating point): QWK, ECE of the ordinal and
   prototype probabilities, and the referable sensitivity/specificity, before and after.
2. The frozen-backbone feature cache: the same heads-only training (backbone frozen, no augmentation)
   with and without the cache, on N images of DATA at a small input size; wall time of train() and its
   epochs, and the largest weight difference between the two results.

Usage: python benchmarks/training_report.py OUT.json --checkpoint CKPT --data FORMAT:PATH [--cache-images 400]
       [--cache-size 128] [--cache-epochs 3]
The numbers are recorded with the machine (CPU model and flags) they ran on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeretina.atomic import write_text_atomic
from edgeretina.bench import machine_info
from edgeretina.cpu import cpu_class
from edgeretina.grades import (GradingConfig, class_probabilities, cumulative_probabilities, ordinal_grades,
                               prototype_probabilities)
from edgeretina.layouts import load_data
from edgeretina.metrics import expected_calibration_error, quadratic_weighted_kappa, sensitivity_specificity


def calibration_effect(checkpoint: Path, data: list[str]) -> dict:
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.data import prepare_images
    from edgeretina.training.loop import predict

    ckpt = load_checkpoint(checkpoint)
    prepared = prepare_images(load_data(data).items, ckpt.preprocess)
    outputs = predict(ckpt.model, prepared.images, ckpt.preprocess)
    plain = GradingConfig(referable_min_grade=ckpt.grading.referable_min_grade)
    return {"n": int(len(prepared.grades)), "grading": ckpt.grading.to_dict(),
            "before": _graded(outputs, prepared.grades, plain), "after": _graded(outputs, prepared.grades, ckpt.grading)}


def _graded(outputs: dict, grades: np.ndarray, grading: GradingConfig) -> dict:
    logits = outputs["ordinal_logits"]
    cumulative = cumulative_probabilities(logits, grading)
    referable = cumulative[:, grading.referable_min_grade - 1] >= grading.referable_threshold
    sensitivity, specificity = sensitivity_specificity((grades >= grading.referable_min_grade).astype(int), referable)
    return {"qwk": quadratic_weighted_kappa(grades, ordinal_grades(logits, grading.thresholds)),
            "ece_ordinal": expected_calibration_error(class_probabilities(cumulative), grades),
            "ece_prototype": expected_calibration_error(prototype_probabilities(outputs["prototype_logits"], grading),
                                                        grades),
            "referable_sensitivity": sensitivity, "referable_specificity": specificity}


def cache_effect(data: list[str], images: int, size: int, epochs: int) -> dict:
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.model import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "subset.csv"
        items = load_data(data).items[:images]
        subset.write_text("path,case_id,grade\n" + "".join(f"{it.path},{it.case_id},{it.grade}\n" for it in items))
        model = ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=size))
        runs = {}
        for cached in (True, False):
            config = TrainConfig(data=(subset,), out=Path(tmp) / f"{cached}.pt", model=model, epochs=epochs,
                                 batch_size=40, trainable_blocks=0, augment=False, cache_features=cached, seed=0)
            started = time.perf_counter()
            train(config, log=lambda _: None, show_progress=False)
            runs["cached" if cached else "uncached"] = {"train_seconds": round(time.perf_counter() - started, 2)}
            runs["cached" if cached else "uncached"]["state"] = load_checkpoint(config.out).model.state_dict()
        difference = max(float((runs["cached"]["state"][k] - runs["uncached"]["state"][k]).abs().max())
                         for k in runs["cached"]["state"] if runs["cached"]["state"][k].is_floating_point())
        for run in runs.values():
            del run["state"]
    return {"images": len(items), "image_size": size, "epochs": epochs, **runs,
            "speed_ratio": round(runs["uncached"]["train_seconds"] / runs["cached"]["train_seconds"], 2),
            "max_weight_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", action="append", required=True, help="held-out FORMAT:PATH (repeatable)")
    parser.add_argument("--cache-images", type=int, default=400)
    parser.add_argument("--cache-size", type=int, default=128)
    parser.add_argument("--cache-epochs", type=int, default=3)
    args = parser.parse_args()
    result = {"machine": machine_info(), "cpu_class": cpu_class(), "checkpoint": str(args.checkpoint),
              "data": args.data, "calibration": calibration_effect(args.checkpoint, args.data)}
    if args.cache_images > 0:
        result["feature_cache"] = cache_effect(args.data, args.cache_images, args.cache_size, args.cache_epochs)
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
