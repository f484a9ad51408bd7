"""A datalist of the other dimensionality than the bundle's network, given to `dira3d finetune` or a task bundle's
train.json / evaluate.json run directly (found by a user walkthrough, 2026-11-28): a 2D datalist (PNGs, as `dira3d
prepare montgomery` writes them) given to a 3D bundle failed while the data were cached with `3D pretraining needs 3D
volumes`, and a 3D datalist (`dira3d prepare lits`) given to a 2D bundle failed while caching (a segmentation bundle) or
on its labels (a classification bundle: "a mask file (a segmentation datalist?)"), none naming the datalist nor the
`dira3d prepare` that fits. Now load_split (``spatial_dims``, which the bundles pass) refuses it first, in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dira3d.data.command import main as prepare_main
from dira3d.data.io import xyz_to_image
from dira3d.evaluation import load_split
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D, bundle_path
from dira3d.evaluation.finetune import main as finetune_main

FITS_2D = "one that `dira3d prepare chestxray14`, `chexpert`, `siim`, `montgomery` or `radiographs` wrote (docs/data_2d.md)"
FITS_3D = "one that `dira3d prepare` wrote for a 3D dataset (`luna16`, `lits`, `lidc`, `brats`, `pecad` or `generic`"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[int, Path]:
    """{2: montgomery_datalist.json, 3: lits_datalist.json}, written by `dira3d prepare` from official layouts."""
    root = tmp_path_factory.mktemp("dims")
    base = root / "raw_montgomery" / "MontgomerySet"
    for number in range(1, 11):
        name = f"MCUCXR_{number:04d}_{number % 2}.png"
        left, right = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
        left[10:40, 8:25], right[10:40, 35:55] = 255, 255
        for folder, array in (("CXR_png", np.full((64, 64), 40 + number, np.uint8)), ("ManualMask/leftMask", left),
                              ("ManualMask/rightMask", right)):
            (base / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(base / folder / name)
    assert prepare_main(["montgomery", "--src", str(root / "raw_montgomery"), "--dst", str(root / "montgomery"),
                         "--size", "64"]) == 0
    lits = root / "raw_lits" / "Training Batch 1"
    lits.mkdir(parents=True)
    for number in range(8):
        hu, seg = np.full((48, 40, 24), -900, np.int16), np.zeros((48, 40, 24), np.uint8)
        hu[10:30, 8:28, 4:16], seg[10:30, 8:28, 4:16] = 60, 1
        for name, array in ((f"volume-{number}.nii", hu), (f"segmentation-{number}.nii", seg)):
            image = xyz_to_image(array)
            image.SetSpacing((0.8, 0.7, 2.5))
            sitk.WriteImage(image, str(lits / name))
    assert prepare_main(["lits", "--src", str(root / "raw_lits"), "--dst", str(root / "lits"), "--train-range", "0", "5",
                         "--val-range", "6", "6", "--test-range", "7", "7"]) == 0
    return {2: root / "montgomery" / "montgomery_datalist.json", 3: root / "lits" / "lits_datalist.json"}


def _expected(datalist: Path, split: str, dims: int) -> tuple[str, str]:
    """How the error for a datalist of images of the other dimensions than a ``dims`` bundle starts, and what follows
    the image's name."""
    other = 5 - dims
    start = (f"datalist {datalist}: entry 0 of split {split!r} (image {datalist.parent}"
             + ("/images/MCUCXR_" if other == 2 else "/volumes/lits-"))
    return start, (f") is a {other}D {'volume' if other == 3 else 'image'}, but this bundle's network is {dims}D; "
                   f"pass a {dims}D datalist, {FITS_2D if dims == 2 else FITS_3D}")


@pytest.fixture
def caching_is_an_error(monkeypatch):
    """Caching a dataset fails the test: the error must come before it."""
    import dira3d.engines

    def cached(*args, **kwargs):
        raise AssertionError("the dataset was cached before the error")

    monkeypatch.setattr(dira3d.engines, "checked_task_cache_data", cached)


@pytest.mark.parametrize("bundle, dims", [("lits_liver_seg", 3), ("luna16_nodule_fpr", 3), ("montgomery_lung_seg", 2),
                                          ("chestxray14_cls", 2)])
