"""A validation split that keeps patients whole, follows the grades and takes from every source.

Groups: images that share a patient (item.patient; ids compare as text across all sources, so a clash
between unrelated corpora only makes a group larger, never leaks a person across the split) or a file
(the frames of one DICOM file), transitively; an image with neither in common is a group of its own. Strata: a group's source (its most common one) and its worst grade
(the patient-level grade of DR screening). Quotas: round(val_fraction x images) is apportioned to the
sources by largest remainder, then each source's share to its grades the same way, so every source gives
~val_fraction of its images and every grade ~val_fraction of its images, within one image per stratum
when groups are single images. Each stratum then takes whole groups in a seeded random order up to its
quota; a source still short of its quota (patients larger than a stratum's share) takes the groups
that bring it closer, from the strata furthest below theirs; when nothing fits anywhere the validation
side gets one smallest group. Independent of
the order of `items`; a pure function of the items and the seed.

Why not scikit-learn's StratifiedGroupKFold: it stratifies one label (not source and grade together),
gives K equal folds rather than a fraction, and the core layer does not depend on scikit-learn.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from edgeretina.dataset import LabeledImage
from edgeretina.errors import ConfigError, DatasetError

Group = list[int]       # indices into the items


def split_items(items: Sequence[LabeledImage], val_fraction: float,
                seed: int) -> tuple[list[LabeledImage], list[LabeledImage]]:
    """(train, validation), each in the order of `items`; no patient (and no file) on both sides.

    Raises ConfigError for a val_fraction outside (0, 1), DatasetError when the items cannot give both
    sides an image (too few images or groups, e.g. one patient)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")
    items = list(items)
    groups = _groups(items)
    wanted = math.floor(val_fraction * len(items) + 0.5)
    if len(groups) < 2 or wanted == 0:
        raise DatasetError(f"too few images for a validation split of {val_fraction:g}: {len(items)} image(s) in "
                           f"{len(groups)} patient/image group(s); add images or give a separate validation set")
    rng = np.random.default_rng(seed)
    strata = _strata(items, groups)
    sizes = {key: sum(len(g) for g in members) for key, members in strata.items()}
    source_quotas, quotas = _quotas(sizes, val_fraction, wanted, rng)
    chosen: set[int] = set()
    for source, source_quota in source_quotas.items():
        mine = {key: members for key, members in sorted(strata.items()) if key[0] == source}
        for group in _choose(mine, quotas, source_quota, rng):
            chosen.update(group)
    if not chosen:       # every quota smaller than its groups (a few large patients): one group, the smallest
        smallest = min(len(g) for g in groups)
        candidates = [g for g in groups if len(g) == smallest]
        chosen.update(candidates[int(rng.integers(len(candidates)))])
    if not chosen or len(chosen) == len(items):
        side = "validation" if not chosen else "training"
        raise DatasetError(f"cannot split {len(items)} image(s) in {len(groups)} group(s) at {val_fraction:g}: "
                           f"the {side} side would be empty (patients are kept whole); give a separate validation set")
    return ([item for i, item in enumerate(items) if i not in chosen],
            [item for i, item in enumerate(items) if i in chosen])


def _group_keys(item: LabeledImage) -> list[tuple[str, str]]:
    keys = [("file", str(item.path))]        # the frames of one DICOM file are one eye
    if item.patient:
        keys.append(("patient", item.patient))
    return keys


def _groups(items: list[LabeledImage]) -> list[Group]:
    """Connected components of "shares a patient or a file" (union-find), ordered by their smallest key:
    two frames of one file stay together even when the grades CSV names a patient for one of them only."""
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[tuple[str, str], int] = {}
    for i, item in enumerate(items):
        for key in _group_keys(item):
            parent[root(i)] = root(first_with.setdefault(key, i))
    members: dict[int, Group] = {}
    for i in range(len(items)):
        members.setdefault(root(i), []).append(i)
    smallest = {r: min(key for i in group for key in _group_keys(items[i])) for r, group in members.items()}
    return [members[r] for r in sorted(members, key=smallest.__getitem__)]


def _strata(items: list[LabeledImage], groups: list[Group]) -> dict[tuple[str, int], list[Group]]:
    strata: dict[tuple[str, int], list[Group]] = {}
    for group in groups:
        sources = Counter(items[i].source for i in group)
        source = min(sources, key=lambda s: (-sources[s], s))
        strata.setdefault((source, max(items[i].grade for i in group)), []).append(group)
    return strata


def _quotas(sizes: dict[tuple[str, int], int], fraction: float, wanted: int,
            rng: np.random.Generator) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Validation images per source and per stratum: `wanted` apportioned to the sources, then each
    source's share to its grades."""
    per_source: dict[str, int] = Counter()
    for (source, _), size in sizes.items():
        per_source[source] += size
    source_quotas = _apportion({s: fraction * n for s, n in sorted(per_source.items())}, wanted, rng)
    quotas = {}
    for source, quota in source_quotas.items():
        cells = {key: size for key, size in sorted(sizes.items()) if key[0] == source}
        total = sum(cells.values())
        quotas.update(_apportion({k: quota * n / total for k, n in cells.items()}, quota, rng))
    return source_quotas, quotas


def _apportion(exact: dict, total: int, rng: np.random.Generator) -> dict:
    """Largest remainder: integers that sum to `total`, each the floor or ceiling of its exact share;
    equal remainders are ordered at random (seeded), not by name."""
    keys = list(exact)
    floors = {k: math.floor(exact[k]) for k in keys}
    ties = rng.random(len(keys))
    by_remainder = sorted(range(len(keys)), key=lambda i: (floors[keys[i]] - exact[keys[i]], ties[i]))
    for i in by_remainder[:max(total - sum(floors.values()), 0)]:
        floors[keys[i]] += 1
    return floors


def _choose(strata: dict[tuple[str, int], list[Group]], quotas: dict[tuple[str, int], int], source_quota: int,
            rng: np.random.Generator) -> list[Group]:
    """One source's validation groups: each stratum's whole groups up to its quota, then, while the
    source is short of its quota (patients larger than a stratum's share), the group that brings the
    source closer from the stratum furthest below its quota."""
    taken, rest, deficit = [], [], {}
    for key, groups in strata.items():
        mine, left = _fill(groups, quotas[key], rng)
        taken += mine
        rest += [(key, g) for g in left]
        deficit[key] = quotas[key] - sum(map(len, mine))
    count = sum(map(len, taken))
    while True:
        closer = [(key, g) for key, g in rest if abs(count + len(g) - source_quota) < abs(count - source_quota)]
        if not closer:
            return taken
        key, group = max(closer, key=lambda kg: deficit[kg[0]])     # the first of equals: seeded order
        rest.remove((key, group))
        taken.append(group)
        count += len(group)
        deficit[key] -= len(group)


def _fill(groups: list[Group], quota: int, rng: np.random.Generator) -> tuple[list[Group], list[Group]]:
    """(taken, rest): whole groups in seeded random order while they fit the quota, then any that brings
    the count closer."""
    order = [groups[i] for i in rng.permutation(len(groups))]
    taken, rest, count = [], [], 0
    for group in order:
        if count + len(group) <= quota:
            taken.append(group)
            count += len(group)
        else:
            rest.append(group)
    for group in list(rest):
        if abs(count + len(group) - quota) < abs(count - quota):
            taken.append(group)
            rest.remove(group)
            count += len(group)
    return taken, rest
