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

__all__ = ["template_volume", "write_template_datalist", "write_visual_word_folder"]


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


def write_visual_word_folder(
    folder: str | os.PathLike,
    classes: int = 2,
    instances: int = 3,
    patch_size: Sequence[int] = (16, 16, 8),
    val_instances: int = 0,
    seed: int = 0,
) -> Path:
    """A folder in the layout of ``dira3d visual-words``' output without its discovery: random patches (float16, in
    [0, 1]) as ``shards/<split>/class_NNNN.npy`` of shape ``(instances, 1, *patch_size)`` and ``visual_words.json``
    (a validation split with ``val_instances`` > 0). For what only the shards' layout matters to: the pretraining
    bundle's loading and its settings, throughput benchmarks.

    Returns:
        ``folder/visual_words.json``.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    patch = [int(p) for p in patch_size]
    meta = {"command": "dira3d visual-words", "classes": int(classes), "patch_size": patch, "resolutions": 1,
            "seed": int(seed), "dtype": "float16"}
    lists: dict = {"meta": meta, "training": []}
    for split, rows in (("training", instances), ("validation", val_instances)):
        if not rows:
            continue
        (folder / "shards" / split).mkdir(parents=True, exist_ok=True)
        lists[split] = []
        for label in range(classes):
            name = f"shards/{split}/class_{label:04d}.npy"
            np.save(folder / name, rng.random((rows, 1, *patch), dtype=np.float32).astype(np.float16))
            lists[split].append({"image": name, "label": label, "num_instances": rows})
    path = folder / "visual_words.json"
    path.write_text(json.dumps(lists, indent=1), encoding="utf-8")
    return path
