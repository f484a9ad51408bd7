"""The 2D DiRA restorative distortions: cutout, outer cutout and patch swap (batched, any device).

They work on 3D batches too (boxes become cuboids), but their defaults are in pixels of a 224²
chest X-ray crop. All random numbers are drawn for the whole batch; ``static_shapes`` picks whether
only the selected samples are computed (the CPU default) or all of them, kept with ``torch.where``
(no host synchronisation: the default elsewhere). Both give the same result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._common import (
    apply_to_subset,
    bernoulli_or,
    check_batch,
    fill_values,
    paint_boxes,
    randint_between,
    resolve_static,
    take,
    uniform,
)

__all__ = ["cutout", "outer_cutout", "patch_swap"]


def _check_size(size: tuple[int, int], name: str) -> None:
    if len(size) != 2 or not 1 <= size[0] <= size[1]:
        raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {size}")


def _boxes(u: torch.Tensor, spatial: Sequence[int], low: Sequence[int], high: Sequence[int],
           clip: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Box sides in ``[low, high]`` clipped to ``clip`` per axis, then origins in ``0 .. dim - side``.

    Args:
        u: ``(..., D, 1 + k)`` uniforms: column 0 draws the side, each further column one origin.
        spatial, low, high, clip: ``D`` Python ints each (no tensor built from Python data).

    Returns:
        ``(sizes, *origins)``: ``1 + k`` long tensors of shape ``(..., D)``.
    """
    sizes, origins = [], [[] for _ in range(u.shape[-1] - 1)]
    for axis, dim in enumerate(spatial):
        side = randint_between(low[axis], high[axis], u[..., axis, 0]).clamp(max=clip[axis])
        sizes.append(side)
        for column, out in enumerate(origins, start=1):
            out.append(randint_between(0, dim - side, u[..., axis, column]))
    return (torch.stack(sizes, dim=-1), *(torch.stack(o, dim=-1) for o in origins))


