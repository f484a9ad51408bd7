"""dira3d.networks against independent references (closes the gaps a mutation audit of the package found).

- The U-Net, the visual-word head, the adversary and the classifier are rebuilt from their state_dicts with
  ``torch.nn.functional`` (conv, batch/instance norm, ReLU / LeakyReLU 0.2, max-pool, transposed conv,
  concatenation of the up-sampled map *then* the skip) following METHOD.md, and compared in float64.
- The layer switches (``gemm_wgrad``, ``gemm_upconv``, ``gemm_head``, ``channel_pad``) leave alone the layers
  they would get wrong (several input channels, dilation, ``padding="same"``, reflect padding, groups,
  output padding) and, where they switch, agree with ``F.conv*`` / ``F.conv_transpose*`` and their autograd
  gradients on non-uniform settings in float32 and float64.
- :func:`load_pretrained` names exactly the tensors it loaded, left missing or refused, honours ``strict``
  for either kind of key difference, and adapts only the first convolution's input channels.
- The 2D ResNet U-Net equals MONAI's ``FlexibleUNet`` with the same weights; ``weights_fit`` reads the
  settings of a network from its keys.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dira3d.networks import (
    Adversary,
    Classifier,
    PredictorHead,
    ProjectionHead,
    ResNetClassifier,
    ResNetSegmenter,
    Segmenter,
    UNet,
    VisualWordHead,
    load_pretrained,
)
from dira3d.networks.channel_pad import use_padded_channels
from dira3d.networks.gemm_head import use_gemm_head
from dira3d.networks.gemm_upconv import use_gemm_upconv
from dira3d.networks.gemm_wgrad import use_gemm_weight_grad
from dira3d.networks.resnet_unet import ResNetUNetEncoder
from dira3d.networks.unet import scale_channels
from dira3d.networks.weights_fit import (
    format_overrides,
    infer_network_settings,
    same_value,
    settings_that_fit,
    state_dict_mismatch,
)

TINY = 1 / 8
FIRST_CONV = "encoder.levels.0.conv1.conv.weight"


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    """Every float tensor of the state_dict (BN statistics included) set to seeded noise, in float64."""
    gen = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype)
                tensor.copy_(noise + 0.5 if "running_var" in name else noise - 0.5)
    return module


# ---------------------------------------------------------------- functional references

def _block(s: dict, prefix: str, x: torch.Tensor, conv=F.conv3d) -> torch.Tensor:
    """3x3(x3) conv with bias (padding 1) -> BatchNorm with running statistics (eps 1e-5) -> ReLU."""
    x = conv(x, s[f"{prefix}.conv.weight"], s[f"{prefix}.conv.bias"], padding=1)
    x = F.batch_norm(x, s[f"{prefix}.adn.N.running_mean"], s[f"{prefix}.adn.N.running_var"],
                     s[f"{prefix}.adn.N.weight"], s[f"{prefix}.adn.N.bias"], False, 0.0, 1e-5)
    return F.relu(x)


def _reference_unet(s: dict, x: torch.Tensor, dims: int = 3) -> torch.Tensor:
    """METHOD.md's Models Genesis U-Net in eval mode, logits (before the sigmoid)."""
    conv = F.conv3d if dims == 3 else F.conv2d
    up = F.conv_transpose3d if dims == 3 else F.conv_transpose2d
    pool = F.max_pool3d if dims == 3 else F.max_pool2d
    skips = []
    for level in range(4):
        x = _block(s, f"encoder.levels.{level}.conv1", x, conv)
        x = _block(s, f"encoder.levels.{level}.conv2", x, conv)
        if level < 3:
            skips.append(x)
            x = pool(x, 2)
    for level in range(3):
        p = f"decoder.levels.{level}"
        x = up(x, s[f"{p}.up.weight"], s[f"{p}.up.bias"], stride=2)
        x = torch.cat([x, skips[2 - level]], dim=1)  # the up-sampled map first, then the skip
        x = _block(s, f"{p}.convs.conv1", x, conv)
        x = _block(s, f"{p}.convs.conv2", x, conv)
    return conv(x, s["decoder.head.weight"], s["decoder.head.bias"])


# ---------------------------------------------------------------- U-Net

