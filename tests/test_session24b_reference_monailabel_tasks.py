"""Session 24b mutation audit of dira3d.deploy.monailabel_tasks: the app's tasks built in the MONAI Label environment
(skipped where it was not built: tests/test_monailabel_server.py builds it) without a server: which bundles
``infer_tasks`` serves and with which task, the segmentation label map, the classification result's probabilities and
a model replaced while the server runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dira3d.deploy.monailabel import default_venv
from dira3d.networks import Classifier, Segmenter
from dira3d.utils import atomic_save

BIAS = 1.5  # a zero linear layer: the served probability is sigmoid(1.5)

SCRIPT = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
import torch
from dira3d.deploy.monailabel_tasks import SegmentationBundleTask, infer_tasks
from dira3d.networks import Classifier
from dira3d.utils import atomic_save

bundles, cube = sys.argv[1], sys.argv[2]
shared = {'width': 0.125, 'roi_size': [16, 16, 8]}
conf = {'bundles': bundles, 'models': 'lits_liver_seg, luna16_nodule_fpr,lidc_nodule_seg',
        'bundle_overrides': json.dumps({'lits_liver_seg': shared, 'lidc_nodule_seg': shared, 'width': 0.125})}
tasks = infer_tasks(conf)
out = {'served': sorted(tasks), 'tasks': {n: type(t).__name__ for n, t in tasks.items()},
       'labels': tasks['lits_liver_seg'].labels}
_, out['result'] = tasks['luna16_nodule_fpr']({'image': cube, 'device': 'cpu'})
out['none'] = sorted(infer_tasks(dict(conf, models='lidc_nodule_seg')))
out['own_labels'] = SegmentationBundleTask(os.path.join(bundles, 'two_channels'), {}, shared).labels
out['capital'] = SegmentationBundleTask(os.path.join(bundles, 'other_seg'), {}, shared).labels
model = os.path.join(bundles, 'luna16_nodule_fpr', 'models', 'model.pt')
atomic_save(Classifier(3, 1, 1, width=0.25).state_dict(), model)  # replaced while the server runs
os.utime(model, ns=(1, 1))
try:
    tasks['luna16_nodule_fpr']({'image': cube, 'device': 'cpu'})
    out['replaced'] = 'served'
except Exception as err:
    out['replaced'] = f'{type(err).__name__}: {err}'
print('RESULT ' + json.dumps(out))
"""


def _bundle(repo_root: Path, dest: Path, name: str, network, source: str | None = None) -> Path:
    shutil.copytree(repo_root / "bundles" / (source or name) / "configs", dest / name / "configs")
    atomic_save(network.state_dict(), dest / name / "models" / "model.pt")
    return dest / name


@pytest.mark.slow  # the MONAI Label environment started, and a classification and two segmentation tasks built
@pytest.mark.timeout(900)
def test_the_app_tasks_serve_each_bundle_with_its_task_labels_and_probabilities(repo_root, tmp_path):
    venv = default_venv()
    if not (venv / ".dira3d-stamp").is_file():
        pytest.skip(f"MONAI Label environment absent at {venv}; build it with `bash dira3d/deploy/monailabel_env.sh`")
    bundles = tmp_path / "bundles"
    _bundle(repo_root, bundles, "lits_liver_seg", Segmenter(3, 1, 1, width=0.125))
    _bundle(repo_root, bundles, "lidc_nodule_seg", Segmenter(3, 1, 1, width=0.25))  # not the width it is served with
    other = _bundle(repo_root, bundles, "other_seg", Segmenter(3, 1, 1, width=0.125), source="lits_liver_seg")  # not asked for
    meta = json.loads((other / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "Liver"}
    (other / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    classifier = Classifier(3, 1, 1, width=0.125)
    with torch.no_grad():
        classifier.fc.weight.zero_()
        classifier.fc.bias.fill_(BIAS)
    _bundle(repo_root, bundles, "luna16_nodule_fpr", classifier)
    # a bundle of two output channels, its structure named in capitals: MONAI Label's own label map is kept
    two = _bundle(repo_root, bundles, "two_channels", Segmenter(3, 1, 2, width=0.125), source="lits_liver_seg")
    meta = json.loads((two / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"].update(num_channels=2, channel_def={"0": "background", "1": "Liver"})
    (two / "configs" / "metadata.json").write_text(json.dumps(meta))
    cube = tmp_path / "cube.nii.gz"  # a prepared candidate cube, HU window -> [0, 1]
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((32, 64, 64)).astype(np.float32)), str(cube))

    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, str(bundles), str(cube)], env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, log[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["served"] == ["lits_liver_seg", "luna16_nodule_fpr"], log[-3000:]
    assert out["tasks"] == {"lits_liver_seg": "SegmentationBundleTask", "luna16_nodule_fpr": "ClassificationBundleTask"}
    assert "ERROR dira3d: bundle lidc_nodule_seg" in log and "is not served" in log, log[-3000:]
    assert out["labels"] == {"liver": 1}  # one sigmoid channel: the mask marks the liver with 1
    assert out["capital"] == {"liver": 1}  # the structure's name as the label map names it
    assert out["own_labels"].get("background") != 1, out["own_labels"]
    probability = 1 / (1 + math.exp(-BIAS))
    assert out["result"]["probabilities"] == {"nodule": pytest.approx(probability, abs=1e-5)}, out["result"]
    assert out["result"]["prediction"] == [{"idx": 0, "label": "nodule", "score": pytest.approx(probability, abs=1e-5)}]
    assert out["none"] == [] and "dira3d: no bundle served: lidc_nodule_seg refused (see the errors above)" in log
    assert "does not fit the network" in out["replaced"], out["replaced"]
