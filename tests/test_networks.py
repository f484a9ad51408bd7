"""Tests of dira3d.networks: shapes, parameter count, errors, TorchScript, pretrained loading."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dira3d.networks import (
    Adversary,
    Classifier,
    LoadReport,
    PredictorHead,
    ProjectionHead,
    Segmenter,
    UNet,
    VisualWordHead,
    load_pretrained,
)
from dira3d.utils import atomic_save

TINY = 1 / 8  # channels 4-8 | 8-16 | 16-32 | 32-64
FIRST_CONV = "encoder.levels.0.conv1.conv.weight"


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and BN statistic with seeded noise so that copies are detectable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=gen)
                tensor.copy_(noise + 0.5 if "running_var" in name else noise - 0.5)
    return module


# ---------------------------------------------------------------- UNet


def test_unet_parameter_count_matches_models_genesis():
    # by hand from the Models Genesis U-Net's layers (docs/method.md): conv k³·cin·cout + cout (bias), BN 2·cout, transposed conv 2³·c·c + c
    def conv(cin, cout, k=3):
        return k**3 * cin * cout + cout

    def block(cin, cout):
        return conv(cin, cout) + 2 * cout

    encoder = sum(block(a, b) for a, b in [(1, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)])
    decoder = sum(conv(c, c, k=2) for c in (512, 256, 128))
    decoder += sum(block(a, b) for a, b in [(768, 256), (256, 256), (384, 128), (128, 128), (192, 64), (64, 64)])
    decoder += conv(64, 1, k=1)
    assert encoder + decoder == 19_073_665

    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=1.0)
    count = sum(p.numel() for p in net.parameters())
    assert count == 19_073_665
    assert abs(count - 19.07e6) / 19.07e6 < 0.01
    assert sum(p.numel() for p in net.encoder.parameters()) == encoder
    assert net.bottleneck_channels == 512


@pytest.mark.parametrize(
    "spatial_dims,size",
    [(3, (16, 16, 8)), (3, (32, 32, 16)), (3, (64, 64, 32)), (2, (32, 32)), (2, (64, 48))],
)
def test_unet_encode_decode_shapes(spatial_dims, size):
    net = UNet(spatial_dims=spatial_dims, in_channels=2, out_channels=3, width=TINY)
    x = torch.rand(2, 2, *size)
    bottleneck, skips = net.encode(x)
    assert net.bottleneck_channels == 64
    assert bottleneck.shape == (2, 64, *(s // 8 for s in size))
    assert [tuple(s.shape) for s in skips] == [
        (2, 8, *size),
        (2, 16, *(s // 2 for s in size)),
        (2, 32, *(s // 4 for s in size)),
    ]
    y = net.decode(bottleneck, skips)
    assert y.shape == (2, 3, *size)
    assert torch.all((y > 0) & (y < 1))  # sigmoid output
    assert torch.equal(net(x), y)


def test_unet_logits_option_is_the_sigmoid_input():
    torch.manual_seed(0)
    sig = UNet(width=TINY).eval()
    logits = UNet(width=TINY, out_activation=None).eval()
    logits.load_state_dict(sig.state_dict())
    x = torch.rand(1, 1, 16, 16, 8)
    out = logits(x)
    torch.testing.assert_close(torch.sigmoid(out), sig(x))


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_unet_other_norms_are_per_sample(norm):
    torch.manual_seed(0)
    net = UNet(width=TINY, norm=norm).train()
    x = torch.rand(3, 1, 16, 16, 8)
    # instance / group norm never mix samples, even in training mode
    torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=1e-4, atol=1e-5)
    names = {type(m).__name__ for m in net.modules()}
    assert ("InstanceNorm3d" in names) if norm == "instance" else ("GroupNorm" in names)


def test_unet_eval_uses_running_statistics():
    torch.manual_seed(0)
    net = UNet(width=TINY).train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics away from their initial values
            net(torch.rand(4, 1, 16, 16, 8) * 2)
    x = torch.rand(1, 1, 16, 16, 8)
    other = torch.rand(1, 1, 16, 16, 8) * 3
    batch = torch.cat([x, other])
    with torch.no_grad():
        # training mode (batch statistics, as the reference code does even in eval): depends on `other`
        assert not torch.allclose(net(batch)[:1], net(torch.cat([x, x * 0]))[:1], atol=1e-4)
        net.eval()
        torch.testing.assert_close(net(batch)[:1], net(x), rtol=1e-4, atol=1e-6)


def test_unet_rejects_bad_input():
    net = UNet(width=TINY)
    with pytest.raises(ValueError, match=r"17.*multiples of 8"):
        net(torch.rand(1, 1, 17, 16, 8))
    with pytest.raises(ValueError, match=r"expects 1 input channel.*got 2"):
        net(torch.rand(1, 2, 16, 16, 8))
    with pytest.raises(ValueError, match=r"shape"):
        net(torch.rand(1, 16, 16, 8))
    with pytest.raises(ValueError, match="norm"):
        UNet(width=TINY, norm="layer")
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(spatial_dims=1)
    with pytest.raises(ValueError, match="out_activation"):
        UNet(out_activation="softmax")


# ---------------------------------------------------------------- heads and adversary


def test_visual_word_head_shapes():
    head = VisualWordHead(spatial_dims=3, in_channels=64, num_classes=5, hidden=16)
    assert head(torch.rand(2, 64, 2, 2, 1)).shape == (2, 5)
    assert head.conv.conv.out_channels == 16 and isinstance(head.conv.adn.N, nn.BatchNorm3d)
    assert VisualWordHead(2, 8, 3, hidden=4)(torch.rand(2, 8, 4, 4)).shape == (2, 3)


def test_projection_head_pools_feature_maps():
    torch.manual_seed(0)
    head = ProjectionHead(16, hidden_features=32, out_features=8, num_layers=3).eval()
    fmap = torch.rand(4, 16, 4, 4, 2)
    out = head(fmap)
    assert out.shape == (4, 8)
    torch.testing.assert_close(out, head(fmap.mean(dim=(2, 3, 4))))
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2

    last_bn = ProjectionHead(16, 32, 8, num_layers=2, last_batch_norm=True).train()
    z = last_bn(torch.rand(6, 16))
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(8), atol=1e-5, rtol=0)
    plain = ProjectionHead(16, 32, 8, num_layers=1, batch_norm=False)
    assert [type(m) for m in plain.mlp] == [nn.Linear]


def test_predictor_head_structure():
    head = PredictorHead(features=32, hidden_features=8)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.rand(4, 32)).shape == (4, 32)


@pytest.mark.parametrize("size,expected", [((64, 64, 32), (8, 8, 4)), ((16, 16, 8), (2, 2, 1))])
def test_adversary_returns_one_logit_map(size, expected):
    adversary = Adversary(spatial_dims=3, in_channels=1, channels=8, num_layers=4)
    out = adversary(torch.rand(2, 1, *size))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 1, *expected)
    assert not any(isinstance(m, nn.Sigmoid) for m in adversary.modules())
    norms = [m for m in adversary.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 3  # the middle blocks only
    assert Adversary(2, channels=8)(torch.rand(2, 1, 32, 32)).shape == (2, 1, 4, 4)


def test_adversary_default_blocks_and_init():
    torch.manual_seed(0)
    adversary = Adversary(spatial_dims=3)
    convs = [m for m in adversary.modules() if isinstance(m, nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (1, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 1, 1)
    ]
    assert all(c.kernel_size == (3, 3, 3) for c in convs)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 5])
def test_adversary_stride_factor_is_the_score_maps_reduction_and_needs_no_divisible_sizes(num_layers):
    """``stride_factor`` (documented in the class docstring and docs/architecture.md) is the product of the convs'
    strides, and a side ``n`` that is not a multiple of it gives ``ceil(n / stride_factor)`` logits."""
    adversary = Adversary(spatial_dims=3, channels=4, num_layers=num_layers)
    strides = [m.stride[0] for m in adversary.modules() if isinstance(m, nn.Conv3d)]
    assert adversary.stride_factor == math.prod(strides) == 2 ** max(1, num_layers - 1)
    size = (37, 21, 18)  # odd, and no side a multiple of 4, 8 or 16
    out = adversary(torch.rand(1, 1, *size))
    assert out.shape[2:] == tuple(math.ceil(n / adversary.stride_factor) for n in size)


@pytest.mark.parametrize("dims", [2, 3])
def test_adversary_refuses_a_patch_too_small_for_its_norm_with_the_minimum(dims):
    adversary = Adversary(spatial_dims=dims, channels=4).eval()  # InstanceNorm fails in eval() too
    with pytest.raises(ValueError, match=r"divide each side by 8.*larger than 8 \(e\.g\. 16×16"):
        adversary(torch.rand(2, 1, *(8,) * dims))
    assert adversary(torch.rand(1, 1, 9, *(8,) * (dims - 1))).shape == (1, 1, 2, *(1,) * (dims - 1))  # 2 voxels
    with pytest.raises(ValueError, match="expects 1 input channel"):
        adversary(torch.rand(2, 3, *(16,) * dims))
    with pytest.raises(ValueError, match=f"for a {dims}D network"):
        adversary(torch.rand(1, *(16,) * dims))  # no batch axis (a conv would take it unbatched)
    batch_norm = Adversary(spatial_dims=dims, channels=4, norm="batch")
    with pytest.raises(ValueError, match="BatchNorm in training"):
        batch_norm(torch.rand(1, 1, *(8,) * dims))
    assert batch_norm(torch.rand(2, 1, *(8,) * dims)).shape == (2, 1, *(1,) * dims)  # two values per channel
    assert batch_norm.eval()(torch.rand(1, 1, *(8,) * dims)).shape == (1, 1, *(1,) * dims)  # running statistics
    assert Adversary(dims, channels=4, norm="none")(torch.rand(1, 1, *(4,) * dims)).shape == (1, 1, *(1,) * dims)


# ---------------------------------------------------------------- task networks


# torch >= 2.10 deprecates TorchScript, but MONAI bundles and MONAI Label still rely on it
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_task_networks_share_unet_keys_and_trace():
    unet = UNet(width=TINY)
    segmenter = Segmenter(width=TINY).eval()
    classifier = Classifier(num_classes=3, width=TINY, dropout=0.2).eval()
    assert set(segmenter.state_dict()) == set(unet.state_dict())
    encoder_keys = {k for k in unet.state_dict() if k.startswith("encoder.")}
    assert {k for k in classifier.state_dict() if k.startswith("encoder.")} == encoder_keys

    x, x2 = torch.rand(2, 1, 16, 16, 8), torch.rand(2, 1, 16, 16, 8)
    for net, shape in ((segmenter, (2, 1, 16, 16, 8)), (classifier, (2, 3))):
        traced = torch.jit.trace(net, x)
        assert traced(x2).shape == shape
        torch.testing.assert_close(traced(x2), net(x2))
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x2), net(x2))
    with pytest.raises(ValueError, match="multiples of 8"):
        classifier(torch.rand(1, 1, 16, 12, 8))


# ---------------------------------------------------------------- load_pretrained


def _checkpoint(unet: UNet) -> dict:
    return {
        "encoder": unet.encoder.state_dict(),
        "decoder": unet.decoder.state_dict(),
        "adversary": {},
        "meta": {"spatial_dims": 3, "in_channels": unet.in_channels, "width": TINY},
    }


def test_load_pretrained_copies_encoder_and_decoder(tmp_path):
    unet = _seeded(UNet(width=TINY), seed=1).eval()
    path = atomic_save(_checkpoint(unet), tmp_path / "pretrained.pt")
    segmenter = Segmenter(width=TINY).eval()
    report = load_pretrained(segmenter, path, parts=("encoder", "decoder"))
    assert isinstance(report, LoadReport)
    for key, value in unet.state_dict().items():
        assert torch.equal(segmenter.state_dict()[key], value), key
    assert sorted(report.loaded) == sorted(unet.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.mismatched == {}
    assert str(path) in report.summary() and f"{len(report.loaded)} tensors loaded" in report.summary()
    x = torch.rand(1, 1, 16, 16, 8)
    torch.testing.assert_close(torch.sigmoid(segmenter(x)), unet(x))

    # a flat state_dict with prefixes, and the MONAI CheckpointSaver wrapper, load the same way
    classifier = Classifier(width=TINY)
    report = load_pretrained(classifier, {"network": unet.state_dict()})
    assert all(torch.equal(classifier.encoder.state_dict()[k], v) for k, v in unet.encoder.state_dict().items())
    assert len(report.loaded) == len(unet.encoder.state_dict())


def test_load_pretrained_reports_missing_and_unexpected():
    unet = _seeded(UNet(width=TINY), seed=2)
    ckpt = _checkpoint(unet)
    dropped = "levels.3.conv2.conv.bias"
    del ckpt["encoder"][dropped]
    ckpt["encoder"]["extra.weight"] = torch.zeros(3)
    classifier = Classifier(width=TINY)
    before = classifier.encoder.state_dict()[dropped].clone()
    report = load_pretrained(classifier, ckpt)
    assert report.missing == [f"encoder.{dropped}"]
    assert report.unexpected == ["encoder.extra.weight"]
    assert torch.equal(classifier.encoder.state_dict()[dropped], before)  # left as initialised
    assert torch.equal(classifier.state_dict()[FIRST_CONV], unet.state_dict()[FIRST_CONV])
    assert "missing" in report.summary() and dropped in report.summary()
    with pytest.raises(ValueError, match=r"strict.*extra\.weight"):
        load_pretrained(Classifier(width=TINY), ckpt, strict=True)


def test_load_pretrained_missing_part():
    unet = UNet(width=TINY)
    ckpt = {"encoder": unet.encoder.state_dict(), "adversary": {}}
    with pytest.raises(ValueError, match=r"'decoder'.*available.*encoder"):
        load_pretrained(Segmenter(width=TINY), ckpt, parts=("encoder", "decoder"))
    with pytest.raises(ValueError, match=r"Classifier has no sub-module 'decoder'"):
        load_pretrained(Classifier(width=TINY), _checkpoint(unet), parts=("decoder",))


def test_load_pretrained_rejects_other_width_and_copies_nothing():
    ckpt = _checkpoint(_seeded(UNet(width=TINY), seed=3))
    segmenter = Segmenter(width=2 * TINY)
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_pretrained(segmenter, ckpt, parts=("encoder", "decoder"))
    message = str(err.value)
    assert FIRST_CONV in message and "(4, 1, 3, 3, 3)" in message and "(8, 1, 3, 3, 3)" in message
    assert "'width': 0.125" in message  # the checkpoint meta helps the user
    assert all(torch.equal(segmenter.state_dict()[k], v) for k, v in before.items())


def test_load_pretrained_repeats_input_channels():
    unet = _seeded(UNet(width=TINY), seed=4).eval()
    ckpt = _checkpoint(unet)
    with pytest.raises(ValueError, match="in_channels_policy='repeat'"):
        load_pretrained(Segmenter(in_channels=4, width=TINY), ckpt)
    segmenter = Segmenter(in_channels=4, width=TINY).eval()
    report = load_pretrained(segmenter, ckpt, parts=("encoder", "decoder"), in_channels_policy="repeat")
    assert report.adapted == [FIRST_CONV]
    assert report.mismatched == {FIRST_CONV: ((4, 1, 3, 3, 3), (4, 4, 3, 3, 3))}
    assert "input channels 1 -> 4" in report.summary()
    # one image copied into the four channels gives the pretrained network's response
    x = torch.rand(1, 1, 16, 16, 8)
    torch.testing.assert_close(torch.sigmoid(segmenter(x.repeat(1, 4, 1, 1, 1))), unet(x), rtol=1e-4, atol=1e-5)