@pytest.mark.parametrize("dims,size", [(3, (16, 16, 8)), (2, (16, 24))])
def test_unet_equals_the_functional_models_genesis_network(dims, size):
    net = _seeded(UNet(spatial_dims=dims, in_channels=2, width=TINY), seed=0).eval()
    x = torch.rand(2, 2, *size, dtype=torch.double)
    with torch.no_grad():
        expected = _reference_unet(net.state_dict(), x, dims)
        torch.testing.assert_close(net(x), torch.sigmoid(expected), rtol=1e-10, atol=1e-12)


def test_segmenter_and_classifier_equal_their_references():
    unet = _seeded(UNet(width=TINY), seed=1).eval()
    state = unet.state_dict()
    x = torch.rand(2, 1, 16, 16, 8, dtype=torch.double)
    segmenter = Segmenter(width=TINY).double().eval()
    segmenter.load_state_dict(state)
    classifier = _seeded(Classifier(num_classes=3, width=TINY, dropout=0.5), seed=2).eval()
    s = classifier.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(segmenter(x), _reference_unet(state, x), rtol=1e-10, atol=1e-12)  # logits
        h = x
        for level in range(4):
            h = _block(s, f"encoder.levels.{level}.conv1", h)
            h = _block(s, f"encoder.levels.{level}.conv2", h)
            h = F.max_pool3d(h, 2) if level < 3 else h
        expected = F.linear(h.mean(dim=(2, 3, 4)), s["fc.weight"], s["fc.bias"])  # global *average* pool
        torch.testing.assert_close(classifier(x), expected, rtol=1e-10, atol=1e-12)


def test_classifier_dropout_drops_the_requested_fraction_in_training_only():
    torch.manual_seed(0)
    classifier = Classifier(num_classes=2, width=TINY, dropout=0.5)
    seen = []
    classifier.dropout.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    x = torch.rand(64, 1, 8, 8, 8)
    classifier.train()(x)
    assert len(seen) == 1, "the classifier's dropout was not applied before its linear layer"
    features, dropped = seen[0]
    kept = features != 0
    zeroed = (dropped[kept] == 0).double().mean().item()
    assert 0.4 < zeroed < 0.6, zeroed  # p = 0.5 of the non-zero features
    torch.testing.assert_close(dropped[kept & (dropped != 0)], 2 * features[kept & (dropped != 0)])
    classifier.eval()(x)
    assert torch.equal(seen[1][1], seen[1][0])


def test_unet_layers_follow_method_md_at_width_one():
    net = UNet(spatial_dims=3, width=1.0)
    convs = [(m.in_channels, m.out_channels, m.kernel_size, type(m).__name__)
             for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    k3, k2 = (3, 3, 3), (2, 2, 2)
    expected = [(1, 32, k3), (32, 64, k3), (64, 64, k3), (64, 128, k3), (128, 128, k3), (128, 256, k3),
                (256, 256, k3), (256, 512, k3),
                (512, 512, k2), (768, 256, k3), (256, 256, k3), (256, 256, k2), (384, 128, k3), (128, 128, k3),
                (128, 128, k2), (192, 64, k3), (64, 64, k3), (64, 1, (1, 1, 1))]
    assert [c[:3] for c in convs] == expected
    assert all(c[3] == "ConvTranspose3d" for c in convs if c[2] == k2)
    assert all(m.bias is not None for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)))
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(norms) == 14 and all(m.eps == 1e-5 and m.momentum == 0.1 and m.affine for m in norms)
    assert net.encoder.skip_channels == [64, 128, 256] and net.encoder.out_channels == 512
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool3d)]
    assert len(pools) == 1 and pools[0].kernel_size == 2


def test_width_rounds_channels_and_keeps_at_least_one():
    assert scale_channels(32, 0.3) == 10 and scale_channels(64, 0.3) == 19  # 9.6 and 19.2 rounded
    net = UNet(width=0.3)
    assert net.encoder.levels[0].conv1.conv.out_channels == 10 and net.bottleneck_channels == round(512 * 0.3)
    assert scale_channels(32, 0.001) == 1
    # every decoder level ends with its skip's channels, also where rounding makes them odd (20 and 39 here)
    odd = UNet(width=0.30625)
    assert odd.encoder.skip_channels == [20, 39, 78]
    assert [level.convs.conv2.conv.out_channels for level in odd.decoder.levels] == [78, 39, 20]
    assert UNet(width=0.001).encoder.levels[0].conv1.conv.out_channels == 1
    for width in (0, -1):
        with pytest.raises(ValueError, match="width"):
            UNet(width=width)
    with pytest.raises(ValueError, match="in_channels"):
        UNet(in_channels=0)


