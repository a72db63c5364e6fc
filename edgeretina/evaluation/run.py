"""`edgeretina evaluate CKPT|BUNDLE --data FORMAT:PATH ... --out DIR`: predictions from the checkpoint or the
bundle (evaluation/sources.py), the report with confidence intervals (evaluation/report.py), and its files
(report.json, report.md, PNG plots) under DIR."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from edgeretina.cpu import cpu_class, cpu_info
from edgeretina.errors import DatasetError, MissingDependencyError
from edgeretina.evaluation.report import evaluation_report, write_report
from edgeretina.evaluation.sources import DEFAULT_K, bundle_input, checkpoint_input, is_bundle

Logger = Callable[[str], None]


def evaluate(target: Path, data: Sequence[str], out: Path, *, k: int = DEFAULT_K, backend: str | None = None,
             n_bootstrap: int = 1000, seed: int = 0, workers: int | None = None,
             log: Logger = print) -> tuple[dict, dict[str, Path]]:
    """Evaluate a checkpoint or a bundle on `data`; returns (report, written files)."""
    from edgeretina.layouts import load_data

    started = time.perf_counter()
    loaded = load_data(data)
    for line in loaded.summary.lines():
        log(line)
    if not loaded.items:
        raise DatasetError(f"no images loaded from {', '.join(map(str, data))}")
    if is_bundle(target):
        inputs = bundle_input(target, loaded.items, backend=backend, log=log)
    else:
        inputs = checkpoint_input(target, loaded.items, k=k, workers=workers, log=log)
    predicted = time.perf_counter()
    meta = {**inputs.meta, "data": [str(d) for d in data], "data_summary": loaded.summary.to_dict(),
            "cpu": cpu_info()[0], "cpu_class": cpu_class(), "prediction_seconds": round(predicted - started, 1)}
    inputs = replace(inputs, meta=meta)
    report = evaluation_report(inputs, n_bootstrap=n_bootstrap, seed=seed)
    try:
        files = write_report(report, inputs, Path(out))
    except MissingDependencyError as exc:        # report.json and report.md are written before the plots
        log(f"plots skipped: {exc}")
        files = {name: Path(out) / name for name in ("report.json", "report.md")}
    log(f"evaluation of {len(inputs.case_ids)} images written to {out} in {time.perf_counter() - started:.1f} s")
    return report, files
