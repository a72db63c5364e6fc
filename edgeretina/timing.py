"""Interleaved median latencies: how export, the runtime (settings re-measured on a new CPU class) and the
benchmark scripts choose between candidates."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def interleaved_median_ms(calls: Mapping[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median milliseconds of each call. One untimed call each first (it allocates and picks kernels), then
    `runs` rounds that call every candidate once in turn, so load from other processes (shared CPUs drift
    a lot) falls on every candidate alike."""
    for call in calls.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