def test_other_norms_are_learnable_and_reach_every_level():
    instance = UNet(width=TINY, norm="instance")
    norms = [m for m in instance.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 14 and all(m.affine and m.weight is not None for m in norms)
    group = UNet(width=TINY, norm="group")
    groups = [m for m in group.modules() if isinstance(m, nn.GroupNorm)]
    # groups of 8 channels' worth where the channel count allows (width 1/8: 4 -> 4 groups, 8+ -> 8 groups)
    assert len(groups) == 14 and all(m.num_groups == math.gcd(m.num_channels, 8) for m in groups)
    assert sorted({m.num_groups for m in groups}) == [4, 8]
    assert not any(isinstance(m, nn.BatchNorm3d) for m in (*group.modules(), *instance.modules()))
    # the task networks hand their norm down
    assert any(isinstance(m, nn.GroupNorm) for m in Classifier(width=TINY, norm="group").modules())
    assert not any(isinstance(m, nn.BatchNorm3d) for m in Classifier(width=TINY, norm="group").modules())
    assert not any(isinstance(m, nn.BatchNorm3d) for m in Segmenter(width=TINY, norm="instance").modules())


def test_decoder_refuses_a_wrong_number_of_skips_and_bad_task_settings():
    net = UNet(width=TINY)
    bottleneck, skips = net.encode(torch.rand(1, 1, 16, 16, 8))
    with pytest.raises(ValueError, match="needs 3 skip tensors, got 2"):
        net.decode(bottleneck, skips[1:])
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(num_classes=0, width=TINY)
    with pytest.raises(ValueError, match="dropout"):
        Classifier(width=TINY, dropout=1.0)
    with pytest.raises(ValueError, match=r"shape \(B, C, X, Y, Z\)"):
        net(torch.rand(1, 1, 1, 16, 16, 8))


# ---------------------------------------------------------------- heads

def test_visual_word_head_equals_method_md_head():
    head = VisualWordHead(spatial_dims=3, in_channels=512, num_classes=50)  # METHOD.md: 512 -> 1024 -> C
    conv = head.conv.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (512, 1024, (3, 3, 3), (1, 1, 1))
    assert sum(p.numel() for p in head.parameters()) == 27 * 512 * 1024 + 1024 + 2 * 1024 + 1024 * 50 + 50
    small = _seeded(VisualWordHead(3, 8, 5, hidden=6), seed=3).eval()
    s = small.state_dict()
    x = torch.rand(2, 8, 4, 4, 2, dtype=torch.double) - 0.5
    h = F.conv3d(x, s["conv.conv.weight"], s["conv.conv.bias"], padding=1)
    h = F.relu(F.batch_norm(h, s["conv.adn.N.running_mean"], s["conv.adn.N.running_var"], s["conv.adn.N.weight"],
                            s["conv.adn.N.bias"], False, 0.0, 1e-5))
    expected = F.linear(h.mean(dim=(2, 3, 4)), s["fc.weight"], s["fc.bias"])  # global average pool
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-10, atol=1e-12)


