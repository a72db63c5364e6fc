"""What a phantom case is made from (PhantomConfig) and what comes out (PhantomCase)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeretina.errors import ConfigError
from edgeretina.grades import NUM_GRADES
from edgeretina.phantom.framing import FAULTS, FRAMINGS

MIN_SIZE = 64
MAX_SIZE = 4096
# Roughly balanced over the ICDR grades; real screening populations are ~70 % grade 0, which
# teaches a small model little about grades 1-4.
DEFAULT_GRADE_WEIGHTS = (0.3, 0.15, 0.25, 0.15, 0.15)


@dataclass(frozen=True)
class PhantomConfig:
    """How phantom fundus photographs are drawn.

    size: output height in pixels; the width is size, 5/4 size or 4/3 size depending on the camera.
    grade_weights: relative frequency of each ICDR target grade 0..4 (normalised; need not sum to 1).
    camera_variation: 0 = ideal camera (centred full field, no blur, noise or tint), 1 = realistic spread
        including a small fraction of strongly degraded photographs.
    jpeg: datasets are written as JPEG with the sampled camera quality (camera-like) or as lossless PNG.
    framing: "mixed" draws each photograph's framing from framing.DEFAULT_FRAMING_MIX; a preset name
        (framing.FRAMINGS: "standard", "grey_frame", "notch", ...) frames every photograph that way.
    faults: "mixed" keeps the camera's own small share of strongly degraded photographs; "none" never
        degrades one; a fault name (framing.FAULTS: "defocus", "under_exposed", ...) gives every
        photograph that one fault, its strength drawn from the fault's range.
    fault_strength: with a fault name, this strength (in the units of framing.FAULTS) instead of a draw.
    """

    size: int = 512
    grade_weights: tuple[float, ...] = DEFAULT_GRADE_WEIGHTS
    camera_variation: float = 1.0
    jpeg: bool = True
    framing: str = "mixed"
    faults: str = "mixed"
    fault_strength: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)):
            raise ConfigError(f"phantom size must be an integer, got {self.size!r}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ConfigError(f"phantom size must be in {MIN_SIZE}..{MAX_SIZE} px, got {self.size}")
        weights = tuple(self.grade_weights)
        if len(weights) != NUM_GRADES:
            raise ConfigError(f"grade_weights needs {NUM_GRADES} values (grades 0..4), got {len(weights)}")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights):
            raise ConfigError(f"grade_weights must be finite and >= 0, got {weights}")
        if sum(weights) <= 0:
            raise ConfigError("grade_weights must not all be zero")
        if not (isinstance(self.camera_variation, (int, float)) and 0.0 <= self.camera_variation <= 1.0):
            raise ConfigError(f"camera_variation must be in [0, 1], got {self.camera_variation!r}")
        if self.framing not in ("mixed", *FRAMINGS):
            raise ConfigError(f"framing must be 'mixed' or one of {', '.join(FRAMINGS)}, got {self.framing!r}")
        if self.faults not in ("mixed", "none", *FAULTS):
            raise ConfigError(f"faults must be 'mixed', 'none' or one of {', '.join(FAULTS)}, got {self.faults!r}")
        if self.fault_strength is not None and (
                self.faults not in FAULTS or isinstance(self.fault_strength, bool)
                or not isinstance(self.fault_strength, (int, float)) or not 0 < self.fault_strength < math.inf):
            raise ConfigError(f"fault_strength needs a fault name and a positive number, got faults={self.faults!r}, "
                              f"fault_strength={self.fault_strength!r}")
        object.__setattr__(self, "grade_weights", tuple(float(w) for w in weights))


@dataclass
class PhantomCase:
    """One synthetic fundus photograph with its ground truth.

    image: uint8 HxWx3 RGB, before JPEG compression (the dataset writer compresses it).
    masks: lesion code -> uint8 HxW mask (0/255); every code in LESION_CODES is present.
    grade: ICDR grade computed from the lesions actually placed inside the visible field of view.
    dme: hard exudate within 1 disc diameter of the fovea (a common screening proxy for DME).
    counts: lesion code -> number of lesions placed inside the visible field of view.
    fov: (cx, cy, radius) of the field-of-view circle in pixels; it may extend past the image edge.
    camera: the camera parameters the photograph was taken with.
    anatomy: disc and fovea position, disc diameter in pixels, eye (0 right, 1 left), cup-to-disc ratio.
    framing: the framing preset (framing.FRAMINGS); surround: what it drew around the field (frame level,
        notch, bars, text).
    fault: the forced fault (framing.FAULTS), or None; fault_strength: its strength, in the units of FAULTS.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    grade: int
    dme: bool
    counts: dict[str, int]
    fov: tuple[float, float, float]
    camera: dict[str, float]
    anatomy: dict[str, float] = field(default_factory=dict)
    framing: str = "standard"
    surround: dict = field(default_factory=dict)
    fault: str | None = None
    fault_strength: float | None = None
