"""A bundle's start with the memory cache, and with ``cache_dir`` on a first and a second start.

Writes synthetic CTs (float32 NIfTI, gzip, values in [0, 1] with a bright ellipsoid as the mask) in the layout of
``dira3d prepare lits`` and builds ``lits_liver_seg``'s training and validation datasets from its ``train.json``:

- memory: the ``CacheDataset`` s filled (what every start pays without ``cache_dir``);
- disk, first start: the datasets built (the disk check) and every entry read once (the first epoch writes the files);
- disk, second start (a restart or a resume): the same, the files read back.

Each is timed up to one pass over every entry (the random crop included), so the three are comparable.

Wall time and process CPU time (steadier on a shared machine) of each, and the size of the cache folder.

    python benchmarks/disk_cache.py                      # 16 volumes of 256 x 256 x 96
    python benchmarks/disk_cache.py --volumes 8 --shape 128 128 64
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_cts(root: Path, count: int, shape: tuple[int, ...]) -> Path:
    rng = np.random.default_rng(0)
    (root / "vols").mkdir(parents=True)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij", sparse=True)
    mask = sum(g**2 for g in grid) <= 0.25
    entries = []
    for i in range(count):
        image = np.clip(0.3 + 0.05 * rng.standard_normal(shape, dtype=np.float32), 0, 1)
        image[mask] = 0.8
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "vols" / f"ct{i}.nii.gz"))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), str(root / "vols" / f"ct{i}_seg.nii.gz"))
        entries.append({"image": f"vols/ct{i}.nii.gz", "label": f"vols/ct{i}_seg.nii.gz", "case_id": f"ct{i}"})
    (root / "lits.json").write_text(json.dumps({"training": entries, "test": [], "meta": {}}))
    return root / "lits.json"


def datasets(datalist: Path, **settings):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "lits_liver_seg" / "configs" / "train.json"))
    parser.update({"datalist": str(datalist), "num_workers": 0, **settings})
    parser.parse(True)
    return parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset")


def timed(label: str, run) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    print(f"{label:<28} wall {time.perf_counter() - wall:7.2f} s   CPU {time.process_time() - cpu:7.2f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 96])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="dira3d_disk_cache_"))
    try:
        datalist = write_cts(root, args.volumes, tuple(args.shape))
        cache = root / "cache"
        print(f"{args.volumes} CTs of {tuple(args.shape)}, lits_liver_seg train.json, num_workers 0")

        def start_and_one_pass(**settings):
            for dataset in datasets(datalist, **settings):
                for i in range(len(dataset)):
                    dataset[i]

        timed("memory (every start)", start_and_one_pass)
        timed("disk, first start", lambda: start_and_one_pass(cache_dir=str(cache)))
        timed("disk, second start", lambda: start_and_one_pass(cache_dir=str(cache)))
        size = sum(p.stat().st_size for p in cache.glob("*.pt"))
        print(f"cache_dir: {len(list(cache.glob('*.pt')))} files, {size / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
