"""Barlow Twins redundancy-reduction loss.

Each feature of the two embeddings is standardised over the batch (mean 0, variance 1, as a
``BatchNorm1d`` without affine parameters does), then the cross-correlation matrix is

    C = z̃1ᵀ z̃2 / N                (D × D, N = batch size)
    L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²

With ``gather_distributed=True`` and an initialised process group the embeddings of all ranks
are gathered (with gradient) first, so statistics and C are over the *global* batch: two ranks
with half the batch each give the same loss as one process with the whole batch (see
:mod:`dira3d.losses.distributed` for why the gradients also match under DDP).

Reference: Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
ICML 2021 (λ = 5e-3).

Example:
    >>> import torch
    >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    >>> loss = BarlowTwinsLoss(lambda_offdiag=5e-3)(z1, z2)
"""

from __future__ import annotations

import torch
from torch import nn

from dira3d.losses.distributed import gather_with_grad

__all__ = ["standardize", "cross_correlation", "barlow_twins_loss", "BarlowTwinsLoss"]


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardise each column of ``z`` over the batch: ``(z − mean) / sqrt(var + eps)``.

    Uses the biased variance (as batch normalisation does), so that ``C_ii = 1`` (up to ``eps``)
    for identical inputs.

    Args:
        z: ``(N, D)`` embeddings.
        eps: added to the variance; keeps constant features finite.

    Returns:
        ``(N, D)`` standardised embeddings.
    """
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The ``(D, D)`` cross-correlation ``standardize(z1)ᵀ standardize(z2) / N``."""
    return standardize(z1).T @ standardize(z2) / z1.shape[0]


def barlow_twins_loss(c: torch.Tensor, lambda_offdiag: float) -> torch.Tensor:
    """``Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²`` for a square cross-correlation matrix ``c``."""
    diagonal = torch.diagonal(c)
    on_diag = (1.0 - diagonal).pow(2).sum()
    off_diag = c.pow(2).sum() - diagonal.pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss on two batches of embeddings.

    Args:
        lambda_offdiag: λ, weight of the off-diagonal (redundancy) term.
        gather_distributed: gather the embeddings of all ranks (with gradient) before computing
            the statistics; a no-op without an initialised process group.

    Raises:
        ValueError: if ``lambda_offdiag`` is negative.
    """

    def __init__(self, lambda_offdiag: float = 5e-3, gather_distributed: bool = False) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"BarlowTwinsLoss: lambda_offdiag must be >= 0, got {lambda_offdiag}.")
        self.lambda_offdiag = float(lambda_offdiag)
        self.gather_distributed = bool(gather_distributed)

    @property
    def min_batch(self) -> int:
        """Smallest local batch it scores: 2 to standardise over the batch (1 when gathering ranks)."""
        return 1 if self.gather_distributed else 2

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss for the embeddings of the two views.

        Args:
            z1: ``(N, D)`` embeddings of view 1 (local batch).
            z2: ``(N, D)`` embeddings of view 2.

        Returns:
            Scalar loss (identical on every rank when gathering).

        Raises:
            ValueError: on mismatched shapes or a (global) batch smaller than 2.
        """
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"BarlowTwinsLoss expects two (N, D) embeddings of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}."
            )
        if self.gather_distributed:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        if z1.shape[0] < 2:
            raise ValueError(
                f"BarlowTwinsLoss needs a batch of at least 2 to standardise features, got {z1.shape[0]}; "
                "increase the batch size (or set gather_distributed=True under DDP)."
            )
        return barlow_twins_loss(cross_correlation(z1, z2), self.lambda_offdiag)
