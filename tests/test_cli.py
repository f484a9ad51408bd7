"""The ``dira3d`` command line: every ``--help`` names each option's default (users should not have to read the code),
and MONAI's notices about the optional nvImageCodec are left out of the console."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dira3d.cli import COMMANDS
from dira3d.cli import main as cli_main
from dira3d.data.command import DATASETS
from dira3d.utils.cli_help import DefaultsHelpFormatter, _shown_default

EXPORTS = ("torchscript", "onnx", "pretrained", "monailabel-app")
COMMAND_LINES = (
    [["prepare", name] for name in DATASETS]
    + [["export", what] for what in EXPORTS]
    + [[name] for name in COMMANDS if name not in ("prepare", "export")]
)


def test_formatter_shows_defaults_only_where_there_is_one():
    parser = argparse.ArgumentParser(prog="toy", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the seed")  # 0 is a default, not "no default"
    parser.add_argument("--size", type=int, nargs=3, default=(64, 64, 32))  # no help text: a line is still printed
    parser.add_argument("--rate", type=float, default=0.5, help="rate in 100%% steps")
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("--src", required=True, help="input")
    parser.add_argument("--out", help="output")
    parser.add_argument("--window", default=(-1, 1), help="window (default -1000 1000)")
    text = " ".join(parser.format_help().split())
    assert "--seed SEED the seed (default: 0)" in text
    assert "--size SIZE SIZE SIZE (default: 64 64 32)" in text
    assert "rate in 100% steps (default: 0.5)" in text
    assert "a switch (default" not in text and "input (default" not in text and "output (default" not in text
    assert "window (default -1000 1000)" in text and "(default: -1 1)" not in text  # the help's own wording is kept


def test_export_without_what_to_export_names_the_choices(capsys):
    """`dira3d export` alone said `the following arguments are required: what`, argparse's internal name."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"required: {{{','.join(EXPORTS)}}}" in err and "required: what" not in err
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    assert f"usage: dira3d export [-h] {{{','.join(EXPORTS)}}} ..." in capsys.readouterr().out  # the usage as before


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=[" ".join(a) for a in COMMAND_LINES])
def test_every_command_help_names_its_defaults(argv, monkeypatch, capsys):
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def record(self, args=None, namespace=None):
        parsers.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", record)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    parser = parsers[0]
    if argv[0] == "export":  # a sub-parser of `dira3d export`
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[1]]
    assert issubclass(parser.formatter_class, DefaultsHelpFormatter), parser.prog
    missing = [
        action.option_strings[0] for action in parser._actions
        if _shown_default(action) is not None and f"(default: {_shown_default(action)})" not in help_text
    ]  # fmt: skip
    assert not missing, f"{parser.prog} --help does not show the default of {missing}"



def _nvimgcodec_notices(path, caplog, quiet: bool) -> list[str]:
    from monai.transforms import LoadImage

    from dira3d.cli import quiet_missing_nvimgcodec

    name = "monai.data.nvimgcodec_pydicom_plugin"
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger=name):
        warnings.simplefilter("always")
        if quiet:  # inside: the logger's level and the warning filters are restored when the block ends
            quiet_missing_nvimgcodec()
        LoadImage(image_only=True)(str(path))
        LoadImage(image_only=True)(str(path))
    texts = [r.getMessage() for r in caplog.records if r.name == name]
    return texts + [str(w.message) for w in caught if "nvImageCodec" in str(w.message)]


def test_missing_nvimgcodec_notices_are_left_out(tmp_path, caplog):
    import nibabel as nib
    import numpy as np

    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    if not _nvimgcodec_notices(path, caplog, quiet=False):
        pytest.skip("nvImageCodec is installed here: MONAI has no notice to leave out")
    assert _nvimgcodec_notices(path, caplog, quiet=True) == []


def test_pretrain_passes_its_output_folder_to_the_bundle_as_an_absolute_path(tmp_path, monkeypatch):
    # `--output '$run'` (a relative folder whose name starts with '$') reached the bundle as "$run/models",
    # which MONAI evaluates as a Python expression; every path it is given is absolute now
    import dira3d.utils.overrides as overrides
    from dira3d.engines.command import main as pretrain_main

    seen = {}
    monkeypatch.setattr(overrides, "run_bundle", lambda configs, **kwargs: seen.update(kwargs))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dl.json").write_text('{"training": []}')
    assert pretrain_main(["--datalist", "dl.json", "--output", "$__import__('os').getcwd()"]) == 0
    paths = {key: seen[key] for key in ("datalist", "dataset_dir", "ckpt_dir", "output_dir")}
    assert all(Path(p).is_absolute() and not p.startswith(("$", "%", "@")) for p in paths.values()), paths
    assert paths["ckpt_dir"] == str(tmp_path / "$__import__('os').getcwd()" / "models")


