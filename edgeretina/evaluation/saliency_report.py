"""The saliency evaluation's report: per method and lesion type the pointing game, average precision and
mass inside the lesions, each a mean over images with a bootstrap interval; the mass on the field's edge;
as report.json, report.md and examples.png (photos with mask contours, then each method's map), each file
written atomically. numpy at import; matplotlib (the `plot` extra) only for the figure."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeretina.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from edgeretina.errors import MissingDependencyError
from edgeretina.evaluation.saliency_metrics import ANY, summarize
from edgeretina.grades import LESION_CODES, LESIONS

SCHEMA = "edgeretina.saliency_evaluation/1"
TYPES = (*LESION_CODES, ANY)
METRICS = ("pointing", "average_precision", "mass_inside")
METRIC_TITLES = {"pointing": "Pointing game (hit rate)", "average_precision": "Average precision (AUC-PR)",
                 "mass_inside": "Share of the map's mass inside the lesions"}
PER_TYPE, AGNOSTIC = "per-type", "class-agnostic"
CONTOUR_COLOURS = dict(zip(LESION_CODES, ("#00c8ff", "#ffff00", "#00ff78", "#b4b4b4", "#ff00ff", "#ff8c00")))


@dataclass
class MethodScores:
    """Every image's scores of one method, gathered as the images are scored."""

    name: str
    description: str
    values: dict[str, dict[str, list]] = field(default_factory=lambda: {t: {m: [] for m in METRICS} for t in TYPES})
    edge_ring: list = field(default_factory=list)
    per_type: bool = False
    n_images: int = 0
    seconds: float = 0.0

    def add(self, scores: dict, per_type: bool) -> None:
        """One image's `saliency_metrics.image_scores`; types absent from the image add nothing."""
        self.per_type = self.per_type or per_type
        self.n_images += 1
        self.edge_ring.append(scores["edge_ring_mass"])
        for code, lesion in scores["types"].items():
            if lesion is not None:
                for metric in METRICS:
                    self.values[code][metric].append(lesion[metric])


@dataclass
class LesionStats:
    """How many scored images hold each lesion type and how much of the field it covers: the chance
    level of the mass share (a uniform map puts exactly that share inside the lesions)."""

    images: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TYPES})
    area: dict[str, list] = field(default_factory=lambda: {t: [] for t in TYPES})
    ring_area: list = field(default_factory=list)

    def add(self, masks: dict[str, np.ndarray], fov: np.ndarray, ring: np.ndarray) -> None:
        field_pixels = max(int(fov.sum()), 1)
        self.ring_area.append(float(ring.sum()) / field_pixels)
        union = np.zeros(fov.shape, bool)
        for code, mask in (*masks.items(), (ANY, None)):
            inside = (union if mask is None else mask) & fov
            if mask is not None:
                union |= mask
            if inside.any():
                self.images[code] += 1
                self.area[code].append(float(inside.sum()) / field_pixels)


@dataclass
class Example:
    """One row of the examples figure: a small photo, its masks and each method's map at that size."""

    case_id: str
    grade: int
    photo: np.ndarray
    masks: dict[str, np.ndarray]
    maps: dict[str, np.ndarray] = field(default_factory=dict)


