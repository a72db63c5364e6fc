from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._logs import warnings_to_log
from edgeretina.cli._options import Backend, enum_value, BundleOption, ThreadsOption, TrustOption, VerifyOption, trust_setting, verify_setting


@app.command(epilog="Example: edgeretina watch /media/camera/inbox --bundle bundle-cpu --out graded/")
def watch(
    folder: Annotated[Path, typer.Argument(help="Hot folder the camera writes photographs (or DICOM files) into.")],
    bundle: BundleOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.jsonl, overlays/ and cards/.")],
    interval: Annotated[float, typer.Option("--interval", min=0.01, help="Seconds between polls.")] = 1.0,
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write overlays and report cards.")] = True,
    once: Annotated[bool, typer.Option("--once", help="Grade what is there now, then exit (cron, tests).")] = False,
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Inference backend (default: the installed one that best fits the bundle).")] = None,
    threads: ThreadsOption = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Backend device (as for grade).")] = None,
    trust: TrustOption = None,
    verify: VerifyOption = True,
    store: Annotated[Optional[Path], typer.Option(
        "--store", help="Also write every record to the results store in this folder (SQLite; the one `edgeretina "
                        "serve --data` uses), overlay and card copied in beside it.")] = None,
    log: Annotated[Optional[Path], typer.Option(
        "--log", help="Append warnings (codec messages about damaged files) to this file (default: OUT/watch.log).")] = None,
) -> None:
    """Grade every new photograph in FOLDER once, when it is completely written; Ctrl-C stops."""
    from edgeretina.runtime.watch import WatchConfig, watch as run_watch

    config = WatchConfig(folder=folder, bundle=bundle, out=out, interval=interval, overlays=overlays,
                         once=once, backend=enum_value(backend), threads=threads, device=device, trust=trust_setting(trust),
                         verify=verify_setting(verify), store=store)
    with warnings_to_log(log or out / "watch.log", create_folder=log is None):
        summary = run_watch(config, on_record=_print_record)
    typer.echo(f"graded {summary.graded} image(s), {summary.errors} error(s); results in {out / 'results.jsonl'}")


def _print_record(record: dict) -> None:
    from edgeretina.runtime.report import one_line

    typer.echo(one_line(record["source"]["path"], record))
