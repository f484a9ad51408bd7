"""Cost of the pretraining bundle's rerun check in ``initialize`` (``dira3d.engines.exit_if_finished``).

Since dira_pretrain 0.1.33 the check compares the run's data with the ones ``last.pt`` records: ``data_source`` (a
real path) and, for a ``last.pt`` that has otherwise finished on that ``data_source``, the number of classes, counted
by the bundle's ``count_classes`` (train.json: the training list of the datalist, each image looked up, none read;
visual_words.json: the visual-word manifest, each shard looked up); ``last.pt`` is read memory-mapped. This times each part on synthetic data of a realistic size: a datalist of ``--volumes``
volumes (empty image files), a complete visual-word manifest of ``--classes`` classes (empty shard files), and a
``last.pt`` of a full-width (1.0) 3D U-Net encoder with its Adam moments, at its last epoch. Median of ``--repeats``
calls, after one warm-up call.

    python benchmarks/rerun_check.py                          # 900 volumes, 5,000 visual words
    python benchmarks/rerun_check.py --volumes 100 --classes 100 --repeats 3 --width 0.125   # quick

The data is written under a temporary folder, removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def write_datalist(root: Path, volumes: int) -> Path:
    (root / "volumes").mkdir()
    entries = []
    for i in range(volumes):
        (root / "volumes" / f"vol{i:05d}.nii.gz").write_bytes(b"")
        entries.append({"image": f"vol{i:05d}.nii.gz", "case_id": f"c{i}"})
    cut = max(1, volumes * 9 // 10)
    path = root / "volumes" / "pretrain_datalist.json"
    path.write_text(json.dumps({"training": entries[:cut], "validation": entries[cut:]}))
    return path


def write_manifest(root: Path, classes: int) -> Path:
    from dira3d.visual_words.writer import new_manifest

    folder = root / "visual_words"
    folder.mkdir()
    listed = []
    for i in range(classes):
        for split in ("t", "v"):
            (folder / f"{split}{i}.npy").write_bytes(b"")
        listed.append({"index": i, "status": "done", "centre": [40, 60, 30],
                       "reference": {"case_id": f"c{i}", "centre": [40, 60, 30]},
                       "shards": {"training": f"t{i}.npy", "validation": f"v{i}.npy"},
                       "rows": {"training": 11, "validation": 3}})
    manifest = {**new_manifest(0, {}, "pretrain_datalist.json", {}, {}), "status": "complete", "classes": listed}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def write_last(root: Path, data: dict, width: float = 1.0) -> Path:
    import torch

    from dira3d.networks import UNet
    from dira3d.utils.checkpoint import atomic_save

    weights = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=width).encoder.state_dict()
    moments = {i: {"exp_avg": v.float().clone(), "exp_avg_sq": v.float().clone(), "step": torch.tensor(1.0)}
               for i, v in enumerate(weights.values()) if v.is_floating_point()}
    meta = {"spatial_dims": 3, "in_channels": 1, "dis_mode": "visual_words", "width": width, **data}
    folder = root / "models"
    atomic_save({"encoder": weights, "decoder": {}, "optimizer_g": {"state": moments, "param_groups": []},
                 "trainer": {"epoch": 200, "iteration": 20000, "epoch_iteration": 0}, "meta": meta},
                folder / "last.pt")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=900)
    parser.add_argument("--classes", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--width", type=float, default=1.0, help="the encoder's width in last.pt (1.0: the default model)")
    args = parser.parse_args(argv)
    from dira3d.engines import load_datalist, with_image_labels
    from dira3d.engines.finished import finished_note
    from dira3d.visual_words import load_visual_word_classes

    root = Path(tempfile.mkdtemp(prefix="dira3d_rerun_check_"))
    try:
        datalist = write_datalist(root, args.volumes)
        words = write_manifest(root, args.classes)
        data = {"data_source": os.path.realpath(datalist), "num_classes": len(load_datalist(datalist, "training"))}
        models = write_last(root, data, args.width)
        if not finished_note(models, 200, data=data):  # the timed check must be the one of a finished run
            raise SystemExit("finished_note did not find the synthetic run finished: the benchmark times the wrong path")
        size = (words / "manifest.json").stat().st_size / 2**20
        rows = [
            (f"count_classes, train.json: datalist of {args.volumes} volumes",
             lambda: len(with_image_labels(load_datalist(datalist, "training")))),
            (f"count_classes, visual_words.json: manifest of {args.classes} classes ({size:.1f} MiB)",
             lambda: len(load_visual_word_classes(words, "training"))),
            ("data_source (realpath)", lambda: os.path.realpath(datalist)),
            (f"finished_note: last.pt of {(models / 'last.pt').stat().st_size / 2**20:.0f} MiB, memory-mapped",
             lambda: finished_note(models, 200, data=data)),
        ]
        for name, call in rows:
            print(f"{name}: {median_ms(call, args.repeats):.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