def test_finetune_refuses_a_datalist_of_the_other_dimensions_in_one_line(prepared, tmp_path, capsys,
                                                                         caching_is_an_error, bundle, dims):
    datalist = prepared[5 - dims]
    out = tmp_path / "out"
    assert finetune_main(["--bundle", bundle, "--tiny", "--datalist", str(datalist), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dira3d finetune:")]
    assert len(lines) == 1, err
    start, then = _expected(datalist, "train", dims)
    assert lines[0].startswith(f"dira3d finetune: error: {start}") and then in lines[0], lines[0]
    assert lines[0].endswith(f"or fine-tune a {5 - dims}D bundle"), lines[0]
    assert "needs 3D volumes" not in err and "a mask file" not in err and "Traceback" not in err
    assert not out.exists()


def _bundle_run(bundle: str, tmp_path: Path, datalist: Path, *files: str) -> subprocess.CompletedProcess:
    configs = bundle_path(bundle) / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", json.dumps([str(configs / name) for name in (*files, "tiny.json")]),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(tmp_path / "run"), "--device", "cpu", "--datalist", str(datalist)]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("bundle, dims, files, split", [
    ("lits_liver_seg", 3, ("train.json",), "train"),
    ("chestxray14_cls", 2, ("train.json", "evaluate.json"), "test"),  # evaluate.json's test split: loaded first
])
def test_a_bundle_run_directly_refuses_it_in_one_line_before_caching(prepared, tmp_path, bundle, dims, files, split):
    datalist = prepared[5 - dims]
    proc = _bundle_run(bundle, tmp_path, datalist, *files)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    start, then = _expected(datalist, split, dims)
    assert errors[0].startswith(f"error: {start}") and then in errors[0], errors[0]
    assert "Traceback" not in out and "caching" not in out and "Engine run" not in out, out[-3000:]


def test_load_split_takes_a_datalist_of_its_dimensions(prepared, tmp_path):
    """The bundle's own datalist, a 2D datalist of one-slice NIfTIs (the 2D bundles read them), and no spatial_dims (a
    bundle of one's own) are not refused."""
    assert load_split(prepared[2], "train", spatial_dims=2, kind="segmentation")
    assert load_split(prepared[3], "test", spatial_dims=3, kind="segmentation")
    assert load_split(prepared[2], "train") and load_split(prepared[3], "train", kind="segmentation")
    slices = []
    for i in range(6):
        for key in ("image", "label"):
            sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.uint8)), str(tmp_path / f"{key}{i}.nii.gz"))
        slices.append({"image": f"image{i}.nii.gz", "label": f"label{i}.nii.gz", "case_id": f"p{i}"})
    path = tmp_path / "slices.json"
    path.write_text(json.dumps({"training": slices[:4], "test": slices[4:]}))
    assert len(load_split(path, "test", spatial_dims=2)) == 2
    with pytest.raises(ValueError, match=r"entry 0 of split 'test' \(image .*image4\.png\) is a 2D image, but this "
                                         r"bundle's network is 3D"):
        load_split(_renamed(path, tmp_path), "test", spatial_dims=3)


def _renamed(path: Path, root: Path) -> Path:
    """The same datalist naming PNGs (a 2D datalist for a 3D bundle)."""
    content = json.loads(path.read_text())
    for entries in content.values():
        for entry in entries:
            for key in ("image", "label"):
                png = entry[key].replace(".nii.gz", ".png")
                Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / png)
                entry[key] = png
    renamed = root / "pngs.json"
    renamed.write_text(json.dumps(content))
    return renamed


def test_every_task_bundle_passes_its_network_dimensions_to_load_split(repo_root):
    """train.json's training and holdout lists and evaluate.json's test split: 3 for the 3D bundles (their network's
    spatial_dims), 2 for the 2D ones."""
    from monai.bundle import ConfigParser

    for bundle in (*BUNDLES, *BUNDLES_2D):
        configs = repo_root / "bundles" / bundle / "configs"
        dims = 2 if bundle in BUNDLES_2D else 3
        for name, keys in (("train.json", ("train#datalist", "validate#datalist")), ("evaluate.json", ("validate#datalist",))):
            parser = ConfigParser(ConfigParser.load_config_files([str(configs / "train.json"), str(configs / name)]))
            for key in keys:
                expression = parser.get(key)
                assert "spatial_dims=" in expression, (bundle, name, key)
                reference = expression.split("spatial_dims=")[1].split(")")[0].split(",")[0].strip()
                value = int(reference) if reference.isdigit() else parser.get_parsed_content(reference.lstrip("@"))
                assert value == dims, (bundle, name, key, reference)
