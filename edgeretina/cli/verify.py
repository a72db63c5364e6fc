from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import Backend, enum_value, ThreadsOption, TrustOption, trust_setting


@app.command(epilog="Example: edgeretina verify bundle-cpu --threads 1")
def verify(
    bundle: Annotated[Path, typer.Argument(help="Exported bundle directory or .zip.")],
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Inference backend (default: the installed one that best fits the bundle).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Backend device (as for grade).")] = None,
    threads: ThreadsOption = None,
    trust: TrustOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Re-run the export gate's checks on this device with the bundle's reference set. Exit code 1 when the
    device does not reproduce the exported model; the result is remembered for grade and watch."""
    from edgeretina.runtime.verify import format_report, report_json, verify_here

    report = verify_here(bundle, backend=enum_value(backend), threads=threads, device=device, trust=trust_setting(trust))
    typer.echo(report_json(report) if as_json else format_report(report))
    if not report.passed:
        raise typer.Exit(1)
