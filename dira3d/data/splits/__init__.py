"""Patient-level split rules: seeded, deterministic, proportional to the paper's sizes.

The paper's splits (LIDC-IDRI 510 / 100 / 408, BraTS 2018 190 / 95, PE-CAD 3 folds) are over
patient ids we cannot ship, so dira3d ships the RULE instead: sort the patient ids, permute
them with ``numpy.random.default_rng(seed)``, and cut the permutation into parts whose sizes are
the paper's sizes scaled to the number of patients found (largest-remainder rounding, every part
non-empty when there are at least as many patients as parts). The same ids and seed always give
the same split, whatever order the files were found in. The resulting split is written into the
datalist and into a ``split.json`` next to it, so it can be reused and cited.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dira3d.utils.atomic import atomic_write_text

__all__ = ["proportional_sizes", "split_patients", "assign_folds", "write_split_file"]


def proportional_sizes(total: int, reference: Sequence[int]) -> list[int]:
    """Scale the reference part sizes to ``total`` items.

    Args:
        total: number of patients to split.
        reference: the paper's part sizes (e.g. ``(510, 100, 408)``).

    Returns:
        Integer sizes summing to ``total``; equal to ``reference`` when ``total == sum(reference)``.
        Every part gets at least one patient when ``total >= len(reference)``.

    Raises:
        ValueError: ``total`` is negative or ``reference`` has a negative or all-zero size.
    """
    if total < 0:
        raise ValueError(f"number of patients must be >= 0, got {total}")
    if not reference or min(reference) < 0 or sum(reference) == 0:
        raise ValueError(f"split sizes {list(reference)} must be non-negative and not all zero")
    exact = [total * r / sum(reference) for r in reference]
    sizes = [math.floor(e) for e in exact]
    # Largest remainder first; ties go to the earlier (usually the training) part.
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    if total >= len(reference):
        for i in range(len(sizes)):
            if sizes[i] == 0 and reference[i] > 0:
                donor = max(range(len(sizes)), key=lambda j: sizes[j])
                sizes[donor] -= 1
                sizes[i] += 1
    return sizes


def _permuted(ids: Sequence[str], seed: int) -> list[str]:
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        duplicates = sorted({i for i in ids if list(ids).count(i) > 1})
        raise ValueError(f"patient ids must be unique for a patient-level split; duplicated: {duplicates[:5]}")
    order = np.random.default_rng(seed).permutation(len(unique))
    return [unique[i] for i in order]


def split_patients(ids: Sequence[str], parts: Mapping[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Split patient ids into named parts proportional to the reference sizes.

    Args:
        ids: unique patient ids (any order).
        parts: part name → reference size, in cutting order (e.g. ``{"training": 510,
            "validation": 100, "test": 408}``).
        seed: seed of the permutation.

    Returns:
        Part name → sorted patient ids; the parts are disjoint and cover ``ids``.

    Raises:
        ValueError: duplicated ids or invalid sizes.
    """
    permuted = _permuted(ids, seed)
    sizes = proportional_sizes(len(permuted), list(parts.values()))
    result: dict[str, list[str]] = {}
    start = 0
    for name, size in zip(parts, sizes):
        result[name] = sorted(permuted[start:start + size])
        start += size
    return result


def assign_folds(ids: Sequence[str], num_folds: int = 3, seed: int = 0) -> dict[str, int]:
    """Assign each patient to one of ``num_folds`` cross-validation folds (sizes differ by ≤ 1).

    Args:
        ids: unique patient ids.
        num_folds: number of folds (≥ 2).
        seed: seed of the permutation.

    Returns:
        Patient id → fold in ``0 .. num_folds - 1``.

    Raises:
        ValueError: ``num_folds < 2`` or duplicated ids.
    """
    if num_folds < 2:
        raise ValueError(f"--folds must be >= 2 for cross-validation, got {num_folds}")
    return {pid: position % num_folds for position, pid in enumerate(_permuted(ids, seed))}


def write_split_file(path: str | Path, split: Mapping[str, object], rule: Mapping[str, object]) -> Path:
    """Write ``{"rule": rule, **split}`` as JSON (the record of which patient went where).

    Args:
        path: the output file (its folder is created).
        split: part name → patient ids, or ``{"folds": {id: fold}}``.
        rule: how it was made (``{"seed": 0, "reference_sizes": {...}, "method": "..."}``).

    Returns:
        The path written.
    """
    return atomic_write_text(path, json.dumps({"rule": dict(rule), **dict(split)}, indent=2, sort_keys=False) + "\n")