def cutout(x: torch.Tensor, generator: torch.Generator, prob: float = 0.3, max_boxes: int = 10,
           size: tuple[int, int] = (10, 70), fill: str | torch.Tensor = "noise", return_mask: bool = False,
           selected: torch.Tensor | None = None, static_shapes: bool | None = None,
           inplace: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill 1..``max_boxes`` random boxes (sides ``size[0]..size[1]`` px, clipped to the image) per sample.

    Args:
        x: ``(B, C, *spatial)`` batch in [0, 1].
        generator: source of randomness (CPU or on ``x``'s device).
        prob: per-sample probability of applying the distortion.
        max_boxes: most boxes per sample (the count is uniform in 1..max_boxes).
        size: ``(min, max)`` box side in pixels.
        fill: ``"noise"`` (U[0, 1) on a 2**-15 grid), ``"zero"`` or a tensor shaped like ``x`` (the values to write).
        return_mask: also return the ``(B, *spatial)`` mask of filled pixels.
        selected: ``(B,)`` boolean, the samples to distort, instead of drawing them with ``prob``.
        static_shapes: ``True``: box masks of every sample (fixed shapes, no host
            synchronisation); ``False``: of the selected samples only (cheaper on a CPU);
            ``None``: static off the CPU. Both give the same result.
        inplace: write into ``x`` (for callers that own it); use the returned tensor either way.

    Returns:
        The distorted batch, or ``(distorted, mask)``.

    Raises:
        ValueError: on a bad shape, probability, size or fill.
    """
    d = check_batch(x)
    _check_size(size, "cutout size")
    b, _, *spatial = x.shape
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    u = uniform((b, max_boxes, d, 2), generator, x.device)
    sizes, starts = _boxes(u, spatial, [size[0]] * d, [size[1]] * d, spatial)
    count = randint_between(1, max_boxes, uniform((b, 1), generator, x.device))
    active = torch.arange(max_boxes, device=x.device) < count
    out, mask = paint_boxes(x, selected, starts, sizes, active, fill_values(x, generator, fill), True, inplace,
                            resolve_static(static_shapes, x.device))
    return (out, mask) if return_mask else out


def outer_cutout(x: torch.Tensor, generator: torch.Generator, prob: float = 0.05,
                 keep_fraction: tuple[float, float] = (0.25, 0.75), fill: str | torch.Tensor = "noise",
                 return_mask: bool = False, selected: torch.Tensor | None = None, static_shapes: bool | None = None,
                 inplace: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill everything outside one random window (sides ``keep_fraction`` of each axis) per sample.

    Args:
        x: ``(B, C, *spatial)`` batch in [0, 1].
        generator: source of randomness (CPU or on ``x``'s device).
        prob: per-sample probability of applying the distortion.
        keep_fraction: ``(min, max)`` window side as a fraction of the axis.
        fill: ``"noise"`` (U[0, 1) on a 2**-15 grid), ``"zero"`` or a tensor shaped like ``x`` (the values to write).
        return_mask: also return the ``(B, *spatial)`` mask of kept pixels.
        selected: ``(B,)`` boolean, the samples to distort, instead of drawing them with ``prob``.
        static_shapes: ``True``: box masks of every sample (fixed shapes, no host
            synchronisation); ``False``: of the selected samples only (cheaper on a CPU);
            ``None``: static off the CPU. Both give the same result.
        inplace: write into ``x`` (for callers that own it); use the returned tensor either way.

    Returns:
        The distorted batch, or ``(distorted, kept)``.

    Raises:
        ValueError: on a bad shape, probability, fraction or fill.
    """
    d = check_batch(x)
    if not 0.0 < keep_fraction[0] <= keep_fraction[1] <= 1.0:
        raise ValueError(f"keep_fraction must satisfy 0 < min <= max <= 1, got {keep_fraction}")
    b, _, *spatial = x.shape
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    lo = [max(1, int(s * keep_fraction[0])) for s in spatial]
    hi = [max(1, int(s * keep_fraction[1])) for s in spatial]
    u = uniform((b, 1, d, 2), generator, x.device)
    sizes, starts = _boxes(u, spatial, lo, hi, spatial)
    active = torch.ones(b, 1, dtype=torch.bool, device=x.device)
    out, kept = paint_boxes(x, selected, starts, sizes, active, fill_values(x, generator, fill), False, inplace,
                            resolve_static(static_shapes, x.device))
    return (out, kept) if return_mask else out


def patch_swap(x: torch.Tensor, generator: torch.Generator, prob: float = 0.3, swaps: int = 10,
               size: tuple[int, int] = (10, 15), selected: torch.Tensor | None = None,
               static_shapes: bool | None = None, inplace: bool = False) -> torch.Tensor:
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
        selected: ``(B,)`` boolean, the samples to distort, instead of drawing them with ``prob``.
        static_shapes: ``True``: swap in every sample and keep the selected ones (no host
            synchronisation); ``False``: swap only in the selected samples; ``None``: static off
            the CPU. Both give the same result.
        inplace: subset path only: write into ``x`` (for callers that own it); use the
            returned tensor either way.

    Returns:
        The distorted batch.

    Raises:
        ValueError: on a bad shape, probability or size.
    """
    d = check_batch(x)
    _check_size(size, "patch_swap size")
    b, c, *spatial = x.shape
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    u = uniform((b, swaps, d, 3), generator, x.device)
    halves = [max(1, s // 2) for s in spatial]
    sizes, first, second = _boxes(u, spatial, [size[0]] * d, [size[1]] * d, halves)
    disjoint = ((first - second).abs() >= sizes).any(dim=2)  # (B, swaps): separated along some axis

    def swap(sub: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        perm = _swap_permutation(spatial, [min(size[1], h) for h in halves], take(first, idx), take(second, idx),
                                 take(sizes, idx), take(disjoint, idx))
        flat = sub.reshape(sub.shape[0], c, -1)
        return flat.gather(2, perm[:, None, :].expand(-1, c, -1)).reshape(sub.shape)

    return apply_to_subset(x, selected, swap, inplace=inplace, static=resolve_static(static_shapes, x.device))


def _swap_permutation(spatial: list[int], max_sides: list[int], first: torch.Tensor, second: torch.Tensor,
                      sizes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` gather indices of the composed swaps of box pairs (``(B, swaps, D)`` each).

    Offsets are enumerated up to the configured largest side per axis (``max_sides``, not the
    drawn sides: a fixed shape); offsets beyond a box's own side, and pairs not ``valid``, read
    and write a sink column, never a real pixel.
    """
    b, swaps, d = sizes.shape
    device = sizes.device
    volume = math.prod(spatial)
    strides = [math.prod(spatial[i + 1:]) for i in range(d)]
    offsets = torch.cartesian_prod(*[torch.arange(m, device=device) for m in max_sides]).view(-1, d)  # (K, D)
    perm = torch.arange(volume + 1, device=device).expand(b, -1).clone()  # column ``volume``: the sink
    for k in range(swaps):  # a handful of swaps, each vectorised over batch and box pixels
        inside = (offsets[None] < sizes[:, k, None]).all(dim=2) & valid[:, k, None]  # (B, K)
        pos_a = _flat_positions(first[:, k], offsets, spatial, strides)
        pos_b = _flat_positions(second[:, k], offsets, spatial, strides)
        pos_a = torch.where(inside, pos_a, volume)
        pos_b = torch.where(inside, pos_b, volume)
        val_a, val_b = perm.gather(1, pos_a), perm.gather(1, pos_b)
        perm.scatter_(1, pos_a, val_b)
        perm.scatter_(1, pos_b, val_a)
    return perm[:, :volume]


def _flat_positions(corner: torch.Tensor, offsets: torch.Tensor, spatial: list[int],
                    strides: list[int]) -> torch.Tensor:
    """``(B, K)`` flat index of ``corner`` (``(B, D)``) plus every offset (``(K, D)``), clipped to the volume."""
    pos = torch.zeros(corner.shape[0], offsets.shape[0], dtype=torch.long, device=corner.device)
    for axis, (dim, stride) in enumerate(zip(spatial, strides)):
        pos += (corner[:, axis, None] + offsets[None, :, axis]).clamp(max=dim - 1) * stride
    return pos
