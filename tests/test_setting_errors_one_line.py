"""Settings checked deep in dira3d's classes (the trainer, the U-Net, the losses) raise ``DataError`` (a ``ValueError``):
under ``python -m monai.bundle run`` they end in one ``error:`` line naming the setting; as plain ``ValueError`` they
printed MONAI's ``Failed to instantiate component`` traceback of some 65 lines (2026-11-28: ``--d_steps 0``,
``--width -1``, ``--lambda_res -1``, ``--second_view foo``, ``--clip_grad_norm -2``, ``--adversarial_kind foo``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dira3d.data.errors import DataError
from dira3d.visual_words.synthetic import write_visual_word_folder

CONFIGS = "bundles/dira_pretrain/configs"


def _raises(call, match):
    with pytest.raises(DataError, match=match):
        call()


def test_setting_checks_raise_data_error():
    from dira3d.engines.components import check_dis_mode, resolve_views
    from dira3d.engines.trainer_checks import check_clip_grad_norm, check_second_view
    from dira3d.losses import AdversarialLoss, RestorationLoss
    from dira3d.losses.dira import parse_weights
    from dira3d.networks import UNet

    _raises(lambda: check_second_view("foo", "moco"), r"^second_view='foo' is not supported")
    _raises(lambda: check_second_view("restored", "visual_words"), r"^second_view='restored' applies to")
    _raises(lambda: check_clip_grad_norm(-2), r"^clip_grad_norm=-2 must be null")
    _raises(lambda: check_dis_mode("nope"), r"^dis_mode='nope' is not supported")
    _raises(lambda: resolve_views("nope", "moco", 3), r"^views='nope' is not supported")
    _raises(lambda: UNet(spatial_dims=3, width=-1), r"^width=-1 must be a positive number")
    _raises(lambda: UNet(spatial_dims=4), r"^spatial_dims=4 is not supported")
    _raises(lambda: parse_weights({"res": -1}), r"^loss weights: .* must be a finite number >= 0")
    _raises(lambda: parse_weights({"nope": 1}), r"^loss weights: unknown term 'nope'")
    _raises(lambda: parse_weights("res"), r"^loss weights: cannot read 'res'")
    _raises(lambda: AdversarialLoss("foo"), r"adversarial_kind")
    _raises(lambda: RestorationLoss("foo"), r"restoration_kind")



@pytest.mark.parametrize("setting", [["--d_steps", "0"], ["--width", "-1"], ["--adversarial_kind", "foo"]])
def test_monai_bundle_run_ends_in_one_error_line(tmp_path, repo_root, setting):
    words = write_visual_word_folder(tmp_path / "vw").parent
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json','{CONFIGS}/visual_words.json']",
           "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
           "--dataset_dir", str(words), "--bundle_root", str(tmp_path / "run"), "--patch_size", "[16,16,8]",
           "--max_epochs", "1", *setting]
    done = subprocess.run(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and setting[0][2:] in errors[0], errors
    assert not (tmp_path / "run" / "models" / "last.pt").exists()