def saliency_report(scores: dict[str, MethodScores], skipped: dict[str, str], lesions: LesionStats, *, n_images: int,
                    excluded: dict[str, int], tolerance: dict, ring_fraction: float, n_bootstrap: int = 1000,
                    confidence: float = 0.95, seed: int = 0, meta: dict | None = None,
                    order: list[str] | None = None) -> dict:
    """The JSON-ready report. methods: {name: {"available": True, "description", "map": "per-type" |
    "class-agnostic", "n_images", "seconds", "edge_ring_mass", "types": {code | "any": {metric: interval}}}}
    for the methods that ran, {"available": False, "reason"} for those skipped, in `order` (default: those
    that ran, then the skipped). An interval is
    saliency_metrics.summarize's {"estimate", "low", "high", "n", "n_undefined"}."""
    def interval(values):
        return summarize(values, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)

    methods: dict[str, Any] = {}
    for name, s in scores.items():
        methods[name] = {"available": True, "description": s.description, "map": PER_TYPE if s.per_type else AGNOSTIC,
                         "n_images": s.n_images, "seconds": round(s.seconds, 3),
                         "edge_ring_mass": interval(s.edge_ring),
                         "types": {t: {m: interval(s.values[t][m]) for m in METRICS} for t in TYPES}}
    for name, reason in skipped.items():
        methods[name] = {"available": False, "reason": reason}
    if order is not None:
        methods = {name: methods[name] for name in order}
    return {
        "schema": SCHEMA,
        "n_images": int(n_images),
        "excluded": {str(k): int(v) for k, v in excluded.items()},
        "n_excluded": int(sum(excluded.values())),
        "tolerance": tolerance,
        "ring_fraction": float(ring_fraction),
        "ring_area_fraction": float(np.mean(lesions.ring_area)) if lesions.ring_area else None,
        "bootstrap": {"method": "percentile", "unit": "image", "n_resamples": int(n_bootstrap),
                      "confidence": float(confidence), "seed": int(seed)},
        "lesions": {t: {"n_images": lesions.images[t],
                        "area_fraction": float(np.mean(lesions.area[t])) if lesions.area[t] else None} for t in TYPES},
        "methods": methods,
        "meta": json.loads(json.dumps(meta or {}, default=str)),
    }


