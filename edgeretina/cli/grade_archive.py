from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import Backend, BundleOption, TrustOption, VerifyOption, enum_value, trust_setting, \
    verify_setting

EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130
PROGRESS_EVERY_S = 2.0


@app.command("grade-archive", epilog="Example: edgeretina grade-archive /archive/2019 scans.csv --bundle bundle-cpu "
                                     "--out graded/ --ray-address auto")
def grade_archive(
    sources: Annotated[list[str], typer.Argument(
        help="Folders (recursive), files, glob patterns, manifest CSV/Parquet files (a 'path' column), DICOM "
             "folders; or URIs pyarrow reads (s3://, gs://, hdfs://, ...).")],
    bundle: BundleOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for parts/, results.parquet and summary.json; "
                                                          "a rerun into it grades only what is not there yet.")],
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="auto (this machine's cluster), HOST:PORT or ray://HOST:10001; default: $RAY_ADDRESS, "
                              "else a local Ray started here with every CPU.")] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Grading actors, one Grader each (default: the cluster's CPUs / threads).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Files per model batch in a worker.")] = 16,
    threads_per_worker: Annotated[int, typer.Option(
        "--threads-per-worker", min=1, help="Backend threads per worker (the CPUs Ray reserves for each).")] = 1,
    part_rows: Annotated[int, typer.Option(
        "--part-rows", min=1, help="Rows per part file (a part is also written every 30 s of results).")] = 256,
    retry_errors: Annotated[bool, typer.Option(
        "--retry-errors", help="Grade again the files whose earlier row is an error.")] = False,
    backend: Annotated[Optional[Backend], typer.Option(
        "--backend", help="Inference backend (default: the installed one that best fits the bundle).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Backend device (as for grade).")] = None,
    trust: TrustOption = None,
    verify: VerifyOption = True,
) -> None:
    """Grade an archive on Ray Data: one Grader per worker, verified on its machine; Parquet out, resumable.
    Exit code 3 when any image failed, 130 when interrupted (rerun to continue)."""
    from edgeretina.archive import ArchiveConfig, grade_archive as run

    config = ArchiveConfig(sources=tuple(sources), bundle=bundle, out=out, ray_address=ray_address, workers=workers,
                           batch_size=batch_size, threads_per_worker=threads_per_worker, part_rows=part_rows,
                           retry_errors=retry_errors, backend=enum_value(backend), device=device,
                           trust=trust_setting(trust), verify=verify_setting(verify))
    printer = _ProgressPrinter()
    try:
        summary = run(config, on_progress=printer, log=lambda line: typer.echo(f"grade-archive: {line}", err=True))
    except KeyboardInterrupt:
        typer.secho(f"interrupted: finished parts are kept in {config.parts}; run the same command again to grade "
                    "the rest", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo(f"{summary.images} image(s) in {out / 'results.parquet'}: "
               + ", ".join(f"{count} {outcome}" for outcome, count in summary.screening.items())
               + f", {summary.errors} error(s); graded {summary.graded_files} file(s) now "
                 f"({summary.throughput_images_per_s:g} images/s on {summary.workers} worker(s)), "
                 f"skipped {summary.skipped_files} already graded")
    if summary.errors:
        raise typer.Exit(EXIT_SOME_FAILED)


class _ProgressPrinter:
    """Plain progress lines on stderr, at most one every PROGRESS_EVERY_S and one at the end: readable in a
    terminal and in `ray job logs` alike."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, progress) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and progress.files_done < progress.files_total:
            return
        self.last = now
        eta = "-" if progress.eta_s is None else time.strftime("%H:%M:%S", time.gmtime(progress.eta_s))
        share = 100.0 * progress.files_done / max(progress.files_total, 1)
        typer.echo(f"grade-archive: {progress.files_done}/{progress.files_total} files ({share:.0f}%), "
                   f"{progress.images} images, {progress.rate:.1f} images/s, ETA {eta}, {progress.errors} error(s)",
                   err=True)
