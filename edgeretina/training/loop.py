"""The training loop: AdamW, warm-up + cosine schedule, class-balanced sampling, autocast where the
hardware computes the lower precision natively (training/precision.py), model selection on validation
QWK, calibration, and the KNN feature bank of the training cases."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeretina.dataset import LabeledImage, grade_counts, read_labels
from edgeretina.errors import ConfigError, DatasetError
from edgeretina.metrics import grading_report
from edgeretina.preprocess import PreprocessConfig
from edgeretina.grades import ordinal_grades
from edgeretina.training.calibration import calibrate
from edgeretina.training.checkpoint import Checkpoint, TrainingBank, save_checkpoint
from edgeretina.training.data import (PreparedSet, augment, balanced_batches, prepare_images, sequential_batches,
                                      steps_per_epoch, to_model_input)
from edgeretina.training.losses import LossWeights, grader_loss
from edgeretina.training.model import GraderModel, ModelConfig
from edgeretina.training.precision import PRECISIONS, ResolvedPrecision, resolve_precision


@dataclass(frozen=True)
class TrainConfig:
    labels: Path
    out: Path                                   # checkpoint file to write
    model: ModelConfig = field(default_factory=ModelConfig)
    val_labels: Path | None = None              # default: a stratified split of `labels`
    val_fraction: float = 0.15
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0              # use ~0.1 when fine-tuning pretrained weights
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    ben_graham: bool = False
    seed: int = 0
    threads: int | None = None
    precision: str = "auto"                    # auto | fp32 | bf16 | fp16 (training/precision.py)
    workers: int | None = None                  # processes that decode/prepare images
    max_minutes: float | None = None            # stop early (keeping the best epoch) past this budget
    loss: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if not 0.0 < self.val_fraction < 0.9:
            raise ConfigError("val_fraction must lie between 0 and 0.9")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict
    seconds: float


Logger = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(config: TrainConfig, log: Logger = _stderr, show_progress: bool = True) -> TrainResult:
    """Train a GraderModel on a labels.csv and write a self-describing checkpoint."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = resolve_precision(config.precision)
    log(f"precision: {precision.name} ({precision.reason})")
    model = _memory_format(GraderModel(config.model), torch.channels_last)
    preprocess = PreprocessConfig(image_size=model.backbone.image_size, mean=tuple(model.backbone.mean),
                                  std=tuple(model.backbone.std), ben_graham=config.ben_graham)
    train_items, val_items = _split(config, rng)
    log(f"data: {len(train_items)} train {grade_counts(train_items)}, {len(val_items)} val {grade_counts(val_items)}")
    lesion_grid = model.grid_size if model.lesion_head is not None else None
    train_set = prepare_images(train_items, preprocess, config.workers, lesion_grid=lesion_grid)
    val_set = prepare_images(val_items, preprocess, config.workers)
    for path, reason in train_set.skipped + val_set.skipped:
        log(f"skipped {path}: {reason}")
    optimizer = _optimizer(model, config)
    steps = steps_per_epoch(len(train_set.grades), config.batch_size)
    schedule = _WarmupCosine(steps * config.epochs, config.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    best_qwk, best_state, history = -math.inf, None, []
    deadline = started + config.max_minutes * 60 if config.max_minutes else math.inf
    epochs = config.epochs
    for epoch in range(config.epochs):
        if epoch >= epochs:
            break
        epoch_started = time.perf_counter()
        losses = _train_epoch(model, train_set, preprocess, optimizer, scheduler, config, precision, rng, steps,
                              f"epoch {epoch + 1}/{config.epochs}", show_progress)
        val_out = predict(model, val_set.images, preprocess, config.batch_size)
        qwk = grading_report(val_set.grades, ordinal_grades(val_out["ordinal_logits"], [0.0] * 4))["qwk"]
        history.append({"epoch": epoch + 1, "loss": losses, "val_qwk": qwk})
        log(f"epoch {epoch + 1}: loss {losses['total']:.4f} val QWK {qwk:.4f}")
        if qwk > best_qwk:
            best_qwk, best_state = qwk, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch == 0 and deadline < math.inf:
            epochs = _epochs_within_budget(config.epochs, time.perf_counter() - epoch_started, deadline)
            if epochs < config.epochs:
                schedule.total_steps = steps * epochs      # finish the cosine decay inside the budget
                log(f"time budget of {config.max_minutes} min: training {epochs} of {config.epochs} epochs")
        if time.perf_counter() > deadline:
            log(f"time budget of {config.max_minutes} min reached after epoch {epoch + 1}")
            break
    model.load_state_dict(best_state)
    model = _memory_format(model, torch.contiguous_format)   # checkpoint and ONNX export see plain tensors
    model.eval()
    val_out = predict(model, val_set.images, preprocess, config.batch_size)
    grading = calibrate(val_out["ordinal_logits"], val_set.grades)
    val_metrics = grading_report(val_set.grades, ordinal_grades(val_out["ordinal_logits"], grading.thresholds))
    log(f"validation after calibration: QWK {val_metrics['qwk']:.4f}, thresholds "
        f"{[round(t, 2) for t in grading.thresholds]}, temperature {grading.temperature:.3f}")
    bank = build_training_bank(model, train_set, preprocess, config.batch_size)
    summary = {
        "train": {"labels": str(config.labels), "n": len(train_set.grades),
                  "grade_counts": np.bincount(train_set.grades, minlength=5).tolist(),
                  "skipped": len(train_set.skipped)},
        "val": {"n": len(val_set.grades), "grade_counts": np.bincount(val_set.grades, minlength=5).tolist()},
        "schedule": {"epochs_run": len(history), "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
                     "precision": precision.name, "precision_reason": precision.reason},
        "history": history,
        "val_metrics": _scalars(val_metrics),
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = save_checkpoint(config.out, Checkpoint(model=model, preprocess=preprocess, grading=grading,
                                                  bank=bank, summary=summary))
    return TrainResult(checkpoint=path, metrics=summary["val_metrics"], seconds=summary["seconds"])


def _split(config: TrainConfig, rng: np.random.Generator) -> tuple[list[LabeledImage], list[LabeledImage]]:
    items = read_labels(config.labels)
    if config.val_labels is not None:
        return items, read_labels(config.val_labels)
    by_grade: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_grade.setdefault(item.grade, []).append(i)
    val_idx: list[int] = []
    for idx in by_grade.values():
        take = int(round(len(idx) * config.val_fraction)) if len(idx) > 1 else 0
        val_idx.extend(rng.permutation(idx)[:take].tolist())
    if not val_idx:
        raise DatasetError(f"{config.labels}: too few images for a validation split; pass val_labels")
    chosen = set(val_idx)
    return [it for i, it in enumerate(items) if i not in chosen], [items[i] for i in sorted(chosen)]


def _optimizer(model: GraderModel, config: TrainConfig) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.startswith("backbone.")
        decay = param.ndim >= 2                       # no weight decay on biases, norms, scales
        groups.setdefault((in_backbone, decay), []).append(param)
    return torch.optim.AdamW([
        {"params": params, "lr": config.lr * (config.backbone_lr_scale if bb else 1.0),
         "weight_decay": config.weight_decay if decay else 0.0}
        for (bb, decay), params in groups.items()
    ])


class _WarmupCosine:
    """Linear warm-up then cosine decay over `total_steps`, which may be shortened while training
    (a time budget decides how many epochs fit only once the first epoch has been timed)."""

    def __init__(self, total_steps: int, warmup_fraction: float):
        self.total_steps = total_steps
        self.warmup = max(1, int(total_steps * warmup_fraction))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epochs_within_budget(planned: int, epoch_seconds: float, deadline: float, now: float | None = None) -> int:
    """How many epochs of `epoch_seconds` fit: the one already run, and as many more as end by `deadline`
    (perf_counter seconds; `now` defaults to the current one)."""
    remaining = deadline - (time.perf_counter() if now is None else now)
    return max(1, min(planned, 1 + int(remaining // max(epoch_seconds, 1e-6))))


def _train_epoch(model, data: PreparedSet, preprocess, optimizer, scheduler, config: TrainConfig,
                 precision: ResolvedPrecision, rng, steps: int, label: str, show_progress: bool) -> dict[str, float]:
    model.train()
    totals: dict[str, float] = {}
    batches = balanced_batches(data.grades, config.batch_size, steps, rng)
    for idx in _progress(batches, steps, label, show_progress):
        images, lesions = augment(data.images[idx], rng, data.lesions[idx] if data.lesions is not None else None)
        grades = torch.from_numpy(data.grades[idx])
        with torch.autocast("cpu", dtype=precision.autocast_dtype or torch.bfloat16,
                            enabled=precision.autocast_dtype is not None):
            outputs = model(_like_model(to_model_input(images, preprocess), model))
        targets = torch.from_numpy(lesions).float() if lesions is not None else None
        loss, parts = grader_loss(outputs, grades, config.loss, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for key, value in {"total": float(loss.detach()), **parts}.items():
            totals[key] = totals.get(key, 0.0) + value / steps
    return totals


def _memory_format(model: GraderModel, memory_format: torch.memory_format) -> GraderModel:
    """Convolutional towers train in channels-last on the CPU: oneDNN's NHWC kernels took a tiny-rn step
    (batch 32 at 224 px, fp32, 2 threads, AMD EPYC Zen 3) from ~1.0 to ~0.77 s. ViTs are left as they are."""
    if model.backbone.kind == "vit":
        return model
    return model.to(memory_format=memory_format)


def _like_model(images: torch.Tensor, model: GraderModel) -> torch.Tensor:
    """The batch in the memory format the model's convolutions are in (no copy for a plain model)."""
    weight = next((p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    if weight is None or weight.is_contiguous():
        return images
    return images.contiguous(memory_format=torch.channels_last)


def _progress(iterable, total: int, label: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=label, leave=False, file=sys.stderr)


def predict(model: GraderModel, images_u8: np.ndarray, preprocess: PreprocessConfig,
            batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run the model in eval mode over prepared uint8 images; returns the exported outputs as numpy."""
    return _predict_batches(model, len(images_u8), batch_size,
                            lambda idx: to_model_input(images_u8[idx], preprocess))


def predict_normalized(model: GraderModel, inputs: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """`predict` over inputs already normalised as the exported graph takes them (float32 [N, 3, H, W])."""
    return _predict_batches(model, len(inputs), batch_size, lambda idx: torch.from_numpy(inputs[idx]).float())


@torch.no_grad()
def _predict_batches(model: GraderModel, count: int, batch_size: int,
                     batch_input: Callable[[np.ndarray], torch.Tensor]) -> dict[str, np.ndarray]:
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    for idx in sequential_batches(count, batch_size):
        out = model(_like_model(batch_input(idx), model))
        for name in model.output_names:
            chunks.setdefault(name, []).append(out[name].float().numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def build_training_bank(model: GraderModel, data: PreparedSet, preprocess: PreprocessConfig,
                        batch_size: int = 64) -> TrainingBank:
    embeddings = predict(model, data.images, preprocess, batch_size)["embedding"]
    return TrainingBank(embeddings=embeddings.astype(np.float32), grades=data.grades.copy(),
                        case_ids=list(data.case_ids))


def _scalars(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) or v is None}
