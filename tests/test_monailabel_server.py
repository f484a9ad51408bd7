"""The real MONAI Label 0.8.5 server serves dira3d bundles from a local folder (acceptance test).

Builds (or reuses) the separate MONAI Label environment, starts the server on 127.0.0.1 with a
studies folder holding a real chest CT, calls ``/info/`` and ``/infer/<model>`` over HTTP and shuts
the server down. The environment is cached in ``$DIRA3D_MONAILABEL_VENV`` (default
``~/.cache/dira3d/monailabel-venv``): the first run on a clean machine builds it (a few minutes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dira3d.deploy.monailabel import MonaiLabelServer, default_venv, ensure_monailabel_env, prepare_app
from dira3d.utils import atomic_save

SEGMENTATION = ("lidc_nodule_seg", "lits_liver_seg", "brats_tumor_seg")
CLASSIFICATION = ("luna16_nodule_fpr", "pecad_embolism_fpr")
CLASSIFIER_BIAS = 1.5  # with a zero linear layer the served probability must be sigmoid(1.5)
# tiny networks; the CT resampled to ~2.3 mm in-plane so the sliding window is quick on CPU.
# The mask must still come back at the scan's own 512x512x48 grid (Invertd + MONAI Label's Restored).
OVERRIDES = {"width": 0.125, "pixdim": [2.28, 2.28, 5.0]}


def _env_or_skip(tmp_path: Path) -> Path:
    venv = default_venv()
    ready = (venv / ".dira3d-stamp").is_file()
    if not ready:
        try:  # the only reason to skip: the package index cannot be reached to build it
            urllib.request.urlopen("https://pypi.org/simple/monailabel/", timeout=20).close()
        except (urllib.error.URLError, OSError) as err:
            pytest.skip(f"MONAI Label environment absent at {venv} and PyPI unreachable ({err}); "
                        "build it with `bash dira3d/deploy/monailabel_env.sh`")
    return ensure_monailabel_env(venv, log=tmp_path / "env-build.log")


def _tiny_bundles(repo_root: Path, scan: Path, dest: Path) -> Path:
    """Copies of the five task bundles (configs) with tiny weights in models/model.pt."""
    from monai.bundle import ConfigParser

    for name in SEGMENTATION + CLASSIFICATION:
        source = repo_root / "bundles" / name / "configs"
        if not (source / "inference.json").is_file():
            pytest.skip(f"bundle {name} is not in this checkout")
        shutil.copytree(source, dest / name / "configs")
        parser = ConfigParser()
        parser.read_config(str(source / "inference.json"))
        for key, value in OVERRIDES.items():
            parser[key] = value
        torch.manual_seed(0)
        network = parser.get_parsed_content("network_def", instantiate=True)
        with torch.no_grad():
            if name in CLASSIFICATION:
                network.fc.weight.zero_()
                network.fc.bias.fill_(CLASSIFIER_BIAS)
            else:
                # centre the logits on this CT so that the thresholded mask holds both labels
                from dira3d.deploy.export import scan_patch

                patch = scan_patch(scan, (64, 64, 32))
                head = network.decoder.head
                head.bias -= network.eval()(patch).median()
        atomic_save(network.state_dict(), dest / name / "models" / "model.pt")
    return dest


def _post(url: str, timeout: float) -> tuple[bytes, str]:
    request = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read(), response.headers.get("content-disposition", "")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_monailabel_serves_local_bundles_over_rest(real_data, repo_root, tmp_path):
    venv = _env_or_skip(tmp_path)
    bundles = _tiny_bundles(repo_root, real_data / "lung1_image.nrrd", tmp_path / "bundles")
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(real_data / "lung1_image.nrrd", studies / "lung1_image.nrrd")
    # the classification bundles take a prepared candidate cube (HU window -> [0, 1]), not a raw CT
    from dira3d.deploy.export import scan_patch

    cube = scan_patch(real_data / "lung1_image.nrrd", (64, 64, 32))[0, 0].numpy()
    sitk.WriteImage(sitk.GetImageFromArray(cube.transpose(2, 1, 0)), str(studies / "lung1_cube.nii.gz"))
    app = prepare_app(tmp_path / "app")

    server = MonaiLabelServer(venv, app, studies, bundles, conf={"bundle_overrides": OVERRIDES}, startup_timeout=240)
    assert server.command[1:3] == ["-m", "monailabel.main"] and "127.0.0.1" in server.command
    with server:
        with urllib.request.urlopen(f"{server.url}/info/", timeout=30) as response:
            info = json.load(response)
        models = info["models"]
        assert set(models) == set(SEGMENTATION + CLASSIFICATION)
        assert models["lits_liver_seg"]["type"] == "segmentation" and models["lits_liver_seg"]["labels"] == {"liver": 1}
        assert models["luna16_nodule_fpr"]["type"] == "classification"

        body, disposition = _post(f"{server.url}/infer/lits_liver_seg?image=lung1_image&output=image", timeout=600)
        suffix = ".nii.gz" if ".nii" in disposition else ".nrrd"
        (tmp_path / f"mask{suffix}").write_bytes(body)
        mask = sitk.ReadImage(str(tmp_path / f"mask{suffix}"))
        image = sitk.ReadImage(str(studies / "lung1_image.nrrd"))
        assert mask.GetSize() == image.GetSize() == (512, 512, 48)
        assert np.allclose(mask.GetSpacing(), image.GetSpacing()) and np.allclose(mask.GetOrigin(), image.GetOrigin())
        labels = np.unique(sitk.GetArrayViewFromImage(mask))
        assert set(labels.tolist()) == {0, 1}, labels

        with pytest.raises(urllib.error.HTTPError):  # a raw CT in HU is refused (intensity_range), not scored
            _post(f"{server.url}/infer/luna16_nodule_fpr?image=lung1_image&output=json", timeout=300)
        body, _ = _post(f"{server.url}/infer/luna16_nodule_fpr?image=lung1_cube&output=json", timeout=300)
        result = json.loads(body)
        assert result["probabilities"]["nodule"] == pytest.approx(1 / (1 + math.exp(-CLASSIFIER_BIAS)), abs=1e-5)
        assert result["prediction"] == [{"idx": 0, "label": "nodule", "score": result["probabilities"]["nodule"]}]

        with pytest.raises(urllib.error.HTTPError):  # an unknown model is refused, not crashed
            _post(f"{server.url}/infer/no_such_model?image=lung1_image&output=json", timeout=60)
    assert server.process is not None and server.process.poll() is not None  # shut down
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/info/", timeout=5)


def test_monailabel_task_reads_the_model_weights_only_whatever_torch_defaults_to(repo_root, tmp_path):
    """MONAI Label loads models/model.pt with a plain torch.load: with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 a
    crafted file ran its code on the server. dira3d's task reads it with weights_only=True first."""
    venv = _env_or_skip(tmp_path)
    bundle = tmp_path / "bundles" / "lits_liver_seg"
    shutil.copytree(repo_root / "bundles" / "lits_liver_seg" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    marker = tmp_path / "code_ran"
    payload = (  # a pickle whose loading calls os.system
        "import os, pickle, sys\n"
        "class Evil:\n    def __reduce__(self):\n        return (os.system, (f'touch {sys.argv[2]}',))\n"
        "open(sys.argv[1], 'wb').write(pickle.dumps({'state_dict': Evil()}, protocol=2))\n"
    )
    subprocess.run([sys.executable, "-c", payload, str(bundle / "models" / "model.pt"), str(marker)], check=True)
    script = (
        "import sys\nfrom dira3d.deploy.monailabel_tasks import SegmentationBundleTask\n"
        "task = SegmentationBundleTask(sys.argv[1], {})\n"
        "try:\n    task._get_network('cpu', {})\nexcept ValueError as err:\n    print('refused:', err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    python = venv / "bin" / "python"
    proc = subprocess.run([str(python), "-c", script, str(bundle)], env=env, capture_output=True, text=True, timeout=300)
    assert "refused:" in proc.stdout and "holds pickled Python objects" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not marker.exists(), "the crafted model.pt ran its code"


def test_monailabel_segments_a_nifti_scan(repo_root, tmp_path):
    """A NIfTI scan (the commonest format; also every file uploaded as `-F file=@scan.nii.gz`) failed in every
    segmentation bundle with HTTP 500: MONAI's Spacingd updated MONAI Label's `image_path` (a str) as a meta dict."""
    venv = _env_or_skip(tmp_path)
    bundle = tmp_path / "bundles" / "lits_liver_seg"
    shutil.copytree(repo_root / "bundles" / "lits_liver_seg" / "configs", bundle / "configs")
    from dira3d.networks import Segmenter

    atomic_save(Segmenter(3, 1, 1, width=0.125).state_dict(), bundle / "models" / "model.pt")
    rng = np.random.default_rng(0)  # a scan has many values: two would be refused as a mask given as the image
    hu = rng.integers(-1000, -700, size=(12, 24, 20)).astype(np.int16)  # (z, y, x) for SimpleITK
    hu[3:9, 6:18, 5:15] = rng.integers(20, 80, size=(6, 12, 10))
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.5, 1.5, 3.0))
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(scan))
    script = (
        "import sys\nimport SimpleITK as sitk\nfrom dira3d.deploy.monailabel_tasks import SegmentationBundleTask\n"
        "task = SegmentationBundleTask(sys.argv[1], {}, {'width': 0.125, 'roi_size': [16, 16, 8]})\n"
        "out, _ = task({'image': sys.argv[2], 'device': 'cpu'})\n"
        "print('mask', list(sitk.ReadImage(out).GetSize()), sitk.ReadImage(out).GetSpacing())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", script, str(bundle), str(scan)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert "mask [20, 24, 12] (1.5, 1.5, 3.0)" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
