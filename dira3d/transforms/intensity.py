"""Non-linear intensity distortion (Models Genesis): a random monotone cubic Bézier curve."""

from __future__ import annotations

import torch

from ._common import apply_to_subset, bernoulli_or, check_batch, resolve_static, take, uniform

__all__ = ["bezier_lookup", "nonlinear_intensity"]

# Voxels per step on the CPU: intermediates of one 64x64x32 sample stay in the L2 cache.
_CPU_CHUNK_VOXELS = 1 << 17


def bezier_lookup(controls: torch.Tensor, inverted: torch.Tensor, num_points: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample per-sample cubic Bézier curves through (0,0), (r1,r2), (r3,r4), (1,1) as lookup tables.

    The x and y samples are sorted independently (as the Models Genesis reference does), which
    makes the table a monotone non-decreasing map from [0, 1] onto [0, 1] even when the raw curve
    folds back; inverted samples get the y table reversed (a decreasing map, 0 -> 1, 1 -> 0).

    Args:
        controls: ``(B, 4)`` the inner control points ``r1, r2, r3, r4`` in [0, 1).
        inverted: ``(B,)`` boolean, which curves are decreasing.
        num_points: samples along the curve.

    Returns:
        ``(xs, ys)``, each ``(B, num_points)``; ``xs`` ascending from 0 to 1.
    """
    t = torch.linspace(0.0, 1.0, num_points, device=controls.device, dtype=controls.dtype)
    b1 = 3 * (1 - t) ** 2 * t  # Bernstein weights of the inner control points; P0 = (0,0) drops out
    b2 = 3 * (1 - t) * t ** 2
    b3 = t ** 3
    xs = controls[:, 0:1] * b1 + controls[:, 2:3] * b2 + b3
    ys = controls[:, 1:2] * b1 + controls[:, 3:4] * b2 + b3
    xs = torch.sort(xs, dim=1).values
    ys = torch.sort(ys, dim=1).values
    ys = torch.where(inverted[:, None], ys.flip(1), ys)
    return xs, ys


def _interpolate(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, grid_points: int = 4097) -> torch.Tensor:
    """Piecewise-linear ``np.interp`` per row: ``values`` ``(B, M)``, tables ``(B, N)``.

    The curve is first resampled on a uniform grid of ``grid_points`` x values (a small
    ``searchsorted``); every voxel then reads its grid cell's value and slope with two ``gather``s
    (much faster than a ``searchsorted`` per voxel). Resampling a monotone table keeps it monotone
    and keeps both endpoints exact. On the CPU the voxels go a few rows at a time so that the
    intermediate tensors stay in cache.
    """
    b = xs.shape[0]
    grid = torch.linspace(0.0, 1.0, grid_points, device=xs.device, dtype=xs.dtype).expand(b, -1).contiguous()
    hi = torch.searchsorted(xs.contiguous(), grid).clamp(1, xs.shape[1] - 1)
    x0, x1 = xs.gather(1, hi - 1), xs.gather(1, hi)
    y0, y1 = ys.gather(1, hi - 1), ys.gather(1, hi)
    w = ((grid - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0.0, 1.0)
    lut = y0 + w * (y1 - y0)  # (B, grid_points): the curve on a uniform grid of x
    slope = torch.diff(lut, dim=1, append=lut[:, -1:])  # per cell; x = 1 reads cell G-2 at frac 1
    out = torch.empty(values.shape, device=values.device, dtype=lut.dtype)
    step = b if values.device.type != "cpu" else max(1, _CPU_CHUNK_VOXELS // max(1, values.shape[1]))
    for i in range(0, b, step):
        pos = values[i:i + step].to(lut.dtype).clamp(0.0, 1.0) * (grid_points - 1)
        cell = pos.long().clamp_(max=grid_points - 2)
        frac = pos - cell
        out[i:i + step] = lut[i:i + step].gather(1, cell).addcmul_(slope[i:i + step].gather(1, cell), frac)
    return out


def nonlinear_intensity(x: torch.Tensor, generator: torch.Generator, prob: float = 1.0,
                        inverse_prob: float = 0.5, num_points: int = 1000, selected: torch.Tensor | None = None,
                        static_shapes: bool | None = None, inplace: bool = False) -> torch.Tensor:
    """Map intensities through a random monotone cubic Bézier curve, one curve per sample.

    Args:
        x: ``(B, C, *spatial)`` batch in [0, 1] (2D or 3D), any device.
        generator: source of randomness (CPU or on ``x``'s device).
        prob: per-sample probability of applying the distortion.
        inverse_prob: probability that a sample's curve is decreasing (inverted intensities).
        num_points: points sampled along each curve for the lookup table.
        selected: ``(B,)`` boolean, the samples to distort, instead of drawing them with ``prob``.
        static_shapes: ``True``: map every sample and keep the selected ones (no host
            synchronisation); ``False``: map only the selected samples; ``None``: static off the
            CPU. Both give the same result.
        inplace: subset path only: write into ``x`` (for callers that own it); use the
            returned tensor either way.

    Returns:
        A new tensor like ``x``; values stay in [0, 1]. All channels of a sample share its curve.

    Raises:
        ValueError: on a badly shaped input or a probability outside [0, 1].
    """
    check_batch(x)
    if not 0.0 <= inverse_prob <= 1.0:
        raise ValueError(f"inverse_prob must be in [0, 1], got {inverse_prob}")
    b = x.shape[0]
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    # Draw for every sample (selected or not) so that a sample's curve does not depend on the others.
    controls = uniform((b, 4), generator, x.device, dtype=torch.float32)
    inverted = uniform((b,), generator, x.device) < inverse_prob

    def curve(sub: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        xs, ys = bezier_lookup(take(controls, idx), take(inverted, idx), num_points)
        flat = sub.reshape(sub.shape[0], -1).float()
        return _interpolate(flat, xs, ys).reshape(sub.shape).to(sub.dtype)

    return apply_to_subset(x, selected, curve, inplace=inplace, static=resolve_static(static_shapes, x.device))
