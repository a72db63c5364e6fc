from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeretina.cli import app


@app.command()
def info(
    bundle: Annotated[Path, typer.Argument(help="Exported bundle directory or .zip.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a bundle and verify every artifact's sha256. Exit code 1 when it was tampered with."""
    from edgeretina.runtime.info import format_info, info_json, inspect_bundle

    summary = inspect_bundle(bundle)
    typer.echo(info_json(summary) if as_json else format_info(summary))
    summary.raise_if_tampered()
