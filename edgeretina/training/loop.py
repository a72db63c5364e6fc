"""The training loop: AdamW, warm-up + cosine schedule, balanced batches (n images of every grade, or a
class-weighted sampler), augmentation that keeps the field of view (training/augment.py), autocast where
the hardware computes the lower precision natively (training/precision.py), model selection and early
stopping on validation QWK, resumable epochs (training/resume.py), a frozen or partly frozen backbone
(training/freezing.py) with a feature cache when it is frozen whole (training/feature_cache.py),
multi-process DDP under torchrun (training/distributed.py), calibration, and the KNN feature bank of the
training cases."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeretina.choices import LESION_LABELS, TRAINING_DEVICES
from edgeretina.dataset import LabeledImage, grade_counts
from edgeretina.errors import ConfigError, DatasetError
from edgeretina.layouts import DataSpec, load_data, parse_data_spec, split_items
from edgeretina.metrics import grading_report
from edgeretina.preprocess import PreprocessConfig
from edgeretina.grades import ordinal_grades
from edgeretina.training import distributed
from edgeretina.training.augment import AugmentConfig, augment
from edgeretina.training.calibration import DEFAULT_TARGET_SENSITIVITY, calibrate
from edgeretina.training.checkpoint import Checkpoint, TrainingBank, save_checkpoint
from edgeretina.training.contrastive import check_contrastive_config, pretrain_contrastive
from edgeretina.training.data import (SAMPLERS, PerGradeBatchSampler, PreparedSet, WeightedBatchSampler,
                                      image_lesion_labels, lesion_mask_paths, missing_lesion_masks, prepare_images,
                                      sequential_batches, to_model_input)
from edgeretina.training.distributed import DistributedContext
from edgeretina.training.feature_cache import FeatureCache, HeadsOnly, compute_features, predict_from_features
from edgeretina.training.freezing import FreezePlan, freeze_backbone, keep_frozen_in_eval
from edgeretina.training.lesion_generation import (LesionBank, LesionGenerationConfig, generate_batch,
                                                   prepared_lesion_masks)
from edgeretina.training.losses import LossWeights, grader_loss
from edgeretina.training.model import GraderModel, ModelConfig
from edgeretina.training.precision import PRECISIONS, ResolvedPrecision, resolve_precision
from edgeretina.training.resume import (ResumeState, load_resume_state, resume_path, run_fingerprint,
                                        save_resume_state)

DEVICES = TRAINING_DEVICES


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Raises ConfigError for values out of range (see __post_init__).

    sampler: "per_grade" — every batch holds `per_grade` images of each grade present (default
        batch_size // grades present), an epoch ends when the largest grade has been seen once;
        "weighted" — batch_size indices drawn with probability 1 / (frequency of their grade).
    patience / min_delta: stop when validation QWK has not risen by more than min_delta for `patience`
        epochs (None: never); the best epoch's weights are kept either way.
    trainable_blocks: None fine-tunes the whole backbone, 0 freezes it (heads only), N trains its last
        N blocks (training/freezing.py).
    augment / augmentation: whether and how strongly to augment (training/augment.py).
    cache_features: with the backbone frozen (trainable_blocks=0) and augment off, compute its outputs
        once and train the heads from them (training/feature_cache.py).
    resume: False starts afresh; True continues from the resume file next to `out`
        (`resume.resume_path(out)`) when there is one; a path continues from that file (it must exist).
    device: "cpu" or "cuda" (under torchrun each process takes cuda:LOCAL_RANK).
    contrastive_epochs / contrastive_lr: image-text contrastive epochs before the grading epochs, and
        their towers' learning rate (training/contrastive.py; 0 epochs: none).
    """

    data: tuple[DataSpec, ...]                  # FORMAT:PATH specs (edgeretina/layouts), merged; a Path is a labels.csv
    out: Path                                   # checkpoint file to write
    model: ModelConfig = field(default_factory=ModelConfig)
    val_data: tuple[DataSpec, ...] = ()         # default: a patient-, source- and grade-aware split of `data`
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
    sampler: str = "per_grade"
    per_grade: int | None = None
    patience: int | None = None
    min_delta: float = 0.0
    trainable_blocks: int | None = None
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    cache_features: bool = True
    resume: bool | Path = False
    device: str = "cpu"
    target_sensitivity: float | None = DEFAULT_TARGET_SENSITIVITY   # referable operating point on validation
    prompts_file: Path | None = None            # grade/lesion descriptions (default: training/prompts.json)
    contrastive_epochs: int = 0
    contrastive_lr: float = 1e-5
    # ELLG lesion generation: lesions cut from training images pasted into others (off by default: on the
    # phantom it did not help, training/lesion_generation.py)
    lesion_generation: LesionGenerationConfig = field(default_factory=LesionGenerationConfig)
    # what the lesion head learns from: "masks" (masks/<CODE>/<case_id>.png) or "image" (image-level labels,
    # data.image_lesion_labels: weak supervision through the max-pooled presence)
    lesion_labels: str = "masks"

    def __post_init__(self):
        object.__setattr__(self, "data", _specs(self.data))
        object.__setattr__(self, "val_data", _specs(self.val_data))
        if not self.data:
            raise ConfigError("no training data: give at least one FORMAT:PATH")
        if self.target_sensitivity is not None and not 0.0 < self.target_sensitivity < 1.0:
            raise ConfigError(f"target_sensitivity must lie strictly between 0 and 1, got {self.target_sensitivity}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if not 0.0 < self.val_fraction < 0.9:
            raise ConfigError("val_fraction must lie between 0 and 0.9")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if self.per_grade is not None and self.per_grade < 1:
            raise ConfigError(f"per_grade must be at least 1, got {self.per_grade}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be at least 1 epoch (or None: no early stopping), got {self.patience}")
        if self.min_delta < 0:
            raise ConfigError(f"min_delta must be >= 0, got {self.min_delta}")
        if self.trainable_blocks is not None and self.trainable_blocks < 0:
            raise ConfigError(f"trainable_blocks must be None, 0 or positive, got {self.trainable_blocks}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.lesion_labels not in LESION_LABELS:
            raise ConfigError(f"lesion_labels must be one of {', '.join(LESION_LABELS)}, not {self.lesion_labels!r}")
        if self.lesion_labels == "image" and not self.model.lesion_head:
            raise ConfigError("image-level lesion labels train the lesion head: add --lesion-head")
        if self.lesion_labels == "image" and self.lesion_generation.probability > 0:
            raise ConfigError("lesion generation pastes lesions from their masks: it needs lesion_labels 'masks'")
        check_contrastive_config(self)


def _specs(values) -> tuple[DataSpec, ...]:
    """Dataset specs from FORMAT:PATH strings or DataSpecs; a Path (or one value alone) is accepted, a Path
    being a labels.csv (the generic csv layout)."""
    if isinstance(values, (str, Path, DataSpec)):
        values = (values,)
    return tuple(v if isinstance(v, DataSpec) else DataSpec("csv", v) if isinstance(v, Path) else parse_data_spec(v)
                 for v in values)


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict
    seconds: float
    rank: int = 0               # the process that returns it (under torchrun only rank 0 writes and reports)


Logger = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _silent(_message: str) -> None:
    pass


class EarlyStopping:
    """Stop when the monitored value has not risen by more than `min_delta` for `patience` updates."""

    def __init__(self, patience: int | None, min_delta: float = 0.0, best: float = -math.inf, waited: int = 0):
        self.patience, self.min_delta, self.best, self.waited = patience, min_delta, best, waited

    def update(self, value: float) -> bool:
        """Record a value; True when it is an improvement (the new best)."""
        if value > self.best + self.min_delta:
            self.best, self.waited = value, 0
            return True
        self.waited += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.waited >= self.patience


def train(config: TrainConfig, log: Logger = _stderr, show_progress: bool = True) -> TrainResult:
    """Train a GraderModel on a labels.csv and write a self-describing checkpoint.

    Under torchrun (WORLD_SIZE > 1) every process runs this; rank 0 logs, validates and writes, and every
    process returns rank 0's result. Raises ConfigError, DatasetError and CheckpointError (a bad resume
    file)."""
    started = time.perf_counter()
    ctx = distributed.init_from_env(config.device)
    threads = torch.get_num_threads()
    try:
        # The run seeds torch's global generators; the caller's random state and thread count come back.
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.startswith("cuda") else []):
            result = _train(config, ctx, log if ctx.is_main else _silent, show_progress and ctx.is_main, started)
    except BaseException:
        distributed.shutdown(ctx, failed=True)
        raise
    finally:
        torch.set_num_threads(threads)
    distributed.shutdown(ctx)
    return result


@dataclass
class _Run:
    """What the epochs share: the model and its trainer, the data, the optimisation state."""

    config: TrainConfig
    ctx: DistributedContext
    precision: ResolvedPrecision
    model: GraderModel
    plan: FreezePlan
    preprocess: PreprocessConfig
    train_set: PreparedSet
    val_set: PreparedSet
    inputs: "_ImageInputs | _CachedInputs"
    val_cache: FeatureCache | None
    sampler: PerGradeBatchSampler | WeightedBatchSampler
    optimizer: torch.optim.Optimizer
    schedule: "_WarmupCosine"
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    augment_rng: np.random.Generator
    fingerprint: dict
    data_summary: dict
    trainer: torch.nn.Module | None = None
    # progress, restored on resume
    epoch: int = 0
    planned_epochs: int = 0
    best_qwk: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    history: list = field(default_factory=list)
    stopping: EarlyStopping | None = None
    elapsed_before: float = 0.0
    resumed_from: int | None = None
    stopped: dict | None = None
    contrastive: dict | None = None     # the contrastive stage's record (None: not run)


def _train(config: TrainConfig, ctx: DistributedContext, log: Logger, show_progress: bool, started: float) -> TrainResult:
    run = _set_up(config, ctx, log)
    _restore(run, log)
    run.trainer = _trainer(run, log)
    _run_epochs(run, log, show_progress, started)
    result = _finish(run, log, started) if ctx.is_main else None
    result = distributed.broadcast(result, ctx)
    return dataclasses.replace(result, rank=ctx.rank)


def _set_up(config: TrainConfig, ctx: DistributedContext, log: Logger) -> _Run:
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    precision = resolve_precision(config.precision, ctx.device)
    log(f"precision: {precision.name} ({precision.reason})")
    if ctx.is_distributed:
        log(f"distributed: {ctx.world_size} processes, backend {ctx.backend}")
    model = GraderModel(config.model, prompts_file=config.prompts_file)   # the same initialisation in every process
    if ctx.is_distributed:                            # but each its own dropout and drop-path draws
        torch.manual_seed(int(np.random.SeedSequence([config.seed, _TORCH_STREAM, ctx.rank]).generate_state(1)[0]))
    plan = freeze_backbone(model.backbone, config.trainable_blocks)
    model = _memory_format(model.to(ctx.device), torch.channels_last)
    log(plan.describe(model))
    preprocess = PreprocessConfig(image_size=model.backbone.image_size, mean=tuple(model.backbone.mean),
                                  std=tuple(model.backbone.std), ben_graham=config.ben_graham)
    train_items, val_items, data_summary = _split(config, log)   # deterministic: the same in every process
    log(f"data: {len(train_items)} train {grade_counts(train_items)}, {len(val_items)} val {grade_counts(val_items)}")
    weak = model.lesion_head is not None and config.lesion_labels == "image"
    lesion_grid = model.lesion_grid_size if model.lesion_head is not None and not weak else None
    train_set = prepare_images(train_items, preprocess, config.workers, lesion_grid=lesion_grid)
    val_set = prepare_images(val_items, preprocess, config.workers,
                             lesion_grid=None if weak else lesion_truth_grid(model, val_items))
    if weak:
        train_set, val_set = (_with_image_lesion_labels(prepared, items)
                              for prepared, items in ((train_set, train_items), (val_set, val_items)))
    for path, reason in train_set.skipped + val_set.skipped:
        log(f"skipped {path}: {reason}")
    contrastive = pretrain_contrastive(model, train_items, train_set, preprocess, config, plan, ctx, log,
                                       precision.autocast_dtype)
    sampler = _sampler(config, train_set.grades, ctx, log)
    augment_rng = np.random.default_rng([config.seed, _AUGMENT_STREAM, ctx.rank])
    bank = _lesion_bank(config.lesion_generation, train_items, train_set, preprocess, log)
    fine_map = model.fine_lesion_head is not None     # [N, C, 32, 32] a 256 px image: too big to cache
    cached = config.cache_features and plan.backbone_frozen and not config.augment and bank is None and not fine_map
    if plan.backbone_frozen and config.augment:
        log("backbone frozen with augmentation on: it runs every step (no feature cache)")
    autocast = lambda: _autocast(precision, ctx)  # noqa: E731
    val_cache = None
    if cached:
        begun = time.perf_counter()
        to_input = lambda batch, m: _like_model(batch.to(ctx.device), m)  # noqa: E731
        train_cache = compute_features(model, train_set.images, preprocess, config.batch_size, to_input, autocast)
        val_cache = compute_features(model, val_set.images, preprocess, config.batch_size, to_input, autocast)
        log(f"feature cache: backbone outputs of {len(train_cache)} + {len(val_cache)} images computed once "
            f"({(train_cache.nbytes + val_cache.nbytes) / 1e6:.1f} MB, {time.perf_counter() - begun:.1f} s)")
        inputs = _CachedInputs(train_cache, train_set, ctx.device)
    else:
        inputs = _ImageInputs(train_set, preprocess, config.augmentation if config.augment else None,
                              augment_rng, model, ctx.device, bank)
    optimizer = _optimizer(model, config)
    schedule = _WarmupCosine(sampler.steps_per_epoch * config.epochs, config.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(_device_type(ctx), enabled=precision.name == "fp16")
    fingerprint = run_fingerprint(config, train_set.case_ids, val_set.case_ids, train_set.grades, val_set.grades,
                                  ctx.world_size, cached)
    return _Run(config=config, ctx=ctx, precision=precision, model=model, plan=plan, preprocess=preprocess,
                train_set=train_set, val_set=val_set, inputs=inputs, val_cache=val_cache, sampler=sampler,
                optimizer=optimizer, schedule=schedule, scheduler=scheduler, scaler=scaler,
                augment_rng=augment_rng, fingerprint=fingerprint, data_summary=data_summary, planned_epochs=config.epochs,
                stopping=EarlyStopping(config.patience, config.min_delta), contrastive=contrastive)


# Separate random streams of one seed (numpy SeedSequence entropy), so that e.g. turning augmentation off
# does not change the batches.
_SAMPLER_STREAM, _AUGMENT_STREAM, _TORCH_STREAM = 1, 2, 3


def _sampler(config: TrainConfig, grades: np.ndarray, ctx: DistributedContext, log: Logger):
    if config.sampler == "weighted":
        sampler = WeightedBatchSampler(grades, config.batch_size, np.random.default_rng([config.seed, _SAMPLER_STREAM]))
        log(f"batches: {config.batch_size} images drawn with class-balancing weights, "
            f"{sampler.steps_per_epoch} an epoch")
    else:
        present = len(np.unique(grades))
        per_grade = config.per_grade or max(1, config.batch_size // present)   # never more than batch_size
        sampler = PerGradeBatchSampler(grades, per_grade, config.seed)
        log(f"batches: {per_grade} of each of {present} grades = {sampler.batch_size} images, "
            f"{sampler.steps_per_epoch} an epoch (until the largest grade has been seen once)")
    if sampler.batch_size < ctx.world_size:
        raise ConfigError(f"a batch of {sampler.batch_size} images cannot be shared by {ctx.world_size} processes: "
                          "raise batch_size or per_grade")
    return sampler


def _restore(run: _Run, log: Logger) -> None:
    """Continue from the resume file when config.resume asks for it."""
    config = run.config
    if config.resume is False:
        return
    path = resume_path(config.out) if config.resume is True else Path(config.resume)
    if config.resume is True and not path.is_file():
        log(f"resume: no resume file at {path}; starting afresh")
        return
    state = load_resume_state(path, run.fingerprint)
    run.model.load_state_dict(state.model)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    if state.scaler:
        run.scaler.load_state_dict(state.scaler)
    run.sampler.load_state_dict(state.sampler)
    rank = run.ctx.rank
    run.augment_rng.bit_generator.state = state.rng["numpy"][rank]
    torch.set_rng_state(state.rng["torch"][rank])
    if run.ctx.device.startswith("cuda") and state.rng.get("cuda"):
        torch.cuda.set_rng_state(state.rng["cuda"][rank], run.ctx.device)
    run.epoch, run.planned_epochs, run.history = state.epoch, state.planned_epochs, list(state.history)
    run.best_qwk, run.best_epoch, run.best_state = state.best_qwk, state.best_epoch, state.best_state
    run.stopping.best, run.stopping.waited = state.stopping_best, state.epochs_without_improvement
    run.elapsed_before, run.resumed_from = state.elapsed_seconds, state.epoch
    log(f"resume: continuing from {path} after epoch {state.epoch} (best QWK {state.best_qwk:.4f} "
        f"at epoch {state.best_epoch})")


def _trainer(run: _Run, log: Logger) -> torch.nn.Module:
    """The module a training step calls: the model, or its heads on cached features; DDP-wrapped under
    torchrun (find_unused_parameters only when a probe forward leaves a trainable parameter without grad)."""
    module = HeadsOnly(run.model) if isinstance(run.inputs, _CachedInputs) else run.model
    if not run.ctx.is_distributed:
        return module
    args, _, _ = run.inputs.batch(np.arange(min(2, len(run.train_set.grades))), augmented=False)
    unused = distributed.unused_parameters(module, *args)
    if unused:
        log(f"DDP: {len(unused)} trainable parameters get no gradient (e.g. {unused[0]}): find_unused_parameters on")
    return distributed.wrap(module, run.ctx, find_unused_parameters=bool(unused))


def _run_epochs(run: _Run, log: Logger, show_progress: bool, started: float) -> None:
    config, ctx = run.config, run.ctx
    resumed_at = time.perf_counter()
    budget = config.max_minutes * 60 if config.max_minutes else math.inf
    deadline = started + budget - run.elapsed_before
    for epoch in range(run.epoch, config.epochs):
        if epoch >= run.planned_epochs:
            break
        epoch_started = time.perf_counter()
        losses = _train_epoch(run.model, run, run.sampler.batches(epoch), f"epoch {epoch + 1}/{config.epochs}",
                              show_progress)
        stop = None
        if ctx.is_main:
            stop = _after_epoch(run, epoch, losses, epoch_started, deadline, log)
        run.planned_epochs, stop = distributed.broadcast((run.planned_epochs, stop), ctx)
        run.schedule.total_steps = run.sampler.steps_per_epoch * run.planned_epochs
        run.epoch = epoch + 1
        _save_resume(run, run.elapsed_before + time.perf_counter() - resumed_at)
        if ctx.is_main:
            entry = run.history[-1]
            log(f"epoch {epoch + 1}: loss {entry['loss']['total']:.4f} val QWK {entry['val_qwk']:.4f}")
            if stop:
                log(stop["message"])
        if stop:
            run.stopped = stop
            return
    run.stopped = ({"reason": "time_budget", "after_epoch": run.epoch,
                    "message": f"time budget: {run.planned_epochs} of {config.epochs} epochs"}
                   if run.planned_epochs < config.epochs else
                   {"reason": "completed", "after_epoch": run.epoch, "message": f"all {config.epochs} epochs run"})


def _after_epoch(run: _Run, epoch: int, losses: dict, epoch_started: float, deadline: float, log: Logger) -> dict | None:
    """Rank 0: validate, keep the best weights, apply the time budget and early stopping. Returns why the
    run stops now (None: it goes on)."""
    config = run.config
    val_out = _validation_outputs(run)
    qwk = grading_report(run.val_set.grades, ordinal_grades(val_out["ordinal_logits"], [0.0] * 4))["qwk"]
    run.history.append({"epoch": epoch + 1, "loss": losses, "val_qwk": qwk})
    if qwk > run.best_qwk:
        run.best_qwk, run.best_epoch = qwk, epoch + 1
        run.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    run.stopping.update(qwk)
    if epoch == 0 and deadline < math.inf:
        epochs = _epochs_within_budget(config.epochs, time.perf_counter() - epoch_started, deadline)
        if epochs < config.epochs:
            run.planned_epochs = epochs          # the cosine decay then ends inside the budget
            log(f"time budget of {config.max_minutes} min: training {epochs} of {config.epochs} epochs")
    if time.perf_counter() > deadline and epoch + 1 < config.epochs:
        return {"reason": "time_budget", "after_epoch": epoch + 1,
                "message": f"time budget of {config.max_minutes} min reached after epoch {epoch + 1}"}
    if run.stopping.should_stop and epoch + 1 < run.planned_epochs:
        return {"reason": "early_stopping", "after_epoch": epoch + 1,
                "message": (f"early stopping after epoch {epoch + 1}: validation QWK has not risen by more than "
                            f"{config.min_delta} for {config.patience} epochs (best {run.best_qwk:.4f} "
                            f"at epoch {run.best_epoch})")}
    return None


def _save_resume(run: _Run, elapsed: float) -> None:
    """Every process hands rank 0 its random states; rank 0 writes the resume file."""
    states = {"numpy": run.augment_rng.bit_generator.state, "torch": torch.get_rng_state()}
    if run.ctx.device.startswith("cuda"):                 # dropout and drop-path draw from the device's generator
        states["cuda"] = torch.cuda.get_rng_state(run.ctx.device)
    rng_states = distributed.gather(states, run.ctx)
    if not run.ctx.is_main:
        return
    model_state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    best = {k: v.detach().cpu() for k, v in run.best_state.items()} if run.best_state is not None else None
    save_resume_state(resume_path(run.config.out), ResumeState(
        epoch=run.epoch, model=model_state, optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict() or None, best_qwk=run.best_qwk,
        best_epoch=run.best_epoch, best_state=best, history=run.history,
        stopping_best=run.stopping.best, epochs_without_improvement=run.stopping.waited, planned_epochs=run.planned_epochs, elapsed_seconds=elapsed,
        rng={key: [s[key] for s in rng_states] for key in rng_states[0]},
        sampler=run.sampler.state_dict(), fingerprint=run.fingerprint))


def _finish(run: _Run, log: Logger, started: float) -> TrainResult:
    """Rank 0: the best epoch's weights, calibration, the bank, the checkpoint; the resume file goes."""
    config, model = run.config, run.model
    if run.best_state is not None:              # None only when no epoch gave a QWK (NaN): keep the last
        model.load_state_dict(run.best_state)
    model = run.model = _memory_format(model, torch.contiguous_format)   # checkpoint and ONNX export see plain tensors
    model.eval()
    val_out = _validation_outputs(run)
    calibration = calibrate(val_out["ordinal_logits"], run.val_set.grades, prototype_logits=val_out["prototype_logits"],
                            target_sensitivity=config.target_sensitivity, lesion_logits=val_out.get("lesion_logits"),
                            lesion_targets=run.val_set.lesions)
    grading = calibration.grading
    skipped = calibration.report.get("operating_point", {}).get("skipped")
    if skipped:
        log(f"referable operating point not chosen: {skipped}")
    if "lesion_thresholds" in calibration.report:
        log(f"lesion thresholds: {_describe_lesion_thresholds(calibration.report['lesion_thresholds'])}")
    val_metrics = grading_report(run.val_set.grades, ordinal_grades(val_out["ordinal_logits"], grading.thresholds))
    log(f"validation after calibration: QWK {val_metrics['qwk']:.4f}, thresholds "
        f"{[round(t, 2) for t in grading.thresholds]}, temperature {grading.temperature:.3f}")
    if isinstance(run.inputs, _CachedInputs):
        embeddings = predict_from_features(model, run.inputs.cache, model.output_names, config.batch_size,
                                           run.ctx.device)["embedding"]
        bank = TrainingBank(embeddings=embeddings.astype(np.float32), grades=run.train_set.grades.copy(),
                            case_ids=list(run.train_set.case_ids), sources=run.train_set.sources)
    else:
        bank = build_training_bank(model, run.train_set, run.preprocess, config.batch_size)
    summary = _summary(run, val_metrics, calibration.report, run.elapsed_before + time.perf_counter() - started)
    path = save_checkpoint(config.out, Checkpoint(model=model, preprocess=run.preprocess, grading=grading,
                                                  bank=bank, summary=summary))
    resume_path(config.out).unlink(missing_ok=True)
    return TrainResult(checkpoint=path, metrics=summary["val_metrics"], seconds=summary["seconds"])


def _describe_lesion_thresholds(report: dict) -> str:
    if "skipped" in report:
        return report["skipped"]
    return ", ".join(f"{code} {r['threshold']:.3f} (F1 {r['f1']['before']:.2f} -> {r['f1']['after']:.2f}"
                     f"{', kept' if 'kept' in r else ''})" for code, r in report.items())


def _with_image_lesion_labels(prepared: PreparedSet, items: list[LabeledImage]) -> PreparedSet:
    """The prepared set with image-level lesion labels [N, L] as its lesion targets (weak supervision)."""
    return dataclasses.replace(prepared, lesions=image_lesion_labels([items[i] for i in prepared.indices]))


def lesion_truth_grid(model: GraderModel, items: list[LabeledImage]) -> tuple[int, int] | None:
    """The patch grid to read held-out lesion targets on, for calibration's per-type presence thresholds:
    the model's, when it has a lesion head and every item has its masks (prepare_images would refuse the
    set otherwise); None when not, and the thresholds are then not fitted."""
    if model.lesion_head is None:
        return None
    return None if missing_lesion_masks(items) else model.lesion_grid_size


def _summary(run: _Run, val_metrics: dict, calibration_report: dict, seconds: float) -> dict:
    config = run.config
    return {
        "data": run.data_summary,
        "train": {"data": [str(d) for d in config.data], "n": len(run.train_set.grades),
                  "grade_counts": np.bincount(run.train_set.grades, minlength=5).tolist(),
                  "skipped": len(run.train_set.skipped)},
        "val": {"n": len(run.val_set.grades), "grade_counts": np.bincount(run.val_set.grades, minlength=5).tolist()},
        "schedule": {"epochs_run": len(run.history), "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
                     "precision": run.precision.name, "precision_reason": run.precision.reason,
                     "sampler": config.sampler, "batch": run.sampler.batch_size,
                     "steps_per_epoch": run.sampler.steps_per_epoch, "trainable_blocks": config.trainable_blocks,
                     "augment": config.augment, "feature_cache": isinstance(run.inputs, _CachedInputs),
                     "lesion_generation": _lesion_generation_summary(config.lesion_generation, run.inputs),
                     "lesion_labels": config.lesion_labels if run.model.lesion_head is not None else None,
                     "processes": run.ctx.world_size, "resumed_from_epoch": run.resumed_from},
        "stopped": run.stopped,
        "best_epoch": run.best_epoch,
        "history": run.history,
        "val_metrics": _scalars(val_metrics),
        "calibration": calibration_report,
        "contrastive": run.contrastive,
        "seconds": round(seconds, 1),
    }


def _validation_outputs(run: _Run) -> dict[str, np.ndarray]:
    if run.val_cache is not None:
        return predict_from_features(run.model, run.val_cache, run.model.output_names, run.config.batch_size,
                                     run.ctx.device)
    return predict(run.model, run.val_set.images, run.preprocess, run.config.batch_size)


def _split(config: TrainConfig, log: Logger) -> tuple[list[LabeledImage], list[LabeledImage], dict]:
    """Training and validation items, and what was loaded and skipped (logged, and kept in the summary)."""
    loaded = load_data(config.data)
    summary = {"train": loaded.summary.to_dict()}
    for line in loaded.summary.lines():
        log(line)
    if config.val_data:
        val = load_data(config.val_data)
        for line in val.summary.lines():
            log(f"validation: {line}")
        kept, overlap = _disjoint_from(val.items, loaded.items)
        if overlap:
            log(f"validation: left out {overlap} images that are training images or of training patients")
        if not kept:
            raise DatasetError("every validation image is a training image or of a training patient")
        return loaded.items, kept, {**summary, "val": {**val.summary.to_dict(), "left_out_as_training": overlap}}
    train_items, val_items = split_items(loaded.items, config.val_fraction, config.seed)
    return train_items, val_items, summary


def _disjoint_from(val: list[LabeledImage], train: list[LabeledImage]) -> tuple[list[LabeledImage], int]:
    """The validation items that are neither a training image (path and frame) nor of a training patient
    (of the same corpus):
    a validation set overlapping training would inflate QWK and choose the calibration on seen cases."""
    images = {(it.path, it.frame) for it in train}
    patients = {(it.source, it.patient) for it in train if it.patient}     # patient ids are per corpus
    kept = [it for it in val if (it.path, it.frame) not in images and (it.source, it.patient) not in patients]
    return kept, len(val) - len(kept)


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


class _ImageInputs:
    """Training inputs from prepared images: augmented (when configured), normalised, on the device."""

    def __init__(self, data: PreparedSet, preprocess: PreprocessConfig, augmentation: AugmentConfig | None,
                 rng: np.random.Generator, model: GraderModel, device: str, bank: LesionBank | None = None):
        self.data, self.preprocess, self.augmentation, self.rng = data, preprocess, augmentation, rng
        self.model, self.device, self.bank = model, device, bank

    def batch(self, idx: np.ndarray, augmented: bool = True):
        """(model args, lesion targets or None, grades [B]): generated lesions (before the augmentation, so
        they turn with the image) can raise a grade and add lesion targets."""
        lesions = self.data.lesions[idx] if self.data.lesions is not None else None
        images, grades = self.data.images[idx], self.data.grades[idx]
        if self.bank is not None and augmented:
            images, grades, lesions = generate_batch(images, grades, self.rng, self.bank, lesions)
        if self.augmentation is not None and augmented:
            grids = lesions if lesions is not None and lesions.ndim == 4 else None   # image-level labels stay
            images, grids = augment(images, self.rng, grids, self.augmentation)
            lesions = grids if grids is not None else lesions
        x = _like_model(to_model_input(images, self.preprocess).to(self.device), self.model)
        return (x,), _lesion_targets(lesions, self.device), _grade_tensor(grades, self.device)


class _CachedInputs:
    """Training inputs from the frozen backbone's cached outputs (no augmentation by construction)."""

    def __init__(self, cache: FeatureCache, data: PreparedSet, device: str):
        self.cache, self.data, self.device = cache, data, device

    def batch(self, idx: np.ndarray, augmented: bool = False):
        lesions = self.data.lesions[idx] if self.data.lesions is not None else None
        return (self.cache.take(idx, self.device), _lesion_targets(lesions, self.device),
                _grade_tensor(self.data.grades[idx], self.device))


def _grade_tensor(grades: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(grades)).to(device)


def _lesion_bank(settings: LesionGenerationConfig, items: list, data: PreparedSet, preprocess: PreprocessConfig,
                 log: Logger) -> LesionBank | None:
    """The donor lesions for ELLG's lesion generation (None when it is off): every connected lesion of the
    training images' masks, in the prepared frame. DatasetError (from the masks) when a case has none."""
    if settings.probability == 0.0:
        return None
    missing = missing_lesion_masks([items[index] for index in data.indices])
    if missing:
        raise DatasetError(f"--lesion-generation needs lesion masks for every training image (masks/<CODE>/"
                           f"<case_id>.png beside labels.csv, empty ones included); missing {missing[0]} and "
                           f"{len(missing) - 1} more")
    bank = LesionBank(config=settings)
    for case, index in enumerate(data.indices):
        item = items[index]
        masks = prepared_lesion_masks(item.path, lesion_mask_paths(item), preprocess, item.frame)
        bank.add(data.images[case], masks, int(data.grades[case]), case=case)
    log(f"lesion generation: {len(bank)} donor lesions from {len(data.indices)} images, "
        f"probability {settings.probability}, {'raising' if settings.raise_grade else 'keeping'} grades")
    return bank


def _lesion_generation_summary(settings: LesionGenerationConfig, inputs) -> dict | None:
    bank = getattr(inputs, "bank", None)
    return None if bank is None else {**asdict(settings), "donor_lesions": len(bank)}


def _lesion_targets(lesions: np.ndarray | None, device: str) -> torch.Tensor | None:
    return torch.from_numpy(lesions).float().to(device) if lesions is not None else None


def _device_type(ctx: DistributedContext) -> str:
    return "cuda" if ctx.device.startswith("cuda") else "cpu"


def _autocast(precision: ResolvedPrecision, ctx: DistributedContext):
    if precision.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(_device_type(ctx), dtype=precision.autocast_dtype)


def _train_epoch(model: GraderModel, run: _Run, batches, label: str, show_progress: bool) -> dict[str, float]:
    """One epoch of steps over `batches` (each process its share of every batch); the mean losses."""
    trainer, ctx, steps = run.trainer, run.ctx, run.sampler.steps_per_epoch
    trainer.train()
    keep_frozen_in_eval(run.plan)
    totals: dict[str, float] = {}
    for batch in _progress(batches, steps, label, show_progress):
        idx = distributed.rank_share(batch, ctx)
        args, lesion_targets, grades = run.inputs.batch(idx)
        with _autocast(run.precision, ctx):
            outputs = trainer(*args)
        loss, parts = grader_loss(outputs, grades, run.config.loss, lesion_targets)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss * distributed.loss_weight(len(idx), len(batch), ctx)).backward()
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        share = len(idx) / len(batch) / steps      # summed over the processes: the epoch's mean
        for key, value in {"total": float(loss.detach()), **parts}.items():
            totals[key] = totals.get(key, 0.0) + value * share
    return distributed.all_sum(totals, ctx)


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
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {}
    for idx in sequential_batches(count, batch_size):
        out = model(_like_model(batch_input(idx).to(device), model))
        for name in model.output_names:
            chunks.setdefault(name, []).append(out[name].float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def build_training_bank(model: GraderModel, data: PreparedSet, preprocess: PreprocessConfig,
                        batch_size: int = 64) -> TrainingBank:
    embeddings = predict(model, data.images, preprocess, batch_size)["embedding"]
    return TrainingBank(embeddings=embeddings.astype(np.float32), grades=data.grades.copy(),
                        case_ids=list(data.case_ids), sources=data.sources)


def _scalars(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) or v is None}
