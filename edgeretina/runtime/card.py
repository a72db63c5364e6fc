"""A per-image report card: photo, saliency overlay, grade probabilities, referral, quality, look-alikes.

Drawn with OpenCV on a fixed canvas (no matplotlib on the device). Layout, left to right: the photo
(with the lesion regions boxed, one colour per type, and a legend, for lesion-head models), the overlay
(or why there is none), and a text panel; nearest bank cases below, with thumbnails when the caller has
them (the bank stores embeddings, not pictures).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from edgeretina.grades import LESION_CODES, NUM_GRADES, grade_name
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
# One colour per lesion type, chosen to stand out on the orange-red fundus and from each other (RGB).
LESION_COLOURS = dict(zip(LESION_CODES, [(0, 200, 255), (255, 255, 0), (0, 255, 120), (255, 255, 255),
                                          (255, 0, 255), (255, 140, 0)]))


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
    if graded.image is not None:
        _lesion_marks(canvas, record.lesions, graded.image.shape[:2], left_photo, top)
    overlay = None
    heat = graded.overlay_map if graded.image is not None and graded.geometry is not None else None
    if heat is not None:
        overlay = render_overlay(graded.image, heat, graded.geometry)
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


def lesion_summary(lesions: list[dict] | None) -> str | None:
    """The card's lesion line, e.g. "Lesions: HE 3, EX 2" (regions per type found, in LESIONS order);
    None when the record has no lesion regions (no lesion head, or nothing above the threshold)."""
    found = [f"{entry['code']} {entry['count']}" for entry in _with_regions(lesions)]
    return "Lesions: " + ", ".join(found) if found else None


def _with_regions(lesions: list[dict] | None) -> list[dict]:
    """The lesion entries that have regions (records from before lesions.find_lesions have none)."""
    return [entry for entry in lesions or [] if entry.get("regions")]


def _lesion_marks(canvas: np.ndarray, lesions: list[dict] | None, photo_shape: tuple[int, int],
                  x: int, y: int) -> None:
    """Box each lesion region on the photo tile drawn at (x, y), and a legend (type, count) in the margin
    under the tile, where it can hide no lesion. Boxes are in photo pixels (runtime/lesions.py); the tile
    letterboxes the photo as _fit does."""
    entries = _with_regions(lesions)
    if not entries:
        return
    h, w = photo_shape
    scale = TILE / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    left, top, sx, sy = x + (TILE - nw) // 2, y + (TILE - nh) // 2, nw / w, nh / h
    for entry in entries:
        colour = LESION_COLOURS.get(entry["code"], INK)
        for region in entry["regions"]:
            x0, y0, x1, y1 = region["box"]
            p0 = (left + int(np.floor(x0 * sx)), top + int(np.floor(y0 * sy)))
            p1 = (max(p0[0] + 2, left + int(np.ceil(x1 * sx)) - 1), max(p0[1] + 2, top + int(np.ceil(y1 * sy)) - 1))
            cv2.rectangle(canvas, p0, p1, colour, 1)      # axis-aligned: crisp, no anti-aliasing needed
    legend = y + TILE + 4                          # the margin between the tiles and the nearest cases
    cursor = x
    for entry in entries:
        label = f"{entry['code']} {entry['count']}"
        colour = LESION_COLOURS.get(entry["code"], INK)
        cv2.rectangle(canvas, (cursor, legend), (cursor + 9, legend + 9), colour, -1)
        cv2.rectangle(canvas, (cursor, legend), (cursor + 9, legend + 9), MUTED, 1)   # white CWS on white
        _text(canvas, label, (cursor + 14, legend + 10), 0.42, INK, 1)
        cursor += 14 + cv2.getTextSize(label, FONT, 0.42, 1)[0][0] + 12


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
    lesions = lesion_summary(record.lesions)
    if lesions:
        y = _wrapped(canvas, lesions, x, y + 16, INK) - 10
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
        _text(canvas, _tail(str(n["case_id"]), 18), (text_left, y + 24), 0.4, INK, 1)
        _text(canvas, f"grade {n['grade']}", (text_left, y + 44), 0.4, INK, 1)
        _text(canvas, f"sim {n['similarity']:.3f}", (text_left, y + 64), 0.4, MUTED, 1)


def _tile(canvas: np.ndarray, rgb: np.ndarray | None, x: int, y: int, missing: str) -> None:
    if rgb is None:
        cv2.rectangle(canvas, (x, y), (x + TILE, y + TILE), (228, 228, 228), -1)
        _text(canvas, missing, (x + 20, y + TILE // 2), 0.6, MUTED, 1)
        return
    canvas[y:y + TILE, x:x + TILE] = _fit(rgb, TILE)


def _tail(text: str, width: int) -> str:
    """The text, or its distinguishing end after '..' when longer than width (case ids differ at the end)."""
    return text if len(text) <= width else ".." + text[-(width - 2):]


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