def write_saliency_report(report: dict, examples: list[Example], out_dir: Path) -> dict[str, Path]:
    """report.json and report.md, then examples.png (when there is an example), each atomically.
    Raises MissingDependencyError without matplotlib (after the JSON and the Markdown are on disk)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"report.json": write_json_atomic(out_dir / "report.json", report),
               "report.md": write_text_atomic(out_dir / "report.md", markdown_report(report))}
    ran = [name for name, m in report["methods"].items() if m["available"]]
    if examples:
        written["examples.png"] = write_bytes_atomic(out_dir / "examples.png", examples_png(examples, ran))
    return written


# --- Markdown -------------------------------------------------------------------------------------

def markdown_report(report: dict) -> str:
    ran = {name: m for name, m in report["methods"].items() if m["available"]}
    tolerance = report["tolerance"]
    excluded = ", ".join(f"{k}: {v}" for k, v in report["excluded"].items()) or "none"
    lines = ["# Saliency evaluation: do the maps point at the lesions?", "",
             f"- Images scored: {report['n_images']}; excluded, not scored: {report['n_excluded']} ({excluded})",
             f"- Model: {_model_text(report['meta'])}",
             f"- Pointing game: a hit when the map's maximum in the field lies within "
             f"{100 * tolerance['fraction_of_field_diameter']:.1f}% of the field diameter of a lesion "
             f"(mean {tolerance['mean_px']:.1f} px); a constant map is a miss, tied maxima score the share "
             "near a lesion",
             f"- Field edge: the outer {100 * report['ring_fraction']:.0f}% of the field's radius, "
             f"{_percent(report['ring_area_fraction'])} of its area (what a uniform map puts there)",
             f"- Intervals: {100 * report['bootstrap']['confidence']:.0f}% percentile bootstrap over images "
             f"({report['bootstrap']['n_resamples']} resamples, seed {report['bootstrap']['seed']})",
             "- Seconds: making and scoring a method's maps (a checkpoint's forward pass counts for the first method "
             "that uses it; a bundle's grading, which gives its saliency, is not counted)", "",
             "## Lesions in the scored images", ""]
    lines += _table(["Lesion", "Images", "Mean share of the field"],
                    [[_type_name(t), str(report["lesions"][t]["n_images"]),
                      _percent(report["lesions"][t]["area_fraction"], 2)] for t in TYPES])
    lines += ["", "## Summary (any lesion)", ""]
    lines += _table(["Method", "Map", "Images", "Pointing", "AP", "Mass in lesions", "Mass on the field edge",
                     "Seconds"],
                    [[name, m["map"], str(m["n_images"]), _ci(m["types"][ANY]["pointing"]),
                      _ci(m["types"][ANY]["average_precision"]), _ci(m["types"][ANY]["mass_inside"]),
                      _ci(m["edge_ring_mass"]), f"{m['seconds']:.1f}"] for name, m in ran.items()])
    for metric in METRICS:
        lines += ["", f"## {METRIC_TITLES[metric]} by lesion type (n images)", ""]
        lines += _table(["Method", *TYPES], [[name, *(_ci(m["types"][t][metric], with_n=True) for t in TYPES)]
                                             for name, m in ran.items()])
    skipped = {name: m["reason"] for name, m in report["methods"].items() if not m["available"]}
    if skipped:
        lines += ["", "## Not run", ""] + [f"- {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def _model_text(meta: dict) -> str:
    if "bundle" in meta:
        return f"bundle {meta['bundle']} ({meta.get('backend')}, {meta.get('precision')})"
    return f"checkpoint {meta.get('checkpoint', '?')} (torch, fp32)"


def _type_name(code: str) -> str:
    names = {lesion.code: lesion.name for lesion in LESIONS}
    return f"{code} ({names[code]})" if code in names else "any lesion"


def _ci(interval: dict, with_n: bool = False) -> str:
    if interval["estimate"] is None:
        return f"n/a (undefined on {interval['n_undefined']})" if interval["n_undefined"] else "n/a"
    text = f"{interval['estimate']:.3f}"
    if interval["low"] is not None and interval["n"] > 1:
        text += f" ({interval['low']:.3f}–{interval['high']:.3f})"
    return text + (f", {interval['n']}" if with_n else "")


def _percent(value: float | None, decimals: int = 1) -> str:
    return "n/a" if value is None else f"{100.0 * value:.{decimals}f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
            + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows])


# --- the examples figure --------------------------------------------------------------------------

def examples_png(examples: list[Example], methods: list[str]) -> bytes:
    """Rows: images with lesions; first column the photo with every lesion type's mask contour, then one
    column per method: the map (scaled to its own peak) over the dimmed photo, the lesion outline and a
    cross at the map's maximum. Raises MissingDependencyError without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise MissingDependencyError("matplotlib", "plot", "the saliency examples figure") from None
    columns = 1 + len(methods)
    figure = Figure(figsize=(2.4 * columns, 2.5 * len(examples) + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_2d(figure.subplots(len(examples), columns, squeeze=False))
    for row, example in zip(axes, examples):
        _photo_panel(row[0], example)
        for ax, name in zip(row[1:], methods):
            _map_panel(ax, example, example.maps.get(name))
    for ax, title in zip(axes[0], ["photo and lesion masks", *methods]):
        ax.set_title(title, fontsize=9)
    handles = [Line2D([], [], color=CONTOUR_COLOURS[c], label=c) for c in LESION_CODES]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _photo_panel(ax, example: Example) -> None:
    ax.imshow(example.photo)
    for code, mask in example.masks.items():
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[CONTOUR_COLOURS[code]], linewidths=0.8)
    ax.set_ylabel(f"{example.case_id}\ngrade {example.grade}", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _map_panel(ax, example: Example, heat: np.ndarray | None) -> None:
    ax.imshow((example.photo.mean(axis=2) * 0.6).astype(np.uint8), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    if heat is None:
        return
    peak = float(heat.max())
    ax.imshow(heat / peak if peak > 0 else heat, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.65)
    union = np.any(np.stack(list(example.masks.values())), axis=0)
    if union.any():
        ax.contour(union.astype(float), levels=[0.5], colors=["cyan"], linewidths=0.6)
    if peak > float(heat.min()):
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        ax.plot([x], [y], marker="+", color="white", markersize=10, markeredgewidth=1.5)
