"""Spatial distortions: random flips (input and target alike) and the in-plane elastic warp (TransVW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import apply_to_subset, bernoulli_or, check_batch, leading_run, resolve_static, take, uniform

__all__ = ["random_flip", "flip_axes", "gaussian_smooth2d", "elastic_inplane"]


def flip_axes(x: torch.Tensor, flips: torch.Tensor, static_shapes: bool | None = None) -> torch.Tensor:
    """Flip each sample of ``x`` along the spatial axes marked in ``flips``.

    Args:
        x: ``(B, C, *spatial)`` batch.
        flips: ``(B, D)`` boolean, which axes to flip per sample.
        static_shapes: ``True``: flip every sample and keep it where marked (``torch.where``, no
            host synchronisation); ``False``: flip only the marked samples (found with ``nonzero``,
            cheaper on a CPU); ``None``: static off the CPU.

    Returns:
        The flipped batch (``x`` itself when the subset path finds nothing to flip).
    """
    static = resolve_static(static_shapes, x.device)
    out = x
    for axis in range(flips.shape[1]):
        if static:
            flip = flips[:, axis].view(-1, *([1] * (x.ndim - 1)))
            out = torch.where(flip, out.flip(2 + axis), out)
            continue
        idx = torch.nonzero(flips[:, axis], as_tuple=False).flatten()
        if idx.numel():  # flip only the samples that need it (cheaper than flip-all + where)
            out = out.clone() if out is x else out
            out[idx] = out[idx].flip(2 + axis)
    return out


def random_flip(x: torch.Tensor, target: torch.Tensor | None, generator: torch.Generator, prob: float = 0.4,
                max_flips: int = 3, static_shapes: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip input and target alike along random spatial axes (Models Genesis ``data_augmentation``).

    Per sample, up to ``max_flips`` flips are made while a ``prob`` coin succeeds, each along an
    axis chosen uniformly; flipping an axis twice cancels, so the net effect is a per-axis parity.

    Args:
        x: ``(B, C, *spatial)`` batch (2D or 3D).
        target: tensor of the same batch and spatial shape (or ``None``), flipped identically.
        generator: source of randomness (CPU or on ``x``'s device).
        prob: probability of each successive flip.
        max_flips: most flips per sample.
        static_shapes: see :func:`flip_axes` (both paths give the same result).

    Returns:
        ``(flipped_x, flipped_target)``.

    Raises:
        ValueError: on bad shapes or a probability outside [0, 1].
    """
    d = check_batch(x)
    if target is not None and (target.shape[0] != x.shape[0] or target.shape[2:] != x.shape[2:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match x shape {tuple(x.shape)} "
                         "in batch and spatial sizes; pass the restoration target of the same patches.")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"flip prob must be in [0, 1], got {prob}")
    b = x.shape[0]
    active = leading_run(uniform((b, max_flips), generator, x.device), prob)
    axis = torch.floor(uniform((b, max_flips), generator, x.device) * d).long().clamp(max=d - 1)
    # flips per axis; a comparison instead of F.one_hot, which checks its input's range on the host
    chosen = axis[..., None] == torch.arange(d, device=x.device)
    counts = (chosen & active[..., None]).sum(dim=1)  # (B, D)
    flips = counts % 2 == 1
    return (flip_axes(x, flips, static_shapes),
            None if target is None else flip_axes(target, flips, static_shapes))


def gaussian_smooth2d(field: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` with zero padding (scipy ``mode="constant"``)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return F.conv2d(out, kernel.view(1, 1, 1, -1), padding=(0, radius))


def _normalise(pos: torch.Tensor, size: int) -> torch.Tensor:
    return pos * (2.0 / max(size - 1, 1)) - 1.0  # align_corners=True convention


def elastic_inplane(x: torch.Tensor, generator: torch.Generator, alpha: float = 991.0, sigma: float = 8.0,
                    prob: float = 1.0, padding_mode: str = "zeros", selected: torch.Tensor | None = None,
                    static_shapes: bool | None = None, inplace: bool = False) -> torch.Tensor:
    """Elastic warp in the (x, y) plane, the same field for every z slice (TransVW, input only).

    The displacement (in voxels) is ``alpha * gaussian_blur(U(-1, 1), sigma)`` per in-plane axis,
    sampled bilinearly with ``grid_sample`` at ``(i + dx, j + dy)``; outside the patch reads 0
    (``padding_mode="zeros"``, like ``map_coordinates``' constant mode) unless told otherwise.

    Args:
        x: ``(B, C, X, Y)`` or ``(B, C, X, Y, Z)`` batch, any device.
        generator: source of randomness (CPU or on ``x``'s device).
        alpha: displacement scale in voxels.
        sigma: smoothing of the displacement field in voxels.
        prob: per-sample probability of applying the warp.
        padding_mode: ``grid_sample`` padding ("zeros", "border", "reflection").
        selected: ``(B,)`` boolean, the samples to warp, instead of drawing them with ``prob``.
        static_shapes: ``True``: warp every sample and keep the selected ones (no host
            synchronisation); ``False``: warp only the selected samples; ``None``: static off the
            CPU. Both give the same result.
        inplace: subset path only: write into ``x`` (for callers that own it); use the
            returned tensor either way.

    Returns:
        The warped batch (values stay within the input range and 0).

    Raises:
        ValueError: on a badly shaped input, a probability outside [0, 1] or ``sigma <= 0``.
    """
    d = check_batch(x)
    if sigma <= 0:
        raise ValueError(f"elastic sigma must be > 0, got {sigma}")
    b, c, sx, sy = x.shape[:4]
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    noise = uniform((b, 2, sx, sy), generator, x.device) * 2 - 1
    # The in-plane fields are small: smooth them for every sample on both paths, so that a
    # sample's field never depends on how many others are computed with it.
    disp = gaussian_smooth2d(noise.reshape(b * 2, 1, sx, sy), sigma).view(b, 2, sx, sy) * alpha
    ii = torch.arange(sx, device=x.device, dtype=disp.dtype).view(1, sx, 1)
    jj = torch.arange(sy, device=x.device, dtype=disp.dtype).view(1, 1, sy)
    # grid_sample's last grid dim is (W, H) = (y, x) for an (N, C, X, Y) input.
    grid = torch.stack([_normalise(jj + disp[:, 1], sy), _normalise(ii + disp[:, 0], sx)], dim=-1)

    def warp(sub: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        n = sub.shape[0]
        if d == 2:
            planes = sub
        else:  # fold z into channels: the same in-plane field warps every slice
            planes = sub.permute(0, 1, 4, 2, 3).reshape(n, -1, sx, sy)
        warped = F.grid_sample(planes.float(), take(grid, idx).float(), mode="bilinear", padding_mode=padding_mode,
                               align_corners=True).to(sub.dtype)
        if d == 2:
            return warped
        return warped.view(n, c, sub.shape[4], sx, sy).permute(0, 1, 3, 4, 2).contiguous()

    return apply_to_subset(x, selected, warp, inplace=inplace, static=resolve_static(static_shapes, x.device))
