"""The one writer of a graded image's pictures, for `grade` and `watch` alike: the saliency overlay
(`<stem>_saliency.png`: the lesion map where the graph has a lesion head, else the graph's saliency;
`GradedImage.overlay_map`) and the report card (`<stem>_card.png`).

A picture that cannot be written never costs the grade: the record keeps it and says in `error` which
picture is missing and why.
"""

from __future__ import annotations

from pathlib import Path

from edgeretina.errors import EdgeRetinaError
from edgeretina.runtime.card import write_card_png
from edgeretina.runtime.grader import GradedImage
from edgeretina.runtime.overlay import render_overlay, write_png

OVERLAY_SUFFIX = "_saliency.png"
CARD_SUFFIX = "_card.png"


def indexed_stem(source: str, index: int) -> str:
    """`grade`'s names: the input's position and stem (two inputs may share a stem in different folders)."""
    return f"{index:05d}_{Path(source).stem}"


def path_stem(relative_path: str) -> str:
    """`watch`'s names: the path inside the hot folder, stable across restarts (folders joined by `__`)."""
    return relative_path.rsplit(".", 1)[0].replace("/", "__")


def write_visuals(graded: GradedImage, stem: str, overlays: Path | None, cards: Path | None) -> None:
    """Write what applies: an overlay where the model gave saliency, a card where the image decoded."""
    heat = graded.overlay_map if overlays is not None else None
    if heat is not None:
        target = Path(overlays) / f"{stem}{OVERLAY_SUFFIX}"
        if _written(graded, "overlay", lambda: write_png(target, render_overlay(graded.image, heat, graded.geometry)),
                    target):
            graded.record.overlay = str(target)
    if cards is not None and graded.image is not None:
        target = Path(cards) / f"{stem}{CARD_SUFFIX}"
        _written(graded, "report card", lambda: write_card_png(target, graded), target)


def _written(graded: GradedImage, what: str, write, target: Path) -> bool:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write()
        return True
    except (EdgeRetinaError, OSError) as exc:
        note = f"the {what} could not be written: {exc}"
        earlier = graded.record.error      # the overlay's failure, when the card fails too: keep both
        graded.record.error = f"{earlier}; {note}" if earlier else f"graded, but {note}"
        return False
