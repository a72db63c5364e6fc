"""reference.npz: the few held-out inputs every bundle ships with the outputs expected on them.

Export writes it (export/reference_set.py); `verify` on the device reads it, runs the bundle's model on the
inputs and re-runs the export gate's checks (edgeretina.fidelity) with the thresholds export recorded.
Inputs are the prepared uint8 images (a quarter of the float32 bytes); the device normalises them with the
manifest's preprocessing, exactly as it does a photograph. Outputs: torch's (what the checks compare with)
and the shipped artifact's on the export machine (how far this device's numbers drift from it).
No pickles: plain arrays, loaded with allow_pickle=False.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeretina.errors import BundleError

REFERENCE_SET_FILE = "reference.npz"
INPUTS_KEY = "inputs_u8"
TORCH_PREFIX = "torch__"
EXPORTED_PREFIX = "exported__"


@dataclass
class ReferenceSet:
    inputs_u8: np.ndarray                  # [N, S, S, 3] prepared images
    torch_outputs: dict[str, np.ndarray]   # the reference the checks compare with
    exported_outputs: dict[str, np.ndarray]  # the artifact's outputs on the export machine (may be empty)

    def __len__(self) -> int:
        return len(self.inputs_u8)


def save_reference_set(path: Path, reference: ReferenceSet) -> None:
    arrays = {INPUTS_KEY: np.ascontiguousarray(reference.inputs_u8, dtype=np.uint8)}
    arrays.update({TORCH_PREFIX + k: np.asarray(v, np.float32) for k, v in reference.torch_outputs.items()})
    arrays.update({EXPORTED_PREFIX + k: np.asarray(v, np.float32) for k, v in reference.exported_outputs.items()})
    np.savez_compressed(path, **arrays)


def load_reference_set(path: Path) -> ReferenceSet:
    """Raises BundleError when the file is missing, unreadable or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise BundleError(f"bundle has no reference set ({Path(path).name}): re-export it to verify on a device") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read the reference set {Path(path).name}: {exc}") from None
    if INPUTS_KEY not in arrays or arrays[INPUTS_KEY].dtype != np.uint8 or arrays[INPUTS_KEY].ndim != 4:
        raise BundleError(f"{Path(path).name} holds no uint8 [N, S, S, 3] inputs")
    torch_outputs = _with_prefix(arrays, TORCH_PREFIX)
    n = len(arrays[INPUTS_KEY])
    if not torch_outputs or any(len(v) != n for v in torch_outputs.values()):
        raise BundleError(f"{Path(path).name}: reference outputs missing or not one per input")
    return ReferenceSet(arrays[INPUTS_KEY], torch_outputs, _with_prefix(arrays, EXPORTED_PREFIX))


def _with_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
