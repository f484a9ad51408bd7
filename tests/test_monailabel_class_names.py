"""A 2D classifier served by the MONAI Label app names its outputs as the bundle's ``inference.json`` names them.

MONAI Label names a classifier's outputs after ``metadata.json``'s ``channel_def`` (in lower case) and leaves out the
outputs without a name there: a ``chexpert_cls`` model fine-tuned on CheXpert's 14 labels (``--set out_channels=14
--set class_names=[...]``), served with the ``--conf bundle_overrides`` of those settings, answered 5 probabilities,
the first ("No Finding") named "atelectasis", where ``inference.json`` writes the 14 under their names. The app now
names them by the bundle's ``class_names`` (with the overrides) and refuses ``class_names`` of another length than
``out_channels``, and a 14-output model served without ``out_channels`` is refused naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from dira3d.data.chexpert import ALL
from dira3d.deploy.monailabel import check_served_bundle, default_venv, parse_overrides
from dira3d.networks import ResNetClassifier
from dira3d.utils import atomic_save

TINY = {"backbone": "resnet10", "roi_size": [64, 64]}  # chexpert_cls's tiny.json: the classifier's settings
ALL14 = {**TINY, "out_channels": 14, "class_names": list(ALL)}

SCRIPT = """
import json, sys
from dira3d.deploy.monailabel_tasks import infer_tasks

tasks = infer_tasks({'bundles': sys.argv[1], 'bundle_overrides': sys.argv[3]})
_, result = tasks['chexpert_cls']({'image': sys.argv[2], 'device': 'cpu'})
print('RESULT ' + json.dumps({'prediction': result['prediction'], 'probabilities': result['probabilities']}))
"""


def _served_chexpert14(repo_root, dest):
    """chexpert_cls's configs with a tiny classifier of CheXpert's 14 labels, as a user makes the folder to serve."""
    bundle = dest / "chexpert_cls"
    shutil.copytree(repo_root / "bundles" / "chexpert_cls" / "configs", bundle / "configs")
    torch.manual_seed(0)
    atomic_save(ResNetClassifier(1, 14, backbone="resnet10").state_dict(), bundle / "models" / "model.pt")
    return bundle


def _check(folder, overrides):
    conf = {"bundle_overrides": json.dumps({"chexpert_cls": overrides})}
    check_served_bundle("chexpert_cls", folder, parse_overrides(conf, "chexpert_cls"), conf)


def test_a_classifier_of_more_outputs_is_refused_until_out_channels_and_class_names_name_them(repo_root, tmp_path):
    folder = _served_chexpert14(repo_root, tmp_path)
    # its 14 outputs: the fix names out_channels (it suggested the backbone and roi_size already given) and class_names
    with pytest.raises(ValueError) as err:
        _check(folder, TINY)
    text = str(err.value)
    assert """'{"chexpert_cls": {"backbone": "resnet10", "roi_size": [64, 64], "out_channels": 14}}'""" in text, text
    assert "the weights fit other settings (14 outputs, chexpert_cls has 5): pass" in text, text
    assert text.endswith("}}', with class_names, one name per output in the order of the training datalist's "
                         "meta.labels"), text
    # out_channels alone: the answer would name 5 of the 14 outputs, after the bundle's 5 classes
    with pytest.raises(ValueError, match=r"\(5 name\(s\)\) does not name the 14 outputs of chexpert_cls .*add "
                                         r"class_names, one name per output"):
        _check(folder, {**TINY, "out_channels": 14})
    _check(folder, ALL14)  # served


@pytest.mark.timeout(600)
def test_the_served_answer_names_and_scores_the_outputs_as_inference_json_does(repo_root, tmp_path):
    venv = default_venv()
    if not (venv / ".dira3d-stamp").is_file():
        pytest.skip(f"MONAI Label environment absent at {venv}; build it with `bash dira3d/deploy/monailabel_env.sh`")
    from monai.bundle import ConfigWorkflow

    folder = _served_chexpert14(repo_root, tmp_path / "served")
    rows, cols = np.mgrid[0:96, 0:80]  # an 8-bit grey radiograph-like PNG, 96 rows x 80 columns
    grey = 40 + 60 * np.random.default_rng(0).random((96, 80)) + 120 * (((cols - 40) / 25.0) ** 2 + ((rows - 48) / 35.0) ** 2 < 1)
    image = tmp_path / "cxr.png"
    Image.fromarray(grey.astype(np.uint8)).save(image)
    configs = folder / "configs"
    flow = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                          logging_file=False, workflow_type=None, image=str(image), ckpt_dir=str(folder / "models"),
                          output_path=str(tmp_path / "prob.json"), **ALL14)
    flow.initialize()
    flow.run()
    flow.finalize()
    written = json.loads((tmp_path / "prob.json").read_text())
    expected = dict(zip(written["classes"], written["predictions"][0]["probabilities"]))
    assert list(expected) == list(ALL)

    proc = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, str(folder.parent), str(image), json.dumps(ALL14)],
                          env={**os.environ, "PYTHONPATH": str(repo_root)}, capture_output=True, text=True, timeout=500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-3000:]
    answer = json.loads(lines[-1][len("RESULT "):])
    # the 14 outputs, in order, under inference.json's names, with its probabilities
    assert [(p["idx"], p["label"]) for p in answer["prediction"]] == list(enumerate(ALL))
    assert list(answer["probabilities"]) == list(ALL)
    assert answer["probabilities"] == pytest.approx(expected, abs=1e-6)
