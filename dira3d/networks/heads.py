"""Heads on top of the encoder: visual-word classifier, projector (MoCo / Barlow Twins / SimSiam)
and the SimSiam predictor (docs/method.md)."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Pool
from torch import nn

__all__ = ["VisualWordHead", "ProjectionHead", "PredictorHead"]


def _positive(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


class VisualWordHead(nn.Module):
    """TransVW classification head: conv3 → ``hidden``, BN, ReLU, global average pool, linear.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the bottleneck (``UNet.bottleneck_channels``).
        num_classes: number of visual words (pseudo-classes).
        hidden: channels of the conv (1024 in TransVW).

    Returns (forward):
        logits ``(B, num_classes)`` — use ``cross_entropy`` on them, not a softmax.

    Raises:
        ValueError: a non-positive size or unsupported ``spatial_dims``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, hidden: int = 1024) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims!r} is not supported; use 2 or 3")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("hidden", hidden)):
            _positive(name, value)
        self.conv = Convolution(
            spatial_dims, in_channels, hidden, kernel_size=3, act=Act.RELU, norm="batch", adn_ordering="NA"
        )
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


class ProjectionHead(nn.Module):
    """MLP projector ``h``: ``num_layers`` linear layers, BN + ReLU between them.

    Accepts a feature map ``(B, C, *spatial)`` (global-average-pooled first) or vectors ``(B, C)``.

    Args:
        in_features: input channels / features.
        hidden_features: width of the hidden layers (2048 for MoCo-v2 / SimSiam).
        out_features: output dimension (128 for MoCo-v2).
        num_layers: number of linear layers (2 for MoCo-v2, 3 for SimSiam and Barlow Twins).
        batch_norm: BatchNorm1d after each hidden linear layer.
        last_batch_norm: BatchNorm1d (without affine, as in SimSiam) after the last layer.

    Raises:
        ValueError: a non-positive size.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int = 2048,
        out_features: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("hidden_features", hidden_features),
            ("out_features", out_features),
            ("num_layers", num_layers),
        ):
            _positive(name, value)
        layers: list[nn.Module] = []
        features = in_features
        for _ in range(num_layers - 1):
            # a bias before BatchNorm is cancelled by its mean subtraction
            layers.append(nn.Linear(features, hidden_features, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_features))
            layers.append(nn.ReLU(inplace=True))
            features = hidden_features
        layers.append(nn.Linear(features, out_features, bias=not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_features, affine=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:  # feature map: global average pool over the spatial axes
            x = torch.flatten(x, 2).mean(dim=2)
        return self.mlp(x)


class PredictorHead(nn.Module):
    """SimSiam predictor ``p``: Linear → BN → ReLU → Linear, ``features → hidden → features``.

    Args:
        features: dimension of the projections it predicts.
        hidden_features: bottleneck width (SimSiam: a quarter of ``features``).

    Raises:
        ValueError: a non-positive size.
    """

    def __init__(self, features: int, hidden_features: int) -> None:
        super().__init__()
        _positive("features", features)
        _positive("hidden_features", hidden_features)
        self.mlp = nn.Sequential(
            nn.Linear(features, hidden_features, bias=False),
            nn.BatchNorm1d(hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
