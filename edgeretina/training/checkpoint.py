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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "edgeretina_version": __version__,
        "model_config": ckpt.model_config.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(),
        "grading": ckpt.grading.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()},
        "bank": ckpt.bank.to_state() if ckpt.bank is not None else None,
        "summary": ckpt.summary,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; report them as one
        raise CheckpointError(f"{path} is not a readable edgeretina checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgeretina checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format version {payload.get('format_version')}")
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
