"""The 2D DiRA restorative distortions: cutout, outer cutout and patch swap (batched, any device).

They work on 3D batches too (boxes become cuboids), but their defaults are in pixels of a 224²
chest X-ray crop.
"""

from __future__ import annotations

import itertools
import math

import torch

from ._common import bernoulli, box_mask, check_batch, randint_between, uniform

__all__ = ["cutout", "outer_cutout", "patch_swap"]


def _fill(x: torch.Tensor, generator: torch.Generator, fill: str) -> torch.Tensor:
    if fill == "noise":
        return uniform(x.shape, generator, x.device, dtype=x.dtype)
    if fill == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"fill must be 'noise' or 'zero', got {fill!r}")


def _check_size(size: tuple[int, int], name: str) -> None:
    if len(size) != 2 or not 1 <= size[0] <= size[1]:
        raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {size}")


def cutout(x: torch.Tensor, generator: torch.Generator, prob: float = 0.3, max_boxes: int = 10,
           size: tuple[int, int] = (10, 70), fill: str = "noise",
           return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill 1..``max_boxes`` random boxes (sides ``size[0]..size[1]`` px, clipped to the image) per sample.

    Args:
        x: ``(B, C, *spatial)`` batch in [0, 1].
        generator: source of randomness (CPU or on ``x``'s device).
        prob: per-sample probability of applying the distortion.
        max_boxes: most boxes per sample (the count is uniform in 1..max_boxes).
        size: ``(min, max)`` box side in pixels.
        fill: ``"noise"`` (U[0, 1)) or ``"zero"``.
        return_mask: also return the ``(B, *spatial)`` mask of filled pixels.

    Returns:
        The distorted batch, or ``(distorted, mask)``.

    Raises:
        ValueError: on a bad shape, probability, size or fill.
    """
    d = check_batch(x)
    _check_size(size, "cutout size")
    b, _, *spatial = x.shape
    dims = torch.tensor(spatial, device=x.device)
    selected = bernoulli(b, prob, generator, x.device)
    u = uniform((b, max_boxes, d, 2), generator, x.device)
    sizes = torch.minimum(randint_between(size[0], size[1], u[..., 0]), dims)
    starts = randint_between(0, dims - sizes, u[..., 1])
    count = randint_between(1, max_boxes, uniform((b, 1), generator, x.device))
    active = (torch.arange(max_boxes, device=x.device) < count) & selected[:, None]
    mask = box_mask(starts, sizes, active, spatial)
    out = torch.where(mask[:, None], _fill(x, generator, fill), x)
    return (out, mask) if return_mask else out


def outer_cutout(x: torch.Tensor, generator: torch.Generator, prob: float = 0.05,
                 keep_fraction: tuple[float, float] = (0.25, 0.75), fill: str = "noise",
                 return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill everything outside one random window (sides ``keep_fraction`` of each axis) per sample.

    Args:
        x: ``(B, C, *spatial)`` batch in [0, 1].
        generator: source of randomness (CPU or on ``x``'s device).
        prob: per-sample probability of applying the distortion.
        keep_fraction: ``(min, max)`` window side as a fraction of the axis.
        fill: ``"noise"`` (U[0, 1)) or ``"zero"``.
        return_mask: also return the ``(B, *spatial)`` mask of kept pixels.

    Returns:
        The distorted batch, or ``(distorted, kept)``.

    Raises:
        ValueError: on a bad shape, probability, fraction or fill.
    """
    d = check_batch(x)
    if not 0.0 < keep_fraction[0] <= keep_fraction[1] <= 1.0:
        raise ValueError(f"keep_fraction must satisfy 0 < min <= max <= 1, got {keep_fraction}")
    b, _, *spatial = x.shape
    dims = torch.tensor(spatial, device=x.device)
    selected = bernoulli(b, prob, generator, x.device)
    lo = torch.clamp((dims * keep_fraction[0]).long(), min=1)
    hi = torch.clamp((dims * keep_fraction[1]).long(), min=1)
    u = uniform((b, 1, d, 2), generator, x.device)
    sizes = randint_between(lo, hi, u[..., 0])
    starts = randint_between(0, dims - sizes, u[..., 1])
    kept = box_mask(starts, sizes, torch.ones(b, 1, dtype=torch.bool, device=x.device), spatial)
    kept = kept | ~selected.view(b, *([1] * d))
    out = torch.where(kept[:, None], x, _fill(x, generator, fill))
    return (out, kept) if return_mask else out


def patch_swap(x: torch.Tensor, generator: torch.Generator, prob: float = 0.3, swaps: int = 10,
               size: tuple[int, int] = (10, 15)) -> torch.Tensor:
    """Swap the contents of ``swaps`` random pairs of equal-sized boxes per sample.

    The swaps are composed as a permutation of pixel positions, applied once to all channels. A
    pair whose two boxes overlap is skipped (a swap of overlapping boxes is not a permutation),
    so every sample keeps its exact multiset of values.

    Args:
        x: ``(B, C, *spatial)`` batch.
        generator: source of randomness (CPU or on ``x``'s device).
        prob: per-sample probability of applying the distortion.
        swaps: box pairs per sample, applied in order.
        size: ``(min, max)`` box side in pixels (clipped to half the axis).

    Returns:
        The distorted batch.

    Raises:
        ValueError: on a bad shape, probability or size.
    """
    d = check_batch(x)
    _check_size(size, "patch_swap size")
    b, c, *spatial = x.shape
    dev = x.device
    dims = torch.tensor(spatial, device=dev)
    strides = torch.tensor([math.prod(spatial[i + 1:]) for i in range(d)], device=dev)
    selected = bernoulli(b, prob, generator, dev)
    u = uniform((b, swaps, d, 3), generator, dev)
    sizes = torch.minimum(randint_between(size[0], size[1], u[..., 0]), torch.clamp(dims // 2, min=1))
    first = randint_between(0, dims - sizes, u[..., 1])
    second = randint_between(0, dims - sizes, u[..., 2])
    disjoint = ((first - second).abs() >= sizes).any(dim=2)  # (B, swaps): separated along some axis
    valid_pair = disjoint & selected[:, None]
    # Enumerate offsets up to the largest side once; offsets beyond a box's own side are masked.
    max_side = int(sizes.max())
    offsets = torch.tensor(list(itertools.product(range(max_side), repeat=d)), device=dev)  # (K, D)
    volume = math.prod(spatial)
    # Column ``volume`` is a sink: masked-out offsets read and write there, never on a real pixel.
    perm = torch.arange(volume + 1, device=dev).expand(b, -1).clone()
    for k in range(swaps):  # a handful of swaps, each vectorised over batch and box pixels
        inside = (offsets[None] < sizes[:, k, None]).all(dim=2) & valid_pair[:, k, None]  # (B, K)
        pos_a = ((first[:, k, None] + offsets[None]).clamp(max=dims - 1) * strides).sum(dim=2)
        pos_b = ((second[:, k, None] + offsets[None]).clamp(max=dims - 1) * strides).sum(dim=2)
        pos_a = torch.where(inside, pos_a, volume)
        pos_b = torch.where(inside, pos_b, volume)
        val_a, val_b = perm.gather(1, pos_a), perm.gather(1, pos_b)
        perm.scatter_(1, pos_a, val_b)
        perm.scatter_(1, pos_b, val_a)
    perm = perm[:, :volume]
    flat = x.reshape(b, c, -1)
    return flat.gather(2, perm[:, None, :].expand(b, c, -1)).reshape(x.shape)
