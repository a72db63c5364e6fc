"""Lesion generation (ELLG-style): lesions cut from correctly graded cases, pasted into other training images.

A training augmentation that adds *lesions* rather than camera variation: connected lesion components
are cut out of donor images (prepared images of training cases, in the model's input frame), moved to a
random place inside another image's field of view, colour-matched to their new neighbourhood, blended in,
and the grade and lesion targets are updated to say what was added. numpy + OpenCV only.

- Colour: Reinhard et al. 2001 ("Color transfer between images") in Ruderman's lαβ space: RGB -> LMS
  (their matrix) -> log10 -> lαβ (a decorrelating rotation), then each channel's mean and standard
  deviation moved onto the target's. The statistics are taken over the donor's *surround* (the patch's
  field pixels that are no lesion) and the destination's neighbourhood (the field pixels under the patch),
  and the one transform is applied to the whole patch: the background under the lesion takes the
  destination's colour and the lesion keeps its contrast against it. Matching over the lesion pixels
  themselves would turn a haemorrhage into the colour of the retina around it.
  OpenCV's CIE L*a*b* is a different space (perceptual, not log-cone); it is not used.
- Blending: a feathered alpha *inside* the component mask (1 in the core, falling to ~1/feather px at
  its rim, from a distance transform), so a paste changes only the pixels of its mask and the mask
  returned (its footprint) bounds everything that changed. cv2.seamlessClone was not used: Poisson blending keeps gradients, not
  levels, so a dark haemorrhage or a bright exudate on a differently lit neighbourhood drifts towards the
  neighbourhood's level (what makes it a lesion is lost), it spreads changes over the whole clone mask
  including the margin (the footprint is no longer the lesion), and it solves a Poisson system per paste.
  Reinhard already matches the colour; the feather only hides the seam. Measured on 374 pastes between
  40 phantoms at 224 px, after the same Reinhard match (x86-amx, one core): the pasted lesion keeps a
  median 0.93 of its lαβ-lightness contrast against its surround with this blend, 0.44 with
  seamlessClone (NORMAL_CLONE, mask grown 4 px: OpenCV leaves the image unchanged or shifted for a
  tighter one), which also changed ~110 pixels per paste outside the lesion; 0.3 vs 0.7 ms a paste.
- Placement: every pasted pixel lies inside the destination's field of view (prepared images are black
  outside it), and the patch's neighbourhood statistics come from field pixels only. Patches may be
  flipped and turned by multiples of 90 degrees (exact on the pixel grid; lesions have no orientation
  that a fundus camera fixes, and flame haemorrhages that follow the nerve fibres are rare enough).
- Labels, ordinal (``mixed_grade``): ELLG mixes the one-hot labels of donor and destination by lesion
  area. On the ICDR scale that is wrong twice over: a grade is set by the worst lesion present, not by
  how much of the image is lesion, and a pasted lesion can never remove the destination's. So the new
  grade is max(destination grade, what each pasted lesion implies), where a lesion implies the least grade
  its type forces under ICDR (``LESION_MIN_GRADE``: a microaneurysm >= 1; a haemorrhage, hard exudate or
  cotton-wool spot >= 2; neovascularisation or a preretinal haemorrhage 4), bounded by its donor's grade
  (a donor graded 1 cannot lend a grade-2 lesion, whatever its mask says: the grade is the better label).
  Severe NPDR (3) needs > 20 haemorrhages in each of four quadrants (the 4-2-1 rule), which a few pasted
  haemorrhages do not establish: a haemorrhage implies 2, and an image that was one haemorrhage short
  of severe is under-graded by one, never over-graded. A lesion of unknown type (a mask from grade
  saliency rather than per-lesion masks) implies min(donor grade, 1): it is some DR lesion, nothing more
  is known.

Ablation on the phantom (x86-amx CPU; 800 phantoms at 384 px, 680 train / 120 validation, the tiny CLIP
ResNet at 96 px for 10 epochs, 4 seeds; held-out QWK on 400 other phantoms, plain CORAL rule / calibrated):
off 0.774 +- 0.022 / 0.728 +- 0.005; probability 0.2, 0.730 +- 0.042 / 0.703 +- 0.049; probability 0.5,
0.659 +- 0.098 / 0.689 +- 0.020; probability 0.5 with raise_grade False, 0.759 +- 0.012 / 0.727 +- 0.032.
Raising grades costs grade-0 recall (0.59 -> 0.22 at 0.5, plain) and referable specificity (0.80 ->
0.62): at probability 0.5 half the grade-0 images of every batch become DR cases, while the per-grade
sampler balances the grades as they were before pasting. Keeping the grade neither helped nor hurt within the
spread. The phantom draws its lesions from the generator the donors come from, so it has none of the
scarcity of rare lesions that ELLG targets on real data; that question stays open, which is why
generation is off by default. A second run with `benchmarks/training_ablation.py --study lesion-generation` (4
seeds, 2026-12-03, x86-amx; benchmarks/results/2026-12-03-intel-xeon-amx/explanations/): paste − off −0.011 ±
0.090 QWK, paste keeping the grade − off +0.022 ± 0.079: no effect outside the spread either way.

Donor masks come from the caller: the phantom's (or any dataset's) per-lesion masks brought into the
prepared frame with ``prepared_lesion_masks``, or the model's per-lesion maps above a threshold.
Only cases the model graded correctly should donate (``correct``): a lesion the model missed on its own
image teaches it nothing reliable when moved (ELLG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from os import PathLike
from typing import Iterable, Sequence

import cv2
import numpy as np

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import PreprocessConfig, decode_image, prepare
from edgeretina.preprocess.config import FIELD_LEVEL_U8
from edgeretina.training.augment import field_mask as field_of

# The least ICDR grade one lesion of a type forces (Wilkinson et al. 2003; see the module docstring).
LESION_MIN_GRADE: dict[str, int] = {"MA": 1, "HE": 2, "EX": 2, "CWS": 2, "NV": 4, "PRH": 4}
UNKNOWN_LESION_MIN_GRADE = 1

# Reinhard et al. 2001, eq. 4 (RGB -> LMS) and eq. 6 (log LMS -> lαβ). The inverses are computed, not
# the paper's rounded ones, so RGB -> lαβ -> RGB is the identity up to float rounding.
_RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402],
                        [0.1967, 0.7244, 0.0782],
                        [0.0241, 0.1288, 0.8444]])
_LOG_LMS_TO_LAB = np.diag([1.0 / math.sqrt(3.0), 1.0 / math.sqrt(6.0), 1.0 / math.sqrt(2.0)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])
_LMS_TO_RGB = np.linalg.inv(_RGB_TO_LMS)
_LAB_TO_LOG_LMS = np.linalg.inv(_LOG_LMS_TO_LAB)
_LMS_FLOOR = 1e-4   # log10 needs > 0: only pure black reaches it (every matrix entry is positive)
_MIN_STAT_PIXELS = 8



@dataclass(frozen=True)
class LesionGenerationConfig:
    """How lesion generation draws; probability 0 (the default) switches it off.

    probability: chance that a training image gets pasted lesions.
    max_patches: 1..max_patches lesions pasted into such an image (uniform).
    margin: the bank's patches are a component's bounding box grown by this fraction of the image side
        on every side (the surround the colour statistics come from; 0.03: 7 px at 224).
    feather: width of the alpha ramp inside a component's rim, a fraction of the image side (0.01: 2 px).
    min_area: components smaller than this many pixels (at model resolution) are not kept: invisible.
    max_side: components whose bounding box is longer than this fraction of the side are not kept.
    max_per_code: at most this many components per lesion type and case, the largest first.
    codes: which lesion types the bank keeps (LESION_CODES order).
    transform_patches: flip and turn each pasted patch by multiples of 90 degrees.
    balance_codes: draw a lesion type uniformly, then one of its patches; False (default) draws patches
        uniformly, so the types come in the proportions the donors have. Balancing lends the one
        neovascularisation patch of a small bank to a fifth of all pastes, and each makes a grade 4.
    raise_grade: True pastes any lesion and raises the grade as ``mixed_grade`` says (ELLG's label
        mixing, ordinal); False pastes only lesions that imply at most the destination's grade, so no label
        changes (more lesions, in new places, on images that already have DR; none on grade 0).
    max_std_ratio: bounds the Reinhard scale σ_target/σ_source to [1/r, r] per channel, so a flat donor
        surround does not blow up a lesion's contrast; None: Reinhard's plain ratio.
    placement_tries: random positions tried for one patch before it is given up.
    Raises ConfigError for values out of range.
    """

    probability: float = 0.0
    max_patches: int = 3
    margin: float = 0.03
    feather: float = 0.01
    min_area: int = 2
    max_side: float = 0.4
    max_per_code: int = 8
    codes: tuple[str, ...] = LESION_CODES
    transform_patches: bool = True
    balance_codes: bool = False
    raise_grade: bool = True
    max_std_ratio: float | None = 2.0
    placement_tries: int = 20

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"lesion generation probability must lie in [0, 1], got {self.probability}")
        for name in ("max_patches", "min_area", "max_per_code", "placement_tries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"lesion generation {name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.margin <= 0.25:
            raise ConfigError(f"lesion generation margin must lie in [0, 0.25] of the image side, got {self.margin}")
        if not 0.0 <= self.feather <= 0.1:
            raise ConfigError(f"lesion generation feather must lie in [0, 0.1] of the image side, got {self.feather}")
        if not 0.0 < self.max_side <= 1.0:
            raise ConfigError(f"lesion generation max_side must lie in (0, 1], got {self.max_side}")
        codes = tuple(self.codes)
        unknown = [c for c in codes if c not in LESION_CODES]
        if not codes or unknown or len(set(codes)) != len(codes):
            raise ConfigError(f"lesion generation codes must be distinct lesion codes from {LESION_CODES}, got {codes}")
        object.__setattr__(self, "codes", tuple(c for c in LESION_CODES if c in codes))
        if self.max_std_ratio is not None and not self.max_std_ratio >= 1.0:
            raise ConfigError(f"lesion generation max_std_ratio must be >= 1 or None, got {self.max_std_ratio}")


# ---------------------------------------------------------------------------------------------- colour


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 or float RGB (0..255) [..., 3] -> float64 Ruderman lαβ [..., 3] (Reinhard et al. 2001)."""
    lms = (np.asarray(rgb, dtype=np.float64) / 255.0) @ _RGB_TO_LMS.T
    return np.log10(np.maximum(lms, _LMS_FLOOR)) @ _LOG_LMS_TO_LAB.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Ruderman lαβ [..., 3] -> float64 RGB on the 0..255 scale, unclipped (the inverse of rgb_to_lab)."""
    lms = np.power(10.0, np.asarray(lab, dtype=np.float64) @ _LAB_TO_LOG_LMS.T)
    return 255.0 * (lms @ _LMS_TO_RGB.T)


def reinhard_transfer(patch_rgb: np.ndarray, target_rgb_region: np.ndarray, source_mask: np.ndarray | None = None,
                      target_mask: np.ndarray | None = None, max_std_ratio: float | None = None) -> np.ndarray:
    """Reinhard colour transfer: uint8 RGB patch [h, w, 3] -> uint8 RGB patch whose lαβ mean and standard
    deviation per channel are those of `target_rgb_region` (any [H, W, 3]).

    source_mask / target_mask (bool, the shapes of the two images): which pixels the statistics are taken
    from (default all); the transform is applied to every pixel of the patch. max_std_ratio bounds the
    per-channel scale to [1/r, r]. A source channel with no spread keeps its deviations (scale 1).
    Raises ValueError when a mask selects no pixel.
    """
    lab = rgb_to_lab(patch_rgb)
    source_mean, source_std = _lab_stats(lab, source_mask)
    target_mean, target_std = _lab_stats(rgb_to_lab(target_rgb_region), target_mask)
    scale = np.where(source_std > 1e-12, target_std / np.maximum(source_std, 1e-12), 1.0)
    if max_std_ratio is not None:
        scale = np.clip(scale, 1.0 / max_std_ratio, max_std_ratio)
    matched = (lab - source_mean) * scale + target_mean
    return np.clip(np.rint(lab_to_rgb(matched)), 0, 255).astype(np.uint8)


def _lab_stats(lab: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    pixels = lab.reshape(-1, 3) if mask is None else lab[np.asarray(mask, dtype=bool)]
    if len(pixels) == 0:
        raise ValueError("colour statistics need at least one pixel; the mask selects none")
    return pixels.mean(axis=0), pixels.std(axis=0)


# ------------------------------------------------------------------------------------------------ labels


def lesion_min_grade(code: str | None, donor_grade: int) -> int:
    """The grade one pasted lesion implies: its type's ICDR minimum, at most its donor's grade."""
    floor = UNKNOWN_LESION_MIN_GRADE if code is None else LESION_MIN_GRADE[code]
    return min(floor, int(donor_grade))


def mixed_grade(destination_grade: int, pasted: Iterable[tuple[str | None, int]]) -> int:
    """The ordinal label mix: max(destination grade, each pasted (code, donor grade)'s implied grade)."""
    return max([int(destination_grade), *(lesion_min_grade(code, g) for code, g in pasted)])


# -------------------------------------------------------------------------------------------------- bank


@dataclass(frozen=True)
class LesionPatch:
    """One donor component: its patch (bounding box grown by the margin) and what is known about it.

    rgb: uint8 [h, w, 3]; lesion: bool [h, w], the component; alpha: float32 [h, w], the feathered blend
    weight, > 0 exactly on `lesion`; surround: bool [h, w], the patch's field pixels that are no lesion of
    any type (where the donor's colour statistics come from); code: the lesion type, None when unknown;
    grade: the donor case's grade; case: the donor's index among the cases the bank was built from.
    """

    rgb: np.ndarray
    lesion: np.ndarray
    alpha: np.ndarray
    surround: np.ndarray
    code: str | None
    grade: int
    case: int


@dataclass
class LesionBank:
    """Lesion components cut from donor images, ready to paste (see the module docstring).

    Build with ``LesionBank.from_cases`` or add cases one at a time with ``add`` (so a large training set
    never needs all its full-resolution masks at once).
    """

    config: LesionGenerationConfig = field(default_factory=LesionGenerationConfig)
    patches: list[LesionPatch] = field(default_factory=list)
    _codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), init=False, repr=False, compare=False)
    _implied: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), init=False, repr=False,
                                 compare=False)
    _indexed_at: int = field(default=0, init=False, repr=False, compare=False)

    @classmethod
    def from_cases(cls, images: np.ndarray, masks: Sequence[np.ndarray], grades: Sequence[int],
                   correct: Sequence[bool] | None = None,
                   config: LesionGenerationConfig | None = None) -> "LesionBank":
        """Donors: uint8 images [N, S, S, 3] (prepared, the training frame), masks per case (bool/uint8
        [L, S, S] in LESION_CODES order, or [S, S] for lesions of unknown type), grades [N], and
        `correct` [N] (default all): only cases graded correctly donate."""
        if correct is not None and len(correct) != len(images):
            raise ValueError(f"correct has {len(correct)} entries for {len(images)} images")
        if not len(images) == len(masks) == len(grades):
            raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(grades)} grades differ in number")
        bank = cls(config=config or LesionGenerationConfig())
        for i, (image, mask, grade) in enumerate(zip(images, masks, grades)):
            if correct is None or bool(correct[i]):
                bank.add(image, mask, int(grade), case=i)
        return bank

    def add(self, image: np.ndarray, mask: np.ndarray, grade: int, case: int = -1) -> int:
        """Cut the components of one donor; returns how many were kept."""
        layers, codes = _mask_layers(np.asarray(mask), image.shape[:2])
        field_pixels = field_of(image) > 0
        any_lesion = np.any(layers, axis=0)
        kept = 0
        for layer, code in zip(layers, codes):
            if code is not None and code not in self.config.codes:
                continue
            for box, component in self._components(layer & field_pixels):
                self.patches.append(_cut(image, field_pixels, any_lesion, box, component, code, grade, case,
                                         self.config))
                kept += 1
        return kept

    def _components(self, layer: np.ndarray) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
        """The kept components of one lesion layer: (x, y, w, h) box and bool mask over the box."""
        count, labels, stats, _ = cv2.connectedComponentsWithStats(layer.astype(np.uint8), connectivity=8)
        side = layer.shape[0]
        order = sorted(range(1, count), key=lambda k: -int(stats[k, cv2.CC_STAT_AREA]))
        out = []
        for k in order:
            x, y, w, h, area = (int(v) for v in stats[k])
            if area < self.config.min_area or max(w, h) > self.config.max_side * side:
                continue
            out.append(((x, y, w, h), labels[y:y + h, x:x + w] == k))
            if len(out) == self.config.max_per_code:
                break
        return out

    def where_correct(self, correct: Sequence[bool]) -> "LesionBank":
        """The bank restricted to donors graded correctly now (`correct` indexed like the cases it was built
        from): refresh it after an epoch without cutting the components again."""
        correct = np.asarray(correct, dtype=bool)
        return LesionBank(config=self.config, patches=[p for p in self.patches if 0 <= p.case < len(correct)
                                                       and correct[p.case]])

    def __len__(self) -> int:
        return len(self.patches)

    def draw(self, rng: np.random.Generator, max_grade: int | None = None) -> LesionPatch | None:
        """One patch: uniformly over the bank, or (config.balance_codes) a lesion type uniformly among those
        present, then one of its patches, so the many microaneurysm and haemorrhage dots do not crowd out
        the rare types. max_grade: only patches implying at most this grade (None when there is none)."""
        codes, implied = self._index()
        candidates = np.flatnonzero(implied <= max_grade) if max_grade is not None else np.arange(len(implied))
        if len(candidates) == 0:
            return None
        if self.config.balance_codes:
            present = np.unique(codes[candidates])
            code = present[int(rng.integers(len(present)))]
            candidates = candidates[codes[candidates] == code]
        return self.patches[int(candidates[int(rng.integers(len(candidates)))])]

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """Per patch: its lesion type's position in LESION_CODES (len(LESION_CODES) when unknown) and the
        grade it implies; recomputed when the bank has grown since."""
        if self._indexed_at != len(self.patches):
            unknown = len(LESION_CODES)
            self._codes = np.array([unknown if p.code is None else LESION_CODES.index(p.code) for p in self.patches],
                                   dtype=np.int64)
            self._implied = np.array([lesion_min_grade(p.code, p.grade) for p in self.patches], dtype=np.int64)
            self._indexed_at = len(self.patches)
        return self._codes, self._implied


