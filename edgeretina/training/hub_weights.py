"""Whether an open_clip pretrained tag (or timm's hub weights of a timm model) can be had here, decided in
seconds.

open_clip (and timm) fetch a tag's weights from the Hugging Face hub (or its own URL) on first use. On a machine
without that network, huggingface_hub retries for about 45 s (measured: 46.7 s for RN50/openai, x86-avx2) and
then fails with a message about connections. ``check_tag_available`` answers first: weights already in the
local cache are fine; otherwise the hub must be reachable within a few seconds, else a ConfigError says how
to get the weights onto this machine.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from edgeretina.errors import ConfigError

#: how long the hub may take to accept a connection before it counts as unreachable
CONNECT_TIMEOUT_S = 3.0
_HUB_HOST = "huggingface.co"
_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")   # timm.models._hub HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def check_tag_available(name: str, tag: str) -> None:
    """Raise ConfigError unless the weights of open_clip tag ``tag`` of model ``name`` are cached here or
    their host answers within CONNECT_TIMEOUT_S. Only a tag open_clip knows reaches here (factory checks)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("file") or _cached(cfg):
        return
    host = _HUB_HOST if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname
    if host is None:
        return
    why = _unreachable(host)
    if why:
        raise ConfigError(
            f"pretrained {tag!r} of {name!r} is an open_clip hub tag, and its weights are neither cached here nor "
            f"downloadable ({host}: {why}). On a machine with network run: python -c \"import open_clip; "
            f"open_clip.create_model('{name}', pretrained='{tag}')\", copy the downloaded weights file "
            f"(under ~/.cache/huggingface/hub) here and pass --pretrained /path/to/that/file")


def check_timm_weights_available(model_name: str) -> None:
    """Raise ConfigError unless timm's pretrained weights of ``model_name`` (a timm name, optionally with a
    ``.tag``) are cached here or their host answers within CONNECT_TIMEOUT_S; also when timm has none."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name, allow_unregistered=False)
    except RuntimeError as error:
        raise ConfigError(f"timm has no pretrained weights for {model_name!r}: {error}") from None
    hub_id, url = cfg.hf_hub_id or "", cfg.url or ""
    if not hub_id and not url:
        raise ConfigError(f"timm has no downloadable pretrained weights for {model_name!r}: pass --pretrained "
                          "/path/to/weights-file")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _TIMM_HUB_FILES
    if hub_id and _in_hub_cache(hub_id, files):
        return
    if not hub_id and os.path.isfile(os.path.join(_torch_hub_checkpoints(), os.path.basename(urlparse(url).path))):
        return
    host = _HUB_HOST if hub_id else urlparse(url).hostname
    why = _unreachable(host) if host else None
    if why:
        raise ConfigError(
            f"pretrained 'timm' of timm/{model_name} means timm's hub weights, and they are neither cached here nor "
            f"downloadable ({host}: {why}). On a machine with network run: python -c \"import timm; "
            f"timm.create_model('{model_name}', pretrained=True)\", copy the downloaded weights file "
            f"(under ~/.cache/huggingface/hub) here and pass --pretrained /path/to/that/file")


def _in_hub_cache(repo: str, filenames) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in filenames)


def _torch_hub_checkpoints() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _cached(cfg: dict) -> bool:
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)   # as open_clip splits it: "timm/x.openai/" names no file
        return _in_hub_cache(repo, (filename,) if filename else _HUB_FILES)
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _unreachable(host: str) -> str | None:
    """Why ``host`` cannot be used now, or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES and host == _HUB_HOST:
        return "HF_HUB_OFFLINE is set"
    try:
        with socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
