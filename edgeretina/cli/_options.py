"""Options shared by several commands, defined once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer

from edgeretina.choices import (BACKENDS, BANK_DTYPES, COUNTERFACTUAL_EVIDENCE, EXPORT_PRECISIONS, EXPORT_TARGETS,
                                GATE_MODES, TARGET_PRECISIONS, TRAINING_PRECISIONS)

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



def choice_enum(name: str, values: Sequence[str]) -> type[Enum]:
    """An Enum typer shows and checks as a fixed set of choices (`--help` lists them; a typo fails at
    parse time). Commands pass `.value` on."""
    return Enum(name, [(value, value) for value in values], type=str)


def enum_value(member: Enum | None) -> str | None:
    return None if member is None else member.value


ExportTarget = choice_enum("ExportTarget", EXPORT_TARGETS)
ExportPrecision = choice_enum("ExportPrecision", EXPORT_PRECISIONS)
GateMode = choice_enum("GateMode", GATE_MODES)
BankDtype = choice_enum("BankDtype", BANK_DTYPES)
TrainingPrecision = choice_enum("TrainingPrecision", TRAINING_PRECISIONS)
Backend = choice_enum("Backend", BACKENDS)
CounterfactualEvidence = choice_enum("CounterfactualEvidence", COUNTERFACTUAL_EVIDENCE)
EnginePrecision = choice_enum("EnginePrecision", TARGET_PRECISIONS["jetson"])
ComputeThreadsOption = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="CPU threads for training and the held-out grading (default: all cores).")]
DataOption = Annotated[list[str], typer.Option(
    "--data", "-d", help="Dataset as FORMAT:PATH (aptos, eyepacs, ddr, idrid, messidor2, deepdrid, phantom, dicom, csv); "
                         "repeat to merge corpora.")]
