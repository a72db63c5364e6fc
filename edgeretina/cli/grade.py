from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._logs import LogOption, warnings_to_log
from edgeretina.cli._options import Backend, enum_value, BundleOption, ThreadsOption, TrustOption, VerifyOption, trust_setting, verify_setting

EXIT_SOME_FAILED = 3


@app.command(epilog="Example: edgeretina grade photos/*.jpg --bundle bundle-cpu --json > results.json")
def grade(
    paths: Annotated[list[str], typer.Argument(
        help="Image files (JPEG, PNG, TIFF, BMP, DICOM), folders or glob patterns.")],
    bundle: BundleOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON.")] = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the records to this CSV file.")] = None,
    overlays: Annotated[Optional[Path], typer.Option("--overlays", help="Folder for saliency overlay PNGs.")] = None,
    cards: Annotated[Optional[Path], typer.Option("--cards", help="Folder for per-image report card PNGs.")] = None,
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Inference backend (default: the installed one that best fits the bundle).")] = None,
    threads: ThreadsOption = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="Backend device: cpu/cuda/tensorrt (onnxruntime), CPU/GPU/AUTO (openvino), cuda (tensorrt).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    verify: VerifyOption = True,
    trust: TrustOption = None,
    log: LogOption = None,
) -> None:
    """Grade fundus photographs with an exported bundle; a multi-frame DICOM gives one record per frame.
    Exit code 3 when any file failed."""
    from edgeretina.runtime.batch import grade_paths
    from edgeretina.runtime.grader import Grader
    from edgeretina.runtime.report import format_table, records_json, write_csv

    with warnings_to_log(log):
        grader = Grader(bundle, backend=enum_value(backend), threads=threads, device=device, trust=trust_setting(trust),
                        verify=verify_setting(verify))
        records = grade_paths(grader, paths, overlays=overlays, batch_size=batch_size, cards=cards)
    if csv_path is not None:
        write_csv(csv_path, records)
    typer.echo(records_json(records) if as_json else format_table(records))
    if any(r.error for r in records):
        raise typer.Exit(EXIT_SOME_FAILED)
