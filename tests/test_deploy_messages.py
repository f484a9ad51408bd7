"""What `dira3d export` / `dira3d localise` / pretrained loading say when the input is not what they need.

Bundle names resolve as in `dira3d finetune`; a missing checkpoint names the option it came from; a
2D/3D checkpoint mix-up is one sentence; weights of a `--tiny` model name the overrides that fit,
in a few lines; key_map.json follows the checkpoint's dimensionality; the MONAI Label start command
is the same in the app's docstring and in docs/deployment.md.
"""

from __future__ import annotations

import ast
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from dira3d.deploy import export_pretrained, load_bundle_network
from dira3d.deploy.command import main as export_main
from dira3d.networks import (
    Classifier,
    ResNetClassifier,
    ResNetSegmenter,
    ResNetUNet,
    UNet,
    load_pretrained,
)
from dira3d.utils import atomic_save

TINY_2D = {"backbone": "resnet10", "decoder_channels": [16, 16, 8, 8, 8], "roi_size": [64, 64]}


def _weights(repo_root: Path, bundle: str, path: Path, overrides: dict) -> Path:
    """Random fine-tuned weights of ``bundle``'s network built with ``overrides``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / bundle / "configs" / "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), path)
    return path


# 1. --bundle takes a name, as dira3d finetune does

def test_export_resolves_a_bundle_name_like_finetune(repo_root, tmp_path, capsys):
    ckpt = _weights(repo_root, "luna16_nodule_fpr", tmp_path / "luna.pt", {"width": 0.125})
    args = ["torchscript", "--bundle", "luna16_nodule_fpr", "--checkpoint", str(ckpt), "--out", str(tmp_path / "l.ts"),
            "--override", "width=0.125", "--input-shape", "1", "1", "16", "16", "8"]
    assert export_main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "l.ts").is_file()
    assert load_bundle_network("luna16_nodule_fpr", ckpt, overrides={"width": 0.125}) is not None
    # neither a folder nor a name: the valid names are listed
    assert export_main(["torchscript", "--bundle", "luna16", "--out", str(tmp_path / "x.ts")]) == 2
    err = capsys.readouterr().err
    assert "luna16_nodule_fpr" in err and "chestxray14_cls" in err and "montgomery_lung_seg" in err
    (tmp_path / "empty").mkdir()
    assert export_main(["torchscript", "--bundle", str(tmp_path / "empty")]) == 2
    assert "lits_liver_seg" in capsys.readouterr().err


def test_export_refuses_an_unknown_override_id(tmp_path, capsys):
    """A typo (widht=0.125) is refused before any work, as in dira3d pretrain / finetune, in both exports
    that take --override; MONAI would add the id silently and build the default network."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"never read")
    for what, out in (("torchscript", "m.ts"), ("onnx", "m.onnx")):
        args = [what, "--bundle", "luna16_nodule_fpr", "--checkpoint", str(ckpt), "--out", str(tmp_path / out),
                "--override", "widht=0.125"]
        assert export_main(args) == 2, what
        err = capsys.readouterr().err
        assert "error:" in err and "'widht' (did you mean 'width'?)" in err and "inference.json" in err, err
        assert not (tmp_path / out).exists()
    with pytest.raises(ValueError, match="did you mean 'width'"):
        load_bundle_network("luna16_nodule_fpr", ckpt, overrides={"widht": 0.125})


# 2. a missing checkpoint names the option of the command that was run

