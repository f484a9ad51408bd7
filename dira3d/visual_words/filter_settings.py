"""The ``--lung-filter`` / ``--body-filter`` settings of ``dira3d visual-words`` resolved for a datalist: ``auto``
follows the modality ``dira3d prepare`` recorded (:func:`datalist_modality`): the lung filter is off for MR
(:func:`resolve_lung_filter`), the body filter on for a user's own CT scans (:func:`resolve_body_filter`).

These names are also importable from :mod:`dira3d.visual_words.discover`, and they log there (the logger
``dira3d.visual_words.discover``), as part of the discovery's log.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["LUNG_FILTER_CHOICES", "datalist_modality", "resolve_lung_filter", "resolve_body_filter"]

logger = logging.getLogger("dira3d.visual_words.discover")  # the discovery's log, which users and tests filter on

LUNG_FILTER_CHOICES = ("auto", "on", "off")


def datalist_modality(datalist: str | os.PathLike) -> str | None:
    """The ``meta.modality`` a ``dira3d prepare`` datalist records (``"ct"`` or ``"mr"``; ``None`` when absent)."""
    try:
        meta = json.loads(Path(datalist).read_text(encoding="utf-8")).get("meta")
    except (OSError, ValueError, AttributeError):
        return None  # read_datalist reports a missing or broken file with its own message
    modality = meta.get("modality") if isinstance(meta, dict) else None
    return str(modality).lower() if modality else None


def resolve_lung_filter(lung_filter: str, datalist: str | os.PathLike) -> str:
    """``"on"`` or ``"off"``: ``auto`` is off for a datalist prepared as MR (``meta.modality`` ``mr``), whose
    [0, 1] intensities are percentiles, not a HU window: TransVW's "mostly lung" rule (at most
    ``max_dense_fraction`` at or above ``dense_hu``) would then only reject the patches holding the brightest
    tissue (an enhancing lesion, fat). On otherwise (CT, or no modality recorded).

    Raises:
        ValueError: an unknown value.
    """
    if lung_filter not in LUNG_FILTER_CHOICES:
        raise ValueError(f"lung_filter must be one of {LUNG_FILTER_CHOICES}, got {lung_filter!r} (--lung-filter)")
    if lung_filter != "auto":
        return lung_filter
    if datalist_modality(datalist) == "mr":
        logger.info("%s was prepared as MR (meta.modality 'mr'): the lung filter (a CT rule in HU: --dense-hu, "
                    "--max-dense-fraction) is off; --lung-filter on applies it anyway", datalist)
        return "off"
    return "on"


def resolve_body_filter(body_filter: str, lung_filter: str, datalist: str | os.PathLike) -> str:
    """``"on"`` or ``"off"``: ``auto`` is on for a datalist prepared as CT by ``dira3d prepare generic`` (``meta.modality``
    ``ct``: a user's own scans, whose air around the patient passes the lung rule) while the lung filter is on; off
    otherwise, as TransVW has no such rule (LUNA16's 100-voxel borders keep patches mostly inside the body)."""
    if body_filter not in LUNG_FILTER_CHOICES:
        raise ValueError(f"body_filter must be one of {LUNG_FILTER_CHOICES}, got {body_filter!r} (--body-filter)")
    if body_filter != "auto":
        return body_filter
    return "on" if lung_filter == "on" and datalist_modality(datalist) == "ct" else "off"
