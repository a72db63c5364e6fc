from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app


@app.command("build-engine")
def build_engine(
    bundle: Annotated[Path, typer.Argument(help="A bundle exported with --target jetson.")],
    fp16: Annotated[Optional[bool], typer.Option("--fp16/--int8",
                                                 help="Engine precision (default: what the export chose).")] = None,
    sparsity: Annotated[bool, typer.Option("--sparsity", help="Use 2:4 structured-sparse kernels.")] = False,
) -> None:
    """Build model.plan on this device with TensorRT, check it against the export's reference outputs."""
    from edgeretina.runtime.backends.tensorrt import build_engine as run_build

    precision = None if fp16 is None else ("fp16" if fp16 else "int8")
    plan = run_build(bundle, precision=precision, sparsity=sparsity or None,
                     log=lambda line: typer.echo(line, err=True))
    typer.echo(str(plan))
