"""The adversary D_φ: a PatchGAN discriminator with 3×3(×3) kernels (docs/method.md)."""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from dira3d.networks.unet import check_input

__all__ = ["Adversary"]

_NORMS = ("instance", "batch", "none")


class Adversary(nn.Module):
    """PatchGAN discriminator returning one map of real/fake logits.

    With the defaults (``channels=64``, ``num_layers=4``) the blocks are those of the official 2D
    DiRA code: conv 64 (stride 2, no norm) → 128 (s2) → 256 (s2) → 512 (s1), InstanceNorm on the
    middle blocks, LeakyReLU 0.2, then a conv to 1 channel; weights drawn from N(0, 0.02).
    Built on MONAI's :class:`~monai.networks.nets.PatchDiscriminator` (which returns every
    layer's output); this wrapper returns only the final score map.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the images it judges.
        channels: channels of the first block (doubled in each following block).
        num_layers: number of conv blocks before the final 1-channel conv (≥ 1).
        norm: ``"instance"`` (default), ``"batch"`` or ``"none"``, used on the middle blocks.

    Attributes:
        stride_factor: how many times smaller each side of the score map is than the input's,
            ``2**max(1, num_layers - 1)`` (8 with the defaults): the first conv and every middle block
            but the last have stride 2, so neighbouring logits are ``stride_factor`` voxels apart in
            the input (each one sees a larger receptive field). The input sides need NOT be
            multiples of it: each stride-2 conv (kernel 3, padding 1) rounds up, so a side ``n``
            gives ``ceil(n / stride_factor)`` logits (the U-Net's own multiple-of-8 rule is
            separate). Its one use is the size check: with a norm the input must leave more than one
            value per channel after this reduction (see Raises).

    Returns (forward):
        logits ``(B, 1, *ceil(spatial / stride_factor))`` — no sigmoid, the adversarial loss
        applies it; real and restored patches of one size give maps of one shape.

    Raises:
        ValueError: an unsupported setting; in ``forward``, a batch of the wrong shape or channel
            count, or one too small for the norm (InstanceNorm needs more than one voxel after the
            ``num_layers - 1`` stride-2 convs: with the defaults, a side larger than 8; BatchNorm
            in training, more than one value per channel).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: int = 64,
        num_layers: int = 4,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims!r} is not supported; use 2 or 3")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r} must be at least 1")
        if channels < 1 or in_channels < 1:
            raise ValueError(f"channels={channels!r} and in_channels={in_channels!r} must be positive")
        if norm not in _NORMS:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {', '.join(_NORMS)}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.norm = norm if num_layers > 1 else "none"  # (one layer: the first conv only, never normalised)
        # the sides are halved (rounded up) by the first conv and by every middle block but the last
        # (see stride_factor in the class docstring)
        self.stride_factor = 2 ** max(1, num_layers - 1)
        self.net = PatchDiscriminator(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=num_layers - 1,  # MONAI counts the blocks after the first one
            kernel_size=3,
            norm=None if norm == "none" else norm,
            # MONAI's default drops the conv bias (BatchNorm cancels it); without a norm keep it
            bias=norm == "none",
            padding=1,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # shape checks on Python ints: no host sync, fine under torch.compile
            check_input(x, self.spatial_dims, self.in_channels, 1)
            self._check_size(list(x.shape))
        # run the layers in turn instead of PatchDiscriminator.forward, which keeps every output
        for layer in self.net.children():
            x = layer(x)
        return x

    def _check_size(self, shape: list[int]) -> None:
        """Refuse a batch whose normalised maps would hold a single value per channel (the norm's
        own error, "Expected more than 1 spatial element", names neither the patch nor the fix)."""
        if self.norm == "none":
            return
        factor = self.stride_factor
        voxels = 1
        for size in shape[2:]:
            voxels *= -(-size // factor)  # each stride-2 conv (kernel 3, padding 1) rounds up
        if self.norm == "instance" and voxels > 1 or self.norm == "batch" and (voxels * shape[0] > 1 or not self.training):
            return
        what = ("InstanceNorm needs more than one voxel" if self.norm == "instance"
                else "BatchNorm in training needs more than one value per channel (batch × voxels)")
        example = "×".join([str(2 * factor)] * len(shape[2:]))
        batch = " (or batches of 2 or more)" if self.norm == "batch" else ""
        raise ValueError(f"input of spatial size {shape[2:]} (batch {shape[0]}) is too small for the adversary: its "
                         f"stride-2 convs divide each side by {factor}, leaving 1 voxel, and {what}; give patches "
                         f"with at least one side larger than {factor} (e.g. {example}){batch}")
