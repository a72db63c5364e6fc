"""`edgeretina bench`: parse the lists of bundles, backends, threads and batches; run; print the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._logs import LogOption, warnings_to_log
from edgeretina.errors import ConfigError


@app.command(epilog="Example: edgeretina bench bundle-cpu bundle-openvino --reference bundle-onnx --threads 1 --out bench-out")
def bench(
    bundles: Annotated[list[Path], typer.Argument(help="Exported bundle directories (or .zip) to measure.")],
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Bundle to compare against (normally the FP32 ONNX export); measured in the same run.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="Comma-separated backends.")] = "onnxruntime,openvino",
    threads: Annotated[str, typer.Option("--threads", help="Comma-separated thread counts.")] = "1,2",
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")] = "1",
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder of photographs (DICOM too) or a labels.csv (default: phantom photographs).")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per configuration, after warm-up.")] = 30,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs per configuration first.")] = 5,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Rounds the timed runs are spread over (round-robin).")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for bench.json and bench.png.")] = None,
    log: LogOption = None,
) -> None:
    """Latency, throughput, memory and fidelity of each bundle x backend x threads x batch, each in its own process."""
    from edgeretina.bench import BenchConfig, format_table, run_bench, write_results

    config = BenchConfig(bundles=list(bundles), reference=reference, backends=_names(backend), threads=_ints(threads, "--threads"),
                         batches=_ints(batch, "--batch"), images=images, runs=runs, warmup=warmup, rounds=rounds)
    with warnings_to_log(log):
        result = run_bench(config, log=_log)
    typer.echo(json.dumps(result.rows, indent=2) if as_json else format_table(result))
    if out is not None:
        written = [path for path in write_results(result, out, log=_log) if path is not None]
        typer.echo("wrote " + " and ".join(map(str, written)), err=True)


def _log(line: str) -> None:
    typer.echo(line, err=True)


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None
