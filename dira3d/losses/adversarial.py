"""Adversarial loss between the restoration network (generator) and the discriminator D_φ.

D_φ outputs raw scores (logits; a PatchGAN gives a score map, averaged over all positions).
With r = D(x) on real patches and f = D(x') on restored ones:

**vanilla** (patent eq. 3, ``L_adv = E[log D(x)] + E[log(1 − D(x'))]``, σ = sigmoid):

    discriminator:  ½ [BCE(σ(r), 1) + BCE(σ(f), 0)] = −½ [log σ(r) + log(1 − σ(f))]
    generator:      BCE(σ(f), 1) = −log σ(f)      (the non-saturating form of −log(1 − σ(f)))

**lsgan** (least squares, the official 2D DiRA code; on the raw outputs, no sigmoid):

    discriminator:  ½ [mean (r − 1)² + mean f²]
    generator:      mean (f − 1)²

Both are computed from logits (``binary_cross_entropy_with_logits``), which is numerically
stable. References: Goodfellow et al., "Generative Adversarial Nets", 2014; Mao et al.,
"Least Squares Generative Adversarial Networks", ICCV 2017; DiRA patent US12387324B2.

Example:
    >>> import torch
    >>> loss = AdversarialLoss("vanilla")
    >>> round(loss.generator(torch.zeros(2, 1, 4, 4, 2)).item(), 4)   # log 2
    0.6931
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dira3d.data.errors import DataError

__all__ = ["ADVERSARIAL_KINDS", "AdversarialLoss"]

ADVERSARIAL_KINDS = ("vanilla", "lsgan")


class AdversarialLoss(nn.Module):
    """Generator and discriminator objectives of a vanilla or least-squares GAN.

    Args:
        kind: ``"vanilla"`` (patent, default) or ``"lsgan"`` (official 2D code).

    Raises:
        ValueError: on an unknown ``kind``.
    """

    def __init__(self, kind: str = "vanilla") -> None:
        super().__init__()
        if kind not in ADVERSARIAL_KINDS:
            raise DataError(None, f"AdversarialLoss: unknown kind {kind!r} (the bundles' adversarial_kind); choose one of "
                                  f"{', '.join(ADVERSARIAL_KINDS)}.")
        self.kind = kind

    def _against(self, logits: torch.Tensor, value: float) -> torch.Tensor:
        """Mean loss of ``logits`` against the constant label ``value`` (1 real, 0 fake)."""
        target = torch.full_like(logits, value)
        if self.kind == "vanilla":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(logits, target)

    def generator(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Generator loss: the discriminator's scores on restored patches pushed towards "real".

        Args:
            fake_logits: D's raw output on x' (any shape), NOT detached.

        Returns:
            Scalar loss.
        """
        return self._against(fake_logits, 1.0)

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Discriminator loss ``½ [loss(real, 1) + loss(fake, 0)]``.

        Args:
            real_logits: D's raw output on real patches x.
            fake_logits: D's raw output on restored patches x' (detach x' before D), of the same
                shape: D must judge real and restored patches of one size.

        Returns:
            Scalar loss.

        Raises:
            ValueError: if the two score maps differ in shape.
        """
        if real_logits.shape != fake_logits.shape:
            raise ValueError(
                f"AdversarialLoss.discriminator expects real and fake score maps of one shape, got "
                f"{tuple(real_logits.shape)} and {tuple(fake_logits.shape)}; give D real and restored patches of the "
                "same batch and size (a mean over maps of different sizes would weigh them unequally)."
            )
        return 0.5 * (self._against(real_logits, 1.0) + self._against(fake_logits, 0.0))

    def forward(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`generator` (the term that enters the DiRA sum)."""
        return self.generator(fake_logits)