def test_projection_and_predictor_heads_equal_their_references():
    proj = _seeded(ProjectionHead(6, hidden_features=5, out_features=4, num_layers=3, last_batch_norm=True), 4).eval()
    s = proj.state_dict()
    x = torch.rand(3, 6, dtype=torch.double) - 0.5

    def bn(h, i, affine=True):
        return F.batch_norm(h, s[f"mlp.{i}.running_mean"], s[f"mlp.{i}.running_var"],
                            s.get(f"mlp.{i}.weight") if affine else None, s.get(f"mlp.{i}.bias") if affine else None,
                            False, 0.0, 1e-5)

    h = F.relu(bn(F.linear(x, s["mlp.0.weight"]), 1))  # no bias before a BatchNorm (it cancels)
    h = F.relu(bn(F.linear(h, s["mlp.3.weight"]), 4))
    expected = bn(F.linear(h, s["mlp.6.weight"]), 7, affine=False)  # SimSiam: last BN without affine
    with torch.no_grad():
        torch.testing.assert_close(proj(x), expected, rtol=1e-10, atol=1e-12)
    assert sum(p.numel() for p in proj.parameters()) == 6 * 5 + 2 * 5 + 5 * 5 + 2 * 5 + 5 * 4
    norms = [m for m in (*proj.modules(), *PredictorHead(6, 3).modules()) if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 4 and all(m.momentum == 0.1 and m.eps == 1e-5 for m in norms)  # PyTorch's defaults
    plain = ProjectionHead(6, 5, 4, num_layers=2, batch_norm=False)
    assert [type(m) for m in plain.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert plain.mlp[0].bias is not None and plain.mlp[2].bias is not None  # no BatchNorm to cancel them

    pred = _seeded(PredictorHead(features=6, hidden_features=3), 5).eval()
    p = pred.state_dict()
    h = F.batch_norm(F.linear(x, p["mlp.0.weight"]), p["mlp.1.running_mean"], p["mlp.1.running_var"],
                     p["mlp.1.weight"], p["mlp.1.bias"], False, 0.0, 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(pred(x), F.linear(F.relu(h), p["mlp.3.weight"], p["mlp.3.bias"]),
                                   rtol=1e-10, atol=1e-12)
    assert pred.mlp[0].bias is None and pred.mlp[3].bias is not None
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="hidden"):
            VisualWordHead(3, 8, 2, hidden=bad)


# ---------------------------------------------------------------- adversary

@pytest.mark.parametrize("dims", [2, 3])
def test_adversary_equals_the_pix2pix_style_reference(dims):
    adv = _seeded(Adversary(spatial_dims=dims, channels=3, num_layers=4), seed=6)
    s = {k[len("net."):]: v for k, v in adv.state_dict().items()}
    conv = F.conv3d if dims == 3 else F.conv2d
    x = torch.rand(2, 1, *(24,) * dims, dtype=torch.double)
    # first conv: bias, stride 2, no norm; middle: no bias, InstanceNorm (no affine), strides 2, 2, 1; last: bias
    assert "initial_conv.conv.bias" in s and "final_conv.conv.bias" in s
    assert not any(k.endswith("bias") for k in s if k[0].isdigit())
    h = F.leaky_relu(conv(x, s["initial_conv.conv.weight"], s["initial_conv.conv.bias"], stride=2, padding=1), 0.2)
    for i, stride in enumerate((2, 2, 1)):
        h = F.leaky_relu(F.instance_norm(conv(h, s[f"{i}.conv.weight"], stride=stride, padding=1), eps=1e-5), 0.2)
    expected = conv(h, s["final_conv.conv.weight"], s["final_conv.conv.bias"], padding=1)
    with torch.no_grad():
        out = adv(x)
    assert out.shape == (2, 1, *(3,) * dims)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_single_layer_adversary_has_no_norm_and_takes_small_patches():
    adv = Adversary(spatial_dims=3, channels=4, num_layers=1)  # norm "instance" asked, none built
    assert not any(isinstance(m, (nn.InstanceNorm3d, nn.BatchNorm3d)) for m in adv.modules())
    assert adv(torch.rand(1, 1, 2, 2, 2)).shape == (1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        Adversary(channels=0)


# ---------------------------------------------------------------- layer switches

def _grads(layer: nn.Module, x: torch.Tensor, fn, *args, **kwargs):
    """Output and gradients of ``layer`` and of the functional reference ``fn(x, weight, bias, ...)``."""
    results = []
    for run in (lambda xi: layer(xi), lambda xi: fn(xi, layer.weight, layer.bias, *args, **kwargs)):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = run(xi)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out * upstream).sum().backward()
        results.append((out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone(), xi.grad.clone()))
    return results


# float32: a bias gradient sums a symmetric upstream (linspace -1..1) to nearly zero, and the summation order of the
# two paths depends on the thread count (1e-5 apart under pytest-xdist): atol 1e-4; float64 keeps the exactness
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-11)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_weight_grad_equals_conv3d_with_per_axis_stride_and_padding(dtype):
    torch.manual_seed(0)
    layer = nn.Conv3d(1, 5, (3, 2, 3), stride=(1, 2, 2), padding=(2, 0, 1)).to(dtype)
    assert use_gemm_weight_grad(layer) == ["0."]
    x = torch.rand(2, 1, 7, 6, 5, dtype=dtype)
    mine, ref = _grads(layer, x, F.conv3d, stride=(1, 2, 2), padding=(2, 0, 1))
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_gemm_weight_grad_leaves_alone_the_layers_it_cannot_compute():
    layers = nn.ModuleList([nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(3, 4, 3),
                            nn.Conv3d(1, 4, 3, dilation=2), nn.Conv3d(1, 4, 3, padding="same"),
                            nn.Conv3d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(1, 4, 3, dilation=(1, 2))])
    assert use_gemm_weight_grad(layers) == ["0.0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [2, 3])
def test_gemm_upconv_equals_conv_transpose_with_anisotropic_kernels(dtype, dims):
    torch.manual_seed(1)
    kernel = (2, 3, 1)[:dims] if dims == 3 else (3, 2)
    cls, fn = (nn.ConvTranspose3d, F.conv_transpose3d) if dims == 3 else (nn.ConvTranspose2d, F.conv_transpose2d)
    layer = cls(3, 5, kernel, stride=kernel).to(dtype)
    assert use_gemm_upconv(layer) == ["0."]
    x = torch.rand(2, 3, *(4, 3, 2)[:dims], dtype=dtype)
    mine, ref = _grads(layer, x, fn, stride=kernel)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_gemm_upconv_honours_output_size_and_leaves_overlapping_layers_alone():
    torch.manual_seed(2)
    layer = nn.ConvTranspose3d(4, 3, 2, stride=2)
    plain = nn.ConvTranspose3d(4, 3, 2, stride=2)
    plain.load_state_dict(layer.state_dict())
    use_gemm_upconv(layer)
    x = torch.rand(1, 4, 3, 3, 3)
    with torch.no_grad():
        out = layer(x, output_size=[7, 7, 7])  # output padding 1, as ConvTranspose3d picks it
        assert out.shape == (1, 3, 7, 7, 7)
        torch.testing.assert_close(out, plain(x, output_size=[7, 7, 7]))
    others = nn.ModuleList([nn.ConvTranspose3d(4, 4, 2, stride=2, output_padding=1),
                            nn.ConvTranspose3d(4, 4, 2, stride=2, dilation=2),
                            nn.ConvTranspose3d(4, 4, 2, stride=2, groups=2)])
    assert use_gemm_upconv(others) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_head_equals_conv3d_for_several_output_channels(dtype):
    torch.manual_seed(3)
    layer = nn.Conv3d(6, 3, 1).to(dtype)
    assert use_gemm_head(layer) == ["0."]
    mine, ref = _grads(layer, torch.rand(2, 6, 3, 4, 2, dtype=dtype), F.conv3d)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_channels_equal_conv3d_and_pad_to_the_next_multiple_only(dtype):
    torch.manual_seed(4)
    layer = nn.Conv3d(3, 10, (3, 1, 3), stride=(2, 1, 1), padding=(1, 0, 2)).to(dtype)
    assert use_padded_channels(layer) == ["0."]
    x = torch.rand(2, 3, 5, 4, 3, dtype=dtype)
    calls = []
    original = F.conv3d

    def spy(x, w, *args):
        calls.append((x.shape[1], tuple(w.shape[:2])))
        return original(x, w, *args)

    one_side = nn.Conv3d(1, 8, 3, padding=1).to(dtype)  # already aligned output channels stay as they are
    assert use_padded_channels(one_side) == ["0."]
    F.conv3d = spy
    try:
        with torch.no_grad():
            layer(x), one_side(x[:, :1])
    finally:
        F.conv3d = original
    assert calls == [(8, (16, 8)), (8, (8, 8))]  # 3 -> 8 in, 10 -> 16 out; 1 -> 8 in, 8 out: no multiple more
    mine, ref = _grads(layer, x, F.conv3d, stride=(2, 1, 1), padding=(1, 0, 2))
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, **TOL[dtype])
    aligned = nn.ModuleList([nn.Conv3d(8, 16, 3), nn.Conv3d(4, 4, 3, groups=2), nn.ConvTranspose3d(1, 4, 2)])
    assert use_padded_channels(aligned) == []


# ---------------------------------------------------------------- load_pretrained

def _checkpoint(unet: UNet) -> dict:
    return {"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(), "meta": {"spatial_dims": 3}}


def test_load_pretrained_names_exactly_the_loaded_and_the_missing_tensors():
    unet = _seeded(UNet(width=TINY), seed=7).float()
    ckpt = _checkpoint(unet)
    ckpt["decoder"] = {k: v for k, v in ckpt["decoder"].items() if not k.startswith("head.")}
    segmenter = Segmenter(out_channels=3, width=TINY)
    head_before = segmenter.decoder.head.weight.detach().clone()
    report = load_pretrained(segmenter, ckpt, parts=("encoder", "decoder"))
    expected = [k for k in unet.state_dict() if not k.startswith("decoder.head.")]
    assert report.loaded == expected and report.missing == ["decoder.head.weight", "decoder.head.bias"]
    assert report.unexpected == [] and report.mismatched == {} and report.adapted == []
    assert all(torch.equal(segmenter.state_dict()[k], unet.state_dict()[k]) for k in expected)
    assert torch.equal(segmenter.decoder.head.weight, head_before)
    classifier = Classifier(width=TINY)
    report = load_pretrained(classifier, {"model": unet.state_dict()})  # the Lightning-style wrapper
    assert report.loaded == [k for k in unet.state_dict() if k.startswith("encoder.")]
    assert report.unexpected == [] and report.parts == ("encoder",)
    assert load_pretrained(Classifier(width=TINY), ckpt, parts="encoder").loaded == report.loaded


@pytest.mark.parametrize("kind", ["missing", "unexpected"])
def test_strict_loading_refuses_either_kind_of_key_difference_and_copies_nothing(kind):
    ckpt = _checkpoint(_seeded(UNet(width=TINY), seed=8).float())
    if kind == "missing":
        del ckpt["encoder"]["levels.1.conv2.conv.bias"]
    else:
        ckpt["encoder"]["extra.weight"] = torch.zeros(2)
    classifier = Classifier(width=TINY)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    with pytest.raises(ValueError, match=r"strict loading .* failed"):
        load_pretrained(classifier, ckpt, strict=True)
    assert all(torch.equal(classifier.state_dict()[k], v) for k, v in before.items())
    report = load_pretrained(classifier, ckpt)  # not strict: the rest loads, the difference is reported
    assert (report.missing if kind == "missing" else report.unexpected) == \
        (["encoder.levels.1.conv2.conv.bias"] if kind == "missing" else ["encoder.extra.weight"])


def test_the_repeat_policy_adapts_only_the_first_convolution():
    ckpt = _checkpoint(_seeded(UNet(width=TINY), seed=9).float())
    # a deeper conv differing only in its input channels is refused, even under "repeat"
    deeper = dict(ckpt["encoder"])
    deeper["levels.1.conv1.conv.weight"] = torch.zeros(8, 3, 3, 3, 3)
    with pytest.raises(ValueError, match=r"encoder\.levels\.1\.conv1\.conv\.weight: checkpoint \(8, 3, 3, 3, 3\)"):
        load_pretrained(Classifier(width=TINY), {"encoder": deeper}, in_channels_policy="repeat")
    # a first conv differing in its output channels too is refused
    with pytest.raises(ValueError, match=r"encoder\.levels\.0\.conv1\.conv\.weight: checkpoint \(4, 1, 3, 3, 3\)"):
        load_pretrained(Classifier(in_channels=2, width=2 * TINY), ckpt, in_channels_policy="repeat")
    # same number of values in another shape is a mismatch, not a copy
    reshaped = dict(ckpt["encoder"])
    reshaped["levels.0.conv1.conv.weight"] = reshaped["levels.0.conv1.conv.weight"].reshape(2, 2, 3, 3, 3)
    target = Classifier(width=TINY)
    before = target.encoder.levels[0].conv1.conv.weight.detach().clone()
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 3, 3\) vs network \(4, 1, 3, 3, 3\)"):
        load_pretrained(target, {"encoder": reshaped})
    assert torch.equal(target.encoder.levels[0].conv1.conv.weight, before)
    # the adapted kernel: the sum over the checkpoint's input channels spread over the network's
    three = Classifier(in_channels=3, width=TINY)
    report = load_pretrained(three, ckpt, in_channels_policy="repeat")
    assert report.adapted == [FIRST_CONV] and FIRST_CONV in report.loaded
    w = ckpt["encoder"]["levels.0.conv1.conv.weight"]
    torch.testing.assert_close(three.encoder.levels[0].conv1.conv.weight, (w / 3).expand(-1, 3, -1, -1, -1))


def test_the_head_only_way_out_is_offered_only_when_the_head_alone_differs():
    ckpt = _checkpoint(_seeded(UNet(width=TINY), seed=10).float())
    with pytest.raises(ValueError, match="Only the decoder's output head differs"):
        load_pretrained(Segmenter(out_channels=2, width=TINY), ckpt, parts=("encoder", "decoder"))
    with pytest.raises(ValueError) as err:
        load_pretrained(Segmenter(in_channels=2, out_channels=2, width=TINY), ckpt, parts=("encoder", "decoder"))
    assert "Only the decoder's output head" not in str(err.value) and "Build the network with" in str(err.value)


def test_the_dimensionality_check_says_where_it_read_the_checkpoints_dims():
    resnet = ResNetSegmenter(1, 1, backbone="resnet10", decoder_channels=(8, 8, 8, 8, 8))
    ckpt2d = {"encoder": resnet.encoder.state_dict(), "meta": {"spatial_dims": 2}}
    with pytest.raises(ValueError, match=r"checkpoint meta spatial_dims: 2D"):
        load_pretrained(Classifier(width=TINY), ckpt2d)
    with pytest.raises(ValueError, match=r"checkpoint kernel shapes: 2D"):
        load_pretrained(Classifier(width=TINY), {"encoder": ckpt2d["encoder"]})


# ---------------------------------------------------------------- ResNet U-Net and weights_fit

def test_resnet_segmenter_equals_monai_flexible_unet_with_the_same_weights():
    from monai.networks.nets import FlexibleUNet

    torch.manual_seed(11)
    decoder_channels = (16, 8, 8, 8, 4)
    ours = _seeded(ResNetSegmenter(1, 2, backbone="resnet10", decoder_channels=decoder_channels), seed=11).eval()
    theirs = FlexibleUNet(1, 2, backbone="resnet10", pretrained=False, decoder_channels=decoder_channels,
                          spatial_dims=2).double().eval()
    state = {k.replace("decoder.head.", "segmentation_head."): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 64, 32, dtype=torch.double)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, theirs(x), rtol=1e-10, atol=1e-10)
    assert out.min() < 0 or out.max() > 1  # logits, no activation
    encoder = ResNetUNetEncoder("resnet18", spatial_dims=2)
    bottleneck, skips = encoder(torch.rand(1, 1, 64, 64))
    assert encoder.skip_channels == [s.shape[1] for s in skips] and encoder.out_channels == bottleneck.shape[1]
    with pytest.raises(ValueError, match="multiples of 32"):
        ResNetClassifier(1, 2, backbone="resnet10")(torch.rand(1, 1, 48, 48))