def _mask_layers(mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, list[str | None]]:
    if mask.ndim == 2 and mask.shape == shape:
        return (mask > 0)[None], [None]
    if mask.ndim == 3 and mask.shape == (len(LESION_CODES), *shape):
        return mask > 0, list(LESION_CODES)
    raise ValueError(f"a donor mask must be [{len(LESION_CODES)}, H, W] (per lesion type) or [H, W] for an "
                     f"image {shape}, got {mask.shape}")


def _cut(image, field_pixels, any_lesion, box, component, code, grade, case, config) -> LesionPatch:
    x, y, w, h = box
    side = image.shape[0]
    pad = int(round(config.margin * side))
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(image.shape[1], x + w + pad), min(image.shape[0], y + h + pad)
    lesion = np.zeros((y1 - y0, x1 - x0), bool)
    lesion[y - y0:y - y0 + h, x - x0:x - x0 + w] = component
    surround = field_pixels[y0:y1, x0:x1] & ~any_lesion[y0:y1, x0:x1]
    return LesionPatch(rgb=image[y0:y1, x0:x1].copy(), lesion=lesion, alpha=_feather(lesion, config.feather * side),
                       surround=surround, code=code, grade=int(grade), case=int(case))


def _feather(lesion: np.ndarray, width: float) -> np.ndarray:
    """Alpha inside the component: distance to its outside / width, capped at 1; the ramp is shortened to
    the component's own depth so a small dot still reaches 1 at its centre."""
    padded = np.pad(lesion, 1).astype(np.uint8)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
    ramp = min(max(width, 1.0), float(distance.max())) if lesion.any() else 1.0
    return np.where(lesion, np.clip(distance / ramp, 0.0, 1.0), 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ pasting


def generate(image: np.ndarray, grade: int, rng: np.random.Generator, bank: LesionBank, max_patches: int | None = None,
             field_mask: np.ndarray | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """Paste 1..max_patches bank lesions into one prepared image (uint8 [S, S, 3]).

    Returns (new image, new grade, pasted mask): the image is a new array, equal to `image` outside the
    pasted mask; the grade follows ``mixed_grade``; the pasted mask is bool [L, S, S] (LESION_CODES order)
    and marks the footprint of each pasted lesion in its type's layer: no pixel outside it changes, and
    inside it every pixel takes the blend (the few whose blend rounds to the old value keep it). Lesions
    of unknown type change pixels but mark no layer (an untyped bank has no lesion targets to update).
    field_mask (bool or uint8 [S, S]): where the retina is; default: the image's non-black pixels
    (augment.field_mask). max_patches defaults to the bank config's. An empty bank, a patch that fits
    nowhere inside the field, or (config.raise_grade False) no lesion implying at most `grade` pastes
    nothing there.
    """
    config = bank.config
    max_patches = config.max_patches if max_patches is None else int(max_patches)
    if max_patches < 1:
        raise ConfigError(f"max_patches must be at least 1, got {max_patches}")
    out = image.copy()
    pasted = np.zeros((len(LESION_CODES), *image.shape[:2]), bool)
    if len(bank) == 0:
        return out, int(grade), pasted
    field_pixels = _field(image, field_mask)
    lent: list[tuple[str | None, int]] = []
    max_grade = None if config.raise_grade else int(grade)
    for _ in range(int(rng.integers(1, max_patches + 1))):
        drawn = bank.draw(rng, max_grade)
        if drawn is None:
            break
        patch = _oriented(drawn, rng, config.transform_patches)
        where = _place(patch.lesion, field_pixels, rng, config.placement_tries)
        if where is None:
            continue
        _paste(out, field_pixels, patch, where, config.max_std_ratio)
        if patch.code is not None:
            y, x = where
            h, w = patch.lesion.shape
            pasted[LESION_CODES.index(patch.code), y:y + h, x:x + w] |= patch.lesion
        lent.append((patch.code, patch.grade))
    return out, mixed_grade(grade, lent), pasted


def _field(image: np.ndarray, given: np.ndarray | None) -> np.ndarray:
    if given is None:
        return field_of(image) > 0
    given = np.asarray(given)
    if given.shape != image.shape[:2]:
        raise ValueError(f"field_mask {given.shape} does not match the image {image.shape[:2]}")
    return given > 0


def _oriented(patch: LesionPatch, rng: np.random.Generator, transform: bool) -> LesionPatch:
    """The patch flipped and turned (always two draws, so switching it off keeps the other draws)."""
    flip, turns = bool(rng.integers(2)), int(rng.integers(4))
    if not transform or (not flip and turns == 0):
        return patch

    def move(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(a[:, ::-1] if flip else a, turns))

    return LesionPatch(rgb=move(patch.rgb), lesion=move(patch.lesion), alpha=move(patch.alpha),
                       surround=move(patch.surround), code=patch.code, grade=patch.grade, case=patch.case)


def _place(lesion: np.ndarray, field_pixels: np.ndarray, rng: np.random.Generator,
           tries: int) -> tuple[int, int] | None:
    """A (row, column) for the patch's top-left corner where the patch lies in the image and every lesion
    pixel lands inside the field; None after `tries` misses."""
    h, w = lesion.shape
    height, width = field_pixels.shape
    if h > height or w > width:
        return None
    for _ in range(tries):
        y, x = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
        if field_pixels[y:y + h, x:x + w][lesion].all():
            return y, x
    return None


def _paste(out: np.ndarray, field_pixels: np.ndarray, patch: LesionPatch, where: tuple[int, int],
           max_std_ratio: float | None) -> None:
    """Blend one patch into `out` in place, on its lesion pixels only."""
    y, x = where
    h, w = patch.lesion.shape
    region = out[y:y + h, x:x + w]
    target = field_pixels[y:y + h, x:x + w] & ~patch.lesion
    if target.sum() < _MIN_STAT_PIXELS:
        target = field_pixels[y:y + h, x:x + w]
    source = patch.surround if patch.surround.sum() >= _MIN_STAT_PIXELS else np.ones_like(patch.surround)
    matched = reinhard_transfer(patch.rgb, region, source, target, max_std_ratio).astype(np.float32)
    alpha = patch.alpha[..., None]
    blended = np.clip(np.rint(alpha * matched + (1.0 - alpha) * region.astype(np.float32)), 0, 255).astype(np.uint8)
    # stay inside the field: the graph's field test (FIELD_LEVEL_U8) reads darker pixels as outside
    dark = patch.lesion & (blended.max(axis=2) <= FIELD_LEVEL_U8)
    blended[dark] = np.maximum(blended[dark], FIELD_LEVEL_U8 + 1)
    region[patch.lesion] = blended[patch.lesion]


def generate_batch(images_u8: np.ndarray, grades: np.ndarray, rng: np.random.Generator, bank: LesionBank,
                   lesions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A training batch through lesion generation: uint8 [B, S, S, 3], grades [B] and optional patch-grid
    lesion targets uint8 [B, L, h, w] -> new arrays (inputs untouched). Each image is generated with
    the bank config's probability; the pasted lesions are or-ed into its grid (``pasted_grid``)."""
    images, new_grades = images_u8.copy(), np.asarray(grades).copy()
    grids = lesions.copy() if lesions is not None else None
    if bank.config.probability == 0.0 or len(bank) == 0:
        return images, new_grades, grids
    chosen = rng.random(len(images)) < bank.config.probability
    for i in np.flatnonzero(chosen):
        images[i], grade, pasted = generate(images[i], int(new_grades[i]), rng, bank)
        new_grades[i] = grade
        if grids is not None:
            grids[i] |= pasted_grid(pasted, grids.shape[-2:])
    return images, new_grades, grids


def pasted_grid(pasted: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Pixel masks [L, S, S] -> uint8 patch-grid targets [L, h, w]: a cell is positive when any pasted
    pixel falls in it (the rule of preprocess.grid_presence)."""
    h, w = (int(v) for v in grid)
    return np.stack([cv2.resize(layer.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0
                     for layer in pasted]).astype(np.uint8)


# ------------------------------------------------------------------------------------------- donor masks


def prepared_lesion_masks(image_path: str | PathLike, mask_paths: Sequence[str | PathLike],
                          preprocess: PreprocessConfig, frame: int | None = None) -> np.ndarray:
    """A case's per-lesion masks (one binary image per lesion type, full photo resolution: the phantom's
    masks/<CODE>/<case>.png, training.data.lesion_mask_paths) -> bool [L, S, S] in the frame of its prepared
    image: the same crop box, a pixel marked when the lesion covers at least half of it (smaller lesions
    are not visible at model resolution), nothing outside the field. Decodes the photo again to find
    its geometry (done once per case when a bank is built)."""
    photo = decode_image(image_path, preprocess.decode_max_side, frame=frame)
    prepared, geometry = prepare(photo, preprocess)
    inside = field_of(prepared) > 0
    layers = []
    for path in mask_paths:
        mask = decode_image(path)[..., 0] > 0
        layers.append(_coverage_in_frame(mask, geometry.original_size, geometry.crop_box, preprocess.image_size)
                      >= 0.5)
    return np.stack(layers) & inside[None]


def _coverage_in_frame(mask: np.ndarray, photo_size: tuple[int, int], crop_box, size: int) -> np.ndarray:
    """Fraction of each prepared pixel a full-resolution mask covers: the mask at the decoded photo's size
    (a JPEG may be decoded scaled), cut to the crop box (black padding where it leaves the photo) and
    area-resized to the model side."""
    cover = mask.astype(np.float32)
    if cover.shape != tuple(photo_size):
        cover = cv2.resize(cover, (photo_size[1], photo_size[0]), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = (int(round(v)) for v in crop_box)
    side = x1 - x0
    crop = np.zeros((side, side), np.float32)
    height, width = cover.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = cover[sy0:sy1, sx0:sx1]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
