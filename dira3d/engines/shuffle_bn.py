"""Shuffle BN for MoCo's key encoder under DDP: encode a share of a permuted global batch.

BatchNorm in training mode normalises with the statistics of the batch it sees. When each rank
encodes its own queries and its own keys, a query and its positive key share those statistics,
and the network can learn to recognise that shared "signature" instead of the image (He et al.,
MoCo, CVPR 2020, section 3.3). Shuffle BN breaks the link for the key encoder:

1. gather the key views of every rank (the global batch, rank 0's rows first);
2. permute it with a permutation that every rank draws alike from a generator seeded by
   (seed, iteration) (:func:`shuffle_permutation`; no broadcast: ranks agree by construction, and a
   resumed run draws the same permutation);
3. each rank encodes its share of the permuted batch (:func:`shuffled_share`), so its BatchNorm
   statistics mix samples of several ranks;
4. gather the keys and put them back in the original order (:func:`unshuffled`); each rank keeps
   its own rows for the loss (:func:`rank_rows`), and the whole set goes to the queue (no
   further gather).

Two ``all_gather`` calls per step, of the key views and of the keys, without gradient (the key
encoder runs under ``no_grad``). With one process :func:`encode_keys` encodes the local batch
and communicates nothing. The pure functions take the gathered tensors and the rank, so they can
be tested in one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dira3d.engines.distributed import get_rank, get_world_size
from dira3d.losses.distributed import concat_all_gather, is_distributed

__all__ = ["check_shuffle_bn", "shuffle_permutation", "shuffled_share", "unshuffled", "rank_rows", "encode_keys"]

_TEXT = {"true": True, "false": False, "null": None, "none": None}  # shuffle_bn given as text


def shuffle_permutation(size: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(size)`` drawn on ``generator``'s device (no host sync).

    Every rank must pass a generator seeded alike (not by rank), so that all ranks hold the
    same permutation without communicating it.
    """
    return torch.randperm(size, generator=generator, device=generator.device)


def rank_rows(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a global batch gathered in rank order (``world`` equal shares)."""
    if tensor.shape[0] % world:
        raise ValueError(f"a global batch of {tensor.shape[0]} cannot be split into {world} equal shares")
    share = tensor.shape[0] // world
    return tensor[rank * share:(rank + 1) * share]


def shuffled_share(global_batch: torch.Tensor, permutation: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s share of the permuted global batch: rows ``permutation[rank·B:(rank+1)·B]``."""
    return global_batch.index_select(0, rank_rows(permutation, rank, world))


def unshuffled(global_keys: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """The keys of the permuted batch (row ``j`` encodes sample ``permutation[j]``) in sample order."""
    return global_keys.index_select(0, torch.argsort(permutation))


def encode_keys(encode: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor,
                generator: torch.Generator | None,
                memory_format: torch.memory_format | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo keys of this rank's ``views`` and of every rank's, with or without shuffle BN.

    Args:
        encode: the key encoder and projector, ``views -> keys`` (call it under ``no_grad``).
        views: this rank's key views ``(B, C, *spatial)``, the same ``B`` on every rank.
        generator: seeded alike on every rank (by seed and iteration): shuffle BN across the
            ranks; None: each rank encodes its own views (no shuffle).
        memory_format: the encoder's input layout (e.g. ``torch.channels_last_3d``), restored
            after the gather (which makes the views contiguous); None: left as gathered.

    Returns:
        ``(local, everyone)``: the keys of this rank's views, and the keys of all ranks in rank
        order (rank 0's rows first) for the queue. With one process both are the local keys
        and nothing is communicated.
    """
    if generator is None or not is_distributed():
        local = encode(views)
        return local, concat_all_gather(local)
    rank, world = get_rank(), get_world_size()
    everyone = concat_all_gather(views)
    permutation = shuffle_permutation(everyone.shape[0], generator)
    share = shuffled_share(everyone, permutation, rank, world)
    if memory_format is not None:
        share = share.contiguous(memory_format=memory_format)
    keys = unshuffled(concat_all_gather(encode(share)), permutation)
    return rank_rows(keys, rank, world), keys


def check_shuffle_bn(shuffle_bn: bool | None, dis_mode: str) -> bool:
    """Whether the trainer shuffles the key encoder's batch across ranks (``shuffle_bn`` setting).

    None (default): on in ``moco`` mode, off in the others. True is refused outside ``moco``: only
    MoCo has a key encoder whose batch can be shuffled. The setting takes effect under DDP only
    (world size > 1); with one process it changes nothing. The text ``true`` / ``false`` /
    ``null`` (any case, as a command line may pass it) is read as the value it names.

    Raises:
        DataError: a value other than True, False or None, or True outside ``moco`` mode (a ``ValueError``; one
            ``error:`` line under ``python -m monai.bundle run``).
    """
    from dira3d.data.errors import DataError

    if isinstance(shuffle_bn, str):
        shuffle_bn = _TEXT.get(shuffle_bn.strip().lower(), shuffle_bn)
    if shuffle_bn is None:
        return dis_mode == "moco"
    if not isinstance(shuffle_bn, bool):
        raise DataError(None, f"shuffle_bn={shuffle_bn!r} must be true, false or null (null: on in dis_mode 'moco')")
    if shuffle_bn and dis_mode != "moco":
        raise DataError(
            None,
            f"shuffle_bn=True applies to dis_mode='moco' only (it shuffles the batch of MoCo's key encoder); "
            f"dis_mode={dis_mode!r} has no key encoder: set shuffle_bn to false or null"
        )
    return shuffle_bn
