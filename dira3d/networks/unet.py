"""The Models Genesis U-Net (docs/method.md) for 2D and 3D, split into ``encoder`` and ``decoder``.

Encoder levels (channels at ``width=1``)::

    level 0: in → 32 → 64      (skip 0)   max-pool
    level 1: 64 → 64 → 128     (skip 1)   max-pool
    level 2: 128 → 128 → 256   (skip 2)   max-pool
    level 3: 256 → 256 → 512   (bottleneck, no pool)

Decoder levels: transposed conv ×2 that keeps the channels (512, 256, 128), concatenation with
the matching skip, two convs (768 → 256 → 256, 384 → 128 → 128, 192 → 64 → 64), then a 1×1 conv
to ``out_channels``. Every 3×3(×3) conv is followed by a normalisation and a ReLU.

The key names (``encoder.levels.0.conv1.conv.weight``, ``decoder.levels.0.up.weight``,
``decoder.head.weight`` …) are a contract: pretraining checkpoints and the task networks
(:class:`~dira3d.networks.task.Segmenter`, :class:`~dira3d.networks.task.Classifier`) share them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Conv, Pool
from torch import nn

from dira3d.data.errors import DataError

__all__ = [
    "UNet",
    "EncoderDecoder",
    "UNetEncoder",
    "UNetDecoder",
    "NORMS",
    "scale_channels",
    "check_input",
    "DIVISOR",
    "ENCODER_PLAN",
]

NORMS = ("batch", "instance", "group")

# Channel plan of the reference network at width 1.
ENCODER_PLAN = ((32, 64), (64, 128), (128, 256), (256, 512))
DIVISOR = 2 ** (len(ENCODER_PLAN) - 1)  # three poolings → sizes must be multiples of 8


def scale_channels(channels: int, width: float) -> int:
    """Scale a channel count by ``width``, rounded, at least 1.

    Args:
        channels: channel count of the reference network.
        width: multiplier (1.0 = the reference network).

    Returns:
        ``max(1, round(channels * width))``.
    """
    return max(1, int(round(channels * width)))




def _check_settings(spatial_dims: int, width: float, norm: str) -> None:
    if spatial_dims not in (2, 3):
        raise DataError(None, f"spatial_dims={spatial_dims!r} is not supported; use 2 or 3")
    if not width > 0:
        raise DataError(None, f"width={width!r} must be a positive number (1.0 = the reference network)")
    if norm not in NORMS:
        raise DataError(None, f"norm={norm!r} is not supported; choose one of {', '.join(NORMS)}")


def _norm_spec(norm: str, channels: int) -> tuple:
    """MONAI ``Norm`` factory argument for ``channels`` feature maps."""
    if norm == "batch":
        return ("batch", {})
    if norm == "instance":
        # affine so that instance-norm networks have learnable scales like the batch-norm ones
        return ("instance", {"affine": True})
    # groups of a size that always divides the (possibly width-scaled) channel count
    return ("group", {"num_groups": math.gcd(channels, 8)})


def _conv_block(spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> Convolution:
    """3×3(×3) conv (with bias, as in Models Genesis) → normalisation → ReLU."""
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        kernel_size=3,
        act=Act.RELU,
        norm=_norm_spec(norm, out_channels),
        adn_ordering="NA",
    )


def _double_conv(spatial_dims: int, in_channels: int, mid_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv1=_conv_block(spatial_dims, in_channels, mid_channels, norm),
            conv2=_conv_block(spatial_dims, mid_channels, out_channels, norm),
        )
    )


def check_input(x: torch.Tensor, spatial_dims: int, in_channels: int, divisor: int = 8) -> None:
    """Check the shape of a batch given to a U-Net encoder.

    Args:
        x: batch ``(B, C, *spatial)``.
        spatial_dims: expected number of spatial axes.
        in_channels: expected channel count ``C``.
        divisor: every spatial size must be a multiple of it (8 for three poolings).

    Raises:
        ValueError: wrong number of axes, wrong channel count, or a spatial size that is not a
            multiple of ``divisor``.
    """
    # written in the TorchScript subset so that scripted task networks keep the check
    shape = list(x.shape)
    if len(shape) != spatial_dims + 2:
        axes = "X, Y, Z" if spatial_dims == 3 else "H, W"
        raise ValueError(
            f"expected a batch of shape (B, C, {axes}) for a {spatial_dims}D network, got shape {shape}; "
            "add the batch/channel axes or set spatial_dims"
        )
    if shape[1] != in_channels:
        raise ValueError(
            f"the network expects {in_channels} input channel(s), got {shape[1]} (input shape {shape}); "
            "set in_channels to match the data"
        )
    spatial = shape[2:]
    for size in spatial:
        if size % divisor != 0:
            raise ValueError(
                f"spatial size {spatial} is not supported: sizes must be multiples of {divisor} "
                f"(the network's downsampling); set patch_size / roi_size to multiples of {divisor}, "
                f"or crop or pad the input, e.g. with monai.transforms.DivisiblePadd(k={divisor})"
            )


class UNetEncoder(nn.Module):
    """Encoder f_θ: four double-conv levels with max-pooling between them.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        width: channel multiplier.
        norm: ``"batch"``, ``"instance"`` or ``"group"``.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, width: float = 1.0, norm: str = "batch") -> None:
        super().__init__()
        _check_settings(spatial_dims, width, norm)
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels!r} must be at least 1")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        levels = []
        channels = in_channels
        self.skip_channels: list[int] = []
        for mid, out in ENCODER_PLAN:
            mid, out = scale_channels(mid, width), scale_channels(out, width)
            levels.append(_double_conv(spatial_dims, channels, mid, out, norm))
            self.skip_channels.append(out)
            channels = out
        self.skip_channels.pop()  # the last level is the bottleneck, not a skip
        self.out_channels = channels
        self.levels = nn.ModuleList(levels)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(bottleneck, skips)``; ``skips[i]`` is the output of level ``i`` (before pooling)."""
        skips: list[torch.Tensor] = []
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            x = level(x)
            if i < last:
                skips.append(x)
                x = self.pool(x)
        return x, skips


class UpLevel(nn.Module):
    """Transposed conv ×2 (channels kept) → concatenation with the skip → double conv."""

    def __init__(self, spatial_dims: int, channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.up = Conv[Conv.CONVTRANS, spatial_dims](channels, channels, kernel_size=2, stride=2)
        self.convs = _double_conv(spatial_dims, channels + skip_channels, out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNetDecoder(nn.Module):
    """Decoder g_θ: up-convolutions, skip concatenation, double convs and a 1×1 output conv.

    Args:
        spatial_dims: 2 or 3.
        out_channels: output channels of the final 1×1 conv.
        width: channel multiplier (must equal the encoder's).
        norm: ``"batch"``, ``"instance"`` or ``"group"``.

    The output is the pre-activation map (logits); :class:`UNet` applies its activation after it.
    """

    def __init__(self, spatial_dims: int = 3, out_channels: int = 1, width: float = 1.0, norm: str = "batch") -> None:
        super().__init__()
        _check_settings(spatial_dims, width, norm)
        if out_channels < 1:
            raise ValueError(f"out_channels={out_channels!r} must be at least 1")
        enc_out = [scale_channels(out, width) for _, out in ENCODER_PLAN]
        levels = []
        channels = enc_out[-1]
        for skip_channels in reversed(enc_out[:-1]):
            # each level ends with as many channels as its skip (768 → 256 → 256 at width 1)
            levels.append(UpLevel(spatial_dims, channels, skip_channels, skip_channels, norm))
            channels = skip_channels
        self.levels = nn.ModuleList(levels)
        self.head = Conv[Conv.CONV, spatial_dims](channels, out_channels, kernel_size=1)
        self.out_channels = out_channels

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decode ``bottleneck`` using ``skips`` (as returned by :class:`UNetEncoder`); returns logits."""
        if len(skips) != len(self.levels):
            raise ValueError(f"the decoder needs {len(self.levels)} skip tensors, got {len(skips)}")
        x = bottleneck
        n = len(skips)
        for i, level in enumerate(self.levels):
            x = level(x, skips[n - 1 - i])
        return self.head(x)


class EncoderDecoder(nn.Module):
    """An ``encoder`` f_θ and a ``decoder`` g_θ: ``forward(x) = activation(decode(*encode(x)))``.

    The interface :class:`UNet` and :class:`~dira3d.networks.ResNetUNet` share (``encode``, ``decode``,
    ``forward``, ``spatial_dims``, ``in_channels``, ``out_channels``, ``divisor``, ``bottleneck_channels``),
    so the DiRA engine uses either.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (checked by :meth:`encode`).
        out_channels: output channels.
        divisor: every spatial size of the input must be a multiple of it.
        out_activation: ``"sigmoid"`` or ``None`` for logits.
        build: makes ``(encoder, decoder)`` once ``out_activation`` is checked; the encoder maps ``x`` to
            ``(bottleneck, skips)`` and has an ``out_channels`` attribute, the decoder maps them back.

    Raises:
        ValueError: an unsupported ``out_activation`` (or whatever ``build`` raises).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, divisor: int,
                 out_activation: str | None, build: Callable[[], tuple[nn.Module, nn.Module]]) -> None:
        super().__init__()
        if out_activation not in ("sigmoid", None):
            raise ValueError(f"out_activation={out_activation!r} is not supported; use 'sigmoid' or None (logits)")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.divisor = divisor
        self.encoder, self.decoder = build()
        self.bottleneck_channels = self.encoder.out_channels
        self.out_activation = nn.Sigmoid() if out_activation == "sigmoid" else nn.Identity()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode a batch ``(B, C, *spatial)``.

        Returns:
            ``(bottleneck, skips)``: the bottleneck and the skip feature maps from the finest to the
            coarsest level (:class:`UNet`: ``(B, 512·width, *spatial/8)`` and three skips;
            :class:`~dira3d.networks.ResNetUNet`: ``(B, 2048, *spatial/32)`` and four).

        Raises:
            ValueError: wrong shape, channel count, or a size that is not a multiple of ``divisor``
                (see :func:`check_input`).
        """
        if not torch.jit.is_tracing():
            check_input(x, self.spatial_dims, self.in_channels, self.divisor)
        return self.encoder(x)

    def decode(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decode to ``(B, out_channels, *spatial)`` and apply the output activation."""
        return self.out_activation(self.decoder(bottleneck, skips))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, skips = self.encode(x)
        return self.decode(bottleneck, skips)


class UNet(EncoderDecoder):
    """Models Genesis U-Net: ``forward(x) = activation(decode(*encode(x)))``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        width: channel multiplier (1.0 = the reference network, ≈19.07 M parameters in 3D;
            1/8 for tests).
        norm: ``"batch"`` (default; eval mode uses running statistics), ``"instance"`` or
            ``"group"`` (small-batch fine-tuning).
        out_activation: ``"sigmoid"`` (restoration in [0, 1]) or ``None`` for logits.

    Raises:
        ValueError: an unsupported setting.

    Example::

        net = UNet(spatial_dims=3, width=1 / 8)
        bottleneck, skips = net.encode(torch.rand(2, 1, 64, 64, 32))   # bottleneck (2, 64, 8, 8, 4)
        restored = net.decode(bottleneck, skips)                        # (2, 1, 64, 64, 32) in (0, 1)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        width: float = 1.0,
        norm: str = "batch",
        out_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, DIVISOR, out_activation,
                         lambda: (UNetEncoder(spatial_dims, in_channels, width, norm),
                                  UNetDecoder(spatial_dims, out_channels, width, norm)))
