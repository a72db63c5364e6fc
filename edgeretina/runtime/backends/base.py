"""One interface for every inference backend (Polygraphy's runner habit, STYLE.md 4)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from edgeretina.errors import BackendError

INPUT_NAME = "image"


class Runner(ABC):
    """Runs one exported graph: `image` float32 [B, 3, S, S] in, named outputs out."""

    name: str = "base"

    def __init__(self, model_path: Path, threads: int | None = None, device: str | None = None,
                 settings: dict | None = None):
        """settings: the backend's runtime settings that export measured as fastest (manifest
        export.runtime[backend]); a runner applies what still holds on this device."""
        self.model_path = Path(model_path)
        self.threads = threads
        self.device = device
        self.settings = dict(settings or {})

    @abstractmethod
    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        ...

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if images.dtype != np.float32 or images.ndim != 4 or images.shape[1] != 3:
            raise BackendError(f"{self.name}: expected float32 [B, 3, H, W], got {images.dtype} {images.shape}")
        try:
            return self._infer(np.ascontiguousarray(images))
        except BackendError:
            raise
        except Exception as exc:  # each backend has its own exception types; the batch sees one
            raise BackendError(f"{self.name} failed to run {self.model_path.name}: {exc}") from exc

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "threads": self.threads, "device": self.device}
