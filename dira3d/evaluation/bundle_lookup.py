"""The repository's task bundles by name: :data:`BUNDLES` (3D), :data:`BUNDLES_2D` (chest X-rays), the folder of a
bundle given its name or path (:func:`bundle_path`, the one resolution rule of every command that takes ``--bundle``)
and the settings of its ``configs/tiny.json`` (:func:`tiny_settings`).

Light on purpose (no MONAI, no torch): importable from :mod:`dira3d.evaluation.finetune`, where these names are
also exported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["BUNDLES", "BUNDLES_2D", "bundle_path", "tiny_settings"]

BUNDLES = ("luna16_nodule_fpr", "pecad_embolism_fpr", "lidc_nodule_seg", "lits_liver_seg", "brats_tumor_seg")
BUNDLES_2D = ("chestxray14_cls", "chexpert_cls", "siim_pneumothorax_seg", "montgomery_lung_seg")  # chest X-rays, docs/2d.md
_REPO_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def bundle_path(bundle: str | os.PathLike, config: str = "train.json") -> Path:
    """Folder of a bundle given its name (one of :data:`BUNDLES` or :data:`BUNDLES_2D`) or its path.

    Args:
        bundle: a bundle folder, or the name of one of the repository's bundles.
        config: the config the caller needs in ``configs/`` (``"inference.json"`` for exports).

    Raises:
        FileNotFoundError: no such bundle folder, or it has no ``configs/<config>``; the message
            lists the valid names.
    """
    path = Path(bundle)
    if not path.is_dir() and str(bundle) in BUNDLES + BUNDLES_2D:
        path = _REPO_BUNDLES / str(bundle)
    if not (path / "configs" / config).is_file():
        what = f"{path / 'configs' / config} does not exist" if path.is_dir() else \
            f"the folder {path} does not exist and it is not a bundle name"
        raise FileNotFoundError(
            f"bundle {str(bundle)!r} not found: {what}; "
            f"use one of {', '.join(BUNDLES + BUNDLES_2D)} or the path of a bundle folder"
        )
    return path


def tiny_settings(bundle: str | os.PathLike, keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` in the bundle's ``configs/tiny.json`` (what ``dira3d finetune --tiny``
    trains with); keys it lacks, or a bundle without one, give nothing."""
    try:
        tiny = json.loads((bundle_path(bundle) / "configs" / "tiny.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: tiny[k] for k in keys if k in tiny}
