"""Local weight files: read the usual layouts, fit them to a tower exactly, or say why they do not fit.

Read: ``.safetensors`` or a torch file (``weights_only``: no arbitrary unpickling), a bare state dict or
one wrapped as ``{"state_dict": ...}``, ``{"model": ...}`` (RETFound, MAE, DeiT) or with EMA weights
(``state_dict_ema``/``model_ema``, preferred when present, as timm does), keys with DDP ``module.`` or
``torch.compile`` ``_orig_mod.`` prefixes. timm's ``load_state_dict`` does exactly this, so it is used.

Fit: the weights go through the converter of the tower's own library first (timm's per-architecture
``checkpoint_filter_fn``: position-embedding resampling to the tower's grid, DINOv2/OpenCLIP layouts;
open_clip's ``load_checkpoint`` massaging), a classifier head the tower does not have is dropped (a timm
tower is built with ``num_classes=0``), and then every key and shape must match: anything missing,
unexpected or of another shape is a CheckpointError listing the first keys and the counts, never a
silent ``strict=False``. (``timm.create_model(checkpoint_path=...)`` does not resample position
embeddings, huggingface/pytorch-image-models#1794, hence the explicit filter.)
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Callable, Mapping

import torch
from torch import nn

from edgeretina.errors import CheckpointError

log = logging.getLogger(__name__)

_SHOWN_KEYS = 5
_VIT_WIDTHS = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_RESNET_DEPTHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34", (3, 4, 23, 3): "resnet101",
                  (3, 8, 36, 3): "resnet152"}

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """The tensors of a weights file, unwrapped and without wrapper prefixes (see the module docstring).

    Raises CheckpointError for a missing or unreadable file, or one that holds no state dict."""
    from timm.models import load_state_dict

    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = load_state_dict(path, use_ema=True, device="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for a bad file; report them as one
        raise CheckpointError(f"{path} is not a readable weights file (safetensors or torch state dict): "
                              f"{error}") from None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path} holds no state dict (found {type(state).__name__})")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path} is not a state dict of tensors: {_first(not_tensors)} are not tensors "
                              "(a training checkpoint? its weights live under 'state_dict' or 'model')")
    return dict(state)


def load_timm_weights(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a local weights file into the timm model ``name`` (built with num_classes=0), exactly.

    Raises CheckpointError when the file cannot be read or does not fit (see check_weights_fit)."""
    raw = read_state_dict(path)
    state = _drop_classifier(_converted(raw, model, _timm_filter(model)), model)
    check_weights_fit(state, model, str(path), name, raw=raw)
    model.load_state_dict(state, strict=True)


def load_open_clip_weights(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a local open_clip (CLIP, CustomTextCLIP) weights file into the whole open_clip model, exactly:
    the position embeddings are resized to the model's image size as open_clip does.

    Raises CheckpointError when the file cannot be read or does not fit (see check_weights_fit)."""
    raw = read_state_dict(path)
    state = _converted(raw, model, _open_clip_conversions)
    check_weights_fit(state, model, str(path), name, raw=raw)
    model.load_state_dict(state, strict=True)


def check_weights_fit(state: Mapping[str, torch.Tensor], model: nn.Module, source: str, name: str, *,
                      raw: Mapping[str, torch.Tensor] | None = None) -> None:
    """CheckpointError unless ``state`` has exactly the model's keys with the model's shapes.

    The message gives the counts and first keys of what is missing, unexpected and of another shape, and
    what architecture the weights (``raw``: as read, before conversion) look like when that is clear."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    parts = [f"{len(keys)} {what} ({_first(keys)})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
             if keys]
    looks_like = describe_weights(raw if raw is not None else state)
    hint = f"; they look like {looks_like}" if looks_like else ""
    raise CheckpointError(f"weights {source} do not fit {name}: keys {', '.join(parts)}{hint}. "
                          "Pass the backbone name these weights were trained with, or weights of this backbone")


def describe_weights(state: Mapping[str, torch.Tensor]) -> str | None:
    """A short guess at the architecture a state dict comes from, or None when it is not clear."""
    if any(k.startswith("visual.") for k in state):
        tower = "ViT" if "visual.conv1.weight" in state and "visual.class_embedding" in state else (
            "ModifiedResNet" if "visual.layer1.0.conv1.weight" in state else "timm/other")
        return f"an open_clip CLIP model ({tower} image tower): use an open_clip model name"
    if "decoder_embed.weight" in state or any(k.startswith("decoder_blocks.") for k in state):
        return "an MAE pretraining checkpoint with its decoder: keep only the encoder's keys"
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        return _describe_vit(int(patch.shape[0]), int(patch.shape[-1]), _count_blocks(state, "blocks"))
    if "layer1.0.conv1.weight" in state and any(k.startswith("conv1.") for k in state):
        depths = tuple(_count_blocks(state, f"layer{i}") for i in range(1, 5))
        guess = _RESNET_DEPTHS.get(depths, "") if "conv1.weight" in state else ""   # conv1.0.*: a deep stem
        if guess == "resnet34" and "layer1.0.conv3.weight" in state:
            guess = "resnet50"
        return f"a ResNet with blocks {list(depths)}" + (f" (timm/{guess})" if guess else "")
    if "stem.0.weight" in state and any(k.startswith("stages.") for k in state):
        depths = [_count_blocks(state, f"stages.{i}.blocks") for i in range(_count_blocks(state, "stages"))]
        return f"a timm ConvNeXt-style CNN with stage depths {depths}"
    return None


def _describe_vit(width: int, patch: int, depth: int) -> str:
    text = f"a timm-layout ViT (width {width}, depth {depth}, patch {patch})"
    size = _VIT_WIDTHS.get(width)
    if size is not None:
        import timm

        names = timm.list_models(f"vit_{size}_patch{patch}_*")[:3]
        if names:
            text += ", e.g. " + ", ".join(f"timm/{n}" for n in names)
    return text


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def _converted(state: StateDict, model: nn.Module, convert: Callable[[StateDict, nn.Module], StateDict]) -> StateDict:
    """``convert(state, model)``; a converter that fails on weights of another architecture leaves them as
    they are, so that check_weights_fit names the keys rather than a converter's internal error."""
    try:
        return convert(dict(state), model)
    except Exception as error:  # converters assume their own layouts: KeyError, RuntimeError, ...
        log.info("weights converter %s failed (%s): checking the weights as they are",
                 getattr(convert, "__qualname__", convert), error)
        return state


def _timm_filter(model: nn.Module) -> Callable[[StateDict, nn.Module], StateDict]:
    """The ``checkpoint_filter_fn`` of the timm module that defines the model's class, if it has one."""
    module = importlib.import_module(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    return convert if callable(convert) else (lambda state, _model: state)


def _drop_classifier(state: StateDict, model: nn.Module) -> StateDict:
    """Without the weights of a classifier (timm's pretrained_cfg 'classifier') the model does not have."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    expected = model.state_dict()
    dropped = [k for k in state if k not in expected and prefixes and k.startswith(prefixes)]
    if dropped:
        log.info("dropped the classifier head of the weights: %s", _first(dropped))
    return {k: v for k, v in state.items() if k not in dropped}


def _open_clip_conversions(state: StateDict, model: nn.Module) -> StateDict:
    """What open_clip.load_checkpoint does between reading a file and load_state_dict (open_clip 3.x),
    applied to a state dict we read ourselves (open_clip's reader knows no {"model": ...} wrapping)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        ours = getattr(model, key, None)
        if key in state and ours is not None and ours.ndim != state[key].ndim:
            state[key] = state[key].reshape(ours.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    return state
