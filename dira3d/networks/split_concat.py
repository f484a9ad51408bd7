"""The U-Net decoder's concatenation, left out: a convolution of ``cat([a, b])`` as two summed convolutions.

Each decoder level runs ``conv(cat([up(x), skip]))``. A convolution is linear in its input
channels, so with the weight split along its input channels at ``a``'s channel count::

    conv(cat([a, b]), W, bias) == conv(a, W[:, :Ca], bias) + conv(b, W[:, Ca:])

This leaves out the concatenation (a copy of both tensors into a new one, and its backward) and
gives cuDNN two narrower convolutions. On an H100 (channels-last bf16, batch 64, 64×64×32 patches,
``benchmarks/conv_layers.py``) the full-resolution level's first convolution (128 + 64 → 64
channels) took 51.5 ms forward + backward as one convolution and 43.5 ms as two, without counting
the concatenation's copy; it is the largest single layer of the step.

:func:`use_split_concat` switches the decoder levels of a module in place (their class changes;
parameters, state-dict keys and checkpoints are untouched). Whether the whole step gets faster is for
``benchmarks/pretrain_throughput.py`` (token ``splitcat``) to say on your card.
"""

from __future__ import annotations

import torch
from torch import nn

from ._switch import switch_layers
from .unet import UpLevel

__all__ = ["SplitConcatUpLevel", "use_split_concat"]

_PLAIN_CONVS = (nn.Conv2d, nn.Conv3d)


class SplitConcatUpLevel(UpLevel):
    """A decoder level whose first convolution reads the up-sampled map and the skip separately."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        first = self.convs[0]
        conv = getattr(first, "conv", None)
        if type(conv) not in _PLAIN_CONVS or conv.groups != 1:  # another switch changed it: keep its path
            return super().forward(x, skip)
        up = self.up(x)
        split = up.shape[1]
        weight = conv.weight
        y = conv._conv_forward(up, weight[:, :split], conv.bias) + conv._conv_forward(skip, weight[:, split:], None)
        for name, module in first.named_children():  # the block's normalisation and activation
            if name != "conv":
                y = module(y)
        for module in list(self.convs)[1:]:
            y = module(y)
        return y


def use_split_concat(*modules: nn.Module) -> list[str]:
    """Switch every U-Net decoder level in ``modules`` to :class:`SplitConcatUpLevel`.

    Returns:
        The qualified names of the switched levels (``"0.decoder.levels.0"``: module index, then the
        name inside it); a level already switched is not listed again.
    """
    return switch_layers(modules, lambda m: SplitConcatUpLevel if type(m) is UpLevel else None)
