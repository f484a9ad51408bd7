"""In-painting and out-painting (Models Genesis), batched: boxes are drawn per sample as tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import (
    bernoulli_or,
    check_batch,
    fill_values,
    leading_run,
    paint_boxes,
    randint_between,
    resolve_static,
    uniform,
)

__all__ = ["inpaint", "outpaint", "random_boxes"]


def random_boxes(batch: int, spatial: Sequence[int], count: int, min_sides: Sequence[int], max_sides: Sequence[int],
                 margin: int, generator: torch.Generator, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` boxes per sample: sides in ``[min_sides, max_sides]``, ``margin`` voxels from the border.

    The origin is drawn in ``[margin, dim - side - margin]`` like the reference; when the axis is
    too short for the margin, the margin shrinks so that the box still fits.

    Args:
        batch: samples.
        spatial: the ``D`` spatial sizes.
        count: boxes per sample.
        min_sides, max_sides: ``D`` Python ints, the side range per axis.
        margin: distance from the border in voxels.
        generator: source of randomness.
        device: where the boxes go.

    Returns:
        ``(starts, sizes)``, each ``(batch, count, D)`` long.
    """
    u = uniform((batch, count, len(spatial), 2), generator, device)
    starts, sizes = [], []
    for axis, dim in enumerate(spatial):  # per axis with Python bounds: no tensor built from Python data
        side = randint_between(min_sides[axis], max_sides[axis], u[..., axis, 0]).clamp(max=dim)
        room = dim - side
        low = room.clamp(max=margin)
        starts.append(randint_between(low, torch.maximum(room - margin, low), u[..., axis, 1]))
        sizes.append(side)
    return torch.stack(starts, dim=-1), torch.stack(sizes, dim=-1)


def _sides(spatial: Sequence[int], num: int, den: int) -> list[int]:
    return [max(1, num * s // den) for s in spatial]


def inpaint(x: torch.Tensor, generator: torch.Generator, max_boxes: int = 5, continue_prob: float = 0.95,
            min_fraction: tuple[int, int] = (1, 6), max_fraction: tuple[int, int] = (1, 3), margin: int = 3,
            prob: float = 1.0, return_mask: bool = False, fill: str | torch.Tensor = "noise",
            selected: torch.Tensor | None = None, static_shapes: bool | None = None,
            inplace: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill up to ``max_boxes`` random boxes with U[0, 1) noise; voxels outside them are untouched.

    The noise is on a ``2**-15`` grid (four values per 64-bit draw: see
    ``dira3d.transforms._common.noise_uniform``).

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
        fill: ``"noise"`` (U[0, 1) on a 2**-15 grid), ``"zero"`` or a tensor shaped like ``x``
            (the values to paint: a composition shares one noise draw between in- and
            out-painting, which never paint the same sample).
        selected: ``(B,)`` boolean, the samples to paint, instead of drawing them with ``prob``.
        static_shapes: ``True``: box masks of every sample (fixed shapes, no host
            synchronisation); ``False``: of the selected samples only (cheaper on a CPU);
            ``None``: static off the CPU. Both give the same result.
        inplace: write into ``x`` (for callers that own it); use the returned tensor either way.

    Returns:
        The painted batch, or ``(painted, mask)`` with ``return_mask``.

    Raises:
        ValueError: on a badly shaped input, a probability outside [0, 1] or a bad ``fill``.
    """
    check_batch(x)
    b, c, *spatial = x.shape
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    starts, sizes = random_boxes(b, spatial, max_boxes, _sides(spatial, *min_fraction), _sides(spatial, *max_fraction),
                                 margin, generator, x.device)
    active = leading_run(uniform((b, max_boxes), generator, x.device), continue_prob)
    out, mask = paint_boxes(x, selected, starts, sizes, active, fill_values(x, generator, fill), True, inplace,
                            resolve_static(static_shapes, x.device))
    return (out, mask) if return_mask else out


def outpaint(x: torch.Tensor, generator: torch.Generator, max_windows: int = 5, continue_prob: float = 0.95,
             margin: int = 3, prob: float = 1.0, return_mask: bool = False, fill: str | torch.Tensor = "noise",
             selected: torch.Tensor | None = None, static_shapes: bool | None = None,
             inplace: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        fill: ``"noise"`` (U[0, 1) on a 2**-15 grid), ``"zero"`` or a tensor shaped like ``x``
            (the values to paint outside the windows).
        selected: ``(B,)`` boolean, the samples to paint, instead of drawing them with ``prob``.
        static_shapes: ``True``: box masks of every sample (fixed shapes, no host
            synchronisation); ``False``: of the selected samples only (cheaper on a CPU);
            ``None``: static off the CPU. Both give the same result.
        inplace: write into ``x`` (for callers that own it); use the returned tensor either way.

    Returns:
        The painted batch, or ``(painted, kept)`` with ``return_mask`` (unselected samples: all kept).

    Raises:
        ValueError: on a badly shaped input, a probability outside [0, 1] or a bad ``fill``.
    """
    check_batch(x)
    b, c, *spatial = x.shape
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    min_sides = [max(1, s - t) for s, t in zip(spatial, _sides(spatial, 4, 7))]
    max_sides = [max(1, s - t) for s, t in zip(spatial, _sides(spatial, 3, 7))]
    starts, sizes = random_boxes(b, spatial, max_windows, min_sides, max_sides, margin, generator, x.device)
    active = leading_run(uniform((b, max_windows), generator, x.device), continue_prob, first_always=True)
    out, kept = paint_boxes(x, selected, starts, sizes, active, fill_values(x, generator, fill), False, inplace,
                            resolve_static(static_shapes, x.device))
    return (out, kept) if return_mask else out

