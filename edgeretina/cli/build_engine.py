"""`edgeretina build-engine` and `edgeretina check-engine`: TensorRT engines built and checked on the device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import EnginePrecision


@app.command("build-engine", epilog="Example: edgeretina build-engine bundle-jetson --fp16")
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="A bundle exported with --target jetson.")],
    fp16: Annotated[Optional[bool], typer.Option("--fp16/--int8",
                                                 help="Engine precision (default: what the export chose).")] = None,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Use 2:4 structured-sparse kernels.")] = False,
) -> None:
    """Build model.plan on this device with TensorRT, check it against the export's reference outputs."""
    from edgeretina.runtime.backends.tensorrt_build import build_engine as run_build

    precision = None if fp16 is None else ("fp16" if fp16 else "int8")
    plan = run_build(bundle, precision=precision, sparsity=sparsity or None,
                     log=lambda line: typer.echo(line, err=True))
    typer.echo(str(plan))


@app.command("check-engine", epilog="Example: edgeretina check-engine model.plan reference_inputs.npy reference_outputs.npz --precision fp16")
def check_engine(
    plan: Annotated[Path, typer.Argument(help="The freshly built model.plan.")],
    inputs: Annotated[Path, typer.Argument(help="reference_inputs.npy of the bundle.")],
    outputs: Annotated[Path, typer.Argument(help="reference_outputs.npz of the bundle (the torch outputs).")],
    precision: Annotated[EnginePrecision, typer.Option("--precision", help="Precision the plan was built in.")] = EnginePrecision("fp16"),
    exported_for: Annotated[str, typer.Option("--exported-for", help="TensorRT version the export targeted.")] = "",
    write_info: Annotated[Optional[Path], typer.Option("--write-info", help="Write engine.json (what built the plan) here.")] = None,
) -> None:
    """Check a plan built with trtexec (build_engine.sh) against the reference outputs; print what built it."""
    from edgeretina.runtime.backends.tensorrt_build import check_built_plan

    result = check_built_plan(plan, inputs, outputs, precision=precision.value, exported_for=exported_for,
                              write_info=write_info)
    typer.echo(json.dumps(result, indent=2))
