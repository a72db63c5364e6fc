"""The counterfactual as one PNG strip, drawn with OpenCV (no matplotlib on the device).

One row, left to right: each step's image in the model-input frame (step 0 = the photo as the model saw
it) with the region that step inpainted outlined, its grade and referable probability written under it;
the last panel is the original photograph with the outline of everything removed (the lesion localisation).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edgeretina.runtime.counterfactual import Counterfactual
from edgeretina.runtime.overlay import write_png

TILE = 176                  # side of each panel's picture
MARGIN = 12
HEADER = 34                 # the title line above the row
CAPTION = 46                # two text lines under each picture
FONT = cv2.FONT_HERSHEY_SIMPLEX
INK = (30, 30, 30)
MUTED = (110, 110, 110)
BACKGROUND = (250, 250, 248)
OUTLINE = (0, 230, 255)     # cyan: visible on the orange-red fundus and on black


def strip_size(steps: int) -> tuple[int, int]:
    """(height, width) of the strip of a counterfactual with `steps` states (step 0 included)."""
    panels = steps + 1
    return HEADER + TILE + CAPTION + MARGIN, MARGIN + panels * (TILE + MARGIN)


def render_strip(cf: Counterfactual) -> np.ndarray:
    """RGB uint8 strip of `strip_size(len(cf.steps))`."""
    height, width = strip_size(len(cf.steps))
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    first, last = cf.steps[0], cf.final
    title = (f"{os.path.basename(cf.file)}: grade {first.grade} -> {last.grade} in {len(cf.steps) - 1} "
             f"step{'' if len(cf.steps) == 2 else 's'} (stopped: {cf.stopped.replace('_', ' ')})")
    _text(canvas, title, (MARGIN, HEADER - 12), 0.55, INK, 2)
    for i, step in enumerate(cf.steps):
        left = MARGIN + i * (TILE + MARGIN)
        canvas[HEADER:HEADER + TILE, left:left + TILE] = _outlined(step.image, step.removed)
        label = "input" if step.index == 0 else f"step {step.index}"
        _text(canvas, f"{label}: grade {step.grade}", (left, HEADER + TILE + 18), 0.45, INK, 1)
        _text(canvas, f"P(referable) {step.referable_probability:.2f}", (left, HEADER + TILE + 38), 0.42, MUTED, 1)
    left = MARGIN + len(cf.steps) * (TILE + MARGIN)
    canvas[HEADER:HEADER + TILE, left:left + TILE] = _outlined(cf.graded.image, cf.union)
    share = cf.to_dict()["removed_field_fraction"]
    _text(canvas, "original, all removed", (left, HEADER + TILE + 18), 0.45, INK, 1)
    _text(canvas, f"{100 * share:.1f}% of the field", (left, HEADER + TILE + 38), 0.42, MUTED, 1)
    return canvas


def write_strip_png(path: str | os.PathLike, cf: Counterfactual) -> Path:
    """Render the strip and write it as a PNG atomically."""
    return write_png(path, render_strip(cf))


def _outlined(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The picture letterboxed into a TILE square with the mask's outline drawn on it."""
    h, w = rgb.shape[:2]
    scale = TILE / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    tile = np.zeros((TILE, TILE, 3), np.uint8)
    top, left = (TILE - nh) // 2, (TILE - nw) // 2
    tile[top:top + nh, left:left + nw] = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (nw, nh),
                                                    interpolation=interpolation)
    if mask.any():
        placed = np.zeros((TILE, TILE), np.uint8)
        placed[top:top + nh, left:left + nw] = cv2.resize(mask.astype(np.uint8), (nw, nh),
                                                          interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(placed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, OUTLINE, 1, cv2.LINE_8)   # crisp: one exact colour
    return tile


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float, colour: tuple, weight: int) -> None:
    cv2.putText(canvas, text, origin, FONT, scale, colour, weight, cv2.LINE_AA)
