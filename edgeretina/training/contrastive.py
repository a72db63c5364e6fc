"""Optional image-text contrastive pre-training before the grading epochs (TWLR's first stage).

With ``TrainConfig.contrastive_epochs > 0`` the image tower and the projection head learn for that many
epochs against the open_clip text tower of the same model, with the symmetric InfoNCE loss of CLIP on
(photograph, caption) pairs; the captions come from each photograph's grade and lesion labels
(training/captions.py). Then the grade and lesion prototypes are encoded again with the adapted text
tower, so that they live in the space the image embeddings were pulled into, and the text tower is dropped.

Choices:
- the text tower trains too. Fundus findings ("microaneurysms", "hard exudates") are far from the web
  captions CLIP was trained on, and its grade descriptions start close together; a frozen text tower would
  also make re-encoding the prototypes a no-op. TWLR fine-tunes both towers likewise.
- learning rates: both towers at ``contrastive_lr`` (default 1e-5, usual for fine-tuning pretrained CLIP
  towers: FLYP and WiSE-FT use 1e-5..3e-5; raise it for randomly initialised towers), the projection head
  (freshly initialised, like the grading heads) and the temperature at the grading ``lr``. AdamW with the
  run's weight decay on matrices only, linear warm-up then cosine decay, gradients clipped to norm 1.
- the temperature is the CLIP model's own ``logit_scale`` (clamped to 100, as CLIP does).
- two photographs with the same findings are positives of each other, not negatives (targets spread
  evenly over every caption with the same facts); with all captions distinct this is CLIP's loss exactly.
- what the freeze plan holds frozen stays frozen (``trainable_blocks``); augmentation is the run's.
- not under torchrun yet (ConfigError): the loss would need the embeddings gathered across processes.
- on resume from a resume file the stage is skipped: that file already holds its weights and prototypes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgeretina.dataset import LabeledImage
from edgeretina.errors import ConfigError
from edgeretina.grades import NUM_GRADES
from edgeretina.preprocess import PreprocessConfig
from edgeretina.training.augment import augment
from edgeretina.training.captions import CaptionFacts, caption, caption_facts
from edgeretina.training.data import PreparedSet, to_model_input
from edgeretina.training.distributed import DistributedContext
from edgeretina.training.factory import TIMM_PREFIX, TextEncoder, build_text_encoder
from edgeretina.training.freezing import FreezePlan, keep_frozen_in_eval
from edgeretina.training.prompts import load_prompts

MAX_LOGIT_SCALE = 100.0
_CONTRASTIVE_STREAM = 4     # the stage's numpy random stream of the run's seed (loop.py uses 1..3)
_WARMUP_FRACTION = 0.05


def check_contrastive_config(config) -> None:
    """ConfigError when a TrainConfig's contrastive settings cannot work: negative epochs, a learning rate
    that is not positive, or a tower without a text tower (``timm/`` names)."""
    if config.contrastive_epochs < 0:
        raise ConfigError(f"contrastive_epochs must be >= 0 (0: no contrastive stage), got {config.contrastive_epochs}")
    if not config.contrastive_lr > 0:
        raise ConfigError(f"contrastive_lr must be positive, got {config.contrastive_lr}")
    name = config.model.backbone.name
    if config.contrastive_epochs and name.startswith(TIMM_PREFIX):
        raise ConfigError(f"contrastive_epochs needs a text tower, and {name!r} is a timm image tower without "
                          "one: use an open_clip model (e.g. edgeretina-tiny-vit, ViT-B-16) or contrastive_epochs 0")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                     same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): the mean of the image->text and text->image cross-entropies of the scaled
    cosine similarities. image, text: [B, D] L2-normalised, row i of each a pair; logit_scale: the scale
    itself (exp of the learned log-scale). same: optional [B, B] bool, True where captions i and j state the
    same findings; each row's target is then spread evenly over its True entries (None: the identity)."""
    logits = logit_scale * image @ text.t()
    if same is None:
        targets = torch.arange(len(image), device=image.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
    return 0.5 * (_soft_cross_entropy(logits, same) + _soft_cross_entropy(logits.t(), same.t()))


def _soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def pretrain_contrastive(model: torch.nn.Module, items: list[LabeledImage], data: PreparedSet,
                         preprocess: PreprocessConfig, config, plan: FreezePlan, ctx: DistributedContext,
                         log: Callable[[str], None], autocast_dtype: torch.dtype | None = None) -> dict | None:
    """The contrastive stage of a run (``config`` a TrainConfig), in place on ``model`` (a GraderModel).

    items: the training items ``data`` was prepared from (unreadable ones are in data.skipped); the captions
    come from their labels. autocast_dtype: bf16 is used when given, anything else trains in fp32 (fp16 would
    need a loss scaler for a few epochs' gain). Logs one line per epoch. Returns None when
    config.contrastive_epochs is 0, else the summary record {epochs, steps, loss_first, loss_last, seconds}
    (first and last step's loss). Raises ConfigError under torchrun and for a tower without a text tower,
    DatasetError for a malformed lesion label, and what build_text_encoder raises.
    """
    epochs = config.contrastive_epochs
    if not epochs:
        return None
    check_contrastive_config(config)
    if ctx.is_distributed:
        raise ConfigError(f"contrastive_epochs is not supported with {ctx.world_size} processes (torchrun) yet: "
                          "run the contrastive stage in one process, or set contrastive_epochs 0")
    if _resuming(config):
        log("contrastive stage: skipped, the resume file holds its weights and prototypes")
        return {"epochs": epochs, "skipped": "resumed"}
    begun = time.perf_counter()
    text = build_text_encoder(config.model.backbone, seed=config.seed).to(ctx.device)
    groups = load_prompts(config.prompts_file).groups()
    _check_same_text_tower(model, text, groups, log)
    kept = _prepared_items(items, data)
    captions = [caption(item, config.seed) for item in kept]
    losses = _fit(model, text, data, captions, _fact_ids([caption_facts(item) for item in kept]), preprocess,
                  config, plan, ctx.device,
                  autocast_dtype if autocast_dtype == torch.bfloat16 else None, log)
    reencode_prototypes(model, text, groups)
    return {"epochs": epochs, "steps": len(losses), "loss_first": round(losses[0], 6),
            "loss_last": round(losses[-1], 6), "seconds": round(time.perf_counter() - begun, 1)}


def reencode_prototypes(model: torch.nn.Module, text: TextEncoder, groups: list[tuple[str, ...]]) -> None:
    """The GraderModel's grade and lesion prototypes from ``text`` (grades first, then lesions)."""
    embeddings = text.encode_groups(groups)
    with torch.no_grad():
        for buffer, rows in ((model.grade_prototypes, embeddings[:NUM_GRADES]),
                             (model.lesion_prototypes, embeddings[NUM_GRADES:])):
            buffer.copy_(rows.to(buffer.device, buffer.dtype))


def _resuming(config) -> bool:
    from edgeretina.training.resume import resume_path

    return config.resume is not False and (config.resume is not True or resume_path(config.out).is_file())


def _check_same_text_tower(model, text: TextEncoder, groups, log) -> None:
    """The rebuilt text tower should give the prototypes the model was built with (same weights, or same
    seed); say so when it does not (a model built from another RNG state), since the stage then adapts a
    text tower the model never saw."""
    current = torch.cat([model.grade_prototypes, model.lesion_prototypes]).detach().float().cpu()
    agreement = F.cosine_similarity(text.encode_groups(groups), current, dim=-1).min().item()
    if agreement < 0.999:
        log(f"contrastive stage: the text tower does not reproduce the model's prototypes (lowest cosine "
            f"{agreement:.3f}); the prototypes will come from the adapted text tower")


def _prepared_items(items: list[LabeledImage], data: PreparedSet) -> list[LabeledImage]:
    """The item of each prepared image: ``data`` keeps the readable items, in their order."""
    skipped = {path for path, _ in data.skipped}
    kept = [item for item in items if str(item.path) not in skipped]
    if [item.case_id for item in kept] != list(data.case_ids):
        kept = _match_in_order(items, data.case_ids)
    return kept


def _match_in_order(items: list[LabeledImage], case_ids: list[str]) -> list[LabeledImage]:
    out, it = [], iter(items)
    for case in case_ids:
        out.append(next(item for item in it if item.case_id == case))
    return out


def _fact_ids(facts: list[CaptionFacts]) -> np.ndarray:
    index: dict[CaptionFacts, int] = {}
    return np.array([index.setdefault(f, len(index)) for f in facts], dtype=np.int64)


def _parameter_groups(model, text: TextEncoder, config) -> list[dict]:
    tower_params = [p for p in model.backbone.parameters() if p.requires_grad]
    tower_params += [p for name, p in text.named_parameters() if name != "clip.logit_scale"]
    head_params = list(model.projection.parameters()) + [text.logit_scale]
    groups = []
    for params, lr in ((tower_params, config.contrastive_lr), (head_params, config.lr)):
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": config.weight_decay if decay else 0.0})
    return groups


def _fit(model, text: TextEncoder, data: PreparedSet, captions: list[str], fact_ids: np.ndarray,
         preprocess: PreprocessConfig, config, plan: FreezePlan, device: str, autocast_dtype, log) -> list[float]:
    """The stage's epochs; the loss of every step."""
    text.requires_grad_(True)
    optimizer = torch.optim.AdamW(_parameter_groups(model, text, config))
    n = len(captions)
    steps = max(1, n // min(config.batch_size, n))        # near-equal batches, none smaller than batch_size
    total = steps * config.contrastive_epochs
    warmup = max(1, int(total * _WARMUP_FRACTION))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, total, warmup))
    rng = np.random.default_rng([config.seed, _CONTRASTIVE_STREAM])
    tokens = text.tokenize(captions)
    augmentation = config.augmentation if config.augment else None
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    for epoch in range(config.contrastive_epochs):
        started, first = time.perf_counter(), len(losses)
        model.train()
        keep_frozen_in_eval(plan)
        text.train()
        for idx in np.array_split(rng.permutation(n), steps):
            images = data.images[idx]
            if augmentation is not None:
                images, _ = augment(images, rng, None, augmentation)
            x = _like_model(to_model_input(images, preprocess).to(device), model)
            same = torch.from_numpy(fact_ids[idx][:, None] == fact_ids[idx][None, :]).to(device)
            with _autocast(device, autocast_dtype):
                pooled, _ = model.backbone(x)
                image_emb = F.normalize(model.projection(pooled).float(), dim=-1)
                text_emb = text(tokens[idx].to(device)).float()
            scale = text.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
            loss = contrastive_loss(image_emb, text_emb, scale, same)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        mean = sum(losses[first:]) / (len(losses) - first)
        log(f"contrastive epoch {epoch + 1}/{config.contrastive_epochs}: loss {mean:.4f} "
            f"({steps} steps, {time.perf_counter() - started:.1f} s)")
    text.eval()
    return losses


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def _like_model(images: torch.Tensor, model) -> torch.Tensor:
    """The batch in the memory format of the model's convolutions (channels-last towers on the CPU)."""
    weight = next((p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1), None)
    if weight is None or weight.is_contiguous():
        return images
    return images.contiguous(memory_format=torch.channels_last)
