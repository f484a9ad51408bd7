"""Bundle overrides checked against the configs they override (MONAI adds an unknown id silently)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_overrides"]


def check_overrides(configs: Iterable[str | os.PathLike], overrides: Mapping[str, Any], where: str = "override") -> None:
    """Refuse override ids (``#``-nested too) that no config in ``configs`` defines.

    A typo (``max_epoch``) would otherwise train with the default.

    Args:
        configs: the bundle config files the overrides apply to (missing files are left out).
        overrides: ``{id: value}``.
        where: how the overrides are named in the error (e.g. ``"--override"``).

    Raises:
        ValueError: names every unknown id, the closest defined one, and the config files.
    """
    from monai.bundle import ConfigParser

    files = [Path(c) for c in configs if Path(c).is_file()]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    unknown = [key for key in overrides if key not in parser]
    if unknown:
        close = {k: difflib.get_close_matches(k, list(parser.config), n=1) for k in unknown}
        hints = "; ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in close.items())
        folder = files[0].parent.parent if files else "the bundle"
        raise ValueError(f"{where}: no setting {hints} in {', '.join(f.name for f in files)} of {folder}; fix or remove it")
