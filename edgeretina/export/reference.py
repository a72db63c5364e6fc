"""Images the export checks itself on: the held-out reference set (the gate) and the calibration set
(post-training quantization). Both go through the shared preprocessing, exactly as on the device."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgeretina.dataset import read_labels
from edgeretina.errors import ExportError
from edgeretina.export.steps import ExportContext
from edgeretina.preprocess import (ImageRef, PreprocessConfig, decode_image, expand_frames, list_images, normalize,
                                   prepare)
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.loop import predict_normalized

# Phantom seeds far from the ones `edgeretina synth` and the demo use, so the sets are held out.
REFERENCE_SEED_BASE = 10_000_019
CALIBRATION_SEED_BASE = 20_000_003
MIN_CALIBRATION_IMAGES = 32   # below this, activation ranges are estimated from too few samples


def load_reference(ctx: ExportContext) -> None:
    """Load the checkpoint and record the torch reference outputs on the held-out images."""
    ckpt = load_checkpoint(ctx.config.checkpoint)
    ctx.checkpoint = ckpt
    prepared, source = load_images(ctx.config.reference_images, ctx.config.reference_count, ckpt.preprocess,
                                   REFERENCE_SEED_BASE + ctx.config.seed * 1_000)
    ctx.reference_truth = reference_grades(ctx.config.reference_images, ctx.config.reference_count)
    ctx.reference_prepared = prepared
    ctx.reference_inputs = normalize(prepared, ckpt.preprocess)
    # torch sees the very tensors the exported graph will be given: one normaliser feeds both sides of the gate
    ctx.reference_outputs = predict_normalized(ckpt.model, ctx.reference_inputs, batch_size=16)
    ctx.reference_source = source


def load_calibration(ctx: ExportContext) -> None:
    """The calibration set for post-training quantization, with its hash recorded in the manifest."""
    config = ctx.config
    prepared, source = load_images(config.calibration_images, config.calibration_count, ctx.checkpoint.preprocess,
                                   CALIBRATION_SEED_BASE + config.seed * 1_000)
    if len(prepared) < MIN_CALIBRATION_IMAGES:
        ctx.log(f"warning: only {len(prepared)} calibration images; {MIN_CALIBRATION_IMAGES}+ from the target "
                "camera give steadier activation ranges")
    ctx.calibration_inputs = normalize(prepared, ctx.checkpoint.preprocess)
    ctx.export_info["calibration"] = {**source, "sha256": hashlib.sha256(prepared.tobytes()).hexdigest()}


def load_images(source: Path | None, count: int, preprocess: PreprocessConfig, phantom_seed: int) -> tuple[np.ndarray, dict]:
    """Prepared uint8 images [N, S, S, 3] from a labels.csv or folder, or phantom photographs when None."""
    if source is None:
        from edgeretina.phantom import PhantomConfig, render_case
        seeds = [phantom_seed + i for i in range(count)]
        images = [prepare(render_case(s, PhantomConfig(size=384)).image, preprocess)[0] for s in seeds]
        return np.stack(images), {"source": "phantom", "count": len(images), "seeds": [seeds[0], seeds[-1]]}
    refs = _image_refs(Path(source))[:count]
    if len(refs) < 2:
        raise ExportError(f"need at least 2 images in {source}, found {len(refs)}")
    images = [prepare(decode_image(r.path, preprocess.decode_max_side, frame=r.frame), preprocess)[0] for r in refs]
    return np.stack(images), {"source": str(source), "count": len(images)}


def reference_grades(source: Path | None, count: int) -> np.ndarray | None:
    """Ground-truth grades of a labels.csv reference set (None for folders and the phantom default,
    whose grades the gate does not need)."""
    if source is None or not (Path(source).is_file() and Path(source).suffix == ".csv"):
        return None
    return np.array([item.grade for item in read_labels(source)[:count]])


def _image_refs(source: Path) -> list[ImageRef]:
    """A labels.csv's rows (one image each: a multi-frame DICOM row names its frame) or a folder's images
    (every frame of a DICOM)."""
    if source.is_file() and source.suffix == ".csv":
        return [ImageRef(str(item.path), item.frame) for item in read_labels(source)]
    if source.is_dir():
        return expand_frames(list_images(source))
    raise ExportError(f"image set must be a labels.csv or a folder: {source}")
