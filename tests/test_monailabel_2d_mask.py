"""A 2D segmentation bundle served by the MONAI Label app answers a PNG radiograph with its mask.

MONAI Label writes the mask in the input's format; its writer kept the ``float32`` of the post transforms, which ITK
cannot write as PNG, so every request of ``montgomery_lung_seg`` / ``siim_pneumothorax_seg`` on a PNG was an HTTP 500
("PNG supports unsigned char and unsigned short"). The task is built in the MONAI Label environment (skipped where it
was not built: tests/test_monailabel_server.py builds it) and run without a server.
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

from dira3d.deploy.bundle_network import bundle_parser
from dira3d.deploy.monailabel import default_venv
from dira3d.utils import atomic_save

TINY = {"backbone": "resnet10", "decoder_channels": [16, 16, 8, 8, 8], "roi_size": [64, 64]}  # tiny.json's network

SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from dira3d.deploy.monailabel_tasks import infer_tasks

bundles, image, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
tasks = infer_tasks({'bundles': bundles, 'bundle_overrides': tiny})
path, _ = tasks['montgomery_lung_seg']({'image': image, 'device': 'cpu'})
mask = np.asarray(Image.open(path))
print('RESULT ' + json.dumps({'suffix': path[-4:], 'shape': list(mask.shape), 'dtype': str(mask.dtype),
                              'values': sorted(int(v) for v in np.unique(mask))}))
"""


@pytest.mark.timeout(600)
def test_a_2d_segmentation_bundle_answers_a_png_with_a_uint8_mask(repo_root, tmp_path):
    venv = default_venv()
    if not (venv / ".dira3d-stamp").is_file():
        pytest.skip(f"MONAI Label environment absent at {venv}; build it with `bash dira3d/deploy/monailabel_env.sh`")
    bundle = tmp_path / "bundles" / "montgomery_lung_seg"
    shutil.copytree(repo_root / "bundles" / "montgomery_lung_seg" / "configs", bundle / "configs")
    torch.manual_seed(0)
    network = bundle_parser(bundle, "inference.json", TINY).get_parsed_content("network_def", instantiate=True)
    atomic_save(network.state_dict(), bundle / "models" / "model.pt")
    rows, cols = np.mgrid[0:80, 0:96]  # a radiograph-like 8-bit PNG, 80 rows x 96 columns: noise and two bright lungs
    grey = 40 + 30 * np.random.default_rng(0).random((80, 96)) + 150 * ((((cols - 30) / 14.0) ** 2 + ((rows - 40) / 28.0) ** 2 < 1)
                       | (((cols - 66) / 14.0) ** 2 + ((rows - 40) / 28.0) ** 2 < 1))
    image = tmp_path / "cxr.png"
    Image.fromarray(grey.astype(np.uint8)).save(image)

    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, str(bundle.parent), str(image), json.dumps(TINY)],
                          env=env, capture_output=True, text=True, timeout=500)
    log = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, log[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    # the mask comes back as a PNG of the radiograph's own size, 0/1 as inference.json writes it
    assert out["suffix"] == ".png" and out["shape"] == [80, 96] and out["dtype"] == "uint8", out
    assert set(out["values"]) <= {0, 1}, out
