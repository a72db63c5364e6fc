"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

BundleOption = Annotated[Path, typer.Option("--bundle", "-b", help="Exported bundle directory or .zip.")]
ThreadsOption = Annotated[Optional[int], typer.Option("--threads", min=1, help="Inference threads (default: all cores).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed.")]
