"""``load_split`` returns the same entries, in the same order, as before it was made fast (2026-11-27).

The reference, ``tests/data/split_loading_reference.json``, was written by the code before that change (git 539f77c)
with ``python tests/test_split_loading_identity.py``: for four medium synthetic datalists (binary classification
with folds and an optional per-entry key, multi-label with a rare class, segmentation with ``pneumothorax`` flags and
few positives, segmentation without flags with folds and ``patient_id``), every split under several label
fractions, seeds, holdouts (shares and ``"validation"``) and folds, it records the sha256 of the returned entries
(paths relative to the datalist's folder, keys in their order) and their number, or the error's type and message.
Its 44 errors' type became ``DataError`` (a ``ValueError``) on 2026-11-28, messages unchanged: load_split's errors
about the datalist or its settings are one ``error:`` line under ``python -m monai.bundle run``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from dira3d.evaluation.datalists import load_split

REFERENCE = Path(__file__).parent / "data" / "split_loading_reference.json"
FRACTIONS = (1.0, 0.25, 0.01)
SEEDS = (0, 3)
HOLDOUTS = (0.1, 0.25, "validation")


def _entries(rng: np.random.Generator, kind: str, count: int, prefix: str, folds: int = 0) -> list[dict]:
    patients = rng.integers(0, max(2, count // 3), count)
    result = []
    for index, patient in enumerate(patients):
        entry = {"image": f"{prefix}/img{index}.png", "case_id": f"{prefix}_p{int(patient)}"}
        if kind == "binary":
            entry["label"] = int(rng.random() < 0.2)
            if entry["label"]:
                entry["diameter_mm"] = float(rng.integers(3, 30))  # on positives only: dropped by _common_keys
        elif kind == "multilabel":
            prevalence = (0.3, 0.1, 0.5, 0.004)  # class 3 rare: completes the subsets and the holdout
            entry["label"] = [float(rng.random() < p) for p in prevalence]
            entry["view"] = "Frontal"
        else:
            entry["label"] = f"{prefix}/mask{index}.png"
            if kind == "flagged":
                entry["pneumothorax"] = int(rng.random() < 0.03)
            else:
                entry["patient_id"] = f"{prefix}_subject{int(patient) // 2}"
        if folds:
            entry["fold"] = int(rng.integers(0, folds))
        result.append(entry)
    return result


def _write(root: Path) -> dict[str, Path]:
    """The four datalists under ``root``, with an empty file for every image and mask."""
    rng = np.random.default_rng(20261127)
    specs = {"binary": (1500, 5), "multilabel": (1500, 0), "flagged": (800, 0), "plain": (600, 4)}
    paths = {}
    for kind, (count, folds) in specs.items():
        content = {"training": _entries(rng, kind, count, "train", folds),
                   "validation": _entries(rng, kind, max(8, count // 10), "val"),
                   "test": _entries(rng, kind, max(8, count // 10), "test")}
        folder = root / kind
        for entries in content.values():
            for entry in entries:
                for key in ("image", "label"):
                    if isinstance(entry[key], str):
                        (folder / entry[key]).parent.mkdir(parents=True, exist_ok=True)
                        (folder / entry[key]).touch()
        paths[kind] = folder / "datalist.json"
        paths[kind].write_text(json.dumps(content), encoding="utf-8")
    return paths


def _combinations(kind: str):
    folds = {"binary": (None, 0, 3), "plain": (None, 1)}.get(kind, (None,))
    for fold in folds:
        yield "test", 1.0, 0, 0.1, fold
        yield "validation", 1.0, 0, 0.1, fold
        for split in ("train", "holdout"):
            for fraction in FRACTIONS:
                for seed in SEEDS:
                    for holdout in HOLDOUTS:
                        yield split, fraction, seed, holdout, fold


def _outcome(path: Path, split: str, fraction: float, seed: int, holdout, fold) -> dict:
    root = str(path.parent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = load_split(path, split, label_fraction=fraction, seed=seed, holdout=holdout, fold=fold)
    except Exception as err:  # noqa: BLE001  (the error is part of the outcome)
        return {"error": type(err).__name__, "message": str(err).replace(root, "<root>")}
    relative = [{k: os.path.relpath(v, root) if k in ("image", "label") and isinstance(v, str) else v
                 for k, v in e.items()} for e in entries]
    text = json.dumps(relative)  # keys in their order, entries in theirs
    return {"count": len(entries), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def outcomes(root: Path) -> dict[str, dict]:
    """``{"<kind> <split> <fraction> <seed> <holdout> <fold>": outcome}`` for every combination."""
    result = {}
    for kind, path in _write(root).items():
        for split, fraction, seed, holdout, fold in _combinations(kind):
            result[f"{kind} {split} {fraction} {seed} {holdout} {fold}"] = _outcome(path, split, fraction, seed,
                                                                                   holdout, fold)
    return result


def test_load_split_gives_the_reference_entries(tmp_path):
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    got = outcomes(tmp_path)
    assert set(got) == set(reference)
    differ = [name for name in reference if got[name] != reference[name]]
    assert not differ, f"{len(differ)} of {len(reference)} outcomes differ, e.g. {differ[:3]}: " \
                       f"{[(got[n], reference[n]) for n in differ[:2]]}"
    # the reference exercises what it should: selections, holdouts and refusals of every datalist
    assert sum("sha256" in o for o in reference.values()) > 200
    assert {name.split()[0] for name, o in reference.items() if "error" in o} >= {"binary", "plain"}


if __name__ == "__main__":  # regenerate the reference (only with the code it pins)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        data = outcomes(Path(folder))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n", encoding="ascii")
    print(f"{len(data)} outcomes, {sum('error' in o for o in data.values())} refusals -> {REFERENCE}", file=sys.stderr)


def test_datalist_paths_resolve_as_monai_joins_them(tmp_path, monkeypatch):
    """The one-step join and the per-read memory of path look-ups (``datalist_entries``) give what
    ``os.path.normpath(os.path.join(folder, value))`` and ``os.path.exists`` give, value by value."""
    from dira3d.data.datalist import datalist_entries

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").touch()
    (tmp_path / "p7").mkdir()  # a case id that names a folder there: MONAI's detection resolves it
    values = ["images/a.png", "./images/a.png", "images//a.png", "images/../images/a.png", "../x.png", "/abs/b.png",
              "images/", "", ".", "p7", "p7", "p8", "Frontal"]
    entries = [{"image": v or "x", "label": v, "case_id": c, "view": "Frontal", "n": 3, "flags": [1.0, 0.0],
                "paths": ["images/a.png", "p8"]} for v, c in zip(values, values[::-1])]
    monkeypatch.chdir(tmp_path)
    for datalist, base_dir in ((tmp_path / "dl.json", None), (Path("dl.json"), None), (Path("dl.json"), ""),
                               (Path("dl.json"), "/"), (Path("dl.json"), f"{tmp_path}/")):
        base = str(datalist.parent if base_dir is None else base_dir)

        def joined(value, always):
            result = os.path.normpath(os.path.join(base, value))
            return result if always or os.path.exists(result) else value

        got = datalist_entries(datalist, content={"training": entries}, path_keys=("image", "label"), base_dir=base_dir)
        for entry, item in zip(entries, got):
            assert list(item) == list(entry)
            assert item["image"] == joined(entry["image"], True) and item["label"] == joined(entry["label"], True)
            assert item["case_id"] == joined(entry["case_id"], False) and item["view"] == "Frontal"
            assert item["paths"] == [joined(p, False) for p in entry["paths"]]
            assert item["n"] == 3 and item["flags"] == [1.0, 0.0]
