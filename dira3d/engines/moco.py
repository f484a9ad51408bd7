"""MoCo's key side for ``dis_mode="moco"``: the momentum (EMA) key encoder and projector, the key
queue, and shuffle BN under DDP.

:class:`DiRATrainer` builds one :class:`MoCoKeyEncoder` in ``moco`` mode and exposes its parts
under the checkpoint keys ``momentum_encoder``, ``momentum_head`` and ``queue``. Per training step
(MoCo v2's order): :meth:`MoCoKeyEncoder.follow` moves the key encoder and projector towards the
query side by EMA, :meth:`MoCoKeyEncoder.training_keys` encodes the key views (shuffled across
ranks when ``shuffle_bn``, :mod:`dira3d.engines.shuffle_bn`), and after the backward pass the
trainer enqueues every rank's keys. Validation encodes its keys with :meth:`MoCoKeyEncoder.encode`
only (no EMA step, no queue update, no communication).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dira3d.engines.distributed import per_rank_batchnorm
from dira3d.engines.optim import ema_update
from dira3d.engines.shuffle_bn import encode_keys
from dira3d.losses import MoCoQueue
from dira3d.losses.distributed import is_distributed
from dira3d.utils.seeding import stream_seed

__all__ = ["MoCoKeyEncoder", "projection_dim", "STREAM_QUEUE", "STREAM_SHUFFLE"]

STREAM_QUEUE = 0  # seed stream of the queue's initial random keys (counter 0)
STREAM_SHUFFLE = 4  # per-iteration shuffle-BN permutation: the same on every rank (not offset by rank)


def projection_dim(head: nn.Module) -> int:
    """The key size of a projection head: the output size of its last ``nn.Linear``.

    Raises:
        ValueError: the head has no ``nn.Linear`` (not a projector from ``build_dis_head('moco', ...)``).
    """
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("dis_mode='moco' needs a projection head ending in a Linear layer (build_dis_head('moco', ...))")
    return linears[-1].out_features


class MoCoKeyEncoder:
    """The EMA key encoder and projector of MoCo, with its queue of keys.

    Args:
        encoder: the query encoder (``network.encoder``); copied, then followed by EMA (never by gradients).
        head: the query projector (``dis_head``); copied likewise.
        queue_size: number of keys in the queue.
        momentum: EMA momentum of the key side.
        seed: the run's seed: the queue's initial keys and the per-iteration shuffle permutation.
        shuffle_bn: shuffle the key batch across ranks (under DDP); the copies then keep per-rank
            BatchNorm (SyncBatchNorm would pool the shuffled shares again).

    Raises:
        ValueError: ``head`` has no ``nn.Linear`` (see :func:`projection_dim`).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, queue_size: int, momentum: float, seed: int,
                 shuffle_bn: bool) -> None:
        self.encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.head = copy.deepcopy(head).requires_grad_(False)
        if shuffle_bn:
            self.encoder, self.head = per_rank_batchnorm(self.encoder), per_rank_batchnorm(self.head)
        gen = torch.Generator().manual_seed(stream_seed(seed, STREAM_QUEUE, 0))
        self.queue = MoCoQueue(projection_dim(head), queue_size, generator=gen)
        self.momentum, self.seed, self.shuffle_bn = float(momentum), int(seed), bool(shuffle_bn)

    def follow(self, encoder: nn.Module, head: nn.Module) -> None:
        """One EMA step of the key encoder and projector towards ``encoder`` and ``head``."""
        ema_update(self.encoder, encoder, self.momentum)
        ema_update(self.head, head, self.momentum)

    def encode(self, views: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 keys of ``views`` from the EMA key encoder and projector."""
        return F.normalize(self.head(self.encoder(views)[0]).float(), dim=1)

    def training_keys(self, views: torch.Tensor, iteration: int, device: torch.device,
                      memory_format: torch.memory_format | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local, everyone)`` keys of a training step (:func:`dira3d.engines.shuffle_bn.encode_keys`):
        this rank's, and every rank's for the queue; shuffled across ranks when ``shuffle_bn``."""
        return encode_keys(self.encode, views, self.shuffle_generator(iteration, device), memory_format)

    def shuffle_generator(self, iteration: int, device: torch.device) -> torch.Generator | None:
        """The generator of this iteration's shuffle-BN permutation, the same on every rank (None: off)."""
        if not (self.shuffle_bn and is_distributed()):
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, STREAM_SHUFFLE, iteration))
        return gen
