"""The embedded default job: phantom data -> train -> export -> grade the held-out set on the runtime.

This sits at the CLI layer (it drives training, export and the runtime), and it measures the model the
way a device would see it: QWK and referable sensitivity/specificity come from the exported bundle run
through the runtime, not from torch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeretina.atomic import write_json_atomic
from edgeretina.dataset import read_labels
from edgeretina.metrics import grading_report


# The demo's tower: a tiny CLIP ModifiedResNet. A tiny ViT from random initialisation stays at the
# class prior for hundreds of steps on a phantom set this size (ViTs need pretrained weights or long
# schedules); the ResNet reaches QWK ~0.7 within ~150 steps on 2 cores.
DEMO_ARCH = "edgeretina-tiny-rn"


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    arch: str = DEMO_ARCH
    n_train: int = 1800
    n_test: int = 300
    photo_size: int = 384          # phantom photograph height
    train_seed: int = 1
    test_seed: int = 2             # a different seed: the test set shares no case with training
    epochs: int = 30
    train_minutes: float = 5.0     # keeps the whole demo under 10 minutes on 2 cores
    precision: str = "auto"        # training precision (training/precision.py): fp32 on CPUs without bf16 units
    threads: int | None = None


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict:
    from edgeretina.export import ExportConfig, export
    from edgeretina.phantom import PhantomConfig, generate_dataset
    from edgeretina.runtime.batch import grade_paths
    from edgeretina.runtime.grader import Grader
    from edgeretina.runtime.report import write_csv
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.model import ModelConfig

    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now
        log(f"[demo] {name}: {timings[name]} s")

    phantom = PhantomConfig(size=config.photo_size)
    train_csv = generate_dataset(workdir / "train", n=config.n_train, seed=config.train_seed, config=phantom)
    test_csv = generate_dataset(workdir / "test", n=config.n_test, seed=config.test_seed, config=phantom)
    lap("synthesise phantom data")
    model = ModelConfig(backbone=BackboneConfig(name=config.arch))
    result = train(TrainConfig(data=(f"phantom:{train_csv.parent}",), out=workdir / "checkpoint.pt", model=model, epochs=config.epochs,
                               max_minutes=config.train_minutes, precision=config.precision,
                               threads=config.threads), log=log)
    lap("train")
    bundle = export(ExportConfig(checkpoint=result.checkpoint, out=workdir / "bundle", target="onnx",
                                 reference_images=test_csv, reference_count=32, overwrite=True), log=log)
    lap("export")
    items = read_labels(test_csv)
    grader = Grader(bundle, threads=config.threads, trust=None)   # the bundle it just exported itself
    records = grade_paths(grader, [item.path for item in items])
    write_csv(workdir / "test_results.csv", records)
    lap("grade held-out set on the runtime")
    metrics = _metrics(items, records)
    metrics.update(timings_s=timings, bundle_mb=round(_size_mb(bundle), 2),
                   val_qwk_torch=result.metrics.get("qwk"))
    write_json_atomic(workdir / "metrics.json", metrics)
    return metrics


def _metrics(items, records) -> dict:
    graded = [(item.grade, r) for item, r in zip(items, records) if r.grade is not None]
    truth = np.array([g for g, _ in graded])
    predicted = np.array([r.grade for _, r in graded])
    referable_p = np.array([r.referable_probability for _, r in graded])
    referable = np.array([r.referable for _, r in graded])
    report = grading_report(truth, predicted, referable_scores=referable_p, referable_pred=referable)
    inference = [r.timings_ms.get("inference", 0.0) for _, r in graded]
    per_image = [sum(r.timings_ms.values()) for _, r in graded]
    return {**report, "n_total": len(records), "n_ungradable": sum(r.gradable is False for r in records),
            "n_errors": sum(r.error is not None for r in records),
            "median_inference_ms": _median(inference), "median_image_ms": _median(per_image)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def format_summary(metrics: dict) -> str:
    sens, spec = metrics.get("referable_sensitivity"), metrics.get("referable_specificity")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return "\n".join([
        f"held-out phantom test set, graded by the exported bundle on the runtime: n = {metrics['n']} "
        f"gradable of {metrics['n_total']} ({metrics['n_ungradable']} ungradable, {metrics['n_errors']} errors)",
        f"  QWK {fmt(metrics['qwk'])}   accuracy {fmt(metrics['accuracy'])}   "
        f"referable sensitivity {fmt(sens)} / specificity {fmt(spec)}   AUC {fmt(metrics.get('referable_auc'))}",
        f"  bundle {metrics['bundle_mb']} MB; median inference {metrics['median_inference_ms']} ms/image "
        f"(batched), median end-to-end {metrics['median_image_ms']} ms/image",
        "  wall time: " + ", ".join(f"{k} {v} s" for k, v in metrics["timings_s"].items()),
    ])
