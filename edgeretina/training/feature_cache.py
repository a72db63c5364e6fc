"""The frozen-backbone shortcut: with the tower frozen and no augmentation, its outputs never change, so
they are computed once and the heads train from them.

`compute_features` runs the backbone in eval mode (what a frozen tower computes during training too:
training/freezing.py keeps it in eval mode) over prepared images and keeps (pooled [N, D], tokens
[N, h*w, D]) in float32. Memory: N x (1 + h*w) x D x 4 bytes — ViT-B-16 at 224 px, 197 x 512 floats,
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

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    @property
    def nbytes(self) -> int:
        return self.pooled.numel() * self.pooled.element_size() + self.tokens.numel() * self.tokens.element_size()

    def take(self, idx: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return self.pooled[index].to(device), self.tokens[index].to(device)


class HeadsOnly(nn.Module):
    """`forward(pooled, tokens)` = the model's heads on cached backbone outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_heads(pooled, tokens)


@torch.no_grad()
def compute_features(model: nn.Module, images_u8: np.ndarray, preprocess: PreprocessConfig, batch_size: int = 64,
                     to_input: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
                     autocast: Callable[[], object] | None = None) -> FeatureCache:
    """The backbone's (pooled, tokens) for every prepared uint8 image, in eval mode, on the CPU in float32.

    to_input(batch, model): puts a normalised batch where and how the model wants it (device, memory
    format); autocast(): the context the training step runs the forward in (the same precision)."""
    was_training = model.training
    model.eval()
    pooled, tokens = [], []
    try:
        for idx in sequential_batches(len(images_u8), batch_size):
            batch = to_model_input(images_u8[idx], preprocess)
            batch = to_input(batch, model) if to_input else batch
            with (autocast() if autocast else nullcontext()):
                p, t = model.forward_features(batch)
            pooled.append(p.float().cpu())
            tokens.append(t.float().cpu())
    finally:
        model.train(was_training)
    return FeatureCache(pooled=torch.cat(pooled), tokens=torch.cat(tokens))


@torch.no_grad()
def predict_from_features(model: nn.Module, cache: FeatureCache, output_names: tuple[str, ...],
                          batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """The model's outputs (eval mode) from cached backbone outputs, as numpy — `loop.predict` without
    the backbone."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    for idx in sequential_batches(len(cache), batch_size):
        out = model.forward_heads(*cache.take(idx, device))
        for name in output_names:
            chunks.setdefault(name, []).append(out[name].float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
