"""How grade-archive scales with Ray workers on this machine: images/s with 1, 2, ... workers, and the ratio.

For each bundle (``--bundle``, repeatable) and each worker count (``--workers 1,2``), the same phantom photographs
are graded into a fresh output folder by ``edgeretina.archive.grade_archive`` on one local Ray started here
(``ray.init(num_cpus=os.cpu_count())``, quiet, shared by every run). Recorded per run:
- ``throughput_images_per_s``: images over the run's grading time (first dispatch to last row), which includes
  starting the actors (each loads its Grader; the on-device verification is warmed up before, so it is cached);
- ``steady_images_per_s``: images after the first result table over the time from that table to the last: the
  rate once the pool is up, what a long archive sees;
and per bundle the scaling ratio of each worker count's steady rate to the 1-worker rate. The machine (CPU model,
edgeretina.cpu's cpu_class, cores, load average, library versions) goes into the JSON beside the numbers: a rate
measured on one CPU class says nothing about another, and a busy machine scales worse than an idle one.

Bundles: the demo's (`edgeretina demo` writes demo-run/bundle; a 256 px tiny CNN such as /work/runs/b-fp32 here).
A ViT-B-16 INT8 bundle needs no downloaded weights (random weights time the same):
    python benchmarks/reference.py --out refs --arch ViT-B-16     # ~7 min on 2 cores
gives refs/ViT-B-16/candidates/cpu (ONNX Runtime INT8), refs/ViT-B-16/candidates/openvino (OpenVINO INT8) and
refs/ViT-B-16/best-cpu (the faster faithful one on this CPU).

Usage: python benchmarks/grade_archive_scaling.py --bundle B [--bundle B2] --out DIR [--images 400]
       [--size 512] [--workers 1,2] [--batch-size 16] [--threads-per-worker 1] [--rounds 1] [--images-dir DIR]
Writes DIR/grade_archive_scaling.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from edgeretina.atomic import write_text_atomic

WARMUP_IMAGES = 4


def main(argv: list[str] | None = None) -> int:
    from edgeretina.archive.cluster import ray_session

    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images = args.images_dir or _phantom_images(args.out / "images", args.images, args.size)
    with ray_session("local"):      # one quiet local Ray for every run, as `grade-archive` starts it
        runs = []
        for bundle in args.bundle:
            _warm_up(bundle, images, args)
            for round_index in range(args.rounds):
                for workers in args.workers:
                    runs.append(_timed_run(bundle, images, workers, round_index, args))
                    print(_row_text(runs[-1]), file=sys.stderr)
    report = {"machine": _machine(), "settings": _settings(args, images), "runs": runs,
              "scaling": _scaling(runs, args.workers)}
    path = write_text_atomic(args.out / "grade_archive_scaling.json", json.dumps(report, indent=2) + "\n")
    print(_table(report))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, action="append", required=True, help="bundle to time (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=400, help="phantom photographs to grade per run")
    parser.add_argument("--size", type=int, default=512, help="phantom photograph height in pixels")
    parser.add_argument("--images-dir", type=Path, default=None, help="grade this folder instead of phantoms")
    parser.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every worker count; medians are reported")
    return parser.parse_args(argv)


def _phantom_images(folder: Path, count: int, size: int) -> Path:
    """The same photographs for every run (seeded); reused when a previous run left them."""
    from edgeretina.phantom import PhantomConfig, generate_dataset

    images = folder / "images"
    if not (images.is_dir() and len(list(images.glob("*.jpg"))) == count):
        shutil.rmtree(folder, ignore_errors=True)
        generate_dataset(folder, n=count, seed=16, config=PhantomConfig(size=size))
        shutil.rmtree(folder / "masks", ignore_errors=True)   # not images to grade
    return images


def _warm_up(bundle: Path, images: Path, args) -> None:
    """A few images through one worker: the bundle's on-device verification is then cached on this machine."""
    from edgeretina.archive import ArchiveConfig, grade_archive

    first = sorted(images.rglob("*.jpg"))[:WARMUP_IMAGES]
    out = args.out / "runs" / "warm-up"
    shutil.rmtree(out, ignore_errors=True)
    grade_archive(ArchiveConfig(sources=tuple(map(str, first)), bundle=bundle, out=out, workers=1,
                                threads_per_worker=args.threads_per_worker, batch_size=args.batch_size))


