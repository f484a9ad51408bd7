"""What the MONAI Label app refuses before serving a bundle (dira3d.deploy.monailabel.check_served_bundle).

A model fine-tuned with --tiny, served without its width, was listed by /info/ and failed every request with
PyTorch's list of mismatched tensors (HTTP 500); weights under other names were loaded in part by MONAI Label's
non-strict load (a network with random weights, served); a misspelt id in a bundle's own bundle_overrides entry
was added without a word (pixdim: the scan served at the wrong resolution). The checks run in dira3d's
environment; the last test runs the app's infer_tasks in the MONAI Label environment when it is there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dira3d.deploy import load_bundle_network
from dira3d.deploy.command import main as export_main
from dira3d.deploy.monailabel import check_served_bundle, default_venv, parse_overrides
from dira3d.networks import Classifier, Segmenter, UNet
from dira3d.utils import atomic_save


def _served(repo_root: Path, dest: Path, name: str, network) -> Path:
    """A bundle folder as a user makes one to serve a fine-tuned model: the configs and models/model.pt."""
    shutil.copytree(repo_root / "bundles" / name / "configs", dest / name / "configs")
    atomic_save(network.state_dict(), dest / name / "models" / "model.pt")
    return dest / name


def _check(name: str, folder: Path, conf: dict) -> None:
    check_served_bundle(name, folder, parse_overrides(conf, name), conf)


def test_a_tiny_model_served_without_its_settings_is_refused_naming_the_bundle_overrides(repo_root, tmp_path):
    folder = _served(repo_root, tmp_path, "lidc_nodule_seg", Segmenter(3, 1, 1, width=0.125))
    with pytest.raises(ValueError) as err:
        _check("lidc_nodule_seg", folder, {})
    text = str(err.value)
    assert "model.pt does not fit the network" in text and "tiny.json" in text
    fix = """--conf bundle_overrides '{"lidc_nodule_seg": {"width": 0.125, "roi_size": [16, 16, 8]}}'"""
    assert text.endswith(fix), text
    assert "--override" not in text  # dira3d export's spelling, not the server's
    # the settings it names are served; a shared pixdim, which the classification bundle does not define, is fine
    _check("lidc_nodule_seg", folder, {"bundle_overrides": fix.split(" ", 2)[2].strip("'")})
    luna = _served(repo_root, tmp_path, "luna16_nodule_fpr", Classifier(3, 1, 1, width=0.125))
    _check("luna16_nodule_fpr", luna, {"bundle_overrides": json.dumps({"width": 0.125, "pixdim": [1, 1, 1]})})
    # other settings given already are kept in the overrides it names (one line to copy)
    with pytest.raises(ValueError, match=r'\{"lidc_nodule_seg": \{"pixdim": \[2, 2, 2\], "width": 0.125'):
        _check("lidc_nodule_seg", folder, {"bundle_overrides": json.dumps({"lidc_nodule_seg": {"pixdim": [2, 2, 2]}})})


def test_a_misspelt_id_of_one_bundle_is_refused_and_a_model_ts_alone_is_not_loaded(repo_root, tmp_path):
    folder = _served(repo_root, tmp_path, "lits_liver_seg", Segmenter(3, 1, 1, width=0.125))
    conf = {"bundle_overrides": json.dumps({"width": 0.125, "lits_liver_seg": {"pixdm": [1, 1, 1]}})}
    with pytest.raises(ValueError, match=r"bundle_overrides \{'lits_liver_seg': \.\.\.\}: no setting 'pixdm' "
                                         r"\(did you mean 'pixdim'\?\)"):
        _check("lits_liver_seg", folder, conf)
    (folder / "models" / "model.pt").rename(folder / "models" / "model.ts")  # a TorchScript is served as it is
    _check("lits_liver_seg", folder, {})


def test_a_pretraining_checkpoint_given_as_the_model_is_named_as_such(repo_root, tmp_path, capsys):
    """It was called "a classification network" (its keys are encoder / decoder mappings, not decoder.*)."""
    unet = UNet(3, 1, 1, width=0.125)
    folder = _served(repo_root, tmp_path, "lidc_nodule_seg", unet)
    atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(), "meta": {"width": 0.125}},
                folder / "models" / "model.pt")
    with pytest.raises(ValueError, match="is a dira3d pretraining checkpoint .* not a model fine-tuned with "
                                         "lidc_nodule_seg: fine-tune it first") as err:
        _check("lidc_nodule_seg", folder, {"bundle_overrides": '{"width": 0.125}'})
    assert "classification" not in str(err.value)
    assert export_main(["torchscript", "--bundle", str(folder), "--out", str(tmp_path / "m.ts"),
                        "--override", "width=0.125"]) == 2
    assert "pretraining checkpoint" in capsys.readouterr().err and not (tmp_path / "m.ts").exists()
    with pytest.raises(ValueError, match="pretraining checkpoint"):
        load_bundle_network(folder, overrides={"width": 0.125})


def test_the_app_serves_the_bundles_that_fit_and_logs_why_not_the_others(repo_root, tmp_path):
    """In the MONAI Label environment (skipped where it was not built: tests/test_monailabel_server.py builds it)."""
    venv = default_venv()
    if not (venv / ".dira3d-stamp").is_file():
        pytest.skip(f"MONAI Label environment absent at {venv}; build it with `bash dira3d/deploy/monailabel_env.sh`")
    _served(repo_root, tmp_path / "bundles", "lidc_nodule_seg", Segmenter(3, 1, 1, width=0.125))
    _served(repo_root, tmp_path / "bundles", "luna16_nodule_fpr", Classifier(3, 1, 1, width=0.125))
    script = (
        "import json, logging, sys\nlogging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from dira3d.deploy.monailabel_tasks import infer_tasks\n"
        "conf = {'bundles': sys.argv[1], 'bundle_overrides': json.dumps({'luna16_nodule_fpr': {'width': 0.125}})}\n"
        "print('served', sorted(infer_tasks(conf)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", script, str(tmp_path / "bundles")], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert "served ['luna16_nodule_fpr']" in proc.stdout, out[-3000:]
    assert "ERROR dira3d: bundle lidc_nodule_seg" in out and "is not served" in out, out[-3000:]
    assert """'{"lidc_nodule_seg": {"width": 0.125, "roi_size": [16, 16, 8]}}'""" in out, out[-3000:]
