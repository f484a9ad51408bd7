"""A new user's plausible mistakes with `dira3d finetune` (docs/finetuning.md walkthrough, session 23): a datalist of
another task or of images only, and a --pretrained file that is not there, are refused in one line before any volume
is cached (they failed in MONAI's tracebacks while caching, or after caching the whole dataset)."""

from __future__ import annotations

import json

import pytest

from dira3d.evaluation import load_split
from dira3d.evaluation.finetune import main as finetune_main


def _datalist(tmp_path, entries: list[dict], name: str = "dl.json"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                (tmp_path / entry[key]).write_bytes(b"")
    path = tmp_path / name
    path.write_text(json.dumps({"training": entries[:-2], "test": entries[-2:]}))
    return path


def _images_only(tmp_path):  # what `dira3d prepare luna16` writes as pretrain_datalist.json
    return _datalist(tmp_path, [{"image": f"v{i}.nii.gz", "case_id": f"p{i}"} for i in range(8)], "pretrain_datalist.json")


def _classes(tmp_path):  # ncc_datalist.json
    return _datalist(tmp_path, [{"image": f"c{i}.nii.gz", "label": i % 2, "case_id": f"p{i // 2}"} for i in range(12)])


def _masks(tmp_path):
    return _datalist(tmp_path, [{"image": f"v{i}.nii.gz", "label": f"m{i}.nii.gz", "case_id": f"p{i}"} for i in range(8)])


@pytest.mark.parametrize("kind", [None, "classification", "segmentation"])
def test_load_split_refuses_entries_without_a_label(tmp_path, kind):
    path = _images_only(tmp_path)
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=rf"datalist {path}: entry 0 of split '{split}' \(\d other entr(y|ies) of it "
                                             rf"too\) \(image {tmp_path / 'v'}\d\.nii\.gz\) has no 'label'"):
            load_split(path, split, kind=kind)


def test_load_split_refuses_labels_of_the_other_kind(tmp_path):
    classes = _classes(tmp_path / "c")
    masks = _masks(tmp_path / "m")
    with pytest.raises(ValueError, match=r"has label \d, a class \(a classification datalist\?\), but this segmentation "
                                         r"bundle takes a mask file per entry; pass the datalist `dira3d prepare` wrote"):
        load_split(classes, "test", kind="segmentation")
    with pytest.raises(ValueError, match=r"has label '.*m6\.nii\.gz', a mask file \(a segmentation datalist\?\), but "
                                         r"this classification bundle takes a class per entry"):
        load_split(masks, "test", kind="classification")
    assert len(load_split(classes, "test", kind="classification")) == 2
    assert len(load_split(masks, "test", kind="segmentation")) == 2
    assert len(load_split(masks, "test")) == 2  # no kind: not checked


@pytest.fixture
def caching_is_an_error(monkeypatch):
    """Caching a dataset fails the test: the errors below must come before it."""
    import dira3d.engines

    def cached(*args, **kwargs):
        raise AssertionError("the dataset was cached before the error")

    monkeypatch.setattr(dira3d.engines, "checked_task_cache_data", cached)


@pytest.mark.parametrize("bundle, make, expected", [
    ("lits_liver_seg", _classes, "has label 0, a class (a classification datalist?), but this segmentation bundle"),
    ("luna16_nodule_fpr", _masks, "a mask file (a segmentation datalist?), but this classification bundle"),
    ("luna16_nodule_fpr", _images_only, "has no 'label': a datalist of images only (for pretraining) cannot fine-tune"),
])
def test_finetune_refuses_a_datalist_of_another_task_in_one_line(tmp_path, capsys, caching_is_an_error, bundle, make,
                                                                  expected):
    path = make(tmp_path)
    out = tmp_path / "out"
    assert finetune_main(["--bundle", bundle, "--tiny", "--datalist", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dira3d finetune:")]
    assert len(lines) == 1 and lines[0].startswith(f"dira3d finetune: error: datalist {path}: entry 0 of split 'train'"), err
    assert expected in lines[0], lines[0]
    assert "Failed to instantiate" not in err and "KeyError" not in err and "TypeError" not in err
    assert not out.exists()


def test_finetune_refuses_a_missing_pretrained_file_before_caching(tmp_path, capsys, caching_is_an_error):
    from test_bundles_finetune import make_classification

    path = make_classification(tmp_path / "data", "ncc.json", (16, 16, 8), folds=False)
    missing = tmp_path / "runs" / "dira_pretrain" / "models" / "best.pt"
    assert finetune_main(["--bundle", "luna16_nodule_fpr", "--tiny", "--datalist", str(path), "--pretrained",
                          str(missing), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"dira3d finetune: error: pretrained checkpoint {missing} does not exist" in err, err


def test_finetune_names_a_pretrained_folder_and_its_checkpoints(tmp_path, capsys, caching_is_an_error):
    """--pretrained runs/dira_pretrain/models (the folder, not best.pt): said so, with the checkpoints in it, before
    caching; it used to say the folder 'does not exist'."""
    from test_bundles_finetune import make_classification

    path = make_classification(tmp_path / "data", "ncc.json", (16, 16, 8), folds=False)
    models = tmp_path / "runs" / "dira_pretrain" / "models"
    models.mkdir(parents=True)
    (models / "best.pt").write_bytes(b"")
    (models / "last.pt").write_bytes(b"")
    assert finetune_main(["--bundle", "luna16_nodule_fpr", "--tiny", "--datalist", str(path), "--pretrained",
                          str(models), "--output-dir", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d finetune:")]
    assert len(lines) == 1, lines
    assert f"pretrained checkpoint {models} is a folder, not a checkpoint file" in lines[0], lines[0]
    assert f"{models / 'best.pt'}, {models / 'last.pt'}" in lines[0] and "does not exist" not in lines[0], lines[0]


def test_inference_without_tiny_json_for_a_tiny_model_is_one_error_line(repo_root, tmp_path):
    """The docs' batch example (inference.json alone) run on the README's `dira3d finetune ... --tiny` model: the error
    named the settings that fit (--width 0.125, tiny.json) at the end of about 100 lines of tracebacks, ending with
    MONAI's `Failed to evaluate ConfigExpression`; now it is the last line, `error: <model.pt>: ...`, exit 1."""
    import os
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np
    import torch

    from dira3d.evaluation import build_task_network
    from dira3d.utils import atomic_save

    with torch.random.fork_rng():
        torch.manual_seed(0)
        atomic_save(build_task_network("segmentation", 3, 1, 1, 0.125, "").state_dict(), tmp_path / "models" / "model.pt")
    scan = tmp_path / "scan.nii.gz"  # a raw CT in HU, air included
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(-1000, 400, (24, 24, 12)).astype(np.float32), np.eye(4)),
             str(scan))
    configs = repo_root / "bundles" / "lits_liver_seg" / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(configs.parent), "--ckpt_dir", str(tmp_path / "models"), "--device", "cpu",
           "--output_dir", str(tmp_path / "out"), "--image", str(scan)]
    proc = subprocess.run(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'models' / 'model.pt'}: does not fit this bundle's network: "), last
    assert "the weights fit --width 0.125" in last and "tiny.json" in last, last
    assert "Traceback" not in proc.stderr + proc.stdout and "Failed to evaluate" not in proc.stderr, proc.stderr[-3000:]
