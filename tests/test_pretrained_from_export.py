"""The files of ``dira3d export pretrained`` (``weights/encoder.pt`` / ``.safetensors``: one part's flat state_dict,
named after the part) are what ``dira3d finetune --pretrained`` loads: the encoder (and, for a segmentation network,
the ``decoder.pt`` of the same export beside it). They were refused as having "no 'encoder' part; parts available:
['levels']"."""

from __future__ import annotations

import pytest
import torch

from dira3d.deploy.weights import export_pretrained
from dira3d.evaluation.pretrained import TASK_KINDS
from dira3d.networks import Classifier, Segmenter, UNet, load_pretrained
from dira3d.utils import atomic_save


@pytest.fixture
def exported(tmp_path):
    """A pretraining checkpoint (width 0.125) exported with --parts encoder decoder, and its network."""
    torch.manual_seed(0)
    unet = UNet(3, 1, 1, width=0.125)
    checkpoint = tmp_path / "best.pt"
    atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                 "meta": {"width": 0.125, "in_channels": 1, "spatial_dims": 3}}, checkpoint)
    export_pretrained(checkpoint, tmp_path / "weights", ["encoder", "decoder"])
    return tmp_path / "weights", unet


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_exported_encoder_is_what_a_classifier_loads(exported, suffix):
    weights, unet = exported
    network = Classifier(3, 1, 1, width=0.125)
    report = load_pretrained(network, weights / f"encoder{suffix}", parts=TASK_KINDS["classification"], strict=True)
    assert len(report.loaded) == len(unet.encoder.state_dict()) and not report.missing and not report.unexpected
    assert "into encoder: 56 tensors loaded" in report.summary(), report.summary()
    for key, value in unet.encoder.state_dict().items():
        assert torch.equal(network.encoder.state_dict()[key], value), key


def test_a_segmenter_loads_the_decoder_of_the_same_export_beside_the_encoder(exported):
    weights, unet = exported
    network = Segmenter(3, 1, 1, width=0.125)
    report = load_pretrained(network, weights / "encoder.pt", parts=TASK_KINDS["segmentation"], strict=True)
    assert len(report.loaded) == len(unet.encoder.state_dict()) + len(unet.decoder.state_dict()), report.summary()
    for key, value in unet.decoder.state_dict().items():
        assert torch.equal(network.decoder.state_dict()[key], value), key


def test_an_encoder_exported_alone_names_the_decoder_a_segmenter_needs(exported):
    weights, _ = exported
    (weights / "decoder.pt").unlink()
    with pytest.raises(ValueError, match=r"has no \(or an empty\) 'decoder' part.*from decoder\.pt beside it.*"
                                         r"--parts encoder decoder"):
        load_pretrained(Segmenter(3, 1, 1, width=0.125), weights / "encoder.pt", parts=TASK_KINDS["segmentation"],
                        strict=True)
