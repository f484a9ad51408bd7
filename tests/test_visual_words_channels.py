"""`dira3d visual-words` on volumes of several channels: the 4D volumes of `dira3d prepare generic --sequences` (a
multi-sequence MR datalist, channels last), which `prepare` ends by sending to `dira3d visual-words`. The extractor
was a one-channel autoencoder, and the run stopped with a traceback from its first convolution ('expected input
[2, 2, 32, 32, 16] to have 1 channels, but got 2 channels instead')."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from dira3d.cli import main as cli_main
from dira3d.visual_words.extractor import train_extractor
from dira3d.visual_words.synthetic import template_volume

SMALL = ["--patch-size", "16", "16", "8", "--border", "4", "4", "2", "--extractor-size", "32", "32", "16",
         "--extractor-width", "0.125", "--extractor-epochs", "1", "--classes", "2", "--neighbours", "2",
         "--val-neighbours", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def two_sequence_datalist(tmp_path_factory):
    """3 volumes of 2 channels (x, y, z, c), as `prepare generic --sequences 't1=...' 'flair=...'` writes them."""
    folder = tmp_path_factory.mktemp("vw_channels")
    (folder / "volumes").mkdir()
    entries = []
    for i in range(3):
        t1, flair = template_volume(i, (40, 40, 24)), template_volume(i + 1, (40, 40, 24))
        nib.save(nib.Nifti1Image(np.stack([t1, flair], axis=-1), np.eye(4)), folder / "volumes" / f"s{i}.nii.gz")
        entries.append({"image": f"volumes/s{i}.nii.gz", "case_id": f"s{i}"})
    path = folder / "pretrain_datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": [],
                                "meta": {"dataset": "generic", "modality": "mr", "channels": ["t1", "flair"]}}))
    return path


def test_two_channel_volumes_give_two_channel_visual_words_and_the_pretraining_command_says_so(
        two_sequence_datalist, tmp_path, capsys):
    out = tmp_path / "vw"
    assert cli_main(["visual-words", "--datalist", str(two_sequence_datalist), "--out", str(out), *SMALL]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["channels"] == 2
    shard = np.load(out / manifest["classes"][0]["shards"]["training"])
    assert shard.shape == (2, 2, 16, 16, 8)  # (K, C, X, Y, Z): both sequences of every instance
    assert (shard[:, 0] != shard[:, 1]).any()  # two channels, not one repeated
    stdout = capsys.readouterr().out
    # the bundle's network takes 1 channel by default: pretraining on these words needs in_channels=2
    assert "--override \"patch_size=[16,16,8]\" --override in_channels=2 --output runs/dira_pretrain" in stdout, stdout


def test_the_extractor_checkpoint_records_the_channels_and_refuses_other_ones(two_sequence_datalist, tmp_path):
    entries = [{"image": str(two_sequence_datalist.parent / e["image"])}
               for e in json.loads(two_sequence_datalist.read_text())["training"]]
    size = dict(size=(32, 32, 16), width=0.125, batch_size=2, seed=0)
    model = train_extractor(entries, epochs=1, checkpoint_path=tmp_path / "x.pt", **size)
    assert model.in_channels == 2 and model.encode(torch.zeros(1, 2, 32, 32, 16)).shape[1] == 64
    state = torch.load(tmp_path / "x.pt", weights_only=True)
    assert state["recorded"]["in_channels"] == 2
    state["recorded"].pop("in_channels")  # as a one-channel checkpoint of the same volumes records it (not at all)
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="image channels: 1 → 2"):
        train_extractor(entries, epochs=1, checkpoint_path=tmp_path / "x.pt", **size)
