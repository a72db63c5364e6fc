"""Load the checkpoint and compute the torch reference outputs on held-out images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeretina.dataset import read_labels
from edgeretina.errors import ExportError
from edgeretina.export.steps import ExportContext
from edgeretina.preprocess import decode_image, normalize, prepare
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.loop import predict

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def load_reference(ctx: ExportContext) -> None:
    ckpt = load_checkpoint(ctx.config.checkpoint)
    ctx.checkpoint = ckpt
    prepared, source = _reference_images(ctx)
    ctx.reference_inputs = normalize(prepared, ckpt.preprocess)
    ctx.reference_outputs = predict(ckpt.model, prepared, ckpt.preprocess, batch_size=16)
    ctx.reference_source = source


def _reference_images(ctx: ExportContext) -> tuple[np.ndarray, dict]:
    config, preprocess = ctx.config, ctx.checkpoint.preprocess
    if config.reference_images is None:
        # No held-out set given: phantom photographs from a seed the training set did not use.
        from edgeretina.phantom import PhantomConfig, render_case
        seeds = [10_000_019 + config.seed * 1_000 + i for i in range(config.reference_count)]
        images = [prepare(render_case(s, PhantomConfig(size=384)).image, preprocess)[0] for s in seeds]
        return np.stack(images), {"source": "phantom", "count": len(images), "seeds": [seeds[0], seeds[-1]]}
    paths = _image_paths(Path(config.reference_images))[: config.reference_count]
    if len(paths) < 2:
        raise ExportError(f"need at least 2 reference images in {config.reference_images}")
    images = [prepare(decode_image(p), preprocess)[0] for p in paths]
    return np.stack(images), {"source": str(config.reference_images), "count": len(images)}


def _image_paths(source: Path) -> list[Path]:
    if source.is_file() and source.suffix == ".csv":
        return [item.path for item in read_labels(source)]
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    raise ExportError(f"reference images must be a labels.csv or a folder: {source}")
