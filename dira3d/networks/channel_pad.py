"""Convolutions whose channel counts are padded with zeros to a multiple of 8 (for GPU tensor cores).

The image-facing layers of the default model have 1 channel on one side: the U-Net's first
convolution (1 → 32) and its output head (64 → 1), the adversary's first (1 → 64) and last
(512 → 1) convolutions. Tensor-core kernels want channel counts that are multiples of 8 (16
bytes of bf16); for 1-channel layers cuDNN falls back to slower kernels. On an H100 in
channels-last bf16, the weight gradient of the U-Net's first layer alone took 10.8 ms of a
113.6 ms step at batch 32 (``sm90_xmma_wgrad_indexed_implicit_gemm``, docs/benchmarks.md), for a
7 GFLOP product.

A padded layer runs the same convolution on the input with zero channels appended and on its
weight with zero input channels (and zero output channels, whose outputs are dropped) appended:

    conv(pad(x), pad(W))[:, :C_out] == conv(x, W)

exactly, since the added products are all zero. Gradients follow through ``F.pad``, which hands the
real channels' gradients back and drops the rest, so parameters, state-dict keys and checkpoints are
those of the plain layer. The extra work is small: 8 channels instead of 1 on an image-sized
tensor (the first layer's 0.23 GFLOP per 64×64×32 patch becomes 1.8, of 780 per training step).

:func:`use_padded_channels` switches the qualifying layers of a module in place (their class
changes). Whether it is faster depends on the card and cuDNN version: ``benchmarks/first_conv.py``
and ``benchmarks/pretrain_throughput.py`` (token ``padch``) measure it. The alternative for the
first layer's weight gradient alone is :mod:`dira3d.networks.gemm_wgrad`; a layer gets one or the
other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._switch import switch_layers

__all__ = ["ChannelPaddedConv2d", "ChannelPaddedConv3d", "use_padded_channels"]

ALIGN = 8  # bf16/fp16 tensor cores: 16-byte rows


def _padded(channels: int, multiple: int) -> int:
    return -(-channels // multiple) * multiple


class _ChannelPaddedMixin:
    """``_conv_forward`` on zero-padded channels; ``pad_multiple`` and ``pad_memory_format`` are set by the switch."""

    pad_multiple: int = ALIGN
    pad_memory_format: torch.memory_format | None = None

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - torch's signature
        cin, cout = weight.shape[1], weight.shape[0]
        extra_in = _padded(cin, self.pad_multiple) - cin
        extra_out = _padded(cout, self.pad_multiple) - cout
        if torch.is_autocast_enabled(input.device.type):  # pad in the dtype the convolution runs in
            dtype = torch.get_autocast_dtype(input.device.type)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        keep = [0, 0] * (weight.dim() - 2)  # F.pad lists the last axis first: spatial axes untouched
        if extra_in:
            input = F.pad(input, keep + [0, extra_in])
            weight = F.pad(weight, keep + [0, extra_in])
        if extra_out:
            weight = F.pad(weight, keep + [0, 0, 0, extra_out])
            bias = None if bias is None else F.pad(bias, [0, extra_out])
        if self.pad_memory_format is not None:
            input = input.contiguous(memory_format=self.pad_memory_format)
            weight = weight.contiguous(memory_format=self.pad_memory_format)
        out = super()._conv_forward(input, weight, bias)
        return out[:, :cout] if extra_out else out


class ChannelPaddedConv3d(_ChannelPaddedMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` run on channels zero-padded to a multiple of ``pad_multiple``."""


class ChannelPaddedConv2d(_ChannelPaddedMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` run on channels zero-padded to a multiple of ``pad_multiple``."""


def _new_class(m: nn.Module, multiple: int) -> type[nn.Module] | None:
    qualifies = (type(m) in (nn.Conv3d, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                 and (m.in_channels % multiple or m.out_channels % multiple))
    return (ChannelPaddedConv3d if isinstance(m, nn.Conv3d) else ChannelPaddedConv2d) if qualifies else None


def use_padded_channels(*modules: nn.Module, multiple: int = ALIGN,
                        memory_format: torch.memory_format | None = None) -> list[str]:
    """Switch every ``Conv2d``/``Conv3d`` in ``modules`` whose channels are not a multiple of ``multiple``.

    Args:
        modules: the networks to change in place.
        multiple: channel alignment (8: bf16/fp16 tensor cores).
        memory_format: layout of the padded input and weight (``torch.channels_last_3d`` when the
            network runs channels-last; a 1-channel tensor does not say which layout it has, the
            padded one must). None: whatever ``F.pad`` returns.

    Returns:
        The qualified names of the switched layers (``"0.encoder.levels.0.conv1.conv"``: module
        index, then the name inside it).

    Raises:
        ValueError: ``multiple`` below 1.
    """
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be a positive integer (8 for bf16/fp16 tensor cores)")

    def setup(layer: nn.Module) -> None:
        layer.pad_multiple, layer.pad_memory_format = int(multiple), memory_format

    return switch_layers(modules, lambda m: _new_class(m, multiple), setup)
