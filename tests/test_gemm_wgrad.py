"""The GEMM weight gradient of 1-input-channel convolutions equals cuDNN's / ATen's (dira3d.networks.gemm_wgrad)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dira3d.networks import Adversary, UNet
from dira3d.networks.gemm_wgrad import GemmWgradConv3d, use_gemm_weight_grad


def grads(conv: nn.Module, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    out = conv(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    result = [out.detach(), conv.weight.grad.clone()]
    result.append(None if conv.bias is None else conv.bias.grad.clone())
    result.append(None if x.grad is None else x.grad.clone())
    return result


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 1, False), (1, 0, True), (2, 2, True)])
@pytest.mark.parametrize("channels_last,input_grad", [(False, False), (True, False), (False, True)])
def test_gemm_weight_grad_matches_the_convolution(dims, stride, padding, bias, channels_last, input_grad):
    conv_cls = nn.Conv3d if dims == 3 else nn.Conv2d
    spatial = (10, 9, 8) if dims == 3 else (11, 10)
    torch.manual_seed(1)
    ref = conv_cls(1, 6, 3, stride=stride, padding=padding, bias=bias).double()
    gemm = conv_cls(1, 6, 3, stride=stride, padding=padding, bias=bias).double()
    gemm.load_state_dict(ref.state_dict())
    assert use_gemm_weight_grad(gemm) == ["0."] and type(gemm).__name__.startswith("GemmWgrad")
    x = torch.rand(3, 1, *spatial, dtype=torch.double)
    if channels_last:
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        ref, gemm, x = ref.to(memory_format=fmt), gemm.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    x1, x2 = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    for a, b in zip(grads(ref, x1), grads(gemm, x2)):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_under_bf16_autocast_the_gradients_agree_within_bf16_rounding():
    torch.manual_seed(2)
    ref = nn.Conv3d(1, 8, 3, padding=1)
    gemm = nn.Conv3d(1, 8, 3, padding=1)
    gemm.load_state_dict(ref.state_dict())
    use_gemm_weight_grad(gemm)
    x = torch.rand(2, 1, 8, 8, 8)
    results = []
    for conv in (ref, gemm):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16  # the same forward as autocast gives the plain layer
        out.float().square().sum().backward()
        assert conv.weight.grad.dtype == torch.float32
        results.append((out.float(), conv.weight.grad, conv.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * a.abs().max().item())


def test_only_single_channel_layers_switch_and_checkpoint_keys_stay():
    net, adversary = UNet(3, 1, 1, width=0.125), Adversary(3, 1, channels=4)
    keys = set(net.state_dict()) | {f"adv.{k}" for k in adversary.state_dict()}
    switched = use_gemm_weight_grad(net, adversary)
    assert switched == ["0.encoder.levels.0.conv1.conv", "1.net.initial_conv.conv"]  # the two image-facing layers
    assert isinstance(net.encoder.levels[0].conv1.conv, GemmWgradConv3d)
    assert set(net.state_dict()) | {f"adv.{k}" for k in adversary.state_dict()} == keys
    assert use_gemm_weight_grad(net, adversary) == []  # already switched: nothing more to do


def test_inference_and_frozen_layers_take_the_plain_path():
    conv = nn.Conv3d(1, 4, 3, padding=1)
    use_gemm_weight_grad(conv)
    x = torch.rand(1, 1, 6, 6, 6)
    with torch.no_grad():
        plain = conv(x)
    conv.requires_grad_(False)
    out = conv(x)
    assert out.grad_fn is None and torch.equal(out, plain)


def test_compiles_without_a_graph_break():
    torch.manual_seed(0)
    conv, ref = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(1, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    use_gemm_weight_grad(conv)
    x = torch.rand(2, 1, 8, 8, 8)
    torch.compile(conv, backend="inductor", fullgraph=True)(x).square().sum().backward()  # fullgraph: breaks raise
    ref(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
