from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import BankDtype, ExportPrecision, ExportTarget, GateMode, enum_value


@app.command(epilog="Example: edgeretina export model.pt --out bundle-cpu --target cpu --reference data/test/labels.csv")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `edgeretina train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory (or .zip with --zip) to create.")],
    target: Annotated[ExportTarget, typer.Option("--target", "-t", help="Export target preset.")] = ExportTarget("onnx"),
    precision: Annotated[Optional[ExportPrecision], typer.Option("--precision", help="onnx: fp32; cpu: int8 (measured choice of scheme) or a scheme; openvino, jetson: fp16 or int8 (default: the target's).")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Held-out images (labels.csv or folder) for the gate.")] = None,
    reference_count: Annotated[int, typer.Option("--reference-count", min=2, help="Held-out images the gate compares on.")] = 64,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="INT8 calibration images (folder or labels.csv), ideally from the target camera.")] = None,
    calibration_count: Annotated[int, typer.Option("--calibration-count", min=1, help="Calibration images used.")] = 256,
    gate: Annotated[GateMode, typer.Option("--gate", help="What a failed fidelity gate does: fail (no bundle), warn (ship and record), off.")] = GateMode("fail"),
    opset: Annotated[int, typer.Option("--opset")] = 17,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle.")] = False,
    as_zip: Annotated[bool, typer.Option("--zip", help="Write the bundle as one .zip file.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Structured pruning with a short recovery distillation, gated against the unpruned model.")] = False,
    bank_dtype: Annotated[BankDtype, typer.Option("--bank-dtype", help="Feature bank on disk: int8 (+ per-row scale) is half the bytes of float16.")] = BankDtype("float16"),
    knn_k: Annotated[int, typer.Option("--knn-k", min=1, help="Nearest training cases returned per image.")] = 5,
    bank_data: Annotated[Optional[list[str]], typer.Option("--bank-data", help="FORMAT:PATH (repeatable): re-embed the feature bank from these images with the exported (e.g. pruned) model.")] = None,
    int8_weight_bits: Annotated[int, typer.Option("--int8-weight-bits", min=7, max=8, help="cpu/openvino INT8 weights: 7 = the same results on every x86 CPU class (default); 8 = only for devices with VNNI/AMX/Arm dot products.")] = 7,
    trt_version: Annotated[str, typer.Option("--trt-version", help="jetson target: TensorRT on the device (8.5 = JetPack 5, 8.6, 10 = JetPack 6).")] = "10",
) -> None:
    """Export a checkpoint to a verified bundle (ONNX, feature bank, manifest)."""
    from edgeretina.export import ExportConfig, export as run_export

    config = ExportConfig(checkpoint=checkpoint, out=out, target=target.value, precision=enum_value(precision),
                          reference_images=reference, reference_count=reference_count, calibration_images=calibration,
                          calibration_count=calibration_count, gate=gate.value, opset=opset, overwrite=overwrite,
                          zip=as_zip, trt_version=trt_version, prune=prune, bank_dtype=bank_dtype.value, knn_k=knn_k,
                          bank_data=tuple(bank_data or ()),
                          int8_weight_bits=int8_weight_bits)
    path = run_export(config, log=lambda line: typer.echo(line, err=True))
    typer.echo(str(path))
