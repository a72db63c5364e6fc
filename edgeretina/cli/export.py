from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `edgeretina train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory (or .zip with --zip) to create.")],
    target: Annotated[str, typer.Option("--target", "-t", help="Export target preset.")] = "onnx",
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 | fp16 | int8 (default: the target's).")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Held-out images (labels.csv or folder) for the gate.")] = None,
    reference_count: Annotated[int, typer.Option("--reference-count", min=2, help="Held-out images the gate compares on.")] = 64,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="INT8 calibration images (folder or labels.csv), ideally from the target camera.")] = None,
    calibration_count: Annotated[int, typer.Option("--calibration-count", min=1, help="Calibration images used.")] = 256,
    gate: Annotated[str, typer.Option("--gate", help="fail | warn | off")] = "fail",
    opset: Annotated[int, typer.Option("--opset")] = 17,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle.")] = False,
    as_zip: Annotated[bool, typer.Option("--zip", help="Write the bundle as one .zip file.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Structured pruning with a short recovery distillation, gated against the unpruned model.")] = False,
    bank_dtype: Annotated[str, typer.Option("--bank-dtype", help="Feature bank on disk: float16 | int8 (+ per-row scale, half the bytes).")] = "float16",
    knn_k: Annotated[int, typer.Option("--knn-k", min=1, help="Nearest training cases returned per image.")] = 5,
    int8_weight_bits: Annotated[int, typer.Option("--int8-weight-bits", help="cpu/openvino INT8 weights: 7 = the same results on every x86 CPU class (default); 8 = only for devices with VNNI/AMX/Arm dot products.")] = 7,
    trt_version: Annotated[str, typer.Option("--trt-version", help="jetson target: TensorRT on the device (8.5 = JetPack 5, 8.6, 10 = JetPack 6).")] = "10",
) -> None:
    """Export a checkpoint to a verified bundle (ONNX, feature bank, manifest)."""
    from edgeretina.export import ExportConfig, export as run_export

    config = ExportConfig(checkpoint=checkpoint, out=out, target=target, precision=precision, reference_images=reference, reference_count=reference_count, calibration_images=calibration, calibration_count=calibration_count, gate=gate,
                          opset=opset, overwrite=overwrite, zip=as_zip, trt_version=trt_version, prune=prune,
                          bank_dtype=bank_dtype, knn_k=knn_k, int8_weight_bits=int8_weight_bits)
    path = run_export(config, log=lambda line: typer.echo(line, err=True))
    typer.echo(str(path))
