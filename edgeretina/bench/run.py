"""The benchmark run: every configuration (bundle x backend x threads x batch) in its own worker process
(edgeretina/bench/worker.py), so its peak memory is its own and one backend's thread pools never warm
the next. The parent alternates between the workers in rounds and pools each worker's rounds, so drift
of the machine (thermal, neighbours) hits every configuration alike. Ratios and fidelity are against a
reference bundle (normally the FP32 ONNX export) measured in the same run.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Callable

from edgeretina.bench.artifacts import cannot_run
from edgeretina.bench.config import BenchConfig, Setup
from edgeretina.bench.images import resolve_images
from edgeretina.bench.machine import machine_info
from edgeretina.bench.process import WorkerProcess
from edgeretina.bench.results import BenchResult, Measurement
from edgeretina.bench.rows import add_reference_ratios, config_summary, measured_row
from edgeretina.errors import EdgeRetinaError

Log = Callable[[str], None]


def run_bench(config: BenchConfig, log: Log = lambda _: None) -> BenchResult:
    """Measure every configuration; returns the rows (skipped ones say why) and the machine.

    Raises ConfigError for bad options or images; a backend or bundle that cannot run becomes a
    skipped row, never an exception.
    """
    bundles = _bundle_list(config)
    setups = [Setup(b, be, t, n) for b, be, t, n in
              itertools.product(bundles, config.backends, config.threads, config.batches)]
    with tempfile.TemporaryDirectory(prefix="edgeretina-bench-") as tmp:
        scratch = Path(tmp)
        images = resolve_images(config.images, scratch, config.phantom_count, config.phantom_size)
        image_list = scratch / "images.txt"
        image_list.write_text("".join(f"{p.resolve()}\n" for p in images))
        measured = [Measurement(s, skipped=cannot_run(s.bundle, s.backend)) for s in setups]
        try:
            _start_workers(measured, image_list, scratch, log)
            _measure_rounds(measured, config, log)
            if config.reference is not None:
                _collect(measured, _ask_fidelity)
            _collect(measured, _stop_worker)
        finally:
            for m in measured:
                if m.worker is not None:
                    m.worker.close()
    rows = [measured_row(m) for m in measured]
    if config.reference is not None:
        add_reference_ratios(rows, measured, config.reference.resolve())
    return BenchResult(rows=rows, machine=machine_info(), config=config_summary(config, len(images)))


def _bundle_list(config: BenchConfig) -> list[Path]:
    bundles = [Path(b).resolve() for b in config.bundles]
    if config.reference is not None and config.reference.resolve() not in bundles:
        bundles.insert(0, config.reference.resolve())
    return list(dict.fromkeys(bundles))


def _start_workers(measured: list[Measurement], image_list: Path, scratch: Path, log: Log) -> None:
    """One at a time, so that load and cold-start times are not measured against each other."""
    for index, m in enumerate(measured):
        if m.skipped:
            log(f"skip {m.setup.name}: {m.skipped}")
            continue
        log(f"load {m.setup.name}")
        m.worker = WorkerProcess(m.setup, image_list, scratch / f"worker-{index}.log")
        try:
            m.ready = m.worker.receive()
        except EdgeRetinaError as exc:
            _skip(m, str(exc))


def _measure_rounds(measured: list[Measurement], config: BenchConfig, log: Log) -> None:
    live = [m for m in measured if m.worker is not None]
    for m in live:
        try:
            if config.warmup:
                m.worker.request(op="runs", n=config.warmup)
        except EdgeRetinaError as exc:
            _skip(m, str(exc))
    per_round = [config.runs // config.rounds + (i < config.runs % config.rounds) for i in range(config.rounds)]
    for index, n in enumerate(per_round):
        log(f"round {index + 1}/{config.rounds}: {n} run(s) per configuration")
        live = [m for m in measured if m.worker is not None]
        # Rotate the order each round: nobody always runs right after the same neighbour.
        shift = index % len(live) if live else 0
        for m in live[shift:] + live[:shift]:
            try:
                reply = m.worker.request(op="runs", n=n)
            except EdgeRetinaError as exc:
                _skip(m, str(exc))
                continue
            m.latencies_ms += reply["latencies_ms"]
            m.with_overlay_ms += reply["with_overlay_ms"]
            m.stages += reply["stages"]


def _collect(measured: list[Measurement], action: Callable[[Measurement], None]) -> None:
    for m in measured:
        if m.worker is None:
            continue
        try:
            action(m)
        except EdgeRetinaError as exc:
            _skip(m, str(exc))


def _ask_fidelity(m: Measurement) -> None:
    m.fidelity = m.worker.request(op="fidelity")


def _stop_worker(m: Measurement) -> None:
    m.peak_rss_mb = m.worker.stop()
    m.worker = None


def _skip(m: Measurement, reason: str) -> None:
    m.skipped = reason
    if m.worker is not None:
        m.worker.close()
        m.worker = None
