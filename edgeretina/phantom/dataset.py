"""Write a phantom dataset: images, per-lesion masks and labels.csv, in parallel and reproducibly."""

from __future__ import annotations

import csv
import functools
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES
from edgeretina.phantom.config import PhantomCase, PhantomConfig
from edgeretina.phantom.render import render_case

LABEL_COLUMNS = ("path", "case_id", "grade", "dme", "source", "seed", *(f"n_{code}" for code in LESION_CODES))
SOURCE = "phantom"


def case_seed(dataset_seed: int, index: int) -> int:
    """The seed of case `index`: a function of the dataset seed and the index only, so any worker
    count and any order of generation give the same cases."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1)[0])


def case_id(dataset_seed: int, index: int) -> str:
    return f"phantom_s{dataset_seed}_{index:05d}"


def generate_dataset(out_dir: str | Path, n: int, seed: int = 0, config: PhantomConfig | None = None,
                     workers: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Render n cases into out_dir and return the path of its labels.csv.

    Layout: images/<case_id>.jpg (or .png when config.jpeg is False), masks/<CODE>/<case_id>.png for
    every lesion code (empty masks included, so the layout is predictable), labels.csv with the columns
    LABEL_COLUMNS and image paths relative to it. Every file is written to a temporary name and renamed,
    and labels.csv comes last, so an interrupted run never leaves a labels.csv that points at missing or
    half-written files. workers defaults to os.cpu_count(); 1 renders in this process. Workers are
    spawned interpreters, so a script that calls this with workers > 1 needs the usual
    `if __name__ == "__main__":` guard.
    progress(done, n) is called in this process as cases finish.

    Raises ConfigError for n <= 0, a negative seed or workers < 1.
    """
    config = config or PhantomConfig()
    _check_arguments(n, seed, workers)
    workers = min(workers or os.cpu_count() or 1, n)
    out_dir = Path(out_dir)
    for folder in ("images", *(f"masks/{code}" for code in LESION_CODES)):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)

    write = functools.partial(_write_case, str(out_dir), seed, config)
    if workers == 1:
        rows = _collect(map(write, range(n)), n, progress)
    else:
        chunk = max(1, min(16, n // (4 * workers)))
        # Fresh interpreters, not fork(): a forked child of a process whose OpenCV (or torch) thread
        # pool is running can deadlock on that pool's locks.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded_opencv) as pool:
            rows = _collect(pool.map(write, range(n), chunksize=chunk), n, progress)
    return _write_labels(out_dir / "labels.csv", rows)


def _check_arguments(n, seed, workers) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ConfigError(f"number of phantom cases must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"phantom dataset seed must be an integer >= 0, got {seed!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer or None, got {workers!r}")


def _collect(results, n: int, progress) -> list[dict[str, object]]:
    rows = []
    for row in results:
        rows.append(row)
        if progress is not None:
            progress(len(rows), n)
    return rows


def _single_threaded_opencv() -> None:
    # The pool already uses every core; OpenCV's own threads would only compete with it.
    cv2.setNumThreads(1)


def _write_case(out_dir: str, dataset_seed: int, config: PhantomConfig, index: int) -> dict[str, object]:
    root = Path(out_dir)
    seed = case_seed(dataset_seed, index)
    name = case_id(dataset_seed, index)
    case = render_case(seed, config)
    image_path = Path("images") / (name + (".jpg" if config.jpeg else ".png"))
    _write_atomic(root / image_path, _encode_image(case, config.jpeg))
    for code in LESION_CODES:
        _write_atomic(root / "masks" / code / f"{name}.png", _encode(".png", case.masks[code]))
    return {"path": image_path.as_posix(), "case_id": name, "grade": case.grade, "dme": int(case.dme),
            "source": SOURCE, "seed": seed, **{f"n_{code}": case.counts[code] for code in LESION_CODES}}


def _encode_image(case: PhantomCase, jpeg: bool) -> bytes:
    bgr = cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    if jpeg:
        return _encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(case.camera["jpeg_quality"])])
    return _encode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])


def _encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, image, params or [])
    if not ok:
        raise OSError(f"OpenCV could not encode a {ext} image")
    return buffer.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _write_labels(path: Path, rows: list[dict[str, object]]) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)
    return path
