"""Single-input-channel convolutions whose weight gradient is one matrix product (for GPUs).

The first convolution of the U-Net (and of the adversary) sees a 1-channel image, for which cuDNN
has no tensor-core kernel in channels-last bf16. On an H100 (batch 64, compiled) switching both
layers' weight gradients to the GEMM below took the step from 380 to 390 patches/s (G step 158 → 156 ms,
D step 9.2 → 7.0 ms: the adversary's first layer). The first profile had attributed a
slow ``sm90_xmma_wgrad_indexed_implicit_gemm`` kernel to these layers; it stays with this option on,
so it belongs to another layer, most likely the decoder's full-resolution level (docs/benchmarks.md,
"H100, second lease"). With one input channel the weight
gradient is small enough to write as a GEMM over all output positions::

    dW[o, k] = Σ_p dY[p, o] · X_k[p]            (k: the kernel's 27 (3D) or 9 (2D) taps)

where ``X_k`` is the (padded) input shifted by tap ``k``: an "unfold" of the input, ``P × taps``
values, and ``dY`` in channels-last is already a ``P × C_out`` matrix. The forward pass and the
input gradient stay cuDNN's.

:func:`use_gemm_weight_grad` switches the qualifying layers of a module in place (their class
changes; parameters, state-dict keys and checkpoints are untouched). Whether it is faster depends
on the card and cuDNN version: ``benchmarks/first_conv.py`` times both on the device at hand, and
``benchmarks/pretrain_throughput.py`` (token ``gemmwg``) the whole step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._switch import switch_layers

__all__ = ["GemmWgradConv2d", "GemmWgradConv3d", "conv_weight_grad_gemm", "use_gemm_weight_grad"]


def _unfold(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]) -> torch.Tensor:
    """``(N, 1, *S)`` → ``(N·prod(S_out), prod(kernel))``: the input under every tap.

    ``Tensor.unfold`` yields ``(S + 2p - k) // s + 1`` windows per axis: the convolution's output size.
    """
    pad = [p for p in reversed(padding) for _ in range(2)]
    xp = F.pad(x[:, 0], pad) if any(padding) else x[:, 0]
    for axis, (k, s) in enumerate(zip(kernel, stride), start=1):
        xp = xp.unfold(axis, k, s)  # (N, *out, *kernel) after every spatial axis, a view
    return xp.reshape(-1, *kernel).flatten(1)


def conv_weight_grad_gemm(x: torch.Tensor, grad_out: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                          padding: tuple[int, ...]) -> torch.Tensor:
    """The weight gradient of a 1-input-channel, ungrouped, undilated convolution as one GEMM.

    Args:
        x: ``(N, 1, *S)`` input.
        grad_out: ``(N, C_out, *S_out)`` gradient of the output (any memory format).
        kernel, stride, padding: the convolution's.

    Returns:
        ``(C_out, 1, *kernel)`` in ``grad_out``'s dtype (float32 accumulation inside the product).
    """
    c_out = grad_out.shape[1]
    cols = _unfold(x.to(grad_out.dtype), kernel, stride, padding)  # (P, taps)
    rows = grad_out.movedim(1, -1).reshape(-1, c_out)  # (P, C_out): a view in channels-last
    return (rows.t() @ cols).view(c_out, 1, *kernel)


class _GemmWgradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dims):
        conv = F.conv3d if dims == 3 else F.conv2d
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dims, bias is not None)
        return conv(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dims, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.nn.grad.conv3d_input if dims == 3 else torch.nn.grad.conv2d_input
            grad_x = grad_input(x.shape, weight.to(grad_out.dtype), grad_out, stride, padding).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad_gemm(x, grad_out, tuple(weight.shape[2:]), stride, padding).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, *range(2, grad_out.dim()))).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


class _GemmWgradMixin:
    """``_conv_forward`` through :class:`_GemmWgradConv` (same forward, GEMM weight gradient)."""

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - torch's signature
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return super()._conv_forward(input, weight, bias)
        dims = weight.dim() - 2
        if torch.is_autocast_enabled(input.device.type):  # what autocast would give conv3d/conv2d
            dtype = torch.get_autocast_dtype(input.device.type)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(input.device.type, enabled=False):
            return _GemmWgradConv.apply(input, weight, bias, self.stride, self.padding, dims)


class GemmWgradConv3d(_GemmWgradMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with one input channel and a GEMM weight gradient."""


class GemmWgradConv2d(_GemmWgradMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with one input channel and a GEMM weight gradient."""


def _new_class(m: nn.Module) -> type[nn.Module] | None:
    qualifies = (type(m) in (nn.Conv3d, nn.Conv2d) and m.in_channels == 1 and m.groups == 1
                 and all(d == 1 for d in m.dilation) and m.padding_mode == "zeros" and not isinstance(m.padding, str))
    return (GemmWgradConv3d if isinstance(m, nn.Conv3d) else GemmWgradConv2d) if qualifies else None


def use_gemm_weight_grad(*modules: nn.Module) -> list[str]:
    """Switch every 1-input-channel ``Conv2d``/``Conv3d`` inside ``modules`` to the GEMM weight gradient.

    Returns:
        The qualified names of the switched layers (``"0.encoder.levels.0.conv1.conv"``: module
        index, then the name inside it).
    """
    return switch_layers(modules, _new_class)
