"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package lists which names it re-exports from which of its modules; a name is imported on first
use. ``import dira3d.data`` (the engine does, for ``DataError``) and ``import dira3d.evaluation``
(the bundles' configs do) then load neither SimpleITK nor scikit-learn, which training, inference
and the GPU benchmarks do not need (tests/test_import_footprint.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, namespace: dict[str, Any], exports: Mapping[str, tuple[str, ...]],
                 submodules: bool = False) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``exports`` on first use.

    Args:
        package: the package's ``__name__``.
        namespace: the package's ``globals()``; a resolved name is stored there (looked up once).
        exports: module path → the names it provides.
        submodules: also resolve ``package.<name>`` submodules as attributes (configs that write
            ``$dira3d.evaluation.transforms.NormalizeMRd`` after only ``import dira3d.evaluation``).

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package.
    """
    owner = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in owner:
            if submodules:
                try:
                    return importlib.import_module(f"{package}.{name}")
                except ModuleNotFoundError as err:
                    if err.name != f"{package}.{name}":
                        raise  # the submodule exists but needs something missing: say what
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(owner[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(owner))

    return __getattr__, __dir__
