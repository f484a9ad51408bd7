"""Single-output task networks for fine-tuning: :class:`Classifier` and :class:`Segmenter`.

Their ``encoder`` / ``decoder`` sub-modules are the very classes of :class:`~dira3d.networks.UNet`,
so the keys of a pretraining checkpoint copy one to one (see :func:`~dira3d.networks.load_pretrained`).
Both return one tensor of logits, as MONAI bundles (``verify_net_in_out``), MONAI Label and
TorchScript export expect.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Pool
from torch import nn

from dira3d.networks.unet import DIVISOR, UNet, UNetEncoder, check_input

__all__ = ["EncoderClassifier", "Classifier", "Segmenter"]


class EncoderClassifier(nn.Module):
    """Any U-Net-style encoder + global average pool + (dropout) + linear → class logits.

    The shared head of :class:`Classifier` and :class:`~dira3d.networks.ResNetClassifier`; the
    sub-module names (``encoder``, ``pool``, ``dropout``, ``fc``) are the checkpoint keys.

    Args:
        encoder: module mapping ``x`` to ``(bottleneck, skips)``, with an ``out_channels`` attribute.
        spatial_dims: 2 or 3.
        in_channels: input channels the encoder expects.
        divisor: every spatial size of the input must be a multiple of it.
        num_classes: number of logits.
        dropout: dropout probability before the linear layer.

    Returns (forward):
        logits ``(B, num_classes)``.

    Raises:
        ValueError: ``num_classes`` < 1 or ``dropout`` outside [0, 1); wrong input shape in ``forward``.
    """

    def __init__(self, encoder: nn.Module, spatial_dims: int, in_channels: int, divisor: int, num_classes: int,
                 dropout: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.divisor = divisor
        self.encoder = encoder
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.encoder.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            check_input(x, self.spatial_dims, self.in_channels, self.divisor)
        bottleneck, _ = self.encoder(x)
        return self.fc(self.dropout(torch.flatten(self.pool(bottleneck), 1)))


class Classifier(EncoderClassifier):
    """Encoder f_θ + global average pool + (dropout) + linear → class logits.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: number of logits (1 for a binary task with ``BCEWithLogitsLoss``).
        width: channel multiplier (must match the pretrained encoder).
        dropout: dropout probability before the linear layer.
        norm: ``"batch"``, ``"instance"`` or ``"group"``.

    Returns (forward):
        logits ``(B, num_classes)``.

    Raises:
        ValueError: an unsupported setting; wrong input shape in ``forward``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 1,
        width: float = 1.0,
        dropout: float = 0.0,
        norm: str = "batch",
    ) -> None:
        super().__init__(UNetEncoder(spatial_dims, in_channels, width, norm), spatial_dims, in_channels, DIVISOR,
                         num_classes, dropout)


class Segmenter(UNet):
    """Encoder f_θ + decoder g_θ of the U-Net, returning logits (no activation).

    A :class:`~dira3d.networks.UNet` with ``out_activation=None``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (e.g. 4 for BraTS; see ``in_channels_policy`` of
            :func:`~dira3d.networks.load_pretrained` to start from a 1-channel encoder).
        out_channels: output channels (logits).
        width: channel multiplier (must match the pretrained weights).
        norm: ``"batch"``, ``"instance"`` or ``"group"``.

    Returns (forward):
        logits ``(B, out_channels, *spatial)``.

    Raises:
        ValueError: an unsupported setting; wrong input shape in ``forward``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        width: float = 1.0,
        norm: str = "batch",
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, width, norm, out_activation=None)
