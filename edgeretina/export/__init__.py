"""Export a trained checkpoint to a verified bundle: `export(ExportConfig(...))`.

Where each concern lives: steps (ExportConfig, the context steps share), targets (the registry: each
target's ordered steps), one module per target's own steps (onnx_steps: the FP32 graph every target
starts from; quantize_ort: `cpu`; openvino_steps: `openvino`; jetson and trt_ops: `jetson`), graph (node
scopes, kept-float selection and the calibration reader the quantizers share), reference (held-out and
calibration images, the torch reference), gate (fidelity against torch), bank and reference_set (what
ships beside the model), prune (the pruning step; its torch surgery is training/prune.py).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edgeretina.bundle import Manifest, load_bundle, save_manifest, zip_bundle
from edgeretina.errors import ExportError
from edgeretina.export.steps import ExportConfig, ExportContext
from edgeretina.export.targets import TARGETS, check_precision, target_steps

__all__ = ["ExportConfig", "export", "TARGETS"]


def export(config: ExportConfig, log: Callable[[str], None] = print) -> Path:
    """Run the target's steps in a staging directory and move the finished bundle into place.

    Nothing is left at `config.out` unless every step (the gate included) succeeded. Returns the bundle path.
    Raises ExportError (GateError when the artifact disagrees with torch).
    """
    steps = target_steps(config.target, prune=config.prune, rebuild_bank=bool(config.bank_data))
    check_precision(config.target, config.precision)
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise ExportError(f"{out} already exists (--overwrite replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="edgeretina-export-work-"))
    try:
        ctx = ExportContext(config=config, staging=staging, work=work, log=log)
        for step in steps:
            step(ctx)
            ctx.steps_done.append(step.__name__)
        save_manifest(staging, _manifest(ctx))
        load_bundle(staging)  # what we hand out must pass the same strict load a device does
        return _publish(staging, out, config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _manifest(ctx: ExportContext) -> Manifest:
    ckpt = ctx.checkpoint
    model = ckpt.model
    h, w = model.grid_size
    shapes = {"ordinal_logits": ["B", 4], "prototype_logits": ["B", 5], "embedding": ["B", model.backbone.embed_dim],
              "saliency": ["B", h, w]}
    if "lesion_logits" in model.output_names:
        shapes["lesion_logits"] = ["B", model.lesion_head.out_features, *model.lesion_grid_size]
    return Manifest(
        model={"arch": ckpt.model_config.to_dict(), "input_size": ckpt.preprocess.image_size,
               "preprocess": ckpt.preprocess.to_dict(), "embed_dim": model.backbone.embed_dim,
               "training": {k: ckpt.summary.get(k) for k in ("train", "val_metrics") if k in ckpt.summary}},
        outputs={"input": {"name": "image", "shape": ["B", 3, ckpt.preprocess.image_size, ckpt.preprocess.image_size]},
                 "names": list(model.output_names), "shapes": {n: shapes[n] for n in model.output_names}},
        grading=ckpt.grading.to_dict(),
        saliency={"grid": [h, w], "method": saliency_method(model), "tokens": model.backbone.token_path},
        bank=ctx.bank_info,
        artifacts=ctx.artifacts,
        export={"target": ctx.config.target, "opset": ctx.config.opset, "steps": ctx.steps_done,
                "checkpoint": Path(ctx.config.checkpoint).name, "reference": ctx.reference_source,
                **ctx.export_info, "gate": ctx.gate},
    )


def _publish(staging: Path, out: Path, config: ExportConfig) -> Path:
    if config.zip:
        return zip_bundle(staging, out)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.chmod(0o755)  # mkdtemp made it private; a bundle is meant to be shared
    staging.rename(out)
    return out


DEEP_SALIENCY = ("patch-prototype similarity: sigmoid(scale * (max cos to a DR grade prototype - cos to the no-DR "
                 "prototype) + bias + log(field weight)); patches the fundus field does not cover carry no evidence")


def saliency_method(model) -> str:
    """The manifest's words for the graph's saliency output."""
    if getattr(model, "shallow_head", None) is None:
        return DEEP_SALIENCY
    return ("gated multi-layer (ELLG): deep = " + DEEP_SALIENCY + "; a shallow layer's learned evidence, both "
            "normalised to the image's peak, fused as the deep peak * sigmoid(12 * (deep - 0.3)) * sqrt(deep * shallow)")
