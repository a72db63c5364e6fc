"""PreprocessConfig: how a model's input is prepared, validated strictly, saved in every checkpoint
and bundle manifest; and CLIP's mean/std, the default normalisation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeretina.errors import ConfigError

# A prepared image is fundus where its brightest channel is above this level, the blacked-out surround
# (mask_outside_fov) at or below it: the graph's field weights (training/model.py) and lesion generation.
FIELD_LEVEL_U8 = 8
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model's input is prepared. Saved in every checkpoint and bundle manifest.

    ``ben_graham_sigma`` is the Gaussian sigma of the local average as a fraction of
    ``image_size``. The default 0.05 (11.2 px at 224) matches the widely used Kaggle APTOS-2019
    recipe (``sigmaX=10`` at 224 px). Ben Graham's original Kaggle-2015 setting was sigma = radius/30,
    i.e. ~0.017 of the image size: it keeps less of the mid-scale structure (haemorrhages, exudate
    clusters) and more of the fine noise; 0.05 is the gentler, more common choice.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_to_fov: bool = True
    ben_graham: bool = False
    ben_graham_sigma: float = 0.05
    mask_outside_fov: bool = True
    # JPEGs larger than twice this on the long side are decoded at 1/2, 1/4 or 1/8 scale by libjpeg
    # (DCT scaling), keeping at least this many pixels: a 12 MP photo then costs a fraction of the
    # memory and time, and nothing downstream needs more (quality works at 512 px, the model at
    # image_size, overlays at <= 1600 px). 0 decodes at full size.
    decode_max_side: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)):
            raise ConfigError(f"image_size must be an integer, got {self.image_size!r}")
        if not 16 <= int(self.image_size) <= 4096:
            raise ConfigError(f"image_size must be in [16, 4096], got {self.image_size}")
        object.__setattr__(self, "image_size", int(self.image_size))
        for name in ("mean", "std"):
            value = _float_triple(name, getattr(self, name))
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")
        for name in ("crop_to_fov", "ben_graham", "mask_outside_fov"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        sigma = self.ben_graham_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.number)):
            raise ConfigError(f"ben_graham_sigma must be a number, got {sigma!r}")
        if not 0.0 < float(sigma) <= 1.0:
            raise ConfigError(f"ben_graham_sigma must be in (0, 1], got {sigma}")
        object.__setattr__(self, "ben_graham_sigma", float(sigma))
        if isinstance(self.decode_max_side, bool) or not isinstance(self.decode_max_side, (int, np.integer)) \
                or self.decode_max_side < 0:
            raise ConfigError(f"decode_max_side must be a non-negative integer, got {self.decode_max_side!r}")
        object.__setattr__(self, "decode_max_side", int(self.decode_max_side))

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """Inverse of ``to_dict``. Strict: unknown keys or bad values raise ``ConfigError``;
        missing keys take their defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown preprocess config keys: {', '.join(map(str, unknown))}")
        return cls(**d)


def _float_triple(name: str, value) -> tuple[float, float, float]:
    numbers = isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value
    )
    if not numbers or len(value) != 3 or not all(np.isfinite(float(v)) for v in value):
        raise ConfigError(f"{name} must be three finite numbers, got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]
