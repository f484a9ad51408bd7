"""The 2D classification bundles on the datalists that ``dira3d prepare`` writes from raw data in the official layout
(the end-to-end walk of session 27; the unit tests used hand-written datalists without ``meta.labels``).

- CheXpert prepared with ``--labels all`` and fine-tuned with ``--set out_channels=14``, as docs/2d.md says, kept the
  bundle's 5 ``class_names``: ``test_cases.csv`` named the first 5 of the 14 outputs Atelectasis ... (they are No
  Finding, Enlarged Cardiomediastinum ...) and the rest ``class5`` ...; the inference command it printed wrote
  5 names over 14 probabilities. ``load_split(class_names=...)`` now refuses names other than the datalist's
  ``meta.labels`` before any image is cached, and ``inference.json`` refuses ``class_names`` that do not name
  ``out_channels`` outputs (:func:`dira3d.evaluation.check_class_names`).
- The classification bundles' ``metadata.json`` said their output was of type ``probabilities`` in the format
  ``logits``: the network emits logits (the sigmoid is inference's post-processing).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dira3d.data import chestxray14, chexpert
from dira3d.data.command import main as prepare_main
from dira3d.data.errors import DataError
from dira3d.evaluation import check_class_names, load_split
from dira3d.evaluation.finetune import bundle_path
from dira3d.evaluation.finetune import main as finetune_main
from dira3d.utils.overrides import parse_value

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CLASSIFICATION = ("chestxray14_cls", "chexpert_cls", "luna16_nodule_fpr", "pecad_embolism_fpr")


def write_chexpert_raw(root: Path, train_patients: int = 6, valid_patients: int = 4) -> Path:
    """``CheXpert-v1.0-small/{train,valid}.csv`` and the JPEGs they name: one frontal view per study; every
    observation of the valid (test) split has both values, the train rows draw 1.0 / 0.0 / -1.0 / blank."""
    rng = np.random.default_rng(0)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.ALL]
    for split, count, first in (("train", train_patients, 1), ("valid", valid_patients, 64541)):
        rows = []
        for i in range(count):
            path = f"CheXpert-v1.0-small/{split}/patient{first + i:05d}/study1/view1_frontal.jpg"
            values = [("1.0" if (i + k) % 2 else "0.0") if split == "valid" else rng.choice(["1.0", "0.0", "-1.0", ""])
                      for k in range(len(chexpert.ALL))]
            rows.append([path, "Female", 60, "Frontal", "AP", *values])
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(30, 220, (40, 48), dtype=np.uint8)).save(root / path, quality=95)
        with open(root / "CheXpert-v1.0-small" / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return root


def _bundle_names(bundle: str) -> list[str]:
    return json.loads((bundle_path(bundle) / "configs" / "train.json").read_text())["class_names"]


def test_the_bundles_class_names_are_the_labels_that_dira3d_prepare_writes(tmp_path):
    raw = write_chexpert_raw(tmp_path / "raw")
    assert prepare_main(["chexpert", "--src", str(raw), "--dst", str(tmp_path / "five"), "--size", "32"]) == 0
    datalist = tmp_path / "five" / "chexpert_datalist.json"
    assert json.loads(datalist.read_text())["meta"]["labels"] == _bundle_names("chexpert_cls")
    test = load_split(datalist, "test", num_labels=5, kind="classification", class_names=_bundle_names("chexpert_cls"))
    assert len(test) == 4
    assert _bundle_names("chestxray14_cls") == list(chestxray14.LABELS)  # what `dira3d prepare chestxray14` names


def test_chexpert_all_labels_refused_with_the_bundles_five_class_names_before_caching(tmp_path, capsys):
    raw = write_chexpert_raw(tmp_path / "raw")
    dst = tmp_path / "all"
    assert prepare_main(["chexpert", "--src", str(raw), "--dst", str(dst), "--labels", "all", "--size", "32"]) == 0
    datalist = dst / "chexpert_datalist.json"
    labels = json.loads(datalist.read_text())["meta"]["labels"]
    assert labels == list(chexpert.ALL) and labels[:5] != _bundle_names("chexpert_cls")
    out = tmp_path / "ft"
    # without out_channels: the label count is refused, with both settings to pass (it said "(and class_names)")
    assert finetune_main(["--bundle", "chexpert_cls", "--datalist", str(datalist), "--output-dir", str(out), "--tiny"]) == 2
    names = json.dumps(labels, separators=(",", ":"))
    assert f"or train on these 14 with --set out_channels=14 and --set class_names='{names}'" in capsys.readouterr().err
    code = finetune_main(["--bundle", "chexpert_cls", "--datalist", str(datalist), "--output-dir", str(out), "--tiny",
                          "--set", "out_channels=14"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("dira3d finetune: error:")]
    assert f"datalist {datalist.resolve()} names its 14 labels in meta.labels, but class_names is ['Atelectasis'" in line
    assert "the AUCs, test_cases.csv and the probabilities would name the classes wrongly" in line
    assert not (out / "models" / "model.pt").exists() and not (out / "test_cases.csv").exists()
    # the value it asks for is the datalist's labels, and the datalist's splits load with it
    given = re.search(r"--set class_names='([^']+)'", line).group(1)
    assert parse_value(given) == labels
    test = load_split(datalist, "test", num_labels=14, kind="classification", class_names=parse_value(given))
    assert len(test) == 4 and all(len(e["label"]) == 14 for e in test)
    with pytest.raises(DataError, match="names its 14 labels in meta.labels"):  # the evaluation of the test split too
        load_split(datalist, "test", num_labels=14, kind="classification", class_names=_bundle_names("chexpert_cls"))


def test_check_class_names_wants_one_name_per_output():
    assert check_class_names(("a", "b"), 2) == ["a", "b"]
    assert check_class_names(["nodule"], 1) == ["nodule"]
    with pytest.raises(DataError, match=r"^class_names=\['a', 'b'\] \(2 name\(s\)\) does not name the 14 outputs of the "
                                        r"network \(out_channels\): pass --class_names"):
        check_class_names(["a", "b"], 14)
    with pytest.raises(DataError, match=r"^class_names='abc' \(not a list\)"):
        check_class_names("abc", 3)


def test_inference_refuses_out_channels_without_as_many_class_names(tmp_path):
    raw = write_chexpert_raw(tmp_path / "raw", train_patients=2, valid_patients=2)
    assert prepare_main(["chexpert", "--src", str(raw), "--dst", str(tmp_path / "all"), "--labels", "all",
                         "--size", "32"]) == 0
    image = next((tmp_path / "all" / "images").rglob("*.png"))
    configs = bundle_path("chexpert_cls") / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           json.dumps([str(configs / "inference.json"), str(configs / "tiny.json")]),
           "--bundle_root", str(tmp_path / "run"), "--ckpt_dir", str(tmp_path / "models"), "--image", str(image),
           "--out_channels", "14", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: class_names=['Atelectasis', 'Cardiomegaly', 'Consolidation', "
                                                     "'Edema', 'Pleural Effusion'] (5 name(s)) does not name the 14 "
                                                     "outputs"), out[-3000:]
    assert "Traceback" not in out and not list(image.parent.glob("*_prob.json"))


@pytest.mark.parametrize("bundle", CLASSIFICATION)
def test_classification_metadata_describes_logits_and_the_probabilities_inference_writes(bundle):
    from monai.bundle import ConfigParser

    configs = bundle_path(bundle) / "configs"
    meta = json.loads((configs / "metadata.json").read_text())
    out = meta["network_data_format"]["outputs"]["pred"]
    post = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert (out["type"], out["value_range"]) == ("logits", [])
    assert (post["type"], post["value_range"]) == ("probabilities", [0, 1])
    assert out["format"] == post["format"] == "classes"
    assert out["num_channels"] == post["num_channels"] and out["channel_def"] == post["channel_def"]
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "tiny.json")])
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # the network's output is the head's: a logit of -10 comes out as it is, outside [0, 1]
        head.weight.zero_()
        head.bias.fill_(-10.0)
        shape = parser.get_parsed_content("roi_size")
        pred = net(torch.rand(1, parser.get_parsed_content("in_channels"), *shape))
    assert pred.shape == (1, out["num_channels"]) and torch.equal(pred, torch.full_like(pred, -10.0))
    post_processing = parser.get_parsed_content("postprocessing")  # inference's sigmoid gives what `post` describes
    probabilities = post_processing({"pred": pred[0]})["pred"]
    assert torch.allclose(probabilities, torch.sigmoid(pred[0])) and 0 < float(probabilities.min()) < 0.5
