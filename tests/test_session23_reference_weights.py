"""Session-23 mutation audit of the pretrained-weights export and loader (dira3d.deploy.weights): each test pins a
behaviour that a mutation of that module changed without any other test failing. References: the module and function
docstrings (the key map's layout after ``meta``, else the keys; ``load_into``'s report and refusals), with hand-made
state_dicts of a few tensors and the expected key lists written out by hand.
"""

from __future__ import annotations

import json

import pytest
import torch

from dira3d.deploy import export_pretrained


def _key_map(written: dict) -> dict:
    return json.loads(written["key_map.json"].read_text())


def test_the_layout_of_a_resnet_checkpoint_comes_from_its_meta_when_no_encoder_key_tells(tmp_path):
    """A 2D ResNet U-Net's decoder alone has no ``conv1`` / ``layer1`` key: its meta names the network."""
    decoder = {"blocks.0.upsample.preconv.weight": torch.zeros(4, 8, 1, 1), "blocks.0.convs.conv_0.conv.weight": torch.zeros(4, 8, 3, 3)}
    ckpt = {"decoder": decoder, "meta": {"network": "ResNetUNet", "spatial_dims": 2, "backbone": "resnet10"}}
    key_map = _key_map(export_pretrained(ckpt, tmp_path / "w", parts=("decoder",), formats=("pt",)))
    assert key_map["layout"].startswith("dira3d ResNetUNet, 2D (resnet10 encoder = MONAI ResNetFeatures, ")
    assert key_map["parts"]["decoder"]["blocks.0.convs.conv_0.conv.weight"]["meaning"] == (
        "decoder level 0, convolution conv_0 (3x3) after concatenating the skip: weight")


def test_a_checkpoint_without_kernels_or_meta_is_laid_out_as_3d(tmp_path):
    """Nothing tells the dimensions (a classifier's ``fc`` alone, no meta): the 3D default, not a guess from a rank."""
    ckpt = {"fc.weight": torch.zeros(2, 8), "fc.bias": torch.zeros(2)}  # a fine-tuned model.pt: a flat state_dict
    key_map = _key_map(export_pretrained(ckpt, tmp_path / "w", parts=("fc",), formats=("pt",)))
    assert key_map["spatial_dims"] == 3
    assert "conv weights are (out, in, kx, ky, kz); inputs are (B, C, X, Y, Z)" in key_map["layout"]
    assert key_map["parts"]["fc"] == {
        "weight": {"shape": [2, 8], "dtype": "float32", "full_name": "fc.weight", "meaning": "other (head / output convolution): weight"},
        "bias": {"shape": [2], "dtype": "float32", "full_name": "fc.bias", "meaning": "other (head / output convolution): bias"},
    }


def test_no_format_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"formats=\[\]: use one or both of \('pt', 'safetensors'\)"):
        export_pretrained({"encoder": {"w.weight": torch.zeros(2, 2)}}, tmp_path / "w", formats=())
    assert not (tmp_path / "w").exists()


def test_the_parts_offered_for_a_missing_one_are_the_tensor_groups_only(tmp_path):
    """A flat state_dict's parts are the first names of its dotted tensor keys: a top-level tensor (a step counter,
    a temperature) or a setting is no part to offer."""
    ckpt = {"fc.weight": torch.zeros(2, 8), "encoder.levels.0.w": torch.zeros(1), "temperature": torch.ones(()),
            "meta": {"width": 1.0}}
    with pytest.raises(ValueError, match=r"has no 'decoder' part \(parts available: encoder, fc\); choose parts among "
                                         r"those, e\.g\. parts=\('encoder', 'fc'\)"):
        export_pretrained(ckpt, tmp_path / "w", parts=("decoder",))


def test_a_part_of_no_weights_is_neither_offered_nor_exported(tmp_path):
    """BUG fixed in session 23: every non-empty mapping counted as a part, so a pretraining checkpoint's ``meta`` (or
    ``trainer``, or its RNG state) was offered in the error and, when asked for, written as an empty (or RNG) state_dict
    with a key map, as if it were weights."""
    ckpt = {"encoder": {"levels.0.conv1.conv.weight": torch.ones(2, 1, 3, 3, 3)}, "meta": {"width": 0.125},
            "trainer": {"epoch": 3}, "rng": {"torch": torch.zeros(4, dtype=torch.uint8), "python": [3, 1]}}
    for part in ("meta", "rng", "trainer"):
        with pytest.raises(ValueError, match=rf"has no '{part}' part \(parts available: encoder\); choose parts among "
                                             r"those, e\.g\. --parts encoder$"):
            export_pretrained(ckpt, tmp_path / part, parts=(part,), given_by="--checkpoint")
        assert not (tmp_path / part).exists()
    written = export_pretrained(ckpt, tmp_path / "w", parts=("encoder",), formats=("pt",))
    assert sorted(written) == ["encoder.pt", "key_map.json"]


def test_only_the_formats_asked_are_written_and_the_meta_keeps_its_nulls(tmp_path):
    pytest.importorskip("safetensors", reason="the safetensors format needs the safetensors package (the test extra)")
    ckpt = {"encoder": {"levels.0.conv1.conv.weight": torch.ones(2, 1, 3, 3, 3)},
            "meta": {"spatial_dims": 3, "backbone": None, "note": object()}}
    written = export_pretrained(ckpt, tmp_path / "w", parts=("encoder",), formats=("safetensors",))
    assert sorted(written) == ["encoder.safetensors", "key_map.json"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["encoder.safetensors", "key_map.json"]
    assert _key_map(written)["meta"] == {"spatial_dims": 3, "backbone": None}  # null kept, what JSON cannot hold left out


def test_a_linear_weight_against_a_1x1_convolution_is_a_mismatch_not_another_dimensionality(tmp_path):
    """Only kernels of two different ranks, both with spatial axes, tell a 2D file from a 3D network: a linear head's
    ``(out, in)`` against a 1x1x1 convolution's ``(out, in, 1, 1, 1)`` is one tensor of another shape."""
    from torch import nn

    from dira3d.deploy import load_into

    path = tmp_path / "fc.pt"
    torch.save({"fc.weight": torch.ones(2, 8), "fc.bias": torch.full((2,), 3.0)}, path)
    network = nn.Module()
    network.fc = nn.Conv3d(8, 2, 1)
    report = load_into(network, path)
    assert report.mismatched == {"fc.weight": ((2, 8), (2, 8, 1, 1, 1))}
    assert report.loaded == ["fc.bias"] and torch.equal(network.fc.bias.detach(), torch.full((2,), 3.0))
