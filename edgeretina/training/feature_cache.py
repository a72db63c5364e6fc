"""The frozen-backbone shortcut: with the tower frozen and no augmentation, its outputs never change, so
they are computed once and the heads train from them.

`compute_features` runs the backbone in eval mode (what a frozen tower computes during training too:
training/freezing.py keeps it in eval mode) over prepared images and keeps (pooled [N, D], tokens
[N, h*w, D]) in float32, with the patches' field weights [N, h*w] (GraderModel.field_weights) and, for
gated saliency, the shallow layer's tokens [N, h*w, C] (ViT-B-16: 196 x 768 floats, 0.6 MB more an image). Memory: N x (1 + h*w) x D x 4 bytes — ViT-B-16 at 224 px, 197 x 512 floats,
is ~0.4 MB an image, 4 GB for 10,000 images; the tiny presets at 64 px take a few KB an image.
`HeadsOnly` is the module that trains from the cache (GraderModel.forward_heads as a forward, so DDP can
wrap it).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeretina.preprocess import PreprocessConfig
from edgeretina.training.data import sequential_batches, to_model_input


@dataclass
class FeatureCache:
    pooled: torch.Tensor     # float32 [N, D]
    tokens: torch.Tensor     # float32 [N, h*w, D]
    field: torch.Tensor      # float32 [N, h*w]: how far each patch lies inside the fundus field
    shallow: torch.Tensor | None = None   # float32 [N, h*w, C]: the shallow layer's tokens (gated saliency)

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    @property
    def nbytes(self) -> int:
        parts = (self.pooled, self.tokens, self.field) + ((self.shallow,) if self.shallow is not None else ())
        return sum(t.numel() * t.element_size() for t in parts)

    def take(self, idx: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """(pooled, tokens, shallow or None, field) of the rows idx: HeadsOnly's arguments."""
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        shallow = self.shallow[index].to(device) if self.shallow is not None else None
        return self.pooled[index].to(device), self.tokens[index].to(device), shallow, self.field[index].to(device)


class HeadsOnly(nn.Module):
    """`forward(pooled, tokens, shallow, field)` = the model's heads on cached backbone outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor, shallow: torch.Tensor | None,
                field: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_heads(pooled, tokens, shallow, field=field)


@torch.no_grad()
def compute_features(model: nn.Module, images_u8: np.ndarray, preprocess: PreprocessConfig, batch_size: int = 64,
                     to_input: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
                     autocast: Callable[[], object] | None = None) -> FeatureCache:
    """The backbone's (pooled, tokens) for every prepared uint8 image, in eval mode, on the CPU in float32.

    to_input(batch, model): puts a normalised batch where and how the model wants it (device, memory
    format); autocast(): the context the training step runs the forward in (the same precision)."""
    was_training = model.training
    model.eval()
    pooled, tokens, shallow, field = [], [], [], []
    try:
        for idx in sequential_batches(len(images_u8), batch_size):
            batch = to_model_input(images_u8[idx], preprocess)
            batch = to_input(batch, model) if to_input else batch
            with (autocast() if autocast else nullcontext()):
                p, t, *s = model.forward_features(batch)
            pooled.append(p.float().cpu())
            tokens.append(t.float().cpu())
            shallow += [s[0].float().cpu()] if s else []
            field.append(model.field_weights(batch).float().cpu())
    finally:
        model.train(was_training)
    return FeatureCache(pooled=torch.cat(pooled), tokens=torch.cat(tokens), field=torch.cat(field),
                        shallow=torch.cat(shallow) if shallow else None)


@torch.no_grad()
def predict_from_features(model: nn.Module, cache: FeatureCache, output_names: tuple[str, ...],
                          batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """The model's outputs (eval mode) from cached backbone outputs, as numpy — `loop.predict` without
    the backbone."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    for idx in sequential_batches(len(cache), batch_size):
        pooled, tokens, shallow, field = cache.take(idx, device)
        out = model.forward_heads(pooled, tokens, shallow, field=field)
        for name in output_names:
            chunks.setdefault(name, []).append(out[name].float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