def test_missing_checkpoint_message_fits_the_caller(tmp_path, capsys):
    assert export_main(["pretrained", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "nope.pt" in err and "--checkpoint" in err and "'pretrained' setting" not in err
    from dira3d.evaluation import build_task_network

    with pytest.raises(FileNotFoundError, match="'pretrained' setting"):  # the bundle setting, in a bundle
        build_task_network("classification", pretrained=str(tmp_path / "nope.pt"))
    # a bundle without models/model.pt: the option and where fine-tuning writes the weights (was "(checkpoint=)")
    for what, out in (("torchscript", "m.ts"), ("onnx", "m.onnx")):
        assert export_main([what, "--bundle", "lits_liver_seg", "--out", str(tmp_path / out)]) == 2, what
        err = capsys.readouterr().err
        assert "--checkpoint (`dira3d finetune --output-dir D` writes D/models/model.pt)" in err and "checkpoint=" not in err, err


def test_a_checkpoint_folder_is_named_as_a_folder_with_its_checkpoints(tmp_path, capsys):
    """--checkpoint runs/dira_pretrain/models (the folder): one line naming the .pt files in it; export said the
    folder 'does not exist' (pretrained) or 'do not exist' (torchscript, onnx)."""
    models = tmp_path / "runs" / "models"
    models.mkdir(parents=True)
    (models / "best.pt").write_bytes(b"")
    (models / "last.pt").write_bytes(b"")
    inside = f"is a folder, not a checkpoint file (pass a checkpoint in it: {models / 'best.pt'}, {models / 'last.pt'})"
    assert export_main(["pretrained", "--checkpoint", str(models), "--out", str(tmp_path / "w")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d export:")]
    assert len(lines) == 1 and f"checkpoint {models} {inside}" in lines[0], lines
    for what, out in (("torchscript", "m.ts"), ("onnx", "m.onnx")):
        assert export_main([what, "--bundle", "lits_liver_seg", "--checkpoint", str(models), "--out",
                            str(tmp_path / out)]) == 2, what
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d export:")]
        assert len(lines) == 1 and f"fine-tuned weights {models} {inside}" in lines[0], lines
    assert not (tmp_path / "w").exists() and not (tmp_path / "m.ts").exists()


def test_export_pretrained_of_a_fine_tuned_classifier_names_its_parts_as_options(tmp_path, capsys):
    """A fine-tuned model.pt is a flat state_dict: the refusal said "parts available: []" and suggested
    parts=('encoder',), the Python spelling, to a command-line user."""
    model = atomic_save(Classifier(3, 1, 1, width=0.125).state_dict(), tmp_path / "model.pt")
    assert export_main(["pretrained", "--checkpoint", str(model), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "has no 'decoder' part (parts available: encoder, fc)" in err and "e.g. --parts encoder fc" in err, err
    assert "parts=(" not in err and not (tmp_path / "w").exists()
    assert export_main(["pretrained", "--checkpoint", str(model), "--out", str(tmp_path / "w"), "--parts", "encoder", "fc"]) == 0
    key_map = json.loads((tmp_path / "w" / "key_map.json").read_text())
    assert key_map["parts"]["fc"]["weight"]["shape"] == [1, 4 * 16]  # 512 x width 0.125 features in
    with pytest.raises(ValueError, match=r"e\.g\. parts=\('encoder', 'fc'\)"):  # from Python, the Python spelling
        export_pretrained(model, tmp_path / "w2")


def test_a_missing_part_names_the_files_to_give_to_pretrained_and_parts_to_python_callers(tmp_path):
    """load_pretrained said "Choose parts among those (e.g. parts=('encoder',))" to `dira3d finetune --pretrained`
    users too, who cannot choose parts: the bundles' path (option="--pretrained") names the files to give instead."""
    from dira3d.evaluation import build_task_network
    from dira3d.networks import Segmenter

    unet = UNet(3, 1, 1, width=0.125)
    (tmp_path / "weights").mkdir()
    atomic_save(unet.encoder.state_dict(), tmp_path / "weights" / "encoder.pt")  # no decoder.pt beside it
    atomic_save(unet.decoder.state_dict(), tmp_path / "decoder.pt")
    with pytest.raises(ValueError, match=r"Choose parts among those \(e\.g\. parts=\('encoder',\)\)"):  # Python
        load_pretrained(Segmenter(3, 1, 1, width=0.125), tmp_path / "weights" / "encoder.pt", parts=("encoder", "decoder"))
    for kind, path, wanted in [
        ("segmentation", tmp_path / "weights" / "encoder.pt",
         "--pretrained needs a checkpoint with 'encoder' and 'decoder': give it the best.pt or last.pt of `dira3d "
         "pretrain`, or the encoder.pt of `dira3d export pretrained --parts encoder decoder` (its decoder.pt beside it)"),
        ("classification", tmp_path / "decoder.pt",
         "--pretrained needs a checkpoint with 'encoder': give it the best.pt or last.pt of `dira3d pretrain`, or the "
         "encoder.pt of `dira3d export pretrained`"),
    ]:
        with pytest.raises(ValueError) as err:
            build_task_network(kind, width=0.125, pretrained=str(path))
        message = str(err.value)
        assert wanted in message, message
        assert f"checkpoint {path} has no (or an empty)" in message
        assert "parts=(" not in message and "Choose parts" not in message, message
    # a checkpoint of other keys, loaded strictly: the way out is a file, not strict=False
    atomic_save({"encoder": {**unet.encoder.state_dict(), "extra.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(ValueError) as err:
        build_task_network("classification", width=0.125, pretrained=str(tmp_path / "extra.pt"))
    assert "give --pretrained the best.pt or last.pt of `dira3d pretrain`" in str(err.value), str(err.value)
    assert "strict=False" not in str(err.value)
    with pytest.raises(ValueError, match="use strict=False to load what matches"):
        load_pretrained(Classifier(3, 1, 1, width=0.125), tmp_path / "extra.pt", strict=True)


# 3. 3D checkpoint for a 2D bundle, and the reverse

def test_a_checkpoint_of_the_other_dimensionality_is_one_sentence(tmp_path):
    unet = UNet(3, 1, 1, width=0.125)
    ckpt3d = {"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(), "meta": {"spatial_dims": 3}}
    with pytest.raises(ValueError, match="this is a 3D checkpoint; a 2D bundle needs one pretrained with "
                                         r"bundles/dira_pretrain configs/2d\.json") as err:
        load_pretrained(ResNetClassifier(1, 3, backbone="resnet10"), ckpt3d, strict=True)
    assert "strict=False" not in str(err.value) and len(str(err.value)) < 400
    resnet = ResNetUNet(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
    ckpt2d = {"encoder": resnet.encoder.state_dict(), "decoder": resnet.decoder.state_dict(), "meta": {"spatial_dims": 2}}
    atomic_save(ckpt2d, tmp_path / "2d.pt")
    with pytest.raises(ValueError, match="this is a 2D checkpoint; a 3D bundle needs"):
        load_pretrained(Classifier(3, 1, 1, width=0.125), tmp_path / "2d.pt", strict=True)
    # as a 2D bundle builds its network (strict loading), and without meta: the kernels' rank tells
    from dira3d.evaluation import build_resnet_task_network

    atomic_save({k: v for k, v in ckpt3d.items() if k != "meta"}, tmp_path / "3d.pt")
    with pytest.raises(ValueError, match="this is a 3D checkpoint; a 2D bundle needs"):
        build_resnet_task_network("segmentation", backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8),
                                  pretrained=str(tmp_path / "3d.pt"))
    # the matching dimensionality still loads
    load_pretrained(ResNetSegmenter(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8)), tmp_path / "2d.pt",
                    parts=("encoder", "decoder"), strict=True)


# 4. --tiny models: the hint names the settings that matter and the values that fit, briefly

def test_infer_network_settings_reads_depth_decoder_and_width():
    from dira3d.networks.weights_fit import infer_network_settings

    assert infer_network_settings(ResNetSegmenter(1, 2, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
                                  .state_dict()) == {"spatial_dims": 2, "in_channels": 1, "backbone": "resnet10",
                                                     "decoder_channels": [16, 16, 8, 8, 8], "out": 2}
    for backbone in ("resnet18", "resnet34", "resnet50"):  # 34 and 50 have the same blocks per stage
        assert infer_network_settings(ResNetClassifier(1, 3, backbone=backbone).state_dict())["backbone"] == backbone
    assert infer_network_settings(Classifier(3, 1, 2, width=0.125).state_dict())["width"] == 0.125


@pytest.mark.parametrize("width", [1.0, 0.5, 0.125, 0.3, 1 / 3, 0.30625])
def test_inferred_width_rebuilds_every_encoder_convolution(width):
    """A width whose channel counts round unevenly (0.3: 10, 19, 19, 38 ... filters) was read from level 0 alone
    (10 / 32 = 0.3125, which builds 20 where the checkpoint has 19): the hint named settings that did not fit."""
    from dira3d.networks.weights_fit import infer_network_settings

    state = Classifier(3, 1, 2, width=width).state_dict()
    inferred = infer_network_settings(state)["width"]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert {k: tuple(v.shape) for k, v in Classifier(3, 1, 2, width=inferred).state_dict().items()} == shapes
    if width in (1.0, 0.5, 0.125, 0.3):
        assert inferred == width  # the round number, not 154 / 512


def test_export_of_a_tiny_2d_model_names_the_overrides(repo_root, tmp_path, capsys):
    bundle = tmp_path / "montgomery_lung_seg"
    shutil.copytree(repo_root / "bundles" / "montgomery_lung_seg" / "configs", bundle / "configs")
    _weights(repo_root, "montgomery_lung_seg", bundle / "models" / "model.pt", TINY_2D)
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(tmp_path / "m.ts")]) == 2
    err = capsys.readouterr().err
    # the list values quoted: unquoted, zsh stops at `[...]` ("no matches found") and bash may turn it into a file name
    printed = '--override backbone=resnet10 --override "decoder_channels=[16,16,8,8,8]" --override "roi_size=[64,64]"'
    assert printed in err
    assert "--tiny" in err and len(err) < 2000 and "… and" in err  # a count, not every key
    # the printed words, as a shell splits them, are the options that export the model
    args = ["torchscript", "--bundle", str(bundle), "--out", str(tmp_path / "m.ts"), *shlex.split(printed)]
    assert export_main(args) == 0, capsys.readouterr().err
    # 3D: the width
    lidc = tmp_path / "lidc_nodule_seg"
    shutil.copytree(repo_root / "bundles" / "lidc_nodule_seg" / "configs", lidc / "configs")
    _weights(repo_root, "lidc_nodule_seg", lidc / "models" / "model.pt", {"width": 0.125})
    with pytest.raises(ValueError, match="--override width=0.125") as info:
        load_bundle_network(lidc)
    assert len(str(info.value)) < 2000


def test_localise_of_a_tiny_model_names_backbone_and_roi_size(tmp_path, capsys):
    from dira3d.evaluation.localise import main as localise_main

    atomic_save(ResNetClassifier(1, 14, backbone="resnet10").state_dict(), tmp_path / "model.pt")
    (tmp_path / "boxes.json").write_text(json.dumps({"test": []}))
    with pytest.raises(SystemExit):
        localise_main(["--bbox-datalist", str(tmp_path / "boxes.json"), "--model", str(tmp_path / "model.pt"),
                       "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "--backbone resnet10" in err and "--roi-size 64 64" in err
    assert len(err) < 2000, f"{len(err)} characters of error"


def test_tiny_instructions_are_documented(repo_root):
    two_d = (repo_root / "docs" / "2d.md").read_text(encoding="utf-8")
    deployment = (repo_root / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert "--backbone resnet10 --roi-size 64 64" in two_d and "--override backbone=resnet10" in two_d
    assert "--override backbone=resnet10" in deployment and "--override width=0.125" in deployment


# 5. key_map.json of a 2D checkpoint

def test_key_map_layout_follows_the_checkpoints_spatial_dims(tmp_path):
    resnet = ResNetUNet(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
    ckpt = {"encoder": resnet.encoder.state_dict(), "decoder": resnet.decoder.state_dict(),
            "meta": {"spatial_dims": 2, "backbone": "resnet10", "network": "ResNetUNet"}}
    key_map = json.loads(export_pretrained(ckpt, tmp_path / "2d", formats=("pt",))["key_map.json"].read_text())
    assert key_map["spatial_dims"] == 2
    assert "(out, in, kx, ky)" in key_map["layout"] and "(B, C, X, Y)" in key_map["layout"]
    assert "kz" not in key_map["layout"] and "ResNetUNet" in key_map["layout"]
    assert key_map["parts"]["encoder"]["layer1.0.conv1.weight"]["meaning"].startswith("ResNet stage 1, block 0")
    unet = UNet(2, 1, 1, width=0.125)  # a 2D Models Genesis U-Net without meta: kernel rank
    key_map = json.loads(export_pretrained({"encoder": unet.encoder.state_dict()}, tmp_path / "u2d", parts=("encoder",),
                                           formats=("pt",))["key_map.json"].read_text())
    assert "(out, in, kx, ky)" in key_map["layout"] and "kz" not in key_map["layout"]
    assert "(3x3)" in key_map["parts"]["encoder"]["levels.0.conv1.conv.weight"]["meaning"]
    unet3d = UNet(3, 1, 1, width=0.125)
    key_map = json.loads(export_pretrained({"encoder": unet3d.encoder.state_dict(), "meta": {"spatial_dims": 3}},
                                           tmp_path / "3d", parts=("encoder",), formats=("pt",))["key_map.json"].read_text())
    assert "(out, in, kx, ky, kz)" in key_map["layout"] and "(B, C, X, Y, Z)" in key_map["layout"]


# 6. one MONAI Label start command

def test_monailabel_start_command_agrees_with_the_docs(repo_root):
    from dira3d.deploy.monailabel import start_command

    main_py = repo_root / "dira3d" / "deploy" / "monailabel_app" / "main.py"
    docstring = ast.get_docstring(ast.parse(main_py.read_text(encoding="utf-8")))
    docs = (repo_root / "docs" / "deployment.md").read_text(encoding="utf-8")
    command = start_command("/venv", "/app", "/studies", "/bundles", 8000)
    assert command[:4] == ["/venv/bin/python", "-m", "monailabel.main", "start_server"]
    for text in (docstring, docs):
        assert "/bin/python -m monailabel.main start_server" in text
        assert "bin/monailabel start_server" not in text


def test_monailabel_app_checks_the_bundles_path_before_copying(repo_root, tmp_path, capsys):
    # the app reads --conf bundles only when the server starts; a wrong --bundles must fail here,
    # before the app folder is created, not after the user starts the server
    for bundles in (tmp_path / "missing", tmp_path):  # no such folder / a folder without bundles
        assert export_main(["monailabel-app", "--out", str(tmp_path / "app"), "--bundles", str(bundles)]) == 2
        assert str(bundles) in capsys.readouterr().err and not (tmp_path / "app").exists()
    assert export_main(["monailabel-app", "--out", str(tmp_path / "app"), "--bundles", str(repo_root / "bundles")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "app" / "main.py").is_file() and "start_server" in out


def test_monailabel_app_names_a_studies_folder_that_is_not_there_and_prints_it_absolute(repo_root, tmp_path, capsys,
                                                                                         monkeypatch):
    """--studies was only pasted into the printed start command: a misspelt folder went unnoticed until the server
    listed no scan, and a relative one named another folder when the server was started from elsewhere."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    base = ["monailabel-app", "--bundles", str(repo_root / "bundles")]
    assert export_main(base + ["--out", str(tmp_path / "app1"), "--studies", "scans"]) == 0
    out = capsys.readouterr().out
    assert f"--studies {tmp_path / 'scans'} --conf" in out and "note: --studies" not in out
    assert export_main(base + ["--out", str(tmp_path / "app2"), "--studies", "scnas"]) == 0
    out = capsys.readouterr().out
    assert f"--studies {tmp_path / 'scnas'} --conf" in out
    assert "note: --studies scnas is not a folder (yet)" in out
    assert export_main(base + ["--out", str(tmp_path / "app3")]) == 0  # not given: a placeholder, no note
    out = capsys.readouterr().out
    assert "--studies <studies folder> --conf" in out and "note: --studies" not in out


def test_monailabel_app_prints_a_start_command_that_works_from_any_folder(repo_root, tmp_path, capsys, monkeypatch):
    """The printed command had --app and --conf bundles as given (relative: another folder once pasted elsewhere) and
    no quotes (a path with a space split into two words)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(repo_root / "bundles" / "lits_liver_seg" / "configs", tmp_path / "my bundles" / "lits_liver_seg"
                    / "configs")
    assert export_main(["monailabel-app", "--out", "my app", "--studies", "my scans", "--bundles", "my bundles"]) == 0
    line = next(t for t in capsys.readouterr().out.splitlines() if "start_server" in t)
    words = shlex.split(line)
    assert words[words.index("--app") + 1] == str(tmp_path / "my app")
    assert words[words.index("--studies") + 1] == str(tmp_path / "my scans")
    assert words[words.index("bundles") + 1] == str(tmp_path / "my bundles")
    assert (tmp_path / "my app" / "main.py").is_file()


def test_monailabel_app_refuses_a_file_as_out_and_keeps_it(repo_root, tmp_path, capsys):
    """--out naming a file was a NotADirectoryError traceback."""
    out = tmp_path / "ct.nrrd"
    out.write_bytes(b"user data")
    assert export_main(["monailabel-app", "--out", str(out), "--bundles", str(repo_root / "bundles")]) == 2
    err = capsys.readouterr().err
    assert f"{out} is a file, not a folder" in err and "--out" in err and "Traceback" not in err
    assert out.read_bytes() == b"user data"


@pytest.mark.parametrize("what", ["torchscript", "onnx"])
def test_export_names_a_roi_size_or_input_shape_that_does_not_fit_the_bundle(what, repo_root, tmp_path, capsys):
    """`--override roi_size=16` (a number) was a TypeError traceback, a 2D `--input-shape` for a 3D bundle PyTorch's
    "expected 5D input (got 4D input)", and a --check-scan smaller than the crop said nothing on what to do."""
    import numpy as np
    import SimpleITK as sitk

    ckpt = _weights(repo_root, "lits_liver_seg", tmp_path / "lits.pt", {"width": 0.125})
    base = [what, "--bundle", "lits_liver_seg", "--checkpoint", str(ckpt), "--out", str(tmp_path / f"m.{what}"),
            "--override", "width=0.125"]
    assert export_main(base + ["--override", "roi_size=16"]) == 2  # a number for a list: check_overrides
    err = capsys.readouterr().err
    assert "roi_size=16 is a number, but the setting is a list" in err and len(err.strip().splitlines()) == 1
    assert export_main(base + ["--override", "roi_size=[16,0,8]"]) == 2  # a list, but not of positive sizes
    err = capsys.readouterr().err
    assert "roi_size [16, 0, 8] is not a list of positive whole numbers" in err and '"roi_size=[16,16,8]"' in err
    assert export_main(base + ["--input-shape", "1", "1", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "--input-shape (input_shape) 1 1 16 16 has 4 numbers" in err and "3D" in err and "e.g. 1 1 64 64 32" in err
    scan = tmp_path / "small.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.int16)), str(scan))
    assert export_main(base + ["--check-scan", str(scan)]) == 2
    err = capsys.readouterr().err
    assert f"does not fit in {scan}" in err and "give a smaller --input-shape" in err
    assert not (tmp_path / f"m.{what}").exists()


def _copy_half_then(stop: BaseException):
    """A shutil.copytree that copies main.py and then stops as a Ctrl-C (or a full disk) would."""
    def copytree(src, dst, **kwargs):
        Path(dst).mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(src) / "main.py", Path(dst) / "main.py")
        raise stop
    return copytree


def test_an_interrupted_monailabel_app_export_leaves_no_half_copied_folder(repo_root, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the app was copied left a partial folder, which the rerun refused ('is not empty')."""
    import dira3d.deploy.monailabel as monailabel

    copytree = shutil.copytree
    argv = ["monailabel-app", "--out", str(tmp_path / "app"), "--bundles", str(repo_root / "bundles")]
    monkeypatch.setattr(monailabel.shutil, "copytree", _copy_half_then(KeyboardInterrupt()))
    assert export_main(argv) == 130
    assert f"interrupted; nothing was written to {tmp_path / 'app'}" in capsys.readouterr().err
    assert not (tmp_path / "app").exists()
    # a folder the user made (empty) stays, emptied again; a failed copy (a full disk) cleans up the same way
    (tmp_path / "mine").mkdir()
    monkeypatch.setattr(monailabel.shutil, "copytree", _copy_half_then(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        monailabel.prepare_app(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    monkeypatch.setattr(monailabel.shutil, "copytree", copytree)
    assert export_main(argv) == 0  # the rerun
    assert (tmp_path / "app" / "main.py").is_file() and "start_server" in capsys.readouterr().out


@pytest.mark.parametrize("stop, code", [(RuntimeError("building the MONAI Label environment failed (exit 1)"), 2),
                                         (KeyboardInterrupt(), 130)])
def test_a_failed_or_interrupted_build_env_removes_the_app_it_copied(repo_root, tmp_path, capsys, monkeypatch, stop, code):
    """`export monailabel-app --build-env`: the app is copied, then the environment is built (minutes); a build that
    fails or is stopped left the app folder, so the rerun refused it ('is not empty')."""
    import dira3d.deploy.monailabel as monailabel

    def build():
        assert (tmp_path / "app" / "main.py").is_file()  # the app was copied first
        raise stop

    monkeypatch.setattr(monailabel, "ensure_monailabel_env", build)
    argv = ["monailabel-app", "--out", str(tmp_path / "app"), "--bundles", str(repo_root / "bundles"), "--build-env"]
    assert export_main(argv) == code
    capsys.readouterr()
    assert not (tmp_path / "app").exists()


def test_removed_if_failed_leaves_a_folder_that_held_files_alone(tmp_path):
    from dira3d.utils.atomic import removed_if_failed

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt), removed_if_failed(tmp_path / "kept") as folder:
        (folder / "new.txt").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["new.txt", "notes.txt"]
    with removed_if_failed(tmp_path / "done") as folder:  # a block that ends well keeps what it wrote
        folder.mkdir()
        (folder / "a.txt").write_text("a")
    assert (tmp_path / "done" / "a.txt").is_file()


def test_exports_keep_an_earlier_export_unless_overwrite(repo_root, tmp_path, capsys):
    """A second torchscript/onnx export to the same --out used to replace the first silently; a name
    without a suffix used to be written as name.ts while the command printed the name."""
    bundle = tmp_path / "luna16_nodule_fpr"
    shutil.copytree(repo_root / "bundles" / "luna16_nodule_fpr" / "configs", bundle / "configs")
    _weights(repo_root, "luna16_nodule_fpr", bundle / "models" / "model.pt", {"width": 0.125})
    base = ["torchscript", "--bundle", str(bundle), "--override", "width=0.125"]
    assert export_main(base) == 0, capsys.readouterr().err
    first = (bundle / "models" / "model.ts").read_bytes()
    assert export_main(base) == 2  # the default <bundle>/models/model.ts is kept
    err = capsys.readouterr().err
    assert "model.ts already exists" in err and "--overwrite" in err
    assert (bundle / "models" / "model.ts").read_bytes() == first
    assert export_main([*base, "--checkpoint", str(tmp_path / "missing.pt"), "--overwrite"]) == 2  # a failed export ...
    assert (bundle / "models" / "model.ts").read_bytes() == first  # ... leaves the earlier one as it was
    capsys.readouterr()
    assert export_main([*base, "--overwrite"]) == 0
    assert torch.jit.load(str(bundle / "models" / "model.ts")) is not None
    assert export_main([*base, "--out", str(tmp_path / "plain")]) == 0  # exactly the path given
    assert (tmp_path / "plain").is_file() and not (tmp_path / "plain.ts").exists()
    assert "written to " + str(tmp_path / "plain") in capsys.readouterr().out
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary file left behind
    (tmp_path / "m.onnx").write_bytes(b"an earlier onnx export")
    args = ["onnx", "--bundle", str(bundle), "--override", "width=0.125", "--out", str(tmp_path / "m.onnx")]
    assert export_main(args) == 2
    assert "m.onnx already exists" in capsys.readouterr().err
    assert (tmp_path / "m.onnx").read_bytes() == b"an earlier onnx export"
    assert export_main(["onnx", "--bundle", str(bundle), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
