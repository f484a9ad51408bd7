"""Writing what a ``dira3d prepare`` ends with: JSON files written atomically (:func:`write_json`) and MONAI
decathlon-style datalists with paths relative to their own folder (:func:`write_datalist`), with the warning about an
empty list (its advice: the prepare's own split options, else :data:`SPLIT_ADVICE`) or the note about one the user
asked to leave empty, and the warning about a one-entry 'validation' list (:func:`warn_one_validation`).

Importable from :mod:`dira3d.data.runner` too. Torch-free.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.data.end_messages import record_datalist
from dira3d.utils.atomic import atomic_write_text

__all__ = ["SPLIT_ADVICE", "write_json", "write_datalist", "warn_one_validation"]


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + ``os.replace``)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


# a datalist written without split_advice: no option named, as the prepare commands' split options differ (each
# prepare passes its own; naming LUNA16's --train-subsets for every dataset sent users to options they do not have)
SPLIT_ADVICE = "check the split options of its `dira3d prepare <dataset>` (see its --help) against the cases found"


# what fine-tuning does without a 'validation' list (every task bundle's holdout default 0.1; holdout=validation opts in)
_UNREAD_BY_FINETUNING = ("fine-tuning does not need the 'validation' list: `dira3d finetune` early-stops on 0.1 of the "
                         "training patients, which it holds out itself (only --set holdout=validation reads that list)")


def write_datalist(path: str | os.PathLike, splits: dict[str, list[dict]], meta: dict,
                   split_advice: str | None = None, asked_empty: Mapping[str, str] | None = None) -> Path:
    """Write a MONAI decathlon-style datalist with paths relative to its own folder.

    Args:
        path: the JSON file.
        splits: ``{"training": [entry, ...], ...}``; an entry's ``"image"`` and a string/path
            ``"label"`` are made relative to ``path``'s folder (absolute or ``Path`` values).
        meta: stored as the top-level ``"meta"`` dict.
        split_advice: what the warning about an empty training / validation / test list says to check
            (the dataset's own split options; every prepare passes its own); default: a pointer to the prepare's
            --help, naming no option (:data:`SPLIT_ADVICE`). An empty
            'validation' list of a datalist with labels is said first to be no loss for fine-tuning
            (:data:`_UNREAD_BY_FINETUNING`): the task bundles hold out their own patients.
        asked_empty: the lists the user asked to leave empty, each with the setting that asked and what the note
            adds (``{"validation": "--val-fraction 0"}``): such a list, empty, gets a ``note`` line, not the warning.
    """
    path = Path(path)
    base = path.parent.resolve()

    def rel(value: Any) -> Any:
        if isinstance(value, Path) or (isinstance(value, str) and os.path.isabs(value)):
            return Path(os.path.relpath(Path(value).resolve(), base)).as_posix()
        return value

    out: dict[str, Any] = {}
    for split, entries in splits.items():
        out[split] = [{k: (rel(v) if k in ("image", "label") else v) for k, v in e.items()} for e in entries]
    out["meta"] = dict(meta)
    empty = [split for split in ("training", "validation", "test") if split in splits and not splits[split]]
    labelled = any("label" in e for entries in splits.values() for e in entries)
    asked = {split: why for split, why in (asked_empty or {}).items() if split in empty}  # e.g. --val-fraction 0
    empty = [split for split in empty if split not in asked]

    def lists(names: Sequence[str]) -> str:
        return f"{', '.join(repr(s) for s in names)} list{'s are' if len(names) > 1 else ' is'} empty"

    if asked:  # what the user asked for: no rerun advice
        print(f"note {path.name}: its {lists(list(asked))}, as asked: {'; '.join(dict.fromkeys(asked.values()))}",
              file=sys.stderr)
    if empty:  # e.g. LUNA16's default test subsets 7-9 not downloaded: the fine-tuning test would fail much later
        # a task datalist's 'validation' list: fine-tuning holds out its own patients, so that list is no loss there
        unread = f"; {_UNREAD_BY_FINETUNING}" if labelled and "validation" in empty else ""
        print(f"WARNING {path.name}: its {lists(empty)}: no prepared case went there{unread}; "
              f"{split_advice or SPLIT_ADVICE}", file=sys.stderr)
    # dira3d prepare: named at the end, with the next step
    record_datalist(path, any("label" in e for e in splits.get("training", [])))
    return write_json(path, out)


def warn_one_validation(path: str | os.PathLike, splits: Mapping[str, list], needs: str, option: str = "--val-fraction",
                        item: str = "volume", written: str = "volumes") -> None:
    """Warn (stderr) when the ``'validation'`` list of the datalist ``path`` just written holds one entry, which
    what ``needs`` names refuses later (Barlow Twins standardises over the validation batch, visual-word validation
    words pair two volumes): e.g. a default ``--val-fraction`` 0.1 of a few patients. ``needs``: what needs 2 or more,
    with its verb (``"Barlow Twins pretraining ... needs"``); ``option``: the prepare option that fills the list;
    ``item`` / ``written``: what an entry is and what the rerun keeps."""
    if len(splits.get("validation") or []) == 1:
        print(f"WARNING {Path(path).name}: its 'validation' list holds 1 {item}; {needs} 2 or more: rerun with a "
              f"larger {option} (the {written} written are kept)", file=sys.stderr)
