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


class _Datastore:
    """The two calls of MONAI Label's LocalDatastore that unknown_image makes (an unknown id has the URI "")."""

    def __init__(self, folder: Path) -> None:
        self.ids = {p.name.split(".")[0]: p for p in folder.iterdir()}

    def get_image_uri(self, image_id: str) -> str:
        return str(self.ids[image_id]) if image_id in self.ids else ""

    def list_images(self) -> list[str]:
        return list(self.ids)


def test_an_image_id_the_studies_folder_lacks_is_named(tmp_path):
    """MONAI Label replaced an unknown `image=` id by "" and the request failed with HTTP 500, its log saying
    `: does not exist; check the path` without the id; the app now answers 404 naming it and the ids there."""
    from dira3d.deploy.monailabel import unknown_image

    (tmp_path / "lung1_image.nrrd").write_bytes(b"x")
    store = _Datastore(tmp_path)
    for image in ("lung1_image", str(tmp_path / "lung1_image.nrrd"), "", None):  # an id, a file, no image
        assert unknown_image({"image": image}, store, tmp_path) is None
    message = unknown_image({"image": "lung1_image.nrrd"}, store, tmp_path)  # the file name, not its id
    assert message.startswith(f"image 'lung1_image.nrrd' is not in the studies folder {tmp_path}")
    assert "lung1_image" in message and "without its extension" in message and "-F file=@" in message
    assert unknown_image({"image": "x"}, store, "http://pacs/dicom-web") is None  # DICOMweb: not asked twice


def test_the_app_answers_an_unknown_image_id_with_404_naming_it(repo_root, tmp_path):
    """In the MONAI Label environment: the app's infer, on MONAI Label's own datastore (skipped where not built)."""
    venv = default_venv()
    if not (venv / ".dira3d-stamp").is_file():
        pytest.skip(f"MONAI Label environment absent at {venv}; build it with `bash dira3d/deploy/monailabel_env.sh`")
    export_main(["monailabel-app", "--out", str(tmp_path / "app"), "--bundles", str(repo_root / "bundles")])
    (tmp_path / "studies").mkdir()
    (tmp_path / "served").mkdir()  # no bundle: the check comes before the model is looked up
    import SimpleITK as sitk
    import numpy as np

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(tmp_path / "studies" / "lung1.nrrd"))
    script = (
        "import os, sys\nsys.path.insert(0, sys.argv[1])\nfrom main import MyApp\n"
        "app = MyApp(sys.argv[1], sys.argv[2], {'bundles': sys.argv[3]})\n"
        "for image in ('nope', 'lung1'):\n"
        "    try:\n        app.infer({'model': 'lits_liver_seg', 'image': image})\n"
        "    except Exception as err:\n"
        "        print(image, type(err).__name__, getattr(err, 'status_code', None), getattr(err, 'detail', err))\n"
        "sys.stdout.flush()\nos._exit(0)\n"  # the datastore's file watcher thread
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", script, str(tmp_path / "app"), str(tmp_path / "studies"),
                           str(tmp_path / "served")], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert f"nope HTTPException 404 image 'nope' is not in the studies folder {tmp_path / 'studies'}" in proc.stdout, \
        out[-3000:]
    assert "(its 1 image id(s): lung1)" in proc.stdout, out[-3000:]
    assert "lung1 HTTPException" not in proc.stdout, out[-3000:]  # a known id goes on to MONAI Label's own answer
