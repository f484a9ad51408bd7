"""In-painting and out-painting (Models Genesis), batched: boxes are drawn per sample as tensors."""

from __future__ import annotations

import torch

from ._common import bernoulli, box_mask, check_batch, leading_run, randint_between, uniform

__all__ = ["inpaint", "outpaint", "random_boxes"]


def random_boxes(batch: int, spatial: list[int], count: int, min_sides: torch.Tensor, max_sides: torch.Tensor,
                 margin: int, generator: torch.Generator, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` boxes per sample: sides in ``[min_sides, max_sides]``, ``margin`` voxels from the border.

    The origin is drawn in ``[margin, dim - side - margin]`` like the reference; when the axis is
    too short for the margin, the margin shrinks so that the box still fits.

    Returns:
        ``(starts, sizes)``, each ``(batch, count, D)`` long.
    """
    d = len(spatial)
    dims = torch.tensor(spatial, device=device)
    u = uniform((batch, count, d, 2), generator, device)
    sizes = torch.minimum(randint_between(min_sides.to(device), max_sides.to(device), u[..., 0]), dims)
    room = dims - sizes
    low = torch.clamp(torch.full_like(room, margin), max=room)
    high = torch.maximum(room - margin, low)
    starts = randint_between(low, high, u[..., 1])
    return starts, sizes


def _sides(spatial: list[int], num: int, den: int) -> torch.Tensor:
    return torch.tensor([max(1, num * s // den) for s in spatial])


def inpaint(x: torch.Tensor, generator: torch.Generator, max_boxes: int = 5, continue_prob: float = 0.95,
            min_fraction: tuple[int, int] = (1, 6), max_fraction: tuple[int, int] = (1, 3), margin: int = 3,
            prob: float = 1.0, return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill up to ``max_boxes`` random boxes with U[0, 1) noise; voxels outside them are untouched.

    Box count: each further box is drawn while a ``continue_prob`` coin succeeds (the reference's
    ``while cnt > 0 and random() < 0.95``), so 0..``max_boxes`` boxes. Box side per axis in
    ``[dim*min_fraction, dim*max_fraction]`` (integer division, default dim//6 .. dim//3).

    Args:
        x: ``(B, C, *spatial)`` batch (2D or 3D), any device.
        generator: source of randomness (CPU or on ``x``'s device).
        max_boxes: most boxes per sample.
        continue_prob: probability of drawing each next box.
        min_fraction: ``(num, den)``: smallest side ``num*dim//den``.
        max_fraction: ``(num, den)``: largest side ``num*dim//den``.
        margin: distance of the boxes from the border, in voxels.
        prob: per-sample probability of applying the distortion.
        return_mask: also return the ``(B, *spatial)`` boolean mask of painted voxels.

    Returns:
        The painted batch, or ``(painted, mask)`` with ``return_mask``.

    Raises:
        ValueError: on a badly shaped input or a probability outside [0, 1].
    """
    check_batch(x)
    b, c, *spatial = x.shape
    selected = bernoulli(b, prob, generator, x.device)
    starts, sizes = random_boxes(b, spatial, max_boxes, _sides(spatial, *min_fraction), _sides(spatial, *max_fraction),
                                 margin, generator, x.device)
    active = leading_run(uniform((b, max_boxes), generator, x.device), continue_prob) & selected[:, None]
    mask = box_mask(starts, sizes, active, spatial)
    noise = uniform(x.shape, generator, x.device, dtype=x.dtype)
    out = torch.where(mask[:, None], noise, x)
    return (out, mask) if return_mask else out


def outpaint(x: torch.Tensor, generator: torch.Generator, max_windows: int = 5, continue_prob: float = 0.95,
             margin: int = 3, prob: float = 1.0, return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Replace everything by U[0, 1) noise except up to ``max_windows`` windows that keep the original.

    The first window is always drawn, each further one while a ``continue_prob`` coin succeeds.
    Window side per axis: ``dim - randint(3*dim//7, 4*dim//7)`` (the reference's rule).

    Args:
        x: ``(B, C, *spatial)`` batch (2D or 3D), any device.
        generator: source of randomness (CPU or on ``x``'s device).
        max_windows: most windows per sample.
        continue_prob: probability of drawing each next window.
        margin: distance of the windows from the border, in voxels.
        prob: per-sample probability of applying the distortion.
        return_mask: also return the ``(B, *spatial)`` boolean mask of kept (window) voxels.

    Returns:
        The painted batch, or ``(painted, kept)`` with ``return_mask`` (unselected samples: all kept).

    Raises:
        ValueError: on a badly shaped input or a probability outside [0, 1].
    """
    check_batch(x)
    b, c, *spatial = x.shape
    selected = bernoulli(b, prob, generator, x.device)
    dims = torch.tensor(spatial)
    min_sides = torch.clamp(dims - _sides(spatial, 4, 7), min=1)
    max_sides = torch.clamp(dims - _sides(spatial, 3, 7), min=1)
    starts, sizes = random_boxes(b, spatial, max_windows, min_sides, max_sides, margin, generator, x.device)
    active = leading_run(uniform((b, max_windows), generator, x.device), continue_prob, first_always=True)
    kept = box_mask(starts, sizes, active, spatial) | ~selected.view(b, *([1] * len(spatial)))
    noise = uniform(x.shape, generator, x.device, dtype=x.dtype)
    out = torch.where(kept[:, None], x, noise)
    return (out, kept) if return_mask else out

