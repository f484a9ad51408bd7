"""Gathering tensors across processes for the discriminative losses.

Two helpers, one per need:

- :func:`concat_all_gather` gathers *without* gradient. Use it for MoCo keys before they are
  enqueued: keys come from the momentum encoder and must never carry gradient.
- :func:`gather_with_grad` gathers *with* gradient (``torch.distributed.nn.functional.all_gather``).
  Use it where the loss couples samples across the global batch (Barlow Twins): every rank then
  computes the same global loss, and the backward pass sums the gradient of each rank's slice over
  all ranks, so each local slice receives ``world_size ×`` its share of the full-batch gradient;
  DDP's gradient *averaging* turns this back into exactly the single-process full-batch gradient.

Both return the input unchanged when ``torch.distributed`` is unavailable, not initialised, or
the world has one process, so single-process code needs no special case.

All ranks must pass tensors of the same shape (use ``drop_last=True`` in the data loader).

Example:
    >>> import torch
    >>> t = torch.ones(2, 3)
    >>> concat_all_gather(t) is t   # no process group: identity
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "concat_all_gather", "gather_with_grad"]


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised.

    Returns:
        True when ``torch.distributed`` is available, initialised and ``world_size > 1``.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, without gradient.

    Args:
        tensor: the local tensor, same shape on every rank.

    Returns:
        ``tensor`` itself when not distributed; otherwise a new detached tensor of shape
        ``(world_size * B, ...)``, rank 0's rows first.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.detach().contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping the autograd graph.

    Args:
        tensor: the local tensor, same shape on every rank.

    Returns:
        ``tensor`` itself when not distributed; otherwise a tensor of shape
        ``(world_size * B, ...)`` through which gradient flows back to every rank's slice
        (summed over ranks, see the module docstring).
    """
    if not is_distributed():
        return tensor
    # imported lazily: torch.distributed.nn pulls in RPC machinery some builds lack
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)
