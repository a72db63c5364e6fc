"""Grade and lesion prototypes: several descriptions per grade and per lesion, kept in one editable JSON
file (training/prompts.json by default), or learnable prototypes for a tower without a text tower.

A prototype from descriptions is the L2-normalised mean of the L2-normalised text embeddings of its
descriptions (prompt ensembling, Radford et al. 2021, section 3.1.4): the factory encodes them, this module
only reads and checks the file. A checkpoint stores the resulting prototypes, never the file, so editing
the file changes the models trained after it and none before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES, NUM_GRADES

DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.json"
_GRADE_KEYS = tuple(str(grade) for grade in range(NUM_GRADES))


@dataclass(frozen=True)
class Prompts:
    """The descriptions of each ICDR grade (0..4) and of each lesion, in the order of LESION_CODES."""

    grades: tuple[tuple[str, ...], ...]
    lesions: tuple[tuple[str, ...], ...]
    source: str = "<memory>"

    def groups(self) -> list[tuple[str, ...]]:
        """Grades then lesions: one group of descriptions per prototype row (what build_backbone takes)."""
        return list(self.grades) + list(self.lesions)


def load_prompts(path: str | os.PathLike | None = None) -> Prompts:
    """Read and check a prompts file (None: the packaged training/prompts.json).

    The file is a JSON object with ``grades`` (keys "0".."4") and ``lesions`` (keys LESION_CODES), each
    value a list of one or more non-empty strings; keys starting with "_" are comments. Raises
    ConfigError naming the file and the key for a missing or unreadable file, invalid JSON, a missing or
    unknown key, or an empty or non-string description.
    """
    source = Path(path) if path is not None else DEFAULT_PROMPTS_FILE
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"prompts file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"prompts file {source} cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"prompts file {source} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"prompts file {source} must hold a JSON object with 'grades' and 'lesions'")
    _check_keys(source, "top level", _visible(data), ("grades", "lesions"))
    grades = _section(source, data, "grades", _GRADE_KEYS)
    lesions = _section(source, data, "lesions", LESION_CODES)
    return Prompts(grades=grades, lesions=lesions, source=str(source))


def orthonormal_prototypes(count: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random orthonormal rows of length ``dim`` ([count, dim]): the start of learnable prototypes
    for a tower without a text tower. Orthonormal rows start every class equally far from every other.
    Draws from ``generator`` (default: torch's global RNG, which the trainer seeds). ConfigError if
    count > dim (no such rows exist)."""
    if count > dim:
        raise ConfigError(f"{count} orthonormal prototypes need an embedding of at least {count} dims, got {dim}")
    basis, _ = torch.linalg.qr(torch.randn(dim, count, generator=generator))
    return basis.t().contiguous()


def _visible(mapping: dict) -> dict:
    return {k: v for k, v in mapping.items() if not (isinstance(k, str) and k.startswith("_"))}


def _check_keys(source: Path, where: str, mapping: dict, expected: tuple[str, ...]) -> None:
    missing = [k for k in expected if k not in mapping]
    unknown = [k for k in mapping if k not in expected]
    if missing or unknown:
        raise ConfigError(f"prompts file {source}, {where}: missing keys {missing}, unknown keys {unknown} "
                          f"(expected exactly {list(expected)})")


def _section(source: Path, data: dict, name: str, keys: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    section = data[name]
    if not isinstance(section, dict):
        raise ConfigError(f"prompts file {source}: {name!r} must be an object keyed by {list(keys)}")
    section = _visible(section)
    _check_keys(source, repr(name), section, keys)
    return tuple(_descriptions(source, f"{name}.{key}", section[key]) for key in keys)


def _descriptions(source: Path, where: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"prompts file {source}, {where}: need a non-empty list of descriptions, got {value!r}")
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"prompts file {source}, {where}[{i}]: a description must be a non-empty string, "
                              f"got {text!r}")
    return tuple(text.strip() for text in value)
