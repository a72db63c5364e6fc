"""ArchiveConfig: every setting of `grade-archive`, checked before Ray starts or a file is listed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgeretina.errors import ConfigError
from edgeretina.runtime.verify import VERIFY_MODES
from edgeretina.signing import TrustList

PARTS_DIR = "parts"
RESULTS_NAME = "results.parquet"
SUMMARY_NAME = "summary.json"
LOCK_NAME = ".grade-archive.lock"
LOCAL = "local"      # ray_address meaning "start a Ray of our own in this process"


@dataclass
class ArchiveConfig:
    sources: tuple[str, ...]              # folders (recursive), files, glob patterns, manifest CSV/Parquet, URIs
    bundle: Path
    out: Path                             # parts/, results.parquet, summary.json
    # None: $RAY_ADDRESS when set (what `ray job submit` gives its entrypoint), else a local Ray started here.
    # "auto": the cluster this machine belongs to (`ray start`); "local": always a Ray of our own; or HOST:PORT.
    ray_address: str | None = None
    workers: int | None = None            # grading actors; None: as many as the cluster's CPUs hold
    batch_size: int = 16                  # files per Grader call (one model batch; a DICOM adds its frames)
    threads_per_worker: int = 1           # the backend's threads in each actor (and the CPUs Ray reserves for it)
    part_rows: int = 256                  # rows buffered on the driver before a part file is written
    part_seconds: float = 30.0            # ... or this long after the first buffered row, whichever comes first
    retry_errors: bool = False            # grade again the files whose earlier row is an error
    backend: str | None = None            # as Grader(...)
    device: str | None = None
    trust: TrustList | str | os.PathLike | None = "environment"   # resolved here, enforced on every worker
    verify: str = "cached"                # as Grader(verify=...), on every worker's machine

    def __post_init__(self) -> None:
        self.sources = tuple(str(s) for s in self.sources)
        self.bundle, self.out = Path(self.bundle), Path(self.out)
        if not self.sources:
            raise ConfigError("no sources given: name folders, files, glob patterns or a manifest CSV/Parquet")
        if self.workers is not None:
            _check_int("workers", self.workers, 1, 100_000)
        _check_int("batch_size", self.batch_size, 1, 4096)
        _check_int("threads_per_worker", self.threads_per_worker, 1, 1024)
        _check_int("part_rows", self.part_rows, 1, 10_000_000)
        if isinstance(self.part_seconds, bool) or not isinstance(self.part_seconds, (int, float)) \
                or not 0 < self.part_seconds < float("inf"):
            raise ConfigError(f"part_seconds must be a positive number, got {self.part_seconds!r}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {self.verify!r}")
        if self.ray_address is not None and not str(self.ray_address).strip():
            raise ConfigError("ray_address is empty: give auto, local or HOST:PORT, or leave it out")
        if not self.bundle.exists():
            raise ConfigError(f"bundle not found: {self.bundle}")

    @property
    def parts(self) -> Path:
        return self.out / PARTS_DIR


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")
