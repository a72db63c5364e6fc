"""What a benchmark collects: per configuration while it runs (Measurement), and in the end (BenchResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeretina.bench.config import Setup
from edgeretina.bench.process import WorkerProcess


@dataclass
class Measurement:
    """One configuration's numbers so far; `skipped` says why it stopped (or never started)."""

    setup: Setup
    worker: WorkerProcess | None = None
    skipped: str | None = None
    ready: dict = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    with_overlay_ms: list[float] = field(default_factory=list)   # the same calls plus rendering their overlays
    stages: list[dict] = field(default_factory=list)
    fidelity: dict | None = None
    peak_rss_mb: float = 0.0


@dataclass
class BenchResult:
    rows: list[dict]
    machine: dict
    config: dict

    def to_dict(self) -> dict:
        return {"machine": self.machine, "config": self.config, "rows": self.rows}
