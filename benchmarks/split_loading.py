"""Wall time of ``dira3d.evaluation.load_split`` on a CheXpert-sized datalist (223,414 training entries).

Writes a synthetic multi-label datalist shaped as ``dira3d prepare chexpert`` writes it (``image``, ``case_id`` =
the patient, five float labels, ``view``; about 3.5 images per patient, a ``validation`` list of other patients
and a small ``test`` list) and, since ``load_split`` checks that the images of the split it returns exist, an empty
file for every image. Then times ``load_split`` for each split the bundles load (``train`` and ``holdout`` at
train.json's start, ``test`` in evaluate.json), at label fractions 1.0 and 0.01: wall time and the process's CPU
time (steadier on a shared machine).

    python benchmarks/split_loading.py                   # 223,414 entries (a minute or two to write the files)
    python benchmarks/split_loading.py --entries 20000   # quicker
    python benchmarks/split_loading.py --profile         # cProfile of each call, top 12 by cumulative time

The data is written under ``--root`` (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_datalist(root: Path, entries: int, seed: int = 0, files: bool = True) -> Path:
    """A CheXpert-like datalist with ``entries`` training entries under ``root`` (and empty image files)."""
    rng = np.random.default_rng(seed)
    patients = max(2, int(entries / 3.46))
    of_patient = np.sort(rng.integers(0, patients, entries))
    prevalence = np.array([0.15, 0.12, 0.07, 0.08, 0.39])

    def entry(index: int, patient: int, split: str) -> dict:
        label = (rng.random(5) < prevalence).astype(float).tolist()
        return {"image": f"images/{split}/patient{patient:06d}/view{index}_frontal.png",
                "case_id": f"patient{patient:06d}", "label": label, "view": "Frontal"}

    training = [entry(i, int(p), "train") for i, p in enumerate(of_patient)]
    validation = [entry(i, patients + p, "train") for i, p in enumerate(range(max(2, entries // 50)))]
    test = [entry(i, 10 * patients + p, "valid") for i, p in enumerate(range(234))]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "chexpert_datalist.json"
    path.write_text(json.dumps({"training": training, "validation": validation, "test": test,
                                "meta": {"dataset": "chexpert", "labels": ["a", "b", "c", "d", "e"]}}), encoding="utf-8")
    if files:
        for item in training + validation + test:
            image = root / item["image"]
            image.parent.mkdir(parents=True, exist_ok=True)
            image.touch()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=223_414)
    parser.add_argument("--root", type=Path, default=None, help="folder for the data (kept); default: a temporary one")
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary of each call")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.01])
    args = parser.parse_args(argv)

    importlib.import_module("dira3d.evaluation.metrics")  # MONAI: the bundle has imported it before load_split runs
    from dira3d.evaluation import load_split

    root = args.root or Path(tempfile.mkdtemp(prefix="split_loading_"))
    try:
        datalist = root / "chexpert_datalist.json"
        if not datalist.exists():
            start = time.perf_counter()
            write_datalist(root, args.entries)
            print(f"wrote {args.entries} entries and their files under {root} in {time.perf_counter() - start:.1f} s")
        for fraction in args.fractions:
            for split in ("train", "holdout", "test"):
                profiler = cProfile.Profile() if args.profile else None
                start, cpu = time.perf_counter(), time.process_time()
                if profiler:
                    profiler.enable()
                result = load_split(datalist, split, label_fraction=fraction, seed=0, holdout=0.1, num_labels=5)
                if profiler:
                    profiler.disable()
                print(f"load_split({split!r}, label_fraction={fraction:g}): {len(result)} entries in "
                      f"{time.perf_counter() - start:.2f} s (CPU {time.process_time() - cpu:.2f} s)")
                if profiler:
                    pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(12)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
