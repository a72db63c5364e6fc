"""Resumable training: after every epoch the loop writes a resume file next to its checkpoint
(`<out stem>.resume.pt`, atomically) and `TrainConfig.resume` continues from it.

The file holds what the next epoch depends on: the model, optimizer, scheduler (and gradient scaler)
states, the epoch count, the best epoch so far (its QWK and weights), the history, the early-stopping
counter, the time already spent, every process's numpy and torch random states and the sampler's state.
A resumed run therefore computes what the uninterrupted run would have: the same batches, the same
augmentation draws, the same weights. Only tensors and plain containers are stored, so
`torch.load(weights_only=True)` reads it (numpy's generator state is a dict of ints).

A fingerprint of everything that shapes the run (model, data, schedule, sampler, losses, augmentation,
number of processes) is stored too; resuming with different settings is refused (ConfigError), naming
what differs. A setting newer than the file (absent from its fingerprint) matches when the resumed run keeps
its default, so files of older versions resume. The resume file is removed once the final checkpoint is
written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeretina import __version__
from edgeretina.errors import ConfigError
from edgeretina.training.checkpoint import load_torch_payload, torch_save_atomic

FORMAT = "edgeretina-resume"
FORMAT_VERSION = 1
# Settings that may change between an interrupted run and its resumption: where things go, how many
# threads/workers, the early-stopping rule, and what only the end of the run uses (the operating point's
# target; the prompts, whose prototypes come back with the weights). Everything else must match, the time
# budget too: it decided the planned epochs after the first one, and the resumed run keeps that plan.
_MAY_CHANGE = ("data", "val_data", "out", "resume", "threads", "workers", "patience", "min_delta",
               "target_sensitivity", "prompts_file")


def resume_path(out: str | os.PathLike) -> Path:
    """Where the resume file of a run writing checkpoint `out` lives: model.pt -> model.resume.pt."""
    out = Path(out)
    return out.with_name(f"{out.stem}.resume{out.suffix or '.pt'}")


@dataclass
class ResumeState:
    epoch: int                                  # epochs completed
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    best_qwk: float
    best_epoch: int
    best_state: dict[str, torch.Tensor] | None
    history: list[dict]
    stopping_best: float                        # the early-stopping rule's best (improvements > min_delta)
    epochs_without_improvement: int
    planned_epochs: int                         # after the time budget's decision
    elapsed_seconds: float                      # training time before this resumption
    rng: dict[str, list]                        # {"numpy": [state per rank], "torch": [ByteTensor per rank]}
    sampler: dict[str, Any]
    fingerprint: dict[str, Any] = field(default_factory=dict)


def run_fingerprint(config: Any, train_ids: list[str], val_ids: list[str], train_grades, val_grades,
                    world_size: int, cached: bool) -> dict[str, Any]:
    """What must be equal for a resumed run to continue the interrupted one (JSON-able).

    "defaults" holds this code's default of every setting: a resume file written before a setting existed
    lacks it, and the run it records behaved as that default does. Only the current run's defaults are
    read (a file's own are ignored)."""
    settings = {k: v for k, v in _plain(dataclasses.asdict(config)).items() if k not in _MAY_CHANGE}
    data = hashlib.sha256(json.dumps([train_ids, [int(g) for g in train_grades], val_ids,
                                      [int(g) for g in val_grades]]).encode()).hexdigest()
    return {"settings": settings, "defaults": _defaults(type(config)), "data_sha256": data,
            "world_size": int(world_size), "feature_cache": bool(cached)}


def _defaults(config_type: type) -> dict[str, Any]:
    """Each setting's default, JSON-comparable like the settings (nested configs as dicts); a required
    setting has none."""
    out = {}
    for f in dataclasses.fields(config_type):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = _plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
    return out


def save_resume_state(path: str | os.PathLike, state: ResumeState) -> Path:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "edgeretina_version": __version__,
               **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)}}
    return torch_save_atomic(path, payload)


def load_resume_state(path: str | os.PathLike, fingerprint: dict[str, Any]) -> ResumeState:
    """Read a resume file and check that it continues this run.

    Raises CheckpointError for a missing or unreadable file or another format, ConfigError when the
    run's settings, data or process count differ from the interrupted run's."""
    path = Path(path)
    payload = load_torch_payload(path, FORMAT, FORMAT_VERSION, "resume file")
    differences = _differences(payload.get("fingerprint", {}), fingerprint)
    if differences:
        raise ConfigError(f"{path} was written by a run with other settings ({'; '.join(differences)}): "
                          "resume with the original settings, or delete the file to start afresh")
    return ResumeState(**{f.name: payload[f.name] for f in dataclasses.fields(ResumeState)})


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    saved_settings, current_settings = saved.get("settings", {}), current.get("settings", {})
    defaults = current.get("defaults", {})
    for key in sorted(set(saved_settings) | set(current_settings)):
        if not _same_setting(saved_settings, current_settings, defaults, key):
            out.append(f"{key}: {saved_settings.get(key)!r} then, {current_settings.get(key)!r} now")
    if saved.get("data_sha256") != current.get("data_sha256"):
        out.append("the training or validation images differ")
    for key in ("world_size", "feature_cache"):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} then, {current.get(key)!r} now")
    return out


def _same_setting(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any], key: str) -> bool:
    """Equal, where a setting the saved run did not know yet (absent there, at any depth of a nested config)
    equals its default: the file predates the setting, and the run uses the behaviour it had then."""
    if key not in saved:
        return key in defaults and current[key] == defaults[key]
    then, now, default = saved[key], current.get(key), defaults.get(key)
    if isinstance(then, dict) and isinstance(now, dict):
        nested = default if isinstance(default, dict) else {}
        return all(_same_setting(then, now, nested, k) for k in set(then) | set(now))
    return then == now


def _plain(value: Any) -> Any:
    """dataclass dicts -> JSON-comparable values (paths and tuples become strings and lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value
