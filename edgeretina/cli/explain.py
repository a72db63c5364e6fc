from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._logs import LogOption, warnings_to_log
from edgeretina.cli._options import (Backend, BundleOption, CounterfactualEvidence, ThreadsOption, TrustOption,
                                     VerifyOption, enum_value,
                                     trust_setting, verify_setting)


@app.command(epilog="Example: edgeretina explain photo.jpg --bundle bundle-cpu --counterfactual --out explained/")
def explain(
    image: Annotated[str, typer.Argument(help="One photograph or DICOM file.")],
    bundle: BundleOption,
    counterfactual: Annotated[bool, typer.Option(
        "--counterfactual", help="Also inpaint the most salient regions step by step and re-grade until grade 0 "
                                 "(disease-to-healthy counterfactual): a PNG strip and a JSON of the steps.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pictures and the JSON.")] = Path("explained"),
    max_steps: Annotated[int, typer.Option("--max-steps", min=1, help="Counterfactual: removals at most.")] = 8,
    evidence: Annotated[CounterfactualEvidence, typer.Option(
        "--evidence", help="Counterfactual: the map that picks what to remove: lesion (the lesion head's cells above "
                           "their thresholds), saliency, or auto (lesion when the bundle has a lesion head).")
    ] = CounterfactualEvidence("auto"),
    grow: Annotated[float, typer.Option("--grow", min=0.0, max=4.0, help="Counterfactual: widen each removed region by "
                                        "this many grid cells (the lesion's rim can hold the grade; the localisation "
                                        "gets coarser).")] = 0.0,
    frame: Annotated[Optional[int], typer.Option("--frame", min=1, help="The frame of a multi-frame DICOM (1-based).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record, files and steps as JSON.")] = False,
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Inference backend (default: the installed one that best fits the bundle).")] = None,
    threads: ThreadsOption = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Backend device (as for grade).")] = None,
    verify: VerifyOption = True,
    trust: TrustOption = None,
    log: LogOption = None,
) -> None:
    """Explain one grade: the saliency overlay and report card, and with --counterfactual what the model
    needed removed to call the eye healthy. Exit code 1 when the photo cannot be graded."""
    from edgeretina.preprocess import ImageRef
    from edgeretina.runtime.counterfactual import CounterfactualConfig
    from edgeretina.runtime.explain import explain as run_explain
    from edgeretina.runtime.grader import Grader

    config = CounterfactualConfig(max_steps=max_steps, evidence=enum_value(evidence), grow_cells=grow) if counterfactual else None
    with warnings_to_log(log):
        grader = Grader(bundle, backend=enum_value(backend), threads=threads, device=device, trust=trust_setting(trust),
                        verify=verify_setting(verify))
        result = run_explain(grader, ImageRef(image, frame), out, config)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    record = result.record
    typer.echo(f"{record.file}: grade {record.grade} ({record.grade_name}), "
               f"P(referable) {record.referable_probability:.2f}")
    if result.counterfactual is not None:
        cf = result.counterfactual
        typer.echo(f"counterfactual: grades {' -> '.join(map(str, cf.grades))} (stopped: {cf.stopped})")
    for name, path in result.files.items():
        typer.echo(f"{name}: {path}")
