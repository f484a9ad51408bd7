"""The pretraining bundle in visual_words mode on the output of `dira3d visual-words` (issue 5)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dira3d.utils.checkpoint import load_checkpoint
from dira3d.visual_words import VolumeAutoencoder, discover_visual_words
from dira3d.visual_words.synthetic import write_template_datalist, write_visual_word_folder

CONFIGS = "bundles/dira_pretrain/configs"


@pytest.mark.slow
def test_bundle_trains_on_visual_word_shards(tmp_path, repo_root):
    datalist = write_template_datalist(tmp_path / "volumes", templates=3, per_template=3, val_per_template=2,
                                       shape=(48, 48, 24))
    torch.manual_seed(0)
    vw = tmp_path / "vw"
    discover_visual_words(datalist, vw, extractor=VolumeAutoencoder(width=0.125).eval(), classes=3, neighbours=3,
                          val_neighbours=2, patch_size=(16, 16, 8), border=(4, 4, 2), extractor_size=(32, 32, 16), seed=0)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json','{CONFIGS}/visual_words.json']",
        "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
        "--dataset_dir", str(vw), "--bundle_root", str(out), "--patch_size", "[16,16,8]", "--max_epochs", "2",
        "--stages", "[{'name':'dis','until_epoch':1,'losses':['dis']},{'name':'dira','losses':['dis','res','adv']}]",
    ]
    proc = subprocess.run(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "models" / "last.pt")
    assert ckpt["meta"]["dis_mode"] == "visual_words"
    # the visual-word head classifies the 3 discovered words
    final_linear = [v for k, v in ckpt["dis_head"].items() if k.endswith("weight") and v.ndim == 2][-1]
    assert final_linear.shape[0] == 3
    assert ckpt["trainer"]["epoch"] == 2



def test_pairs_per_epoch_sets_the_epoch_length_of_visual_word_pretraining(tmp_path, repo_root):
    """With few words (a small dataset, a GPU benchmark), an epoch of one pair per instance is shorter than one
    batch of 64 and drop_last leaves it empty: `pairs_per_epoch` (visual_words.json) draws that many pairs instead."""
    from monai.bundle import ConfigParser

    words = write_visual_word_folder(tmp_path / "vw", classes=3, instances=3).parent
    configs = [str(repo_root / CONFIGS / name) for name in ("train.json", "tiny.json", "visual_words.json")]
    lengths = {}
    for value in (None, 640):
        parser = ConfigParser()
        parser.read_config(configs)
        parser.update({"dataset_dir": str(words), "patch_size": [16, 16, 8], "pairs_per_epoch": value})
        lengths[value] = len(parser.get_parsed_content("train#dataset"))
    assert lengths == {None: 9, 640: 640}  # default: every one of the 3 x 3 instances once


@pytest.mark.parametrize("value", [0, -3, 2.5, "abc", True])
def test_pairs_per_epoch_other_than_a_whole_number_is_refused_naming_it(tmp_path, value):
    from dira3d.visual_words import VisualWordPairDataset

    words = write_visual_word_folder(tmp_path / "vw", classes=3, instances=3).parent
    with pytest.raises(ValueError, match=r"^pairs_per_epoch=.*give a whole number >= 1"):
        VisualWordPairDataset(words, pairs_per_epoch=value)
    assert len(VisualWordPairDataset(words, pairs_per_epoch=12.0)) == 12  # 12.0 as JSON may write it
