"""Restoration loss: distance between the original patch and its restoration.

    L_res = (1/n) Σ (x − x')²      (kind="mse", Models Genesis / TransVW / DiRA default)
    L_res = (1/n) Σ |x − x'|       (kind="l1")

where x' = g_θ(f_θ(T(x))) is the decoder's restoration of the distorted patch and n the number
of voxels in the batch.

Reference: Zhou et al., "Models Genesis", MedIA 2021; DiRA patent US12387324B2 (L_res).

Example:
    >>> import torch
    >>> RestorationLoss("l1")(torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)).item()
    1.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dira3d.data.errors import DataError

__all__ = ["RESTORATION_KINDS", "RestorationLoss"]

RESTORATION_KINDS = ("mse", "l1")


class RestorationLoss(nn.Module):
    """Mean squared (``"mse"``) or absolute (``"l1"``) restoration error.

    Args:
        kind: ``"mse"`` or ``"l1"``.

    Raises:
        ValueError: on an unknown ``kind``.
    """

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in RESTORATION_KINDS:
            raise DataError(None, f"RestorationLoss: unknown kind {kind!r} (the bundles' restoration_kind); choose one of "
                                  f"{', '.join(RESTORATION_KINDS)}.")
        self.kind = kind

    def forward(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean error between ``restored`` (x') and ``target`` (x).

        Raises:
            ValueError: if the shapes differ (broadcasting would silently average the wrong pairs).
        """
        if restored.shape != target.shape:
            raise ValueError(
                f"RestorationLoss: restored {tuple(restored.shape)} and target {tuple(target.shape)} differ in shape; "
                "the decoder output must match the patch size."
            )
        if self.kind == "mse":
            return F.mse_loss(restored, target)
        return F.l1_loss(restored, target)
