"""Grade a list of paths (files, folders, globs) and write overlays as results arrive."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from edgeretina.preprocess import list_images
from edgeretina.runtime.grader import Grader, GradeRecord
from edgeretina.runtime.visuals import indexed_stem, write_visuals

def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files stay as given (a missing one will get an error record), folders are searched recursively
    for images, and glob patterns are expanded. Order is kept; duplicates are dropped."""
    found: list[str] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            found.extend(str(p) for p in list_images(path))
        elif not path.exists() and glob.has_magic(item):
            found.extend(sorted(glob.glob(item, recursive=True)))
        else:
            found.append(item)
    return list(dict.fromkeys(found))


def grade_paths(grader: Grader, inputs: Sequence[str | os.PathLike], overlays: Path | None = None,
                batch_size: int = 8, on_record: Callable[[GradeRecord], None] | None = None,
                cards: Path | None = None) -> list[GradeRecord]:
    records = []
    for index, graded in enumerate(grader.grade_iter(expand_inputs(inputs), batch_size)):
        write_visuals(graded, indexed_stem(graded.record.file, index), overlays, cards)
        records.append(graded.record)
        if on_record:
            on_record(graded.record)
    return records
