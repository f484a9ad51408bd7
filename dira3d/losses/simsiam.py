"""SimSiam symmetric negative-cosine loss with stop-gradient.

    D(p, z) = −(1/B) Σ_b  p_b·z_b / (‖p_b‖ ‖z_b‖)
    L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1))

where p are the predictor outputs, z the projector outputs and sg the stop-gradient; the loss
lies in [−1, 1] and reaches −1 when predictions align with the other view's projection.

Reference: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.

Example:
    >>> import torch
    >>> z = torch.randn(4, 8)
    >>> float(SimSiamLoss()(z, z, z, z)) + 1.0 < 1e-6
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["negative_cosine", "SimSiamLoss"]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, sg(z))``: the mean negative cosine similarity, no gradient into ``z``."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


class SimSiamLoss(nn.Module):
    """Symmetric SimSiam loss ``½D(p1, sg(z2)) + ½D(p2, sg(z1))``."""

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss for predictions ``p1, p2`` and projections ``z1, z2`` (all ``(B, D)``).

        Returns:
            Scalar loss in [−1, 1].

        Raises:
            ValueError: if the four tensors do not share one ``(B, D)`` shape.
        """
        shapes = {tuple(t.shape) for t in (p1, p2, z1, z2)}
        if len(shapes) != 1 or p1.ndim != 2:
            raise ValueError(
                f"SimSiamLoss expects p1, p2, z1, z2 of one (B, D) shape, got {[tuple(t.shape) for t in (p1, p2, z1, z2)]}; "
                "the predictor output dimension must equal the projector's."
            )
        return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
