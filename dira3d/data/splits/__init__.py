"""Patient-level split rules: seeded, deterministic, proportional to the paper's sizes.

The paper's splits (LIDC-IDRI 510 / 100 / 408, BraTS 2018 190 / 95, PE-CAD 3 folds) are over
patient ids we cannot ship, so dira3d ships the RULE instead: sort the patient ids, permute
them with ``numpy.random.default_rng(seed)``, and cut the permutation into parts whose sizes are
the paper's sizes scaled to the number of patients found (largest-remainder rounding, every part
non-empty when there are at least as many patients as parts). The same ids and seed always give
the same split, whatever order the files were found in. The resulting split is written into the
datalist and into a ``split.json`` next to it, so it can be reused and cited.

A rerun into the same output folder with the same rule after patients were added or removed keeps
the recorded split (:func:`extend_split`): every patient stays in its part and only the new patients
are dealt out, to the parts furthest below their sizes. Cutting the new permutation afresh would
move earlier patients between training and test, so a model fine-tuned on the earlier datalist
would be tested on some of its own training patients.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dira3d.utils.atomic import atomic_write_text

__all__ = ["proportional_sizes", "split_patients", "extend_split", "earlier_split", "assign_folds", "write_split_file"]


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


def split_patients(ids: Sequence[str], parts: Mapping[str, int], seed: int = 0,
                   earlier: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Split patient ids into named parts proportional to the reference sizes.

    Args:
        ids: unique patient ids (any order).
        parts: part name → reference size, in cutting order (e.g. ``{"training": 510,
            "validation": 100, "test": 408}``).
        seed: seed of the permutation.
        earlier: the split an earlier run of the same rule recorded (:func:`earlier_split`): its
            patients keep their parts and only new ones are dealt out (:func:`extend_split`).

    Returns:
        Part name → sorted patient ids; the parts are disjoint and cover ``ids``.

    Raises:
        ValueError: duplicated ids or invalid sizes.
    """
    permuted = _permuted(ids, seed)
    sizes = proportional_sizes(len(permuted), list(parts.values()))
    kept = extend_split(permuted, dict(zip(parts, sizes)), seed, earlier)
    if kept is not None:
        return kept
    result: dict[str, list[str]] = {}
    start = 0
    for name, size in zip(parts, sizes):
        result[name] = sorted(permuted[start:start + size])
        start += size
    return result


def extend_split(ids: Sequence[str], sizes: Mapping[str, int], seed: int,
                 earlier: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]] | None:
    """Keep an earlier split of (some of) ``ids`` and deal out only the patients it does not hold.

    Every patient of ``ids`` that ``earlier`` placed stays in its part (patients no longer in ``ids``
    are dropped); the others, in the seeded order of :func:`split_patients`, go one by one to the part
    furthest below its size in ``sizes`` (ties: the earlier part).

    Args:
        ids: unique patient ids now.
        sizes: part name → the size it should have for ``len(ids)`` patients.
        seed: seed of the permutation of the new patients.
        earlier: part name → patient ids of the earlier split (same rule), or None.

    Returns:
        Part name → sorted patient ids; None when ``earlier`` is None or holds none of ``ids`` (then
        the caller's own rule applies unchanged).

    Raises:
        ValueError: duplicated ids.
    """
    permuted = _permuted(ids, seed)
    present = set(permuted)
    result = {name: [p for p in (earlier or {}).get(name, ()) if p in present] for name in sizes}
    placed = {p for pids in result.values() for p in pids}
    if not placed:
        return None
    names = list(sizes)
    for pid in permuted:
        if pid not in placed:
            name = max(names, key=lambda n: (sizes[n] - len(result[n]), -names.index(n)))
            result[name].append(pid)
    return {name: sorted(pids) for name, pids in result.items()}


def earlier_split(path: str | Path, rule: Mapping[str, object]) -> dict[str, list[str]] | None:
    """The parts recorded in the ``split.json`` at ``path`` when it was made by ``rule``; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not JSON, or not UTF-8: not a split.json a run wrote; split afresh
        recorded = None
    if not isinstance(recorded, dict):  # damaged: a fresh cut moves patients if the patient set changed since
        print(f"WARNING {path}: cannot be read as the split record of an earlier run (empty, cut short or edited), "
              "so the patients are split afresh: the same patients and seed give the same split, but patients "
              "added or removed since may move others between training, validation and test; it is replaced",
              file=sys.stderr)
        return None
    if recorded.get("rule") != json.loads(json.dumps(dict(rule))):
        return None
    return {name: [p for p in pids if isinstance(p, (str, int))]  # ids; anything else was not written by a run
            for name, pids in recorded.items() if name != "rule" and isinstance(pids, list)}


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
