"""Session 23b mutation audit of dira3d.engines.command (`dira3d pretrain`): its messages and checks, pinned on the
public helpers without a training run."""

from __future__ import annotations

import json

import pytest
import torch

from dira3d.engines.command import (BUNDLE_DIR, early_stop_note, finished_message, interrupted_message, parse_override,
                                    visual_words_mismatch)
from dira3d.utils.interrupts import StoppedBySignal, TerminatedBySignal
from dira3d.visual_words.writer import FORMAT

CONFIGS = BUNDLE_DIR / "configs"


def test_parse_override_strips_the_key_and_refuses_an_empty_one():
    assert parse_override(" width =0.5") == ("width", 0.5)
    for text in ("=5", "  =moco"):
        with pytest.raises(ValueError, match="write key=value"):
            parse_override(text)


def test_interrupted_message_before_the_first_checkpoint_names_ctrl_c_or_sigterm(tmp_path):
    last = tmp_path / "models" / "last.pt"
    assert interrupted_message(tmp_path, {}, KeyboardInterrupt()) == (
        f"interrupted before the first checkpoint ({last} does not exist); rerunning the same command starts afresh")
    assert interrupted_message(tmp_path, {}, TerminatedBySignal()).startswith("stopped by SIGTERM before the first checkpoint")


def test_interrupted_message_after_a_checkpoint_says_how_to_resume(tmp_path):
    last = tmp_path / "models" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert interrupted_message(tmp_path, {}, KeyboardInterrupt()) == (
        f"interrupted; the last checkpoint is {last}; rerun the same command to resume from it")
    assert interrupted_message(tmp_path, {"resume": "false"}, None) == (
        f"interrupted; the last checkpoint is {last}; rerun without --override resume=false to resume from it")
    assert interrupted_message(tmp_path, {"resume": True}, StoppedBySignal("SIGTERM", 12)) == (
        f"stopped by SIGTERM at iteration 12; {last} saved; rerun the same command to resume from it")


@pytest.mark.parametrize("content", [{"meta": {"command": "dira3d visual-words"}, "training": []},
                                     {"format": FORMAT, "training": []}])
def test_a_visual_words_output_needs_the_visual_words_config_and_fits_it(tmp_path, content):
    datalist = tmp_path / "visual_words.json"
    datalist.write_text(json.dumps(content))
    train, vw = str(CONFIGS / "train.json"), str(CONFIGS / "visual_words.json")
    assert "pretrain on it with --config visual_words.json" in visual_words_mismatch(datalist, [train], {})
    assert visual_words_mismatch(datalist, [train, vw], {}) == ""


def test_the_visual_words_config_refuses_a_datalist_of_volumes(tmp_path):
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    train, vw = str(CONFIGS / "train.json"), str(CONFIGS / "visual_words.json")
    assert "reads the output of `dira3d visual-words`" in visual_words_mismatch(datalist, [train, vw], {})
    assert visual_words_mismatch(datalist, [train], {}) == ""


def test_early_stop_note_only_for_a_run_early_stopping_ended(tmp_path):
    stopped = {"stopped_epoch": 7, "metric": "val_loss", "counter": 3, "stage": "res", "patience": 3, "best_epoch": 4}
    torch.save({"trainer": {"early_stop": stopped}}, tmp_path / "stopped.pt")
    torch.save({"trainer": {"early_stop": {**stopped, "stopped_epoch": None}}}, tmp_path / "running.pt")
    assert early_stop_note(tmp_path / "stopped.pt").startswith(
        "stopped early after epoch 7: val_loss had not improved for 3 validation(s) in the final stage 'res'")
    assert early_stop_note(tmp_path / "running.pt") == ""


def test_finished_message_hints_the_width_only_when_it_is_not_the_default(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"trainer": {}}, models / "last.pt")
    full = finished_message(tmp_path, [str(CONFIGS / "train.json")], {}).splitlines()
    assert full[-1] == (f"fine-tune:   dira3d finetune --bundle BUNDLE --datalist DATALIST --pretrained {models / 'last.pt'} "
                        "--output-dir runs/ft (docs/finetuning.md)")
    tiny = finished_message(tmp_path, [str(CONFIGS / "train.json")], {"width": 0.25}).splitlines()
    assert tiny[-1].endswith(f"--pretrained {models / 'last.pt'} --set width=0.25 --output-dir runs/ft (docs/finetuning.md)")


@pytest.mark.parametrize("configs, overrides, hint", [
    (["2d.json", "2d_tiny.json"], {}, " --tiny"),
    # `--override "decoder_channels=(16,16,8,8,8)"` is read as a tuple: the network of 2d_tiny.json all the same
    (["2d.json", "2d_tiny.json"], {"decoder_channels": (16, 16, 8, 8, 8)}, " --tiny"),
    (["2d.json"], {}, ""),  # the 2D bundles' own network: nothing to set
    (["2d.json"], {"backbone": "resnet18"}, " --set backbone=resnet18"),
    (["2d.json", "2d_tiny.json"], {"decoder_channels": [32, 16, 8, 8, 8]},
     ' --set backbone=resnet10 --set "decoder_channels=[32,16,8,8,8]"'),
])
def test_finished_message_of_a_2d_run_names_the_finetune_options_its_network_needs(tmp_path, configs, overrides, hint):
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"trainer": {}}, models / "last.pt")
    message = finished_message(tmp_path, [str(CONFIGS / c) for c in ["train.json", *configs]], overrides)
    assert message.splitlines()[-1] == (f"fine-tune:   dira3d finetune --bundle BUNDLE --datalist DATALIST --pretrained "
                                        f"{models / 'last.pt'}{hint} --output-dir runs/ft (docs/2d.md)")
