"""MoCo-v2 instance discrimination: InfoNCE against a queue of negative keys.

For queries q (online encoder) and keys k (momentum encoder), both L2-normalised, and a queue
of K negative keys n_1..n_K:

    logits_b = [q_b·k_b, q_b·n_1, …, q_b·n_K] / τ
    L = −(1/B) Σ_b log softmax(logits_b)[0]

i.e. cross-entropy with the positive at index 0. Keys get no gradient (stop-gradient, as the
momentum encoder is updated by EMA, not by back-propagation).

Reference: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020; Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo-v2), 2020.
DiRA uses τ = 0.2 and a queue of 65,536 keys.

Example:
    >>> import torch
    >>> queue = MoCoQueue(dim=8, size=16, generator=torch.Generator().manual_seed(0))
    >>> q, k = torch.randn(4, 8), torch.randn(4, 8)
    >>> loss = InfoNCELoss(temperature=0.2)(q, k, queue.queue)
    >>> queue.enqueue(k)   # after the loss: this step's keys become later steps' negatives
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoCoQueue", "InfoNCELoss"]


class MoCoQueue(nn.Module):
    """A ring buffer of L2-normalised keys, stored as module buffers (saved in ``state_dict``).

    In DDP, gather the keys of all ranks with :func:`dira3d.losses.distributed.concat_all_gather`
    before :meth:`enqueue`, so that every rank holds the same queue.

    Args:
        dim: key dimension D.
        size: number of keys K (65,536 in MoCo-v2).
        generator: random generator for the initial keys (reproducible initialisation).

    Raises:
        ValueError: if ``dim`` or ``size`` is not positive.
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, dim: int, size: int = 65536, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"MoCoQueue: dim and size must be positive, got dim={dim}, size={size}.")
        self.dim, self.size = int(dim), int(size)
        self.register_buffer("queue", F.normalize(torch.randn(self.size, self.dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with ``keys`` (normalised, detached), wrapping at the end.

        Args:
            keys: ``(B, D)`` keys, ``B <= size``; need not divide ``size``.

        Raises:
            ValueError: on a wrong key dimension or a batch larger than the queue.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"MoCoQueue.enqueue expects keys (B, {self.dim}), got {tuple(keys.shape)}.")
        batch = keys.shape[0]
        if batch > self.size:
            raise ValueError(
                f"MoCoQueue.enqueue: batch of {batch} keys exceeds the queue size {self.size}; "
                "increase the queue size or reduce the (global) batch."
            )
        keys = F.normalize(keys.detach().to(self.queue.dtype), dim=1)
        rows = (self.ptr + torch.arange(batch, device=self.queue.device)) % self.size
        self.queue[rows] = keys
        self.ptr.copy_((self.ptr + batch) % self.size)


class InfoNCELoss(nn.Module):
    """InfoNCE loss with a queue of negatives (MoCo-v2).

    ``q`` and ``k`` are L2-normalised inside; ``queue`` (the keys tensor, or a :class:`MoCoQueue`,
    whose ``.queue`` is then used) is used as given (a :class:`MoCoQueue` keeps its keys
    normalised) and detached, like ``k``.

    Args:
        temperature: τ > 0 (0.2 in MoCo-v2 / DiRA).

    Raises:
        ValueError: if ``temperature`` is not positive.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"InfoNCELoss: temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | MoCoQueue) -> torch.Tensor:
        """Mean InfoNCE loss; the positive of row b of ``q`` is row b of ``k``.

        Args:
            q: ``(B, D)`` queries.
            k: ``(B, D)`` positive keys (no gradient flows into them).
            queue: ``(K, D)`` negative keys, or the :class:`MoCoQueue` holding them.

        Returns:
            Scalar loss.

        Raises:
            ValueError: if the shapes do not fit together.
            TypeError: if ``queue`` is neither a tensor nor a :class:`MoCoQueue`.
        """
        if isinstance(queue, MoCoQueue):
            queue = queue.queue
        elif not isinstance(queue, torch.Tensor):
            raise TypeError(f"InfoNCELoss: queue must be the (K, D) tensor of negative keys or a MoCoQueue, "
                            f"got {type(queue).__name__}.")
        if q.ndim != 2 or k.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(
                f"InfoNCELoss expects q (B, D), k (B, D) and queue (K, D), got {tuple(q.shape)}, "
                f"{tuple(k.shape)} and {tuple(queue.shape)}; check the projection dimension of both heads "
                "and of the MoCoQueue."
            )
        q = F.normalize(q, dim=1)
        k = F.normalize(k.detach(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ queue.detach().to(q.dtype).T
        logits = torch.cat([positive, negatives], dim=1) / self.temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)
