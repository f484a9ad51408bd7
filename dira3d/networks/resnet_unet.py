"""The 2D DiRA network (docs/method.md): a U-Net with a ResNet-50 encoder, built from MONAI pieces.

- ``encoder`` (f_θ): :class:`ResNetUNetEncoder`, MONAI's ``ResNetFeatures`` (``pretrained=False``:
  nothing is downloaded) returning ``(bottleneck, skips)`` like :class:`~dira3d.networks.UNetEncoder`.
  For a 224² input the feature maps are 64 @ 112², 256 @ 56², 512 @ 28², 1024 @ 14² (the skips)
  and 2048 @ 7² (the bottleneck). Its keys are the familiar ``conv1``, ``bn1``, ``layer1`` … ``layer4``.
- ``decoder`` (g_θ): :class:`ResNetUNetDecoder`, the decoder of MONAI's ``FlexibleUNet`` (nearest
  upsampling, concatenation, two conv-BN-ReLU per level; channels 256/128/64/32/16) plus a 3×3
  output conv (``decoder.head``), exactly what ``FlexibleUNet(backbone="resnet50")`` builds.

:class:`ResNetUNet` has the interface of :class:`~dira3d.networks.UNet` (``encode``, ``decode``,
``forward``, ``bottleneck_channels``, ``spatial_dims``: their shared base
:class:`~dira3d.networks.unet.EncoderDecoder`), so the DiRA engine uses either. The task
networks :class:`ResNetClassifier` and :class:`ResNetSegmenter` share the ``encoder`` / ``decoder``
key names, so :func:`~dira3d.networks.load_pretrained` copies pretraining weights one to one.
Spatial sizes must be multiples of 32 (five halvings).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE, SegmentationHead
from monai.networks.nets.flexible_unet import UNetDecoder as _FlexibleUNetDecoder
from monai.networks.nets.resnet import ResNetFeatures

from dira3d.networks.task import EncoderClassifier
from dira3d.networks.unet import EncoderDecoder

__all__ = ["BACKBONES", "ResNetUNetEncoder", "ResNetUNetDecoder", "ResNetUNet", "ResNetClassifier",
           "ResNetSegmenter", "RESNET_DIVISOR"]

BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
RESNET_DIVISOR = 32  # stride-2 stem conv, max-pool and three stride-2 stages
# FlexibleUNet's decoder defaults (batch norm with eps 1e-3, in-place ReLU, nearest upsampling)
_DECODER_NORM = ("batch", {"eps": 1e-3, "momentum": 0.1})
_DECODER_ACT = ("relu", {"inplace": True})


def _feature_channels(backbone: str) -> tuple[int, ...]:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not supported; choose one of {', '.join(BACKBONES)}")
    return tuple(FLEXUNET_BACKBONE.register_dict[backbone]["feature_channel"])


def _check_dims(spatial_dims: int, in_channels: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims={spatial_dims!r} is not supported; use 2 (chest X-rays) or 3")
    if in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r} must be at least 1")


class ResNetUNetEncoder(ResNetFeatures):
    """Encoder f_θ: a MONAI ResNet without its classifier, returning ``(bottleneck, skips)``.

    Args:
        backbone: one of ``BACKBONES`` (default ``"resnet50"``).
        spatial_dims: 2 (default) or 3.
        in_channels: input channels (1 for grey X-rays, 3 for ImageNet-style inputs).

    Attributes:
        out_channels: channels of the bottleneck (2048 for ResNet-50).
        skip_channels: channels of the four skips, finest first (64, 256, 512, 1024 for ResNet-50).
    """

    def __init__(self, backbone: str = "resnet50", spatial_dims: int = 2, in_channels: int = 1) -> None:
        channels = _feature_channels(backbone)
        _check_dims(spatial_dims, in_channels)
        super().__init__(backbone, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.skip_channels = list(channels[:-1])
        self.out_channels = channels[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        """Return ``(bottleneck, skips)``: the last stage and the four earlier maps, finest first."""
        features = super().forward(x)
        return features[-1], list(features[:-1])


class ResNetUNetDecoder(_FlexibleUNetDecoder):
    """Decoder g_θ: MONAI ``FlexibleUNet``'s U-Net decoder plus its 3×3 output conv (``head``).

    Args:
        encoder_channels: the encoder's feature channels, finest first, bottleneck last
            (``(64, 256, 512, 1024, 2048)`` for ResNet-50).
        out_channels: output channels (logits).
        decoder_channels: channels of the five decoder levels.
        spatial_dims: 2 or 3.
    """

    def __init__(self, encoder_channels: Sequence[int], out_channels: int = 1,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), spatial_dims: int = 2) -> None:
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"decoder_channels={tuple(decoder_channels)} needs {len(encoder_channels)} values, one per "
                             "encoder level")
        if out_channels < 1:
            raise ValueError(f"out_channels={out_channels!r} must be at least 1")
        # FlexibleUNet's channel list starts with the input channels, which it never uses as a skip
        super().__init__(spatial_dims=spatial_dims, encoder_channels=(0, *encoder_channels),
                         decoder_channels=tuple(decoder_channels), act=_DECODER_ACT, norm=_DECODER_NORM,
                         dropout=0.0, bias=False, upsample="nontrainable", pre_conv="default", interp_mode="nearest",
                         align_corners=None, is_pad=False)
        self.head = SegmentationHead(spatial_dims, decoder_channels[-1], out_channels, kernel_size=3, act=None)
        self.out_channels = out_channels

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """Decode ``bottleneck`` with ``skips`` (as :class:`ResNetUNetEncoder` returns them); returns logits."""
        if len(skips) != len(self.blocks) - 1:
            raise ValueError(f"the decoder needs {len(self.blocks) - 1} skip tensors, got {len(skips)}")
        return self.head(super().forward([*skips, bottleneck], skip_connect=len(skips)))


class ResNetUNet(EncoderDecoder):
    """U-Net with a ResNet encoder: ``forward(x) = activation(decode(*encode(x)))``.

    Args:
        in_channels: input channels (1 or 3).
        out_channels: output channels.
        backbone: one of ``BACKBONES``; ``"resnet50"`` (≈23.5 M encoder parameters) is the paper's.
        decoder_channels: the five decoder levels' channels.
        out_activation: ``"sigmoid"`` (restoration in [0, 1]) or ``None`` for logits.
        spatial_dims: 2 (default) or 3.

    Raises:
        ValueError: an unsupported setting; in ``encode``, a wrong shape or a size not divisible by 32.

    Example::

        net = ResNetUNet(in_channels=1)
        bottleneck, skips = net.encode(torch.rand(2, 1, 224, 224))   # bottleneck (2, 2048, 7, 7)
        restored = net.decode(bottleneck, skips)                      # (2, 1, 224, 224) in (0, 1)
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, backbone: str = "resnet50",
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), out_activation: str | None = "sigmoid",
                 spatial_dims: int = 2) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, RESNET_DIVISOR, out_activation,
                         lambda: (ResNetUNetEncoder(backbone, spatial_dims, in_channels),
                                  ResNetUNetDecoder(_feature_channels(backbone), out_channels, decoder_channels,
                                                    spatial_dims)))


class ResNetClassifier(EncoderClassifier):
    """ResNet encoder f_θ + global average pool + (dropout) + linear → class logits.

    Args:
        in_channels: input channels (must match the pretrained encoder).
        num_classes: number of logits (14 for ChestX-ray14, 5 for CheXpert).
        backbone: one of ``BACKBONES`` (must match the pretrained encoder).
        dropout: dropout probability before the linear layer.
        spatial_dims: 2 (default) or 3.

    Returns (forward):
        logits ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, backbone: str = "resnet50", dropout: float = 0.0,
                 spatial_dims: int = 2) -> None:
        super().__init__(ResNetUNetEncoder(backbone, spatial_dims, in_channels), spatial_dims, in_channels,
                         RESNET_DIVISOR, num_classes, dropout)


class ResNetSegmenter(ResNetUNet):
    """:class:`ResNetUNet` returning logits (no activation), for segmentation fine-tuning.

    Args:
        in_channels, out_channels, backbone, decoder_channels, spatial_dims: as :class:`ResNetUNet`.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, backbone: str = "resnet50",
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), spatial_dims: int = 2) -> None:
        super().__init__(in_channels, out_channels, backbone, decoder_channels, None, spatial_dims)
