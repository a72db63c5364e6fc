"""A per-image report card: photo, saliency overlay, grade probabilities, referral, quality, look-alikes.

Drawn with OpenCV on a fixed canvas (no matplotlib on the device). Layout, left to right: the photo,
the overlay (or why there is none), and a text panel; nearest bank cases below, with thumbnails when
the caller has them (the bank stores embeddings, not pictures).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from edgeretina.grades import NUM_GRADES, grade_name
from edgeretina.quality import REASON_TEXT
from edgeretina.runtime.grader import GradedImage
from edgeretina.runtime.overlay import render_overlay, write_png

TILE = 320                 # side of the photo and overlay tiles
PANEL_WIDTH = 440
MARGIN = 16
THUMB = 72
HEIGHT = 2 * MARGIN + 28 + TILE + 2 * MARGIN + THUMB + 24
WIDTH = 2 * TILE + PANEL_WIDTH + 4 * MARGIN

FONT = cv2.FONT_HERSHEY_SIMPLEX
INK = (30, 30, 30)
MUTED = (110, 110, 110)
BACKGROUND = (250, 250, 248)
REFERABLE_RED = (200, 40, 40)
NEGATIVE_GREEN = (30, 140, 60)
UNGRADABLE_AMBER = (200, 130, 0)
BAR_BLUE = (60, 110, 200)


def render_card(graded: GradedImage, bank_thumbnails: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Render one graded image as an RGB uint8 card (HEIGHT x WIDTH x 3).

    ``bank_thumbnails`` maps bank case ids to RGB pictures; cases without one are drawn as text only.
    """
    canvas = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    record = graded.record
    _text(canvas, heading(record), (MARGIN, MARGIN + 18), 0.6, INK, 2)
    top = MARGIN + 28
    left_photo, left_overlay, left_panel = MARGIN, 2 * MARGIN + TILE, 3 * MARGIN + 2 * TILE
    _tile(canvas, graded.image, left_photo, top, "no photo")
    overlay = None
    if graded.image is not None and graded.saliency is not None and graded.geometry is not None:
        overlay = render_overlay(graded.image, graded.saliency, graded.geometry)
    _tile(canvas, overlay, left_overlay, top, "no overlay" if record.gradable is not False else "not graded")
    _panel(canvas, graded, left_panel, top)
    _neighbors(canvas, record.neighbors, bank_thumbnails or {}, MARGIN, top + TILE + 2 * MARGIN)
    return canvas


def write_card_png(path: str | os.PathLike, graded: GradedImage,
                   bank_thumbnails: Mapping[str, np.ndarray] | None = None) -> Path:
    """Render the card and write it as a PNG atomically."""
    return write_png(path, render_card(graded, bank_thumbnails))


def heading(record) -> str:
    """The card's first line: the file, and for a DICOM which frame of how many and which eye."""
    name = os.path.basename(record.file)
    dicom = record.dicom
    if not dicom:
        return name
    parts = [f"frame {dicom['frame']}/{dicom['frames']}"] if dicom.get("frames", 1) > 1 else []
    parts.append(_EYES.get(dicom.get("laterality"), "eye not recorded"))
    return f"{name}  ({', '.join(parts)})"


_EYES = {"L": "left eye", "R": "right eye"}


def quality_lines(quality: dict | None) -> list[str]:
    """What the card says about image quality: the gradability score and the measure that limits it, then
    each comparison that failed with its value and rule (the measures a technician can act on, not all 13)."""
    if not quality:
        return []
    limited = f", limited by {quality['limited_by']}" if quality.get("limited_by") else ""
    lines = [f"gradability score {float(quality.get('score', 0.0)):.2f}{limited}"]
    lines += [f"{t['measure']} = {float(t['value']):.3g}   fails {t['rule']}" for t in quality.get("triggers", [])]
    return lines


def _panel(canvas: np.ndarray, graded: GradedImage, x: int, y: int) -> None:
    record = graded.record
    if record.error and record.grade is None:
        _title(canvas, "ERROR", REFERABLE_RED, x, y)
        _wrapped(canvas, record.error, x, y + 50, INK)
        return
    if record.gradable is False:
        _title(canvas, "UNGRADABLE", UNGRADABLE_AMBER, x, y)
        reasons = (record.quality or {}).get("reasons", [])
        y = _wrapped(canvas, "ungradable: " + "; ".join(REASON_TEXT.get(r, r) for r in reasons), x, y + 50, INK)
        _quality(canvas, record.quality, x, y + 10)
        return
    referable = bool(record.referable)
    _title(canvas, "REFER" if referable else "NO REFERRAL", REFERABLE_RED if referable else NEGATIVE_GREEN, x, y)
    _text(canvas, f"P(referable) = {record.referable_probability:.2f}", (x, y + 50), 0.55, INK, 1)
    _text(canvas, f"grade {record.grade}: {record.grade_name}", (x, y + 78), 0.55, INK, 2)
    y = _probability_bars(canvas, record.probabilities or [], record.grade, x, y + 96)
    _quality(canvas, record.quality, x, y + 10)


