"""What a benchmark run measures: the options (BenchConfig) and one configuration (Setup)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeretina.errors import ConfigError

# Per-image stages a row breaks its time into (overlay = saliency rendering, timed beside the grader).
STAGES = ("decode", "quality", "preprocess", "inference", "postprocess", "knn", "overlay")


@dataclass
class BenchConfig:
    """What to measure. runs = timed runs per configuration, spread over `rounds` rounds."""

    bundles: list[Path]
    reference: Path | None = None
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    threads: list[int] = field(default_factory=lambda: [1])
    batches: list[int] = field(default_factory=lambda: [1])
    images: Path | None = None          # folder (searched recursively) or labels.csv; None = phantom photographs
    runs: int = 30
    warmup: int = 5
    rounds: int = 5
    phantom_count: int = 16
    phantom_size: int = 768

    def __post_init__(self) -> None:
        if not self.bundles and self.reference is None:
            raise ConfigError("bench needs at least one bundle")
        for name, values in (("threads", self.threads), ("batch", self.batches)):
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"--{name} values must be integers >= 1, got {values}")
        if not self.backends:
            raise ConfigError("bench needs at least one backend")
        if self.runs < 1 or self.rounds < 1 or self.warmup < 0:
            raise ConfigError("runs and rounds must be >= 1 and warmup >= 0")
        self.rounds = min(self.rounds, self.runs)


@dataclass(frozen=True)
class Setup:
    """One configuration: a bundle on a backend with a thread count and a batch size."""

    bundle: Path
    backend: str
    threads: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.bundle.name}/{self.backend} t{self.threads} b{self.batch}"
