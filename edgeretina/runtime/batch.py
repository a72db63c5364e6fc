"""Grade a list of paths (files, folders, globs) and write overlays as results arrive."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from edgeretina.dataset import IMAGE_SUFFIXES
from edgeretina.errors import EdgeRetinaError
from edgeretina.runtime.card import card_name, write_card_png
from edgeretina.runtime.grader import GradedImage, Grader, GradeRecord
from edgeretina.runtime.overlay import overlay_name, render_overlay, write_png



def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files stay as given (a missing one will get an error record), folders are searched recursively
    for images, and glob patterns are expanded. Order is kept; duplicates are dropped."""
    found: list[str] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif not path.exists() and glob.has_magic(item):
            found.extend(sorted(glob.glob(item, recursive=True)))
        else:
            found.append(item)
    return list(dict.fromkeys(found))


def grade_paths(grader: Grader, inputs: Sequence[str | os.PathLike], overlays: Path | None = None,
                batch_size: int = 8, on_record: Callable[[GradeRecord], None] | None = None,
                cards: Path | None = None) -> list[GradeRecord]:
    paths = expand_inputs(inputs)
    for folder in (overlays, cards):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    records = []
    for index, graded in enumerate(grader.grade_iter(paths, batch_size)):
        record = graded.record
        if overlays is not None and graded.saliency is not None:
            try:
                target = Path(overlays) / overlay_name(record.file, index)
                write_png(target, render_overlay(graded.image, graded.saliency, graded.geometry))
                record.overlay = str(target)
            except (EdgeRetinaError, OSError) as exc:
                record.error = f"graded, but the overlay could not be written: {exc}"
        if cards is not None and graded.image is not None:
            _write_card(graded, Path(cards) / card_name(record.file, index))
        records.append(record)
        if on_record:
            on_record(record)
    return records


def _write_card(graded: GradedImage, target: Path) -> None:
    try:
        write_card_png(target, graded)
    except (EdgeRetinaError, OSError) as exc:
        graded.record.error = f"graded, but the report card could not be written: {exc}"
