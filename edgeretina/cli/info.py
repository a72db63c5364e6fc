from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeretina.cli import app
from edgeretina.cli._options import TrustOption, trust_setting


@app.command(epilog="Example: edgeretina info bundle-cpu")
def info(
    bundle: Annotated[Path, typer.Argument(help="Exported bundle directory or .zip.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    trust: TrustOption = None,
) -> None:
    """Summarise a bundle, verify every artifact's sha256 and its signature. Exit code 1 when it was tampered
    with or, under a trust list, its signature is refused."""
    from edgeretina.runtime.info import format_info, info_json, inspect_bundle

    summary = inspect_bundle(bundle, trust=trust_setting(trust))
    typer.echo(info_json(summary) if as_json else format_info(summary))
    summary.raise_if_tampered()
