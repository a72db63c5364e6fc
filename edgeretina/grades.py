"""The International Clinical Diabetic Retinopathy (ICDR) scale and the text that describes it.

Each grade and lesion carries one short description (what reports and cards show). The text prototypes
of a model are built from the several clinical descriptions per grade and lesion in
training/prompts.json (averaged embeddings, RetinaScan, TWLR); a checkpoint keeps the resulting
prototypes, so editing that file changes newly trained models only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_GRADES = 5
REFERABLE_MIN_GRADE = 2  # moderate NPDR or worse is referable (ICDR; the usual screening rule)


@dataclass(frozen=True)
class Grade:
    value: int
    short: str
    name: str
    description: str


GRADES: tuple[Grade, ...] = (
    Grade(0, "none", "No apparent retinopathy",
          "a fundus photograph of a healthy retina with no signs of diabetic retinopathy"),
    Grade(1, "mild", "Mild non-proliferative DR",
          "a fundus photograph with mild diabetic retinopathy showing only a few microaneurysms"),
    Grade(2, "moderate", "Moderate non-proliferative DR",
          "a fundus photograph with moderate diabetic retinopathy showing haemorrhages, "
          "hard exudates or cotton wool spots"),
    Grade(3, "severe", "Severe non-proliferative DR",
          "a fundus photograph with severe diabetic retinopathy showing many haemorrhages "
          "in all four quadrants, venous beading or intraretinal microvascular abnormalities"),
    Grade(4, "proliferative", "Proliferative DR",
          "a fundus photograph with proliferative diabetic retinopathy showing neovascularisation "
          "or preretinal or vitreous haemorrhage"),
)


@dataclass(frozen=True)
class Lesion:
    code: str
    name: str
    description: str


LESIONS: tuple[Lesion, ...] = (
    Lesion("MA", "microaneurysm", "small round red dots of microaneurysms in the retina"),
    Lesion("HE", "haemorrhage", "dot, blot or flame shaped retinal haemorrhages"),
    Lesion("EX", "hard exudate", "bright yellow waxy hard exudates with sharp edges"),
    Lesion("CWS", "cotton wool spot", "pale fluffy white cotton wool spots with soft edges"),
    Lesion("NV", "neovascularisation", "fine tangled new vessels of neovascularisation"),
    Lesion("PRH", "preretinal haemorrhage", "a large preretinal or vitreous haemorrhage"),
)
LESION_CODES: tuple[str, ...] = tuple(lesion.code for lesion in LESIONS)


def grade_name(value: int) -> str:
    return GRADES[check_grade(value)].name


def check_grade(value: int) -> int:
    if not isinstance(value, (int,)) or isinstance(value, bool) or not 0 <= value < NUM_GRADES:
        raise ValueError(f"ICDR grade must be an integer 0..{NUM_GRADES - 1}, got {value!r}")
    return value


def is_referable(grade: int, min_grade: int = REFERABLE_MIN_GRADE) -> bool:
    return check_grade(grade) >= min_grade


def ordinal_grades(ordinal_logits, thresholds) -> np.ndarray:
    """The CORAL rule: a grade is the number of cumulative logits above their thresholds ([B, K-1] -> [B])."""
    return (np.asarray(ordinal_logits) > np.asarray(thresholds)[None, :]).sum(axis=1)


def grade_texts() -> list[str]:
    return [g.description for g in GRADES]


def lesion_texts() -> list[str]:
    return [lesion.description for lesion in LESIONS]


@dataclass(frozen=True)
class GradingConfig:
    """Post-processing of the ordinal (CORAL) logits; lives in checkpoints and manifests so that
    recalibrating never needs a re-export.

    P(grade > k) = sigmoid((logit_k - thresholds[k]) / temperature); grade = #{k : P(grade > k) > 0.5};
    referable probability = P(grade >= referable_min_grade); referable when it reaches referable_threshold.
    target_sensitivity: the referable sensitivity referable_threshold was chosen for on held-out cases
        (training/calibration.py), None when it is the plain 0.5.
    prototype_temperature: softmax temperature of the prototype logits (text-prototype grade probabilities).
    lesion_thresholds: per lesion type (LESION_CODES order), the image-level presence probability at which
        the type counts as present, fitted for F1 on held-out cases (training/calibration.py); None when
        every type uses the plain 0.5 (no lesion head, or not fitted).
    """

    thresholds: tuple[float, ...] = (0.0,) * (NUM_GRADES - 1)
    temperature: float = 1.0
    referable_min_grade: int = REFERABLE_MIN_GRADE
    referable_threshold: float = 0.5
    target_sensitivity: float | None = None
    prototype_temperature: float = 1.0
    lesion_thresholds: tuple[float, ...] | None = None

    def __post_init__(self):
        if len(self.thresholds) != NUM_GRADES - 1:
            raise ValueError(f"need {NUM_GRADES - 1} ordinal thresholds, got {len(self.thresholds)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not self.prototype_temperature > 0:
            raise ValueError(f"prototype_temperature must be positive, got {self.prototype_temperature}")
        if not 1 <= self.referable_min_grade < NUM_GRADES:
            raise ValueError(f"referable_min_grade must be 1..{NUM_GRADES - 1}")
        if not 0.0 < self.referable_threshold < 1.0:
            raise ValueError("referable_threshold must lie strictly between 0 and 1")
        if self.target_sensitivity is not None and not 0.0 < self.target_sensitivity < 1.0:
            raise ValueError("target_sensitivity must be None or lie strictly between 0 and 1")
        if self.lesion_thresholds is not None:
            if len(self.lesion_thresholds) != len(LESION_CODES):
                raise ValueError(f"need {len(LESION_CODES)} lesion thresholds ({', '.join(LESION_CODES)}), "
                                 f"got {len(self.lesion_thresholds)}")
            if not all(0.0 < t < 1.0 for t in self.lesion_thresholds):
                raise ValueError(f"lesion thresholds must lie strictly between 0 and 1, got {self.lesion_thresholds}")

    def to_dict(self) -> dict:
        return {"scale": "ICDR", "num_grades": NUM_GRADES, "thresholds": [float(t) for t in self.thresholds],
                "temperature": float(self.temperature), "referable_min_grade": self.referable_min_grade,
                "referable_threshold": float(self.referable_threshold),
                "target_sensitivity": None if self.target_sensitivity is None else float(self.target_sensitivity),
                "prototype_temperature": float(self.prototype_temperature),
                "lesion_thresholds": (None if self.lesion_thresholds is None
                                      else [float(t) for t in self.lesion_thresholds])}

    @classmethod
    def from_dict(cls, data: dict) -> "GradingConfig":
        """Reads manifests and checkpoints written before target_sensitivity, prototype_temperature and
        lesion_thresholds existed (they take their defaults)."""
        if data.get("scale", "ICDR") != "ICDR" or data.get("num_grades", NUM_GRADES) != NUM_GRADES:
            raise ValueError(f"unsupported grading scale {data.get('scale')!r} with {data.get('num_grades')} grades")
        target = data.get("target_sensitivity")
        lesion = data.get("lesion_thresholds")
        return cls(thresholds=tuple(float(t) for t in data["thresholds"]),
                   temperature=float(data["temperature"]),
                   referable_min_grade=int(data["referable_min_grade"]),
                   referable_threshold=float(data["referable_threshold"]),
                   target_sensitivity=None if target is None else float(target),
                   prototype_temperature=float(data.get("prototype_temperature", 1.0)),
                   lesion_thresholds=None if lesion is None else tuple(float(t) for t in lesion))


def cumulative_probabilities(ordinal_logits: np.ndarray, grading: GradingConfig) -> np.ndarray:
    """[B, K-1] logits -> P(grade > k) with the calibrated thresholds and temperature."""
    z = (np.asarray(ordinal_logits, dtype=np.float64) - np.asarray(grading.thresholds)) / grading.temperature
    return 1.0 / (1.0 + np.exp(-z))


def class_probabilities(cumulative: np.ndarray) -> np.ndarray:
    """P(grade > k) -> P(grade = g). CORAL is rank-consistent in its biases; calibrated thresholds can
    break monotonicity slightly, so the cumulative curve is made non-increasing first."""
    monotone = np.minimum.accumulate(cumulative, axis=1)
    ones = np.ones((len(monotone), 1))
    zeros = np.zeros((len(monotone), 1))
    upper = np.concatenate([ones, monotone], axis=1)
    lower = np.concatenate([monotone, zeros], axis=1)
    return upper - lower


def prototype_probabilities(prototype_logits: np.ndarray, grading: GradingConfig) -> np.ndarray:
    """[B, 5] prototype logits -> softmax grade probabilities at the calibrated prototype temperature."""
    z = np.asarray(prototype_logits, dtype=np.float64) / grading.prototype_temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
