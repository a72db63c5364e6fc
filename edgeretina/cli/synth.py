from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import SeedOption


@app.command(epilog="Example: edgeretina synth --out data/train --n 2000 --seed 1")
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write images/, masks/ and labels.csv into.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of photographs.")] = 100,
    seed: SeedOption = 0,
    size: Annotated[int, typer.Option("--size", min=64, help="Image height in pixels.")] = 512,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Worker processes.")] = None,
) -> None:
    """Generate synthetic (phantom) fundus photographs with lesion masks and ICDR grades."""
    from edgeretina.phantom import PhantomConfig, generate_dataset

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"\rsynth: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    labels = generate_dataset(out, n=n, seed=seed, config=PhantomConfig(size=size), workers=workers, progress=progress)
    typer.echo(str(labels))
