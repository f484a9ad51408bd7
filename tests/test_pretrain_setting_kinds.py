"""Settings of the pretraining bundle given a value of the wrong kind end in one ``error:`` line naming the setting
(session 26), under ``dira3d pretrain --override`` and ``python -m monai.bundle run`` alike.

Before: ``num_classes=abc`` and ``distortion_args=abc`` (defaults that are expressions, so ``check_overrides`` did not
judge them) failed in MONAI's traceback naming no setting; ``pin_memory=maybe`` (or ``--channels_last false`` under
``monai.bundle run``, which hands ``false`` on as text) ran with the setting on; ``log_every=0`` failed at the first
step with a ZeroDivisionError, ``log_every=-1`` and ``image_every=0`` logged / drew every iteration, ``max_epochs=1.5``
trained 2 epochs and ``num_classes=2.5`` 2 classes, without a word.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dira3d.data.errors import DataError
from dira3d.utils import check_whole_numbers


@pytest.fixture
def datalist(tmp_path):
    import nibabel as nib

    data = np.random.default_rng(0).random((32, 32, 16)).astype(np.float32)  # tiny.json's patch size
    entries = []
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
        entries.append({"image": str(tmp_path / f"{name}.nii.gz")})
    path = tmp_path / "pretrain_datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": entries[:1]}))
    return path


@pytest.mark.parametrize("key, value, expected", [
    ("pin_memory", "maybe", r"is text, but the setting is true or false \(default true on a GPU\)"),
    ("num_classes", "abc", r"is text, but the setting is a number \(default one class per training volume\)"),
    ("distortion_args", "abc", r"is text, but the setting is a mapping of names to values"),
    ("distortion_args", [1, 2], r"is a list, but the setting is a mapping of names to values"),
    ("patch_size", 32, r"is a number, but the setting is a list \(default \[64, 64, 32\]\)"),  # "has no len()"
])
def test_check_overrides_judges_settings_whose_default_is_an_expression(repo_root, key, value, expected):
    from dira3d.utils.overrides import check_overrides

    configs = [repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json"]
    with pytest.raises(ValueError, match=rf"^--override: {key}={value!r}".replace("[", r"\[") + f" {expected}.*; fix the value$"):
        check_overrides(configs, {key: value}, where="--override")


def test_check_overrides_keeps_values_of_the_right_kind_for_expression_defaults(repo_root):
    from dira3d.utils.overrides import check_overrides

    configs = [repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json"]
    check_overrides(configs, {"pin_memory": False, "num_classes": 5, "distortion_args": {"sigma": 4.0}})
    check_overrides(configs, {"distortion_args": None, "num_classes": "$2 * 3", "pin_memory": "@channels_last"})
    # a component (a mapping with _target_) may still be replaced by an expression or a reference
    check_overrides(configs, {"network_def": "$dira3d.networks.UNet(3, 1, 1, width=0.125)"})


@pytest.mark.parametrize("num_classes", ["abc", 2.5, True, None])
def test_build_dis_head_refuses_a_class_count_that_is_not_a_whole_number(num_classes):
    from dira3d.engines import build_dis_head

    with pytest.raises(DataError, match=rf"^num_classes={num_classes!r}: num_classes must be a positive integer .*"
                                        r"give a whole number >= 1"):
        build_dis_head("visual_words", 3, 8, num_classes=num_classes, hidden=4)
    head = build_dis_head("visual_words", 3, 8, num_classes=3.0, hidden=4)  # a whole number written as a float
    assert head(torch.zeros(2, 8, 1, 1, 1)).shape == (2, 3)


def test_distortion_from_settings_names_both_settings():
    from dira3d.transforms.compositions import NoDistortion, TransVWDistortion, distortion_from_settings

    for bad in ("abc", [1, 2], 5):
        with pytest.raises(DataError, match=rf"^distortion_args={bad!r} is not a mapping".replace("[", r"\[")):
            distortion_from_settings("transvw", bad)
    with pytest.raises(DataError, match=r"^distortion='transvw', distortion_args=\{'sigmas': 4.0\}: .*has no setting"):
        distortion_from_settings("transvw", {"sigmas": 4.0})
    assert isinstance(distortion_from_settings("none", None), NoDistortion)
    assert distortion_from_settings("transvw", {"sigma": 4.0}).sigma == 4.0
    assert isinstance(distortion_from_settings("transvw", {}), TransVWDistortion)


@pytest.mark.parametrize("patch_size", [32, [64, "a", 32], [64, 64], [64, 64, 31.5]])
def test_a_patch_size_that_is_not_whole_sizes_is_refused_naming_it(patch_size):
    from dira3d.engines.data import RandPatchPair, RandPatchPaird

    with pytest.raises(DataError, match=r"^patch_size=.* must have 3 positive sizes for spatial_dims=3, a list of whole "
                                        r"numbers, e.g. patch_size=\[64, 64, 32\]$"):
        RandPatchPaird("image", patch_size=patch_size)
    assert RandPatchPair(patch_size=(32, 32.0, 16)).patch_size == (32, 32, 16)


@pytest.mark.parametrize("betas", [[0.9], [0.9, 1.0], "abc", [0.9, "x"], None])
def test_adam_betas_that_are_not_two_numbers_in_0_1_are_refused_naming_the_setting(betas):
    """betas_d=[0.9] failed in Adam's first step with a bare IndexError inside MONAI's traceback."""
    from dira3d.engines.performance import build_adam

    module = torch.nn.Linear(2, 2)
    with pytest.raises(DataError, match=r"^betas_d=.*: Adam's betas must be a list of two numbers in \[0, 1\)"):
        build_adam([module], lr=0.001, betas=betas, device="cpu", name="lr_d")
    assert build_adam([module], lr=0.001, betas=(0.5, 0.999), device="cpu", name="lr_d").defaults["betas"] == (0.5, 0.999)


@pytest.mark.parametrize("settings, minimum, expected", [
    ({"log_every": 0}, 1, "log_every=0 is less than 1; give a whole number >= 1, e.g. --log_every 1"),
    ({"log_every": -1}, 1, "log_every=-1 is less than 1"),
    ({"max_epochs": 1.5}, 1, "max_epochs=1.5 is not a whole number"),
    ({"image_every": "abc"}, 1, "image_every='abc' is not a number"),
    ({"batch_size": True}, 1, "batch_size=True is not a number"),
    ({"save_every": -1}, 0, "save_every=-1 is negative; give a whole number >= 0, e.g. --save_every 0"),
])
def test_check_whole_numbers_names_the_setting(settings, minimum, expected):
    with pytest.raises(DataError) as err:
        check_whole_numbers(minimum, **settings)
    assert str(err.value).startswith(expected), str(err.value)


def test_check_whole_numbers_returns_ints():
    assert check_whole_numbers(max_epochs=2.0, log_every=1) == {"max_epochs": 2, "log_every": 1}
    assert check_whole_numbers(0, num_workers=0) == {"num_workers": 0}


@pytest.mark.parametrize("name", ["train.json", "multi_gpu_train.json"])
def test_the_pretraining_bundle_checks_counts_and_switches_before_anything_is_read(repo_root, name):
    from monai.bundle import ConfigParser

    folder = repo_root / "bundles" / "dira_pretrain" / "configs"
    config = json.loads((folder / name).read_text())
    checks = config["initialize"][1:4]
    assert checks[0] == ("$dira3d.utils.check_whole_numbers(max_epochs=@max_epochs, batch_size=@batch_size, "
                         "log_every=@log_every, image_every=@image_every, collapse_patience=@collapse_patience, "
                         "d_steps=@d_steps, queue_size=@queue_size)")
    assert checks[1] == "$dira3d.utils.check_whole_numbers(0, save_every=@save_every, num_workers=@num_workers)"
    # every true/false setting of train.json that is read as a truth value (not compile or amp, which take text,
    # nor resume and validation, read with as_bool) is checked
    parser = ConfigParser()
    parser.read_config(str(folder / "train.json"))
    switches = {key for key, value in parser.config.items() if isinstance(value, bool)} | {"pin_memory"}
    checked = {part.split("=")[0].strip() for part in checks[2].partition("(")[2].rstrip(")").split(",")}
    assert checked == switches - {"compile", "resume", "validation"}, checked ^ switches


def _monai_bundle_run(repo_root, tmp_path, datalist, *args):
    folder = repo_root / "bundles" / "dira_pretrain"
    configs = json.dumps([str(folder / "configs" / "train.json"), str(folder / "configs" / "tiny.json")])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs,
           "--meta_file", str(folder / "configs" / "metadata.json"), "--bundle_root", str(folder),
           "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), "--datalist", str(datalist),
           "--max_epochs", "1", "--batch_size", "1", *args]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300), out


@pytest.mark.parametrize("args, expected", [
    (["--num_classes", "abc"], "error: num_classes='abc': num_classes must be a positive integer"),
    (["--distortion_args", "abc"], "error: distortion_args='abc' is not a mapping; give the settings of distortion "
                                   "'transvw' by name"),
    (["--log_every", "0"], "error: log_every=0 is less than 1; give a whole number >= 1, e.g. --log_every 1"),
    (["--betas_d", "[0.9]"], "error: betas_d=[0.9]: Adam's betas must be a list of two numbers in [0, 1)"),
    (["--pin_memory", "false"], "error: pin_memory='false' is text, but the setting is true or false; give true or "
                                "false (python -m monai.bundle run: --pin_memory True or --pin_memory False)"),
])
def test_monai_bundle_run_refuses_a_setting_of_the_wrong_kind_in_one_line(repo_root, tmp_path, datalist, args,
                                                                         expected):
    proc, out = _monai_bundle_run(repo_root, tmp_path, datalist, *args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), text[-3000:]
    assert "Traceback" not in text and "Failed to" not in text, text[-3000:]
    assert not (out / "models" / "last.pt").exists()


@pytest.mark.parametrize("override, expected", [
    ("pin_memory=maybe", "--override: pin_memory='maybe' is text, but the setting is true or false"),
    ("log_every=-1", "log_every=-1 is less than 1"),  # logged every iteration without a word
    ("max_epochs=1.5", "max_epochs=1.5 is not a whole number"),  # trained 2 epochs
    ("num_classes=2.5", "num_classes=2.5: num_classes must be a positive integer"),  # trained 2 classes
])
def test_dira3d_pretrain_refuses_a_setting_of_the_wrong_kind_in_one_line(tmp_path, datalist, capsys, override,
                                                                        expected):
    from dira3d.engines.command import main

    argv = ["--datalist", str(datalist), "--tiny", "--output", str(tmp_path / "run"), "--override", "max_epochs=1",
            "--override", "batch_size=1", "--override", override]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's error (check_overrides)
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dira3d pretrain: error: ") and expected in err, err
    assert not (tmp_path / "run" / "models" / "last.pt").exists()


# ---------------------------------------------------------------- the fine-tuning bundles

TASK_BUNDLES = sorted(p.parent.parent.name for p in (Path(__file__).parent.parent / "bundles").glob("*/configs/evaluate.json"))


@pytest.mark.parametrize("bundle", TASK_BUNDLES)
@pytest.mark.parametrize("config", ["train.json", "multi_gpu_train.json"])
@pytest.mark.parametrize("key, value, expected", [
    ("val_interval", 0, "val_interval=0 is less than 1"),  # ignite's "Argument every should be integer ..." named none
    ("max_epochs", 1.5, "max_epochs=1.5 is not a whole number"),  # trained 2 epochs
    ("lr_patience", -1, "lr_patience=-1 is negative"),  # ran without a word
    ("amp", "maybe", "amp='maybe' is text, but the setting is true or false"),  # mixed precision on
])
def test_the_task_bundles_check_counts_and_amp_first(repo_root, tmp_path, monkeypatch, bundle, config, key, value,
                                                    expected):
    from monai.bundle import ConfigParser

    from dira3d.utils.bundle_errors import user_error_in

    folder = repo_root / "bundles" / bundle / "configs"
    files = [folder / "train.json"] + ([folder / config] if config != "train.json" else []) + [folder / "tiny.json"]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    monkeypatch.chdir(tmp_path)  # the bundle's default output folders are relative
    steps = len(parser["initialize"])
    for step in range(4):  # the split settings, the counts, the switches: nothing read or written before them
        parser.get_parsed_content(f"initialize#{step}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    parser[key] = value
    parser.parse()
    with pytest.raises(Exception) as err:
        for step in range(1, 4):
            parser.get_parsed_content(f"initialize#{step}")
    cause = user_error_in(err.value)
    assert isinstance(cause, DataError) and str(cause).startswith(expected), repr(err.value)
    assert steps > 4


@pytest.mark.parametrize(("setting", "expected"), [
    ("val_interval=0", "val_interval=0 is less than 1; give a whole number >= 1, e.g. --val_interval 1"),
    ("cache_rate=2", "cache_rate=2 is outside [0, 1]; give a number in [0, 1]"),  # check_ranges
])
def test_dira3d_finetune_refuses_a_setting_naming_it_before_caching(tmp_path, capsys, setting, expected):
    from test_bundles_finetune import make_classification

    from dira3d.evaluation.finetune import main as finetune_main

    path = make_classification(tmp_path / "data", "ncc.json", (16, 16, 8), folds=False)
    out = tmp_path / "out"
    assert finetune_main(["--bundle", "luna16_nodule_fpr", "--tiny", "--datalist", str(path), "--output-dir", str(out),
                          "--set", setting]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dira3d finetune:")]
    assert lines == [f"dira3d finetune: error: {expected}"], err
    assert "caching" not in err
    assert not out.exists()
