"""Synthetic volumes with a known answer, for tests, benchmarks and demos.

Volumes are made from a few *templates* (a lung-like background level and dense spheres at
template-specific places) plus a little noise, so the right neighbours of a volume are exactly
the volumes of its template.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["template_volume", "write_template_datalist"]


def template_volume(template: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The noiseless ``(X, Y, Z)`` template ``template`` in [0, 1].

    Background ≈ lung (0.05 + 0.08·template, below the 0.425 dense threshold); three dense
    spheres (0.7) whose centres depend on the template (and ``seed``).
    """
    rng = np.random.default_rng([seed, template])
    shape = tuple(int(s) for s in shape)
    volume = np.full(shape, 0.05 + 0.08 * (template % 4), dtype=np.float32)
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]  # broadcasting: no (X, Y, Z, 3) grid in memory
    z_scale = shape[2] / shape[0]  # spheres flattened like the volume's slice axis
    for _ in range(3):
        cx, cy, cz = rng.uniform(0.2, 0.8, size=3) * np.array(shape)
        radius = 0.12 * min(shape[:2])
        inside = (x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) / z_scale) ** 2 <= radius**2
        volume[inside] = 0.7
    return volume


def write_template_datalist(
    folder: str | os.PathLike,
    templates: int = 3,
    per_template: int = 4,
    val_per_template: int = 0,
    shape: Sequence[int] = (64, 64, 32),
    noise: float = 0.01,
    seed: int = 0,
) -> Path:
    """Write noisy copies of the templates as float32 NIfTI (RAS, identity affine) + a datalist.

    Training entries are ordered template-major (volume ``i`` has template ``i // per_template``);
    each entry carries its template as ``"template"``.

    Args:
        folder: output folder (created).
        templates, per_template, val_per_template: how many templates and volumes of each.
        shape: volume size (x, y, z).
        noise: standard deviation of the Gaussian noise (values are clipped to [0, 1]).
        seed: seeds templates and noise.

    Returns:
        The datalist path (``folder/datalist.json``).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    datalist: dict = {"training": [], "validation": [], "meta": {"dataset": "visual-word templates", "window": [-1000, 1000]}}
    for t in range(templates):
        base = template_volume(t, shape, seed)
        for split, count in (("training", per_template), ("validation", val_per_template)):
            for i in range(count):
                case = f"t{t}_{split[:3]}{i}"
                volume = np.clip(base + rng.normal(0.0, noise, base.shape), 0.0, 1.0).astype(np.float32)
                nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "images" / f"{case}.nii.gz")
                datalist[split].append({"image": f"images/{case}.nii.gz", "case_id": case, "template": t})
    path = folder / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1), encoding="utf-8")
    return path
