"""What `edgeretina explain` writes for one photo: the saliency overlay and report card (as `grade` draws
them), and with a counterfactual its PNG strip and a JSON of the step grades."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgeretina.atomic import write_json_atomic
from edgeretina.errors import ConfigError, EdgeRetinaError
from edgeretina.preprocess import ImageRef
from edgeretina.runtime.counterfactual import Counterfactual, CounterfactualConfig, counterfactual_from, grade_one
from edgeretina.runtime.counterfactual_strip import write_strip_png
from edgeretina.runtime.grader import GradedImage, Grader, GradeRecord
from edgeretina.runtime.visuals import CARD_SUFFIX, OVERLAY_SUFFIX, write_visuals

STRIP_SUFFIX = "_counterfactual.png"
STEPS_SUFFIX = "_counterfactual.json"


@dataclass
class Explanation:
    record: GradeRecord
    files: dict[str, Path] = field(default_factory=dict)     # what was written: overlay, card, strip, steps
    counterfactual: Counterfactual | None = None

    def to_dict(self) -> dict:
        return {"record": self.record.to_dict(), "files": {k: str(v) for k, v in self.files.items()},
                "counterfactual": self.counterfactual.to_dict() if self.counterfactual else None}


def explain(grader: Grader, path_or_ref: str | os.PathLike | ImageRef, out: str | os.PathLike,
            counterfactual: CounterfactualConfig | None = None) -> Explanation:
    """Grade one photo and write its pictures into `out`; with a CounterfactualConfig also run the
    counterfactual and write its strip and steps. Raises what `grade_one` raises for a photo that cannot
    be graded, and EdgeRetinaError when a picture cannot be written (here the pictures are the result)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create folder {out}: {exc.strerror or exc}") from None
    graded = grade_one(grader, path_or_ref)
    stem = _stem(graded)
    write_visuals(graded, stem, out, out)
    if graded.record.error:
        raise EdgeRetinaError(graded.record.error)
    explanation = Explanation(graded.record, {"overlay": out / f"{stem}{OVERLAY_SUFFIX}",
                                              "card": out / f"{stem}{CARD_SUFFIX}"})
    if counterfactual is not None:
        cf = counterfactual_from(grader, graded, counterfactual)
        explanation.counterfactual = cf
        explanation.files["strip"] = _written(lambda p: write_strip_png(p, cf), out / f"{stem}{STRIP_SUFFIX}")
        explanation.files["steps"] = _written(lambda p: write_json_atomic(p, cf.to_dict()), out / f"{stem}{STEPS_SUFFIX}")
    return explanation


def _stem(graded: GradedImage) -> str:
    stem = Path(graded.record.file).stem
    dicom = graded.record.dicom or {}
    return f"{stem}_frame{dicom['frame']}" if dicom.get("frames", 1) > 1 else stem


def _written(write, target: Path) -> Path:
    try:
        return write(target)
    except OSError as exc:
        raise EdgeRetinaError(f"could not write {target}: {exc.strerror or exc}") from None
