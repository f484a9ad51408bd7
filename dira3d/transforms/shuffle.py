"""Local pixel shuffling (Models Genesis), vectorised over blocks and samples.

Semantics (ours, documented because the reference's differ slightly): ``num_blocks`` boxes are
drawn per sample exactly as in the reference (each side ``1 .. int(dim * max_block_fraction)``,
origin uniform so the box fits). Boxes may overlap; a voxel belongs to the *last* box that covers
it (later boxes are painted over earlier ones). Each box's visible voxels are then permuted
uniformly at random among themselves, all at once (one ``randperm`` and one stable sort over the
enumerated block voxels; no per-block loop). Hence:

- every box's multiset of values (over its visible voxels) is kept, so the histogram of each
  sample is kept exactly;
- voxels outside all boxes are untouched;
- all channels of a sample get the same spatial permutation (multi-modal voxels stay aligned).

The reference instead reads every window from the original and writes it into the running result,
so with overlaps it can duplicate or drop values; ours is the closest form that keeps the
invariant and needs no sequential loop over the 10,000 blocks.
"""

from __future__ import annotations

import math

import torch

from ._common import apply_to_subset, bernoulli, check_batch, randint_between, uniform

__all__ = ["permute_within_segments", "local_pixel_shuffle"]


def permute_within_segments(segments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(N)`` that keeps every index inside its segment.

    Args:
        segments: ``(N,)`` integer segment label of each position; equal labels must be contiguous
            (e.g. sorted).
        generator: source of randomness.

    Returns:
        ``(N,)`` long indices ``order`` such that ``segments[order] == segments``.

    One stable radix-friendly int32 sort of ``(segment rank << r) | random r bits`` does it, where
    ``r = 31 - bits(number of segments)`` (12 or more for 10,000 blocks x 32 samples); equal random
    keys (probability ``2**-r`` per pair) keep their order. With too few bits left it falls back
    to an exact ``randperm`` followed by a stable sort of the labels (three times slower).
    """
    n = segments.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=segments.device)
    starts = torch.ones(n, dtype=torch.int32, device=segments.device)
    starts[1:] = (segments[1:] != segments[:-1]).int()
    rank = torch.cumsum(starts, 0, dtype=torch.int32) - 1  # dense segment rank 0..S-1
    rand_bits = 31 - max(1, int(rank[-1]).bit_length())
    if rand_bits >= 10:
        noise = torch.randint(0, 1 << rand_bits, (n,), generator=generator, device=generator.device,
                              dtype=torch.int32).to(segments.device)
        return torch.sort((rank << rand_bits) | noise, stable=True).indices
    perm = torch.randperm(n, generator=generator, device=generator.device).to(segments.device)
    return perm[torch.sort(rank[perm], stable=True).indices]


def _offset_table(max_sides: list[int], strides: list[int], device: torch.device) -> torch.Tensor:
    """``(S, Vmax)`` linear offsets of the ``l``-th voxel of a block, for every block shape ``S``.

    Block shapes are few (``prod(max_sides)``, 108 for 6x6x3), so decoding the offsets once per
    shape and gathering them is far cheaper than decoding per block voxel.
    """
    shapes = torch.cartesian_prod(*[torch.arange(1, m + 1, device=device) for m in max_sides]).view(-1, len(max_sides))
    local = torch.arange(math.prod(max_sides), device=device).expand(shapes.shape[0], -1)
    table = torch.zeros_like(local)
    for axis in range(len(max_sides) - 1, -1, -1):  # last axis fastest, as in the flattened volume
        side = shapes[:, axis, None]
        table = table + (local % side) * strides[axis]
        local = local // side
    return table


def visible_block_voxels(spatial: list[int], max_sides: list[int], starts: torch.Tensor,
                         sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels of every block that no later block covers, listed block by block.

    Enumerates all block voxels at once (block ``k`` contributes ``prod(sizes[k])`` entries via
    ``repeat_interleave``, offsets from a per-shape table), paints the owner of every voxel with a
    deterministic ``amax`` of block ids (the last block wins), and keeps the entries a block owns.

    Args:
        spatial: spatial sizes.
        max_sides: largest block side per axis.
        starts, sizes: ``(B, n, D)`` block origins and sides.

    Returns:
        ``(linear, block)``: flat indices into ``(B * prod(spatial))`` in increasing block order
        (position order within a block), and the global block id ``sample * n + k`` of each.
    """
    b, n, d = starts.shape
    device = starts.device
    volume = math.prod(spatial)
    strides = [math.prod(spatial[i + 1:]) for i in range(d)]
    shape_id = torch.zeros(b, n, dtype=torch.long, device=device)
    for axis in range(d):
        shape_id = shape_id * max_sides[axis] + (sizes[..., axis] - 1)
    base = (starts * torch.tensor(strides, device=device)).sum(dim=2)
    base = (base + torch.arange(b, device=device)[:, None] * volume).flatten()
    counts = sizes.prod(dim=2).flatten()
    table = _offset_table(max_sides, strides, device).flatten()
    # Per block: where its offsets start in the flat table, minus where its voxels start in the
    # enumeration, so that one gather plus arange gives every voxel's table slot.
    slot = shape_id.flatten() * math.prod(max_sides) - (torch.cumsum(counts, 0) - counts)
    ids = torch.arange(b * n, device=device)
    # int32 halves the memory traffic of the largest step (every value fits: < b * volume).
    per_voxel = torch.repeat_interleave(torch.stack([base, slot, ids], dim=1).int(), counts, dim=0)
    block = per_voxel[:, 2]
    slots = per_voxel[:, 1] + torch.arange(block.numel(), device=device, dtype=torch.int32)
    linear = (per_voxel[:, 0] + table.int()[slots]).long()  # scatter/gather want int64 indices
    owner = torch.full((b * volume,), -1, dtype=torch.int32, device=device)
    owner.scatter_reduce_(0, linear, block, reduce="amax")
    keep = torch.nonzero(owner.gather(0, linear) == block).squeeze(1)
    return linear.index_select(0, keep), block.index_select(0, keep)


def local_pixel_shuffle(x: torch.Tensor, generator: torch.Generator, num_blocks: int = 10000,
                        max_block_fraction: float = 0.1, prob: float = 1.0) -> torch.Tensor:
    """Shuffle voxels inside many small random blocks (see the module docstring for semantics).

    Args:
        x: ``(B, C, *spatial)`` batch (2D or 3D), any device.
        generator: source of randomness (CPU or on ``x``'s device).
        num_blocks: blocks per sample (Models Genesis: 10,000).
        max_block_fraction: largest block side as a fraction of the axis (``dim // 10`` at 0.1);
            at least 1 voxel.
        prob: per-sample probability of applying the distortion.

    Returns:
        A new tensor like ``x`` with every sample's histogram kept.

    Raises:
        ValueError: on a badly shaped input or a non-positive setting.
    """
    d = check_batch(x)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0.0 < max_block_fraction <= 1.0:
        raise ValueError(f"max_block_fraction must be in (0, 1], got {max_block_fraction}")
    b, c, *spatial = x.shape
    selected = bernoulli(b, prob, generator, x.device)
    max_sides = [max(1, int(s * max_block_fraction)) for s in spatial]
    dims = torch.tensor(spatial, device=x.device)
    u = uniform((b, num_blocks, d, 2), generator, x.device)
    sizes = randint_between(1, torch.tensor(max_sides, device=x.device), u[..., 0])
    starts = randint_between(0, dims - sizes, u[..., 1])

    def shuffle(sub: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(selected, as_tuple=False).flatten()
        dst, block = visible_block_voxels(spatial, max_sides, starts[idx], sizes[idx])
        src = dst[permute_within_segments(block, generator)]
        # Channels share the permutation: work on (C, B*V) so one index serves all of them.
        flat = sub.transpose(0, 1).reshape(c, -1)
        out = flat.clone()
        out[:, dst] = flat[:, src]
        return out.view(c, sub.shape[0], *spatial).transpose(0, 1).contiguous()

    return apply_to_subset(x, selected, shuffle)