def test_weights_fit_reads_unet_settings_and_reports_the_right_direction():
    seg = Segmenter(3, 2, 4, width=0.25).state_dict()
    assert infer_network_settings(seg) == {"spatial_dims": 3, "in_channels": 2, "width": 0.25, "out": 4}
    encoder_only = {k[len("encoder."):]: v for k, v in seg.items() if k.startswith("encoder.")}
    assert infer_network_settings(encoder_only)["width"] == 0.25  # no part prefix
    state = dict(Classifier(width=TINY).state_dict())
    state.pop("fc.bias")
    state["extra"] = torch.zeros(1)
    missing, unexpected, mismatched = state_dict_mismatch(state, Classifier(num_classes=2, width=TINY))
    assert missing == ["fc.bias"] and unexpected == ["extra"] and mismatched == {"fc.weight": ((1, 64), (2, 64))}
    assert not same_value(0.125, 0.13) and same_value(1, 1.0) and same_value([16, 8], (16, 8))
    resnet = {"encoder.conv1.weight": torch.zeros(64, 1, 7, 7),
              **{f"decoder.blocks.{i}.convs.conv_1.conv.weight": torch.zeros(c, c, 3, 3) for i, c in enumerate((16, 8))}}
    # a tuple of the same channels and a float of the same value fit: nothing to change
    assert settings_that_fit(resnet, {"in_channels": 1.0, "spatial_dims": 2, "decoder_channels": (16, 8)}) == {}
    assert settings_that_fit(resnet, {"in_channels": 3, "decoder_channels": (16, 16)}) == \
        {"in_channels": 1, "decoder_channels": [16, 8]}
    assert format_overrides({"roi_size": [64, 64], "backbone": "resnet10"}) == \
        '--override "roi_size=[64,64]" --override backbone=resnet10'
