"""Transposed convolutions with stride equal to kernel as one matrix product (for GPUs).

The U-Net's up-sampling layers are ``ConvTranspose3d(C, C, kernel_size=2, stride=2)``. With the
stride equal to the kernel the output windows do not overlap: every input voxel writes its own
``2×2×2`` block, and the layer is one GEMM followed by a rearrangement::

    y[n, (s, k), o] = Σ_c x[n, s, c] · W[c, (o, k)] + b[o]

where ``s`` runs over input voxels and ``k`` over the kernel's taps. cuDNN runs a transposed
convolution as the input gradient of a strided convolution. On an H100 (channels-last bf16), a
kernel of that kind (``sm80_xmma_dgrad``) took 2.0 ms per step at batch 32. If it is the
full-resolution up-sampling (128 → 128 channels, 137 GFLOP at batch 32), that is about
70 TFLOP/s. The GEMM runs at the card's matrix rate; the rearrangement is one pass over the
output, which ``torch.compile`` fuses into the following concatenation.

:func:`use_gemm_upconv` switches the qualifying layers of a module in place (their class changes;
parameters, state-dict keys and checkpoints are untouched). Whether it is faster depends on the card
and cuDNN version: ``benchmarks/pretrain_throughput.py`` (token ``gemmup``) measures it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._switch import switch_layers

__all__ = ["GemmConvTranspose2d", "GemmConvTranspose3d", "use_gemm_upconv"]


class _GemmUpconvMixin:
    """``forward`` as one GEMM and a rearrangement (non-overlapping windows only: see ``_qualifies``)."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # noqa: A002
        if output_size is not None:  # torch's own path picks output_padding from it
            return super().forward(input, output_size)
        n, c, *spatial = input.shape
        kernel, out = list(self.kernel_size), self.out_channels
        dims = len(spatial)
        # (n, *spatial, c) @ (c, out * taps): a view of a channels-last input, a copy otherwise
        y = torch.matmul(input.movedim(1, -1), self.weight.reshape(c, out * math.prod(kernel)))
        y = y.view(n, *spatial, out, *kernel)
        # (n, s0, k0, s1, k1, ..., out): every input voxel's block in place, channels last
        order = [0, *(axis for i in range(dims) for axis in (1 + i, 2 + dims + i)), 1 + dims]
        y = y.permute(order).reshape(n, *(s * k for s, k in zip(spatial, kernel)), out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        y = y.movedim(-1, 1)  # NC... view with channels-last strides
        channels_last = torch.channels_last_3d if dims == 3 else torch.channels_last
        if dims in (2, 3) and input.is_contiguous(memory_format=channels_last) and not input.is_contiguous():
            return y
        return y.contiguous()  # the layout the input had


class GemmConvTranspose3d(_GemmUpconvMixin, nn.ConvTranspose3d):
    """:class:`torch.nn.ConvTranspose3d` with ``stride == kernel_size`` as one GEMM."""


class GemmConvTranspose2d(_GemmUpconvMixin, nn.ConvTranspose2d):
    """:class:`torch.nn.ConvTranspose2d` with ``stride == kernel_size`` as one GEMM."""


def _new_class(m: nn.Module) -> type[nn.Module] | None:
    qualifies = (type(m) in (nn.ConvTranspose3d, nn.ConvTranspose2d) and tuple(m.stride) == tuple(m.kernel_size)
                 and not any(m.padding) and not any(m.output_padding) and all(d == 1 for d in m.dilation)
                 and m.groups == 1 and m.padding_mode == "zeros")
    return (GemmConvTranspose3d if isinstance(m, nn.ConvTranspose3d) else GemmConvTranspose2d) if qualifies else None


def use_gemm_upconv(*modules: nn.Module) -> list[str]:
    """Switch every ``ConvTranspose2d``/``3d`` with non-overlapping windows in ``modules`` to the GEMM form.

    Qualifying layers: stride equal to the kernel size, no padding, output padding or dilation, one
    group (the U-Net's up-sampling layers).

    Returns:
        The qualified names of the switched layers (``"0.decoder.levels.0.up"``: module index, then
        the name inside it).
    """
    return switch_layers(modules, _new_class)