def _title(canvas: np.ndarray, text: str, colour: tuple, x: int, y: int) -> None:
    cv2.rectangle(canvas, (x, y), (x + PANEL_WIDTH, y + 30), colour, -1)
    _text(canvas, text, (x + 8, y + 22), 0.7, (255, 255, 255), 2)


def _probability_bars(canvas: np.ndarray, probabilities: list[float], grade: int | None, x: int, y: int) -> int:
    label_width, bar_width, row = 240, PANEL_WIDTH - 240 - 50, 22
    for g in range(min(NUM_GRADES, len(probabilities))):
        p = float(probabilities[g])
        top = y + g * row
        weight = 2 if g == grade else 1
        _text(canvas, f"{g} {grade_name(g)}", (x, top + 15), 0.4, INK, weight)
        cv2.rectangle(canvas, (x + label_width, top + 4), (x + label_width + bar_width, top + 18), (225, 225, 225), -1)
        cv2.rectangle(canvas, (x + label_width, top + 4), (x + label_width + round(bar_width * p), top + 18), BAR_BLUE, -1)
        _text(canvas, f"{p:.2f}", (x + label_width + bar_width + 6, top + 16), 0.42, INK, 1)
    return y + NUM_GRADES * row


def _quality(canvas: np.ndarray, quality: dict | None, x: int, y: int) -> None:
    if not quality:
        return
    _text(canvas, "quality", (x, y + 14), 0.5, INK, 2)
    for i, line in enumerate(quality_lines(quality)):
        _text(canvas, line, (x, y + 36 + 18 * i), 0.42, INK, 1)


def _neighbors(canvas: np.ndarray, neighbors: list[dict], thumbnails: Mapping[str, np.ndarray], x: int, y: int) -> None:
    if not neighbors:
        return
    _text(canvas, "nearest cases", (x, y - 4), 0.5, INK, 2)
    slot = (WIDTH - 2 * MARGIN) // max(len(neighbors), 1)
    for i, n in enumerate(neighbors):
        left = x + i * slot
        thumb = thumbnails.get(n["case_id"])
        text_left = left
        if thumb is not None:
            canvas[y + 4:y + 4 + THUMB, left:left + THUMB] = _fit(thumb, THUMB)
            text_left = left + THUMB + 6
        _text(canvas, str(n["case_id"])[-18:], (text_left, y + 24), 0.4, INK, 1)
        _text(canvas, f"grade {n['grade']}", (text_left, y + 44), 0.4, INK, 1)
        _text(canvas, f"sim {n['similarity']:.3f}", (text_left, y + 64), 0.4, MUTED, 1)


def _tile(canvas: np.ndarray, rgb: np.ndarray | None, x: int, y: int, missing: str) -> None:
    if rgb is None:
        cv2.rectangle(canvas, (x, y), (x + TILE, y + TILE), (228, 228, 228), -1)
        _text(canvas, missing, (x + 20, y + TILE // 2), 0.6, MUTED, 1)
        return
    canvas[y:y + TILE, x:x + TILE] = _fit(rgb, TILE)


def _fit(rgb: np.ndarray, side: int) -> np.ndarray:
    """Letterbox an RGB image into a black side x side square, keeping its aspect ratio."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (nw, nh), interpolation=interpolation)
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - nh) // 2, (side - nw) // 2
    square[top:top + nh, left:left + nw] = resized
    return square


def _wrapped(canvas: np.ndarray, text: str, x: int, y: int, colour: tuple, scale: float = 0.45) -> int:
    """Draw text wrapped to the panel width; return the y below the last line."""
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if cv2.getTextSize(candidate, FONT, scale, 1)[0][0] > PANEL_WIDTH and line:
            _text(canvas, line, (x, y), scale, colour, 1)
            y, line = y + 20, word
        else:
            line = candidate
    if line:
        _text(canvas, line, (x, y), scale, colour, 1)
        y += 20
    return y


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float, colour: tuple, weight: int) -> None:
    cv2.putText(canvas, text, origin, FONT, scale, colour, weight, cv2.LINE_AA)