def _visual_words_datalist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "visual_words.json"
    path.write_text(json.dumps({"meta": {"command": "dira3d visual-words", "classes": 2, "patch_size": [16, 16, 8]},
                                "training": [{"image": "shards/training/class_0000.npy", "label": 0}]}))
    return path


def test_pretrain_refuses_a_visual_words_output_without_its_config_and_the_reverse(tmp_path, monkeypatch, capsys):
    """`dira3d pretrain --datalist vw/visual_words.json` without `--config visual_words.json` cached the dataset and
    then failed with 'class_0000.npy: loaded as a 5D image ...; 3D pretraining needs 3D volumes'; with it on a volumes
    datalist, it said '.../manifest.json does not exist'."""
    import dira3d.utils.overrides as overrides
    from dira3d.engines.command import main as pretrain_main

    calls = []
    monkeypatch.setattr(overrides, "run_bundle", lambda configs, **kwargs: calls.append(configs))
    vw = _visual_words_datalist(tmp_path / "vw")
    volumes = tmp_path / "prepared" / "pretrain_datalist.json"
    volumes.parent.mkdir()
    volumes.write_text(json.dumps({"training": [{"image": "volumes/a.nii.gz"}], "meta": {"dataset": "generic"}}))
    for argv, expected in (
        (["--datalist", str(vw)], r"is the output of `dira3d visual-words` \(patch shards, not volumes\); pretrain on it "
                                  r"with --config visual_words.json"),
        (["--datalist", str(volumes), "--config", "visual_words.json"], r"--config visual_words.json reads the output of "
                                                                         r"`dira3d visual-words`, but --datalist .* is not one"),
    ):
        with pytest.raises(SystemExit) as stop:
            pretrain_main(argv + ["--output", str(tmp_path / "run"), "--tiny"])
        assert stop.value.code == 2 and re.search(expected, capsys.readouterr().err)
    assert calls == [] and not (tmp_path / "run").exists()
    assert pretrain_main(["--datalist", str(vw), "--config", "visual_words.json", "--output", str(tmp_path / "run")]) == 0
    assert pretrain_main(["--datalist", str(volumes), "--output", str(tmp_path / "run")]) == 0 and len(calls) == 2


