"""The lines under ``dira3d experiment``'s ``table.md`` about what a mean AUC was taken over (multi-label classifiers).

Each run's ``metrics.json`` records the positives of each class in its training and test splits (``splits``). A class
of one value in the test split has no AUC and is left out of the run's mean AUC, and a class of no positive in the
training split was never shown to the classifier: ``dira3d finetune`` warns about both while the runs go, once per
process, but the table was built without a word about them, and a rerun that had nothing to run said nothing at all.
:func:`auc_class_notes` says it under the table, from the runs' records.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["auc_class_notes"]

_LISTED = 10  # runs named in a note, then "and N more"


def _class_names(datalist: str | Path, count: int) -> list[str]:
    """The datalist's ``meta.labels`` (as ``dira3d prepare`` writes them), else ``class k``."""
    try:
        names = json.loads(Path(datalist).read_text(encoding="utf-8")).get("meta", {}).get("labels") or []
    except Exception:  # noqa: BLE001 - the names only: the numbers come from the runs' records
        names = []
    names = [str(n) for n in names][:count] if isinstance(names, list) else []
    return names + [f"class {k}" for k in range(len(names), count)]


def auc_class_notes(datalist: str | Path, runs: list[tuple[str, str]]) -> str:
    """The notes for ``runs`` (``(name, run folder)``, e.g. ``("dira @ 5 % labels, seed 0", ".../runs/dira_lf0.05_seed0")``):
    the classes that the test split gives one value only (left out of the mean AUC; the same for every run of one
    test split, so named once per split), and the runs that trained without a positive of some class. '' when neither
    happened, or the runs are not of a multi-label classifier (``splits`` ``positive`` is a list)."""
    single: dict[str, list[str]] = {}  # message -> runs
    untrained: list[str] = []
    for name, folder in runs:
        try:
            splits = json.loads((Path(folder) / "metrics.json").read_text(encoding="utf-8"))["splits"]
            test, train = splits.get("test") or {}, splits.get("train") or {}
        except Exception:  # noqa: BLE001 - a run without such a record (older, or not a classifier): nothing to say
            continue
        positive, cases = test.get("positive"), test.get("cases")
        if isinstance(positive, list) and isinstance(cases, int):
            names = _class_names(datalist, len(positive))
            left = [f"{names[k]} ({'all positive' if p == cases else 'all negative'})"
                    for k, p in enumerate(positive) if p in (0, cases)]
            if left:
                single.setdefault(f"Mean AUC over {len(positive) - len(left)} of {len(positive)} classes: the test split "
                                  f"({cases} images) holds {', '.join(left)}, one value only: no AUC, left out of the "
                                  "mean", []).append(name)
        positive = train.get("positive")
        if isinstance(positive, list):
            names = _class_names(datalist, len(positive))
            absent = [names[k] for k, p in enumerate(positive) if p == 0]
            if absent:
                untrained.append(f"{name} ({', '.join(absent)})")
    note = ""
    for message, named in single.items():
        where = "" if len(single) == 1 else f" ({_listed(named)})"
        note += f"\n{message}{where}; not comparable with a mean over all the classes.\n"
    if untrained:
        note += (f"\nTrained without a positive of some class (the classifier learned to call it absent, so its test AUC "
                 f"says nothing of the initialisation; use a larger label fraction): {_listed(untrained)}.\n")
    return note


def _listed(runs: list[str]) -> str:
    return "; ".join(runs[:_LISTED]) + (f"; and {len(runs) - _LISTED} more" if len(runs) > _LISTED else "")
