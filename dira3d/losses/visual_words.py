"""Visual-word (pseudo-class) discrimination loss of TransVW.

Each visual word is a pseudo-class (patent claim 11; TransVW self-discovery). The loss is the
cross-entropy between the classification head's logits and the visual-word index:

    L_dis = −(1/B) Σ_b log softmax(logits_b)[y_b]

computed with ``F.cross_entropy`` on the raw logits. The TransVW reference code takes the log
of a softmax output, which loses precision for confident predictions; this does not.

Reference: Haghighi et al., "Transferable Visual Words", IEEE TMI 2021.

Example:
    >>> import torch
    >>> loss = VisualWordLoss()(torch.zeros(2, 4), torch.tensor([0, 3]))
    >>> round(float(loss), 4)   # log 4
    1.3863
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisualWordLoss"]


class VisualWordLoss(nn.Module):
    """Cross-entropy over visual-word classes, on logits.

    Args:
        label_smoothing: passed to ``F.cross_entropy`` (0 = none, the TransVW setting).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"VisualWordLoss: label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy.

        Args:
            logits: ``(B, C)`` raw scores of the visual-word head.
            target: ``(B,)`` integer class indices in ``[0, C)``. Indices outside that range are
                not checked here (that would read the targets on the host every step and stall a
                GPU); ``F.cross_entropy`` refuses them (an ``IndexError`` on CPU, a device-side
                assert on CUDA).

        Returns:
            Scalar loss.

        Raises:
            ValueError: if the shapes do not fit together, or ``target`` is not an integer tensor
                (float targets would be truncated to other classes).
        """
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"VisualWordLoss expects logits (B, C) and integer targets (B,), got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}; pass the head's logits, not probabilities."
            )
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(
                f"VisualWordLoss expects integer class indices as targets, got dtype {target.dtype}; "
                "pass the visual-word index as an integer tensor (e.g. torch.int64), not a float or one-hot label."
            )
        return F.cross_entropy(logits, target.long(), label_smoothing=self.label_smoothing)