def test_pretrain_ends_saying_where_the_checkpoints_are_and_how_to_fine_tune(tmp_path, monkeypatch, capsys):
    """A finished `dira3d pretrain` ended with ignite's 'Engine run finished': no word of best.pt, TensorBoard or the
    next step, and a --tiny checkpoint needs the task bundle's width set to 0.125."""
    import dira3d.utils.overrides as overrides
    from dira3d.engines.command import main as pretrain_main

    def run_bundle(configs, ckpt_dir, **kwargs):
        Path(ckpt_dir).mkdir(parents=True)
        for name in ("best.pt", "last.pt"):
            (Path(ckpt_dir) / name).write_bytes(b"x")

    monkeypatch.setattr(overrides, "run_bundle", run_bundle)
    volumes = tmp_path / "pretrain_datalist.json"
    volumes.write_text(json.dumps({"training": [], "meta": {}}))
    out = tmp_path / "run"
    assert pretrain_main(["--datalist", str(volumes), "--output", str(out), "--tiny"]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoints: {out / 'models' / 'best.pt'}" in printed and str(out / "models" / "last.pt") in printed
    assert f"tensorboard --logdir {out / 'eval'}" in printed
    assert f"dira3d finetune --bundle BUNDLE --datalist DATALIST --pretrained {out / 'models' / 'best.pt'} --set width=0.125" in printed
    assert pretrain_main(["--datalist", str(volumes), "--output", str(tmp_path / "run2")]) == 0
    assert "--set width" not in capsys.readouterr().out  # the bundles' default width
    # 2D (2d.json): the width says nothing; a 2d_tiny.json checkpoint needs --tiny (the bundles' resnet50 refused it)
    assert pretrain_main(["--datalist", str(volumes), "--output", str(tmp_path / "run3"), "--config", "2d.json",
                          "--config", "2d_moco.json", "--config", "2d_tiny.json"]) == 0
    printed = capsys.readouterr().out
    assert f"--pretrained {tmp_path / 'run3' / 'models' / 'best.pt'} --tiny --output-dir runs/ft (docs/2d.md)" in printed
    assert pretrain_main(["--datalist", str(volumes), "--output", str(tmp_path / "run4"), "--config", "2d.json",
                          "--override", "backbone=resnet18"]) == 0
    printed = capsys.readouterr().out
    assert f"--pretrained {tmp_path / 'run4' / 'models' / 'best.pt'} --set backbone=resnet18 --output-dir" in printed
    assert pretrain_main(["--datalist", str(volumes), "--output", str(tmp_path / "run5"), "--config", "2d.json"]) == 0
    assert "best.pt --output-dir runs/ft (docs/2d.md)" in capsys.readouterr().out  # the bundles' defaults


def test_pretrain_tiny_with_2d_json_adds_2d_tiny_json_after_the_2d_configs(tmp_path, monkeypatch):
    """`dira3d pretrain --tiny --config 2d.json --config 2d_moco.json` (as `dira3d finetune --tiny` is written) stacked
    the 3D tiny.json before 2d.json, which set batch 32 and the 224² ResNet-50 back: on a few X-rays "the training
    data loader yields no batch ... lower batch_size", not a word of 2d_tiny.json."""
    import dira3d.utils.overrides as overrides
    from dira3d.engines.command import main as pretrain_main

    calls = []
    monkeypatch.setattr(overrides, "run_bundle", lambda configs, **kwargs: calls.append([Path(c).name for c in configs]))
    datalist = tmp_path / "radiographs_datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"dataset": "radiographs"}}))
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"lr_g": 0.01}))
    for extra, expected in (
        (["--config", "2d.json", "--config", "2d_moco.json"], ["train.json", "2d.json", "2d_moco.json", "2d_tiny.json"]),
        (["--config", "2d.json", "--config", "2d_barlow.json", "--config", str(mine)],  # the user's own file wins
         ["train.json", "2d.json", "2d_barlow.json", "2d_tiny.json", "mine.json"]),
        (["--config", "2d.json", "--config", "2d_simsiam.json", "--config", "2d_tiny.json"],  # not twice
         ["train.json", "2d.json", "2d_simsiam.json", "2d_tiny.json"]),
        ([], ["train.json", "tiny.json"]),  # 3D: unchanged
    ):
        assert pretrain_main(["--datalist", str(datalist), "--output", str(tmp_path / f"run{len(calls)}"), "--tiny",
                              *extra]) == 0
        assert calls[-1] == expected, extra


def test_version_names_dira3d_torch_and_monai(capsys):
    import monai
    import torch

    import dira3d

    assert cli_main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"dira3d {dira3d.__version__} (torch ")
    assert torch.__version__.split("+")[0] in out and f"monai {monai.__version__}" in out


def test_python_dash_m_dira3d_runs_the_command(repo_root):
    """`python -m dira3d ...` where the console script is not on PATH (a checkout on PYTHONPATH, as on a GPU machine
    the package is carried to): the same command and exit codes."""
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    ok = subprocess.run([sys.executable, "-m", "dira3d", "pretrain", "--help"], capture_output=True, text=True,
                        timeout=120, env=env, cwd="/")
    assert ok.returncode == 0 and "usage: dira3d pretrain" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dira3d", "nonsense"], capture_output=True, text=True, timeout=120,
                         env=env, cwd="/")
    assert bad.returncode == 2 and "nonsense" in bad.stderr


def test_experiment_help_is_a_summary_that_points_to_the_docs(capsys):
    """`dira3d experiment --help` printed the module's whole reference (about 150 lines): now a screen as the other
    commands' helps, with the config example, every config key and where the reference is, which holds it all."""
    from dira3d.evaluation.experiment_config import KNOWN

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["experiment", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 50, len(text.splitlines())
    assert text.startswith("usage: dira3d experiment [-h] --config CONFIG\n")
    assert 'docs/results.md, "The dira3d experiment command"' in " ".join(text.split())
    missing = [key for key in KNOWN if key != "welch" and not re.search(rf"^ +{key}:", text, flags=re.M)]
    assert not missing, f"config keys not in the help's example: {missing}"
    results = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text(encoding="utf-8")
    section = results.split("\n## The `dira3d experiment` command\n", 1)[1].split("\n## ", 1)[0]
    for key in KNOWN:  # the reference names every key (welch: its older spelling of `test: welch`)
        assert f"`{key}" in section or f"\n{key}:" in section, key
