"""The pluggable discrimination branches of ``dira3d pretrain`` on datalists that ``dira3d prepare`` writes (the
end-to-end walk of session 28: synthetic raw data in the official layout -> ``dira3d prepare`` -> the documented
commands; every branch trained through dis -> +res -> +adv and fine-tuned with its encoder loaded).

- A ``validation`` split too small for Barlow Twins (``dira3d prepare chestxray14``'s default ``--val-fraction`` 0.1
  of a few patients holds one image) was refused when training started: after the training and validation images
  were cached, with ignite's traceback above the ``error:`` line. ``initialize`` now refuses it
  (:func:`dira3d.engines.check_validation_size`), before any data is cached, in the one line.
- Under ``--tiny`` (2 iterations an epoch) every validation gave the same discrimination output for each volume:
  in eval mode BatchNorm normalises with running statistics still near their starting values, so Barlow Twins'
  ``val_loss_dis`` was proj_dim (15.9999 for 16) whatever the weights, visual words' ln(num_classes), and
  ``best.pt`` was picked on that without a word. The evaluator now says so, once.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dira3d.cli import main as cli_main
from dira3d.data.command import main as prepare_main
from dira3d.engines import build_dis_loss, check_validation_size
from dira3d.engines.command import main as pretrain_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImageSpacing[x", "y]"]


def write_chestxray14_raw(root: Path, count: int = 10, test: int = 2) -> Path:
    """The NIH layout (``images_00N/images/*.png``, the data entry CSV, the official split lists): one image a
    patient, two bright 'lungs' at varying places over noise."""
    rng = np.random.default_rng(0)
    rows = []
    yy, xx = np.mgrid[:64, :64]
    for i in range(count):
        name = f"{i + 1:08d}_000.png"
        folder = root / f"images_00{1 + i % 2}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        image = 60 + 80 * np.exp(-((xx - 20 - rng.integers(0, 10)) ** 2 + (yy - 32) ** 2) / 150.0)
        image += 80 * np.exp(-((xx - 44) ** 2 + (yy - 30 - rng.integers(0, 10)) ** 2) / 150.0)
        Image.fromarray(np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)).save(folder / name)
        rows.append([name, ("No Finding", "Effusion", "Mass|Nodule")[i % 3], 0, i + 1, 50, "M", "PA", 64, 64, 0.14, 0.14])
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIH_HEADER)
        writer.writerows(rows)
    (root / "train_val_list.txt").write_text("\n".join(r[0] for r in rows[:-test]) + "\n")
    (root / "test_list.txt").write_text("\n".join(r[0] for r in rows[-test:]) + "\n")
    return root


def test_barlow_with_one_validation_image_refused_in_initialize_before_caching(tmp_path, capfd):
    raw = write_chestxray14_raw(tmp_path / "nih")
    assert prepare_main(["chestxray14", "--src", str(raw), "--dst", str(tmp_path / "prepared"), "--size", "64"]) == 0
    datalist = tmp_path / "prepared" / "chestxray14_datalist.json"
    assert len(json.loads(datalist.read_text())["validation"]) == 1  # the default --val-fraction 0.1 of 8 patients
    capfd.readouterr()
    code = pretrain_main(["--datalist", str(datalist), "--config", "2d.json", "--config", "2d_barlow.json", "--tiny",
                          "--output", str(tmp_path / "run")])
    out, err = capfd.readouterr()
    assert code == 2
    assert re.search(r"error: every validation batch was too small for the discrimination loss, .*put at least 2 "
                     r"images in the validation split of .*chestxray14_datalist\.json.* more validation images \(`dira3d prepare chestxray14 \.\.\. --val-fraction`", err), err
    assert "Traceback" not in out + err and "caching" not in out + err  # refused before any image was cached
    assert not (tmp_path / "run").exists()


def test_check_validation_size_follows_the_losses_batch_and_stages():
    barlow, gathered = build_dis_loss("barlow"), build_dis_loss("barlow", gather_distributed=True)
    one, two = [{"image": "a.png"}], [{"image": "a.png"}, {"image": "b.png"}]
    with pytest.raises(ValueError, match=r"put at least 2 volumes in the validation split of dl\.json"):
        check_validation_size(barlow, one, 2, datalist="dl.json")
    with pytest.raises(ValueError, match="at least 2 images"):  # batch_size 1: every batch holds one
        check_validation_size(barlow, two, 1, spatial_dims=2)
    check_validation_size(barlow, two, 2)  # two in one batch: scored
    check_validation_size(barlow, [], 2)  # validation false: nothing to check
    check_validation_size(gathered, one, 2)  # DDP: the batch is gathered over the ranks
    check_validation_size(build_dis_loss("moco"), one, 2)  # InfoNCE scores a batch of one
    check_validation_size(barlow, one, 2, stages=[{"name": "res", "losses": ["res"]}])  # no discrimination at all
    with pytest.raises(ValueError):
        check_validation_size(barlow, one, 2, stages=[{"name": "res", "until_epoch": 1, "losses": ["res"]},
                                                      {"name": "dira", "losses": ["dis", "res", "adv"]}])


def test_tiny_barlow_validation_says_its_discrimination_loss_measures_nothing(tmp_path):
    assert cli_main(["synthetic", "--out", str(tmp_path / "luna"), "--count", "8", "--size", "48", "48", "24",
                     "--seed", "0"]) == 0
    assert prepare_main(["luna16", "--src", str(tmp_path / "luna"), "--dst", str(tmp_path / "prepared")]) == 0
    datalist = tmp_path / "prepared" / "pretrain_datalist.json"
    assert len(json.loads(datalist.read_text())["validation"]) >= 2
    run = subprocess.run([sys.executable, "-m", "dira3d", "pretrain", "--datalist", str(datalist), "--output",
                          str(tmp_path / "run"), "--tiny", "--override", "dis_mode=barlow", "--override", "max_epochs=1",
                          "--override", "stages=[{'name': 'dis', 'losses': ['dis']}]"],
                         capture_output=True, text=True, timeout=300)  # a process of its own: the console as a user's
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    val = float(re.search(r"val_loss_dis: ([-\d.]+)", text).group(1))
    assert val == pytest.approx(16, abs=0.01)  # proj_dim of tiny.json: C = 0, whatever the weights
    assert text.count("the discrimination head gives the same output for every volume of a validation batch") == 1
    assert "val_loss_dis is about proj_dim" in text and "train more iterations" in text
    assert torch.load(tmp_path / "run" / "models" / "best.pt", weights_only=True)["meta"]


def test_check_validation_size_reads_the_datalists_split_and_leaves_an_unreadable_one_to_the_loaders(tmp_path):
    barlow = build_dis_loss("barlow")
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"training": [{"image": "a"}] * 3, "validation": [{"image": "b"}]}))
    with pytest.raises(ValueError, match="validation split of .*dl.json"):
        check_validation_size(barlow, None, 2, datalist=datalist)
    check_validation_size(barlow, None, 2, datalist=datalist, split="training")  # visual words on volumes: 3 there
    check_validation_size(barlow, None, 2, datalist=tmp_path / "missing.json")  # named by the loaders, not here

