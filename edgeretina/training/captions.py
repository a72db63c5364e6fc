"""Clinical captions from a photograph's labels: the text side of contrastive image-text pre-training
(training/contrastive.py; TWLR's first stage pairs fundus photographs with their findings).

A caption names the ICDR grade and whatever lesion labels the item carries:

- the phantom (and any labels.csv with these columns): ``n_<CODE>`` lesion counts and ``dme`` (hard
  exudates within one disc diameter of the fovea, 0/1);
- IDRiD: ``dme_risk`` (0 no hard exudates, 1 exudates farther than one disc diameter from the macula,
  2 within it);
- Messidor-2: ``adjudicated_dme`` (0/1).

e.g. "fundus photograph with moderate non-proliferative diabetic retinopathy: 6 microaneurysms,
3 haemorrhages, 2 hard exudates, some near the fovea". Only lesions that are present are named (CLIP text
towers read "no haemorrhages" much like "haemorrhages"); an item whose counts are all zero reads "no visible
lesions", an item without lesion labels gets a grade-only caption. Torch-free; deterministic: the template
is a function of the seed and the case id alone, so neither the order of the items nor the process matters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edgeretina.dataset import LabeledImage
from edgeretina.errors import DatasetError
from edgeretina.grades import LESION_CODES, LESIONS

GRADE_PHRASES: tuple[str, ...] = (
    "no diabetic retinopathy",
    "mild non-proliferative diabetic retinopathy",
    "moderate non-proliferative diabetic retinopathy",
    "severe non-proliferative diabetic retinopathy",
    "proliferative diabetic retinopathy",
)
TEMPLATES: tuple[str, ...] = (
    "fundus photograph with {findings}",
    "retinal photograph showing {findings}",
    "colour fundus image of an eye with {findings}",
)
#: (singular, plural) of each lesion as a counted noun; "neovascularisation" is a mass noun
COUNT_NOUNS: dict[str, tuple[str, str]] = {
    **{lesion.code: (lesion.name, lesion.name + "s") for lesion in LESIONS},
    "NV": ("area of neovascularisation", "areas of neovascularisation"),
}
NEAR_FOVEA = "hard exudates near the fovea"
_IDRID_RISK = {0: None, 1: "hard exudates away from the macula", 2: NEAR_FOVEA}
_DME = {0: None, 1: NEAR_FOVEA}
_MESSIDOR_DME = {0: None, 1: "diabetic macular oedema"}


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption says, without its wording: two items with equal facts describe the same findings
    (contrastive training treats them as positives of each other, not as negatives).

    lesions: (code, count) of the lesions present, in LESION_CODES order; None when the item has no lesion
    counts, () when it has counts and all are zero. macula: a phrase about the macula, or None."""

    grade: int
    lesions: tuple[tuple[str, int], ...] | None
    macula: str | None

    def findings(self) -> str:
        lesions = self.lesions or ()
        exudates_near_fovea = self.macula == NEAR_FOVEA and any(code == "EX" for code, _ in lesions)
        parts = [_counted(code, n) + (", some near the fovea" if code == "EX" and exudates_near_fovea else "")
                 for code, n in lesions]
        if self.macula is not None and not exudates_near_fovea:
            parts.append(self.macula)
        if not parts and self.lesions == ():
            parts = ["no visible lesions"]
        grade = GRADE_PHRASES[self.grade]
        return f"{grade}: {', '.join(parts)}" if parts else grade


def caption_facts(item: LabeledImage) -> CaptionFacts:
    """The grade and lesion labels of ``item`` (see the module docstring for the columns read). Empty cells
    count as unknown. Raises DatasetError naming the case, the column and the value for a label that is not
    a count (n_*) or not one of the column's codes (dme, dme_risk, adjudicated_dme)."""
    extra = item.extra or {}
    counts = [(code, _integer(item, f"n_{code}", extra.get(f"n_{code}"))) for code in LESION_CODES]
    known = [(code, n) for code, n in counts if n is not None]
    lesions = tuple((code, n) for code, n in known if n > 0) if known else None
    return CaptionFacts(grade=item.grade, lesions=lesions, macula=_macula(item, extra))


def caption(item: LabeledImage, seed: int = 0) -> str:
    """A short clinical caption of ``item``: a template (chosen by ``seed`` and the case id) around its
    findings. Every item has a grade, so every item has a caption. Raises what caption_facts raises."""
    return render(caption_facts(item), _template_index(seed, item.case_id))


def render(facts: CaptionFacts, template: int = 0) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(findings=facts.findings())


def _counted(code: str, count: int) -> str:
    singular, plural = COUNT_NOUNS[code]
    return f"{count} {singular if count == 1 else plural}"


def _macula(item: LabeledImage, extra: dict[str, str]) -> str | None:
    for column, phrases in (("dme", _DME), ("dme_risk", _IDRID_RISK), ("adjudicated_dme", _MESSIDOR_DME)):
        code = _integer(item, column, extra.get(column))
        if code is None:
            continue
        if code not in phrases:
            raise DatasetError(f"{item.path} (case {item.case_id}): {column} {code} is not one of "
                               f"{sorted(phrases)}")
        return phrases[code]
    return None


def _integer(item: LabeledImage, column: str, value: str | None) -> int | None:
    text = (value or "").strip()
    if not text:
        return None
    try:
        number = float(text)             # spreadsheets write counts as "3.0"
    except ValueError:
        number = float("nan")
    if not number.is_integer() or number < 0:
        raise DatasetError(f"{item.path} (case {item.case_id}): {column} {text!r} is not a count "
                           "(a non-negative integer)")
    return int(number)


def _template_index(seed: int, case_id: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % len(TEMPLATES)

