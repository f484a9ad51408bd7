"""How the user of a fine-tuning run sets what an error asks to change: ``dira3d finetune``'s options, or, inside
``dira3d experiment``, its config (``overrides: {width: ...}``, ``label_fractions``).

The experiment runs each fine-tuning in-process under :func:`experiment_settings`; the errors raised deep in a
run (a checkpoint of another width, an AUC undefined on the holdout) ask :func:`bundle_setting` and
:func:`label_fraction_setting` how to spell the setting, so that they name the one the user can change.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

__all__ = ["experiment_settings", "in_experiment", "bundle_setting", "label_fraction_setting"]

_IN_EXPERIMENT: ContextVar[bool] = ContextVar("_IN_EXPERIMENT", default=False)


@contextlib.contextmanager
def experiment_settings() -> Iterator[None]:
    """Within: the fine-tuning runs are ``dira3d experiment``'s, whose settings are in its config."""
    token = _IN_EXPERIMENT.set(True)
    try:
        yield
    finally:
        _IN_EXPERIMENT.reset(token)


def in_experiment() -> bool:
    """Whether the current run is one of ``dira3d experiment``'s (see :func:`experiment_settings`)."""
    return _IN_EXPERIMENT.get()


def bundle_setting(values: Mapping[str, Any], finetune: str) -> str:
    """How to set the bundle ids ``values``: ``finetune`` (the ``dira3d finetune --set`` / ``monai.bundle run`` form
    the caller wrote) outside an experiment, ``overrides: {width: 0.125}`` in the experiment config inside one."""
    if not in_experiment():
        return finetune
    shown = ", ".join(f"{key}: {value if isinstance(value, str) else json.dumps(value, separators=(', ', ': '))}"
                      for key, value in values.items())
    return f"`overrides: {{{shown}}}` in the experiment config"


def label_fraction_setting() -> str:
    """The label fraction's setting: ``--label-fraction`` (``dira3d finetune``) or the experiment config's
    ``label_fractions``."""
    return "label_fractions in the experiment config" if in_experiment() else "--label-fraction"
