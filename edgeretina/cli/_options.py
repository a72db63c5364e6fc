"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

BundleOption = Annotated[Path, typer.Option("--bundle", "-b", help="Exported bundle directory or .zip.")]
ThreadsOption = Annotated[Optional[int], typer.Option("--threads", min=1, help="Inference threads (default: all cores).")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed.")]
TrustOption = Annotated[Optional[Path], typer.Option(
    "--trust", help="Trust list (file or folder of Ed25519 public keys) that bundle signatures must verify against "
                    "(default: $EDGERETINA_TRUST, else ~/.config/edgeretina/trusted_keys when it exists).")]


def trust_setting(trust: Optional[Path]) -> Path | str:
    """What a command passes on as ``trust=``: the --trust path, or the environment's trust list."""
    return trust if trust is not None else "environment"
VerifyOption = Annotated[bool, typer.Option(
    "--verify/--no-verify", help="Re-run the export gate on this device once (cached) and refuse a bundle that fails "
                                 "it; --no-verify grades anyway.")]


def verify_setting(verify: bool) -> str:
    """What a command passes on as ``verify=``."""
    return "cached" if verify else "off"
