"""The `write_reference_set` step: every bundle ships a few held-out inputs with the torch outputs on them
(and the artifact's own outputs on the export machine), so `verify` can re-run the gate on the device.

Which images: the gate's reference images whose torch ordinal logits lie farthest from a CORAL threshold.
An image within rounding noise of a threshold flips grade on any change of float kernels, and with a
handful of images one flip fails grade agreement; the continuous checks (embedding cosine, saliency
correlation, neighbours) still see every deviation on the clear-cut images.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from edgeretina.bundle import describe_artifact
from edgeretina.cpu import cpu_class
from edgeretina.errors import ExportError
from edgeretina.export.steps import ExportContext
from edgeretina.reference_set import REFERENCE_SET_FILE, ReferenceSet, save_reference_set

MAX_IMAGES = 8
MIN_IMAGES = 2
MAX_INPUT_BYTES = 900_000   # uint8 inputs before compression: the whole file stays well under 1 MB


def write_reference_set(ctx: ExportContext) -> None:
    if ctx.reference_prepared is None or ctx.last_gate is None:
        raise ExportError("the reference set needs the reference images and a gate run before it")
    chosen = _clear_cut_images(ctx, _image_budget(ctx.reference_prepared))
    reference = ReferenceSet(
        inputs_u8=ctx.reference_prepared[chosen],
        torch_outputs={k: np.asarray(v)[chosen] for k, v in ctx.reference_outputs.items()},
        exported_outputs={k: np.asarray(v)[chosen] for k, v in ctx.last_gate.outputs.items()})
    save_reference_set(ctx.staging / REFERENCE_SET_FILE, reference)
    ctx.artifacts.append(describe_artifact(ctx.staging, REFERENCE_SET_FILE, fmt="npz", role="reference-set",
                                           precision="n/a", target=ctx.config.target))
    thresholds = {k: v for k, v in asdict(ctx.last_gate.thresholds).items() if k != "max_size_ratio"}
    ctx.export_info["verify"] = {
        "reference_set": REFERENCE_SET_FILE, "images": len(chosen), "gate": ctx.last_gate.label,
        "thresholds": thresholds, "selection": "the gate's reference images farthest from a CORAL threshold",
        "exported_on": {"cpu_class": cpu_class()}}
    ctx.log(f"reference set for on-device verification: {len(chosen)} images, "
            f"{(ctx.staging / REFERENCE_SET_FILE).stat().st_size / 1e3:.0f} kB")


def _image_budget(prepared: np.ndarray) -> int:
    per_image = int(np.prod(prepared.shape[1:]))
    return max(MIN_IMAGES, min(MAX_IMAGES, MAX_INPUT_BYTES // per_image, len(prepared)))


def _clear_cut_images(ctx: ExportContext, count: int) -> np.ndarray:
    logits = np.asarray(ctx.reference_outputs["ordinal_logits"], dtype=np.float64)
    margin = np.abs(logits - np.asarray(ctx.checkpoint.grading.thresholds)).min(axis=1)
    return np.sort(np.argsort(-margin, kind="stable")[:count])