def _timed_run(bundle: Path, images: Path, workers: int, round_index: int, args) -> dict:
    from edgeretina.archive import ArchiveConfig, grade_archive

    out = args.out / "runs" / f"{bundle.name}-w{workers}-r{round_index}"
    shutil.rmtree(out, ignore_errors=True)
    arrivals: list[tuple[float, int]] = []
    started = time.perf_counter()
    summary = grade_archive(ArchiveConfig(sources=(str(images),), bundle=bundle, out=out, workers=workers,
                                          batch_size=args.batch_size, threads_per_worker=args.threads_per_worker),
                            on_progress=lambda p: arrivals.append((time.perf_counter(), p.images)))
    wall = time.perf_counter() - started
    shutil.rmtree(out / "parts", ignore_errors=True)
    return {"bundle": str(bundle), "bundle_sha256": summary.bundle_sha256, "model": _model(bundle),
            "workers": workers, "round": round_index, "images": summary.graded_images, "errors": summary.errors,
            "wall_s": round(wall, 3), "grading_s": summary.grading_s,
            "throughput_images_per_s": summary.throughput_images_per_s,
            "steady_images_per_s": _steady_rate(arrivals), "result_tables": len(arrivals)}


def _steady_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Images after the first result table over the time from it to the last one (None with one table)."""
    if len(arrivals) < 2 or arrivals[-1][0] <= arrivals[0][0]:
        return None
    (t0, n0), (t1, n1) = arrivals[0], arrivals[-1]
    return round((n1 - n0) / (t1 - t0), 3)


def _model(bundle: Path) -> dict:
    from edgeretina.bundle import load_bundle

    manifest = load_bundle(bundle, verify=False).manifest
    artifact = next((a for a in manifest.artifacts if a.role == "model"), None)
    backbone = (manifest.model.get("arch") or {}).get("backbone") or {}
    return {"arch": backbone.get("name"), "input_size": manifest.model.get("input_size"),
            "format": artifact.format if artifact else None, "precision": artifact.precision if artifact else None}


def _scaling(runs: list[dict], worker_counts: list[int]) -> dict:
    """Per bundle: the median steady rate per worker count and its ratio to the 1-worker rate."""
    scaling = {}
    for bundle in dict.fromkeys(run["bundle"] for run in runs):
        rates = {}
        for workers in worker_counts:
            values = [r["steady_images_per_s"] or r["throughput_images_per_s"] for r in runs
                      if r["bundle"] == bundle and r["workers"] == workers]
            rates[str(workers)] = round(statistics.median(values), 3) if values else None
        base = rates.get("1")
        scaling[bundle] = {"images_per_s": rates,
                           "ratio_to_1_worker": {w: round(v / base, 3) for w, v in rates.items() if base and v}}
    return scaling


def _machine() -> dict:
    from edgeretina.bench.machine import library_versions, machine_info
    from edgeretina.cpu import cpu_class

    info = machine_info()
    info.update(cpu_class=cpu_class(), load_average=[round(v, 2) for v in os.getloadavg()])
    info["libraries"].update(library_versions(("ray", "pyarrow")))
    return info


def _settings(args, images: Path) -> dict:
    return {"images_dir": str(images), "images": len(list(images.rglob("*.jpg"))), "size": args.size,
            "workers": args.workers, "batch_size": args.batch_size, "threads_per_worker": args.threads_per_worker,
            "rounds": args.rounds, "ray": "local, num_cpus=os.cpu_count()", "cores": os.cpu_count()}


def _row_text(run: dict) -> str:
    return (f"{Path(run['bundle']).name}: {run['workers']} worker(s), {run['images']} images, "
            f"{run['throughput_images_per_s']} images/s overall, {run['steady_images_per_s']} steady")


def _table(report: dict) -> str:
    machine = report["machine"]
    lines = [f"{machine['cpu']} ({machine['cpu_class']}, {machine['cores']} cores, load {machine['load_average']})",
             f"{'bundle':<40} {'workers':>7} {'images/s':>9} {'steady':>8} {'ratio':>6}"]
    for bundle, scaling in report["scaling"].items():
        for workers, rate in scaling["images_per_s"].items():
            overall = [r["throughput_images_per_s"] for r in report["runs"]
                       if r["bundle"] == bundle and str(r["workers"]) == workers]
            ratio = scaling["ratio_to_1_worker"].get(workers)
            lines.append(f"{Path(bundle).name:<40} {workers:>7} {statistics.median(overall):>9.2f} "
                         f"{rate if rate is not None else float('nan'):>8.2f} {ratio if ratio else float('nan'):>6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
