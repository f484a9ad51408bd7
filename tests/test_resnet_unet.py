"""The 2D ResNet-50 U-Net: shapes, the ResNet-50 parameter count, key sharing and load_pretrained."""

import pytest
import torch

from dira3d.networks.pretrained import load_pretrained
from dira3d.networks.resnet_unet import ResNetClassifier, ResNetSegmenter, ResNetUNet
from dira3d.utils import atomic_save

# torchvision's resnet50 has 25,557,032 parameters, of which the 2048 → 1000 fc layer holds
# 2,049,000: the convolutional trunk (3 input channels) has 23,508,032.
RESNET50_TRUNK = 23_508_032


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return ResNetUNet(in_channels=3).eval()


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_encoder_is_resnet50_sized(net):
    assert abs(_count(net.encoder) - RESNET50_TRUNK) / RESNET50_TRUNK < 0.01
    assert net.bottleneck_channels == 2048 and net.spatial_dims == 2
    # a grey input changes only the stem: 64 × 7 × 7 × (3 − 1) weights fewer
    assert _count(ResNetUNet(in_channels=1).encoder) == _count(net.encoder) - 64 * 7 * 7 * 2


@torch.no_grad()
def test_shapes_at_64_and_224(net):
    bottleneck, skips = net.encode(torch.rand(1, 3, 64, 64))
    assert bottleneck.shape == (1, 2048, 2, 2)
    assert [tuple(s.shape[1:]) for s in skips] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    out = net.decode(bottleneck, skips)
    assert out.shape == (1, 1, 64, 64) and out.min() > 0 and out.max() < 1  # sigmoid
    bottleneck, skips = net.encode(torch.rand(1, 3, 224, 224))
    assert bottleneck.shape == (1, 2048, 7, 7) and skips[0].shape == (1, 64, 112, 112)
    assert net.decode(bottleneck, skips).shape == (1, 1, 224, 224)


def test_bad_inputs_raise(net):
    with pytest.raises(ValueError, match="multiples of 32") as err:
        net.encode(torch.rand(1, 3, 48, 48))
    # the advice names the network's own divisor, not the 3D U-Net's 8 (`dira3d localise --roi-size 60 60`)
    assert "multiples of 8" not in str(err.value) and "k=8" not in str(err.value), err.value
    assert "DivisiblePadd(k=32)" in str(err.value)
    with pytest.raises(ValueError, match="input channel"):
        net.encode(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="backbone"):
        ResNetUNet(backbone="resnet51")
    with pytest.raises(ValueError, match="skip tensors"):
        net.decode(torch.rand(1, 2048, 2, 2), [])


def test_classifier_loads_the_unet_encoder(net, tmp_path):
    classifier = ResNetClassifier(in_channels=3, num_classes=14).eval()
    assert classifier.encoder.state_dict().keys() == net.encoder.state_dict().keys()
    report = load_pretrained(classifier, {"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict()})
    assert not report.missing and not report.mismatched and len(report.loaded) == len(net.encoder.state_dict())
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(classifier.encoder.state_dict()[key], value)
    with torch.no_grad():
        assert classifier(torch.rand(1, 3, 32, 32)).shape == (1, 14)


def test_segmenter_round_trip_through_a_checkpoint_file(tmp_path):
    # a small backbone keeps the file small; the code path is the one ResNet-50 takes
    torch.manual_seed(1)
    pretrained = ResNetUNet(in_channels=1, backbone="resnet10").eval()
    path = tmp_path / "pretrained.pt"
    atomic_save({"encoder": pretrained.encoder.state_dict(), "decoder": pretrained.decoder.state_dict(),
                 "meta": {"spatial_dims": 2}}, path)
    segmenter = ResNetSegmenter(in_channels=1, backbone="resnet10").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(segmenter(x), torch.logit(pretrained(x)), atol=1e-3)
        load_pretrained(segmenter, path, parts=("encoder", "decoder"), strict=True)
        # same weights: the segmenter's logits are the U-Net's output before its sigmoid
        torch.testing.assert_close(torch.sigmoid(segmenter(x)), pretrained(x))
    mismatched = ResNetClassifier(in_channels=3, backbone="resnet10")
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(mismatched, path)


def test_3d_variant_runs():
    net = ResNetUNet(in_channels=1, backbone="resnet10", spatial_dims=3).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
