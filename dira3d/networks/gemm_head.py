"""1×1 convolutions with a few output channels as one matrix product over channels-last rows (for GPUs).

The U-Net's output head is ``Conv3d(64, 1, kernel_size=1)`` at full resolution. cuDNN has no
tensor-core kernel for one output channel: on an H100 (batch 64, 64×64×32 patches, channels-last
bf16) the layer alone took 1.47 ms forward and 2.86 ms backward, 0.74 TFLOP/s, in a
non-tensor-core ``implicit_convolveNd_sgemm`` kernel (``benchmarks/conv_layers.py``;
docs/benchmarks.md). The layer is memory-bound: its input is 1 GB at that batch. In channels-last
the input is already a ``(voxels, C_in)`` matrix, so the layer is::

    y[p, o] = Σ_c x[p, c] · W[o, c] + b[o]        (F.linear on x.movedim(1, -1))

one pass over the input for the forward, one for each gradient (the input gradient is an outer
product, the weight gradient a matrix-vector product), each at the card's memory rate.

:func:`use_gemm_head` switches the qualifying layers of a module in place (their class changes;
parameters, state-dict keys and checkpoints are untouched). Whether it is faster depends on the card
and cuDNN version: ``benchmarks/conv_layers.py`` (variant ``gemm``) times the layer alone and
``benchmarks/pretrain_throughput.py`` (token ``gemmhead``) the whole step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._switch import switch_layers

__all__ = ["GemmHeadConv2d", "GemmHeadConv3d", "MAX_OUT_CHANNELS", "use_gemm_head"]

MAX_OUT_CHANNELS = 7  # from 8 output channels on, cuDNN's tensor-core kernels apply


class _GemmHeadMixin:
    """``_conv_forward`` as ``F.linear`` over the channel axis (1×1 kernel, stride 1, no padding only)."""

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - torch's signature
        out_channels, in_channels = weight.shape[:2]
        y = F.linear(input.movedim(1, -1), weight.reshape(out_channels, in_channels), bias).movedim(-1, 1)
        channels_last = torch.channels_last_3d if y.dim() == 5 else torch.channels_last
        if input.is_contiguous(memory_format=channels_last) and not input.is_contiguous():
            return y  # channels-last strides already, as cuDNN would return
        return y.contiguous()  # the layout the input had


class GemmHeadConv3d(_GemmHeadMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with a 1×1×1 kernel and a few output channels as one matrix product."""


class GemmHeadConv2d(_GemmHeadMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with a 1×1 kernel and a few output channels as one matrix product."""


def _new_class(m: nn.Module) -> type[nn.Module] | None:
    qualifies = (type(m) in (nn.Conv3d, nn.Conv2d) and all(k == 1 for k in m.kernel_size)
                 and all(s == 1 for s in m.stride) and m.groups == 1 and m.out_channels <= MAX_OUT_CHANNELS
                 and (m.padding == "valid" or (not isinstance(m.padding, str) and not any(m.padding))))
    return (GemmHeadConv3d if isinstance(m, nn.Conv3d) else GemmHeadConv2d) if qualifies else None


def use_gemm_head(*modules: nn.Module) -> list[str]:
    """Switch every 1×1 ``Conv2d``/``Conv3d`` with at most 7 output channels in ``modules`` to the GEMM form.

    Qualifying layers: kernel 1, stride 1, no padding, one group, ``out_channels <= 7`` (the
    U-Net's output head; wider 1×1 convolutions run well in cuDNN and are left alone).

    Returns:
        The qualified names of the switched layers (``"0.decoder.head"``: module index, then the
        name inside it).
    """
    return switch_layers(modules, _new_class)
