"""Self-describing checkpoints: everything needed to rebuild, export and explain the model.

Saved with torch.save and read back with weights_only=True, so loading never unpickles arbitrary
objects: only tensors and plain containers go in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeretina import __version__
from edgeretina.atomic import write_atomic
from edgeretina.errors import CheckpointError
from edgeretina.grades import GradingConfig
from edgeretina.preprocess import PreprocessConfig
from edgeretina.training.model import GraderModel, ModelConfig

FORMAT = "edgeretina-checkpoint"
FORMAT_VERSION = 1


@dataclass
class TrainingBank:
    """Embeddings of the training cases (L2-normalised) with their grades and ids, as the checkpoint keeps
    them: what export writes to bank.npz (edgeretina/bank_storage.py) for the runtime's KNN FeatureBank."""

    embeddings: np.ndarray      # float32 [N, D]
    grades: np.ndarray          # int64 [N]
    case_ids: list[str]
    sources: list[str] | None = None    # the dataset each case came from (aptos, eyepacs, phantom, ...)

    def to_state(self) -> dict[str, Any]:
        state = {"embeddings": torch.from_numpy(self.embeddings.astype(np.float16)),
                 "grades": torch.from_numpy(self.grades.astype(np.int64)), "case_ids": list(self.case_ids)}
        if self.sources is not None:
            state["sources"] = list(self.sources)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TrainingBank":
        sources = state.get("sources")
        return cls(embeddings=state["embeddings"].float().numpy(), grades=state["grades"].numpy(),
                   case_ids=list(state["case_ids"]), sources=list(sources) if sources is not None else None)


@dataclass
class Checkpoint:
    model: GraderModel
    preprocess: PreprocessConfig
    grading: GradingConfig
    bank: TrainingBank | None
    summary: dict[str, Any] = field(default_factory=dict)   # training data, schedule, metrics, timings

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "edgeretina_version": __version__,
        "model_config": ckpt.model_config.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(),
        "grading": ckpt.grading.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()},
        "bank": ckpt.bank.to_state() if ckpt.bank is not None else None,
        "summary": ckpt.summary,
    }
    return torch_save_atomic(path, payload)


def torch_save_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """torch.save to `path` atomically (a temporary beside it, renamed into place): an interrupted save
    leaves the previous file, never half of one. Creates the parent folder. Used by checkpoints and
    resume files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda fh: torch.save(payload, fh))


def load_torch_payload(path: str | os.PathLike, file_format: str, version: int, kind: str) -> dict[str, Any]:
    """The dict a torch_save_atomic call wrote, read with weights_only=True (no arbitrary unpickling).

    Raises CheckpointError, naming the file as a `kind` ("checkpoint"), when it is missing, unreadable, of
    another format or of another format version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; report them as one
        raise CheckpointError(f"{path} is not a readable edgeretina {kind}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise CheckpointError(f"{path} is not an edgeretina {kind}")
    if payload.get("format_version") != version:
        raise CheckpointError(f"{path}: unsupported {kind} format version {payload.get('format_version')}")
    return payload


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    payload = load_torch_payload(path, FORMAT, FORMAT_VERSION, "checkpoint")
    with torch.random.fork_rng(devices=[]):     # the random init it is about to overwrite draws from torch's RNG
        model = GraderModel(ModelConfig.from_dict(payload["model_config"]), for_checkpoint=True)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture: {exc}") from None
    model.eval()
    bank = TrainingBank.from_state(payload["bank"]) if payload.get("bank") else None
    return Checkpoint(model=model, preprocess=PreprocessConfig.from_dict(payload["preprocess"]),
                      grading=GradingConfig.from_dict(payload["grading"]), bank=bank,
                      summary=payload.get("summary", {}))
