"""Shared helpers for the batched distortions: random draws, input checks, box masks.

Random numbers are always drawn on the *generator's* device and then moved to the input's
device. A CPU generator therefore works for any input (CUDA included); a generator on the input's
device avoids the host-to-device copy. The same seed on the same generator device gives the same
output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "check_batch",
    "uniform",
    "randint_between",
    "bernoulli",
    "apply_to_subset",
    "box_mask",
    "leading_run",
]


def check_batch(x: torch.Tensor, name: str = "x", spatial_dims: Sequence[int] = (2, 3)) -> int:
    """Check that ``x`` is a floating ``(B, C, *spatial)`` batch; return the number of spatial dims.

    Raises:
        ValueError: if ``x`` is not a floating tensor with 2 or 3 spatial dimensions.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor of shape (B, C, *spatial), got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}; convert it with .float().")
    dims = x.ndim - 2
    if dims not in spatial_dims:
        raise ValueError(f"{name} must have shape (B, C, *spatial) with {' or '.join(map(str, spatial_dims))} spatial dims, "
                         f"got shape {tuple(x.shape)}; add the batch dimension with x[None] for a single item.")
    return dims


def uniform(shape: Sequence[int], generator: torch.Generator, device: torch.device | str,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) numbers drawn on ``generator.device`` and moved to ``device``."""
    u = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return u.to(device)


def randint_between(low: torch.Tensor | int, high: torch.Tensor | int, u: torch.Tensor) -> torch.Tensor:
    """Map uniforms ``u`` in [0, 1) to integers in ``[low, high]`` (both inclusive, like ``random.randint``).

    ``low`` and ``high`` broadcast against ``u``; where ``high < low`` the result is ``low``.
    """
    low_t = torch.as_tensor(low, device=u.device)
    high_t = torch.maximum(torch.as_tensor(high, device=u.device), low_t)
    span = (high_t - low_t + 1).to(u.dtype)
    # min() guards against u*span rounding up to span for u very close to 1 in float32.
    offset = torch.minimum(torch.floor(u * span).long(), (high_t - low_t).long())
    return low_t.long() + offset


def bernoulli(batch: int, prob: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Per-sample boolean draws with probability ``prob`` (shape ``(batch,)``)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {prob}")
    return uniform((batch,), generator, device) < prob


def apply_to_subset(x: torch.Tensor, selected: torch.Tensor,
                    fn: Callable[[torch.Tensor], torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """Apply ``fn`` to the samples where ``selected`` is true, leave the others as they are.

    Only the selected samples are computed (cheaper than computing all and masking). With
    ``inplace`` the result is written into ``x`` (for callers that own ``x``) instead of a copy.
    """
    if bool(selected.all()):
        return fn(x)
    idx = torch.nonzero(selected, as_tuple=False).flatten()
    out = x if inplace else x.clone()
    if idx.numel():
        out[idx] = fn(x[idx])
    return out


def leading_run(u: torch.Tensor, prob: float, first_always: bool = False) -> torch.Tensor:
    """Boolean ``(B, n)``: item j is active while every draw up to j succeeded (``u < prob``).

    This is the reference's ``while cnt > 0 and random.random() < p`` loop, vectorised: the number
    of active items is a geometric count truncated at ``n``.
    """
    ok = u < prob
    if first_always:
        ok[:, 0] = True
    return torch.cumprod(ok.long(), dim=1).bool()


def box_mask(starts: torch.Tensor, sizes: torch.Tensor, active: torch.Tensor,
             spatial: Sequence[int]) -> torch.Tensor:
    """Union of axis-aligned boxes per sample.

    Args:
        starts: ``(B, n, D)`` integer first voxel of each box.
        sizes: ``(B, n, D)`` integer box sides.
        active: ``(B, n)`` boolean, which boxes count.
        spatial: the ``D`` spatial sizes.

    Returns:
        Boolean ``(B, *spatial)``, true inside at least one active box.
    """
    b, n, d = starts.shape
    inside = []
    for axis, length in enumerate(spatial):
        coord = torch.arange(length, device=starts.device)
        lo = starts[..., axis, None]
        inside.append(((coord >= lo) & (coord < lo + sizes[..., axis, None])).float())  # (B, n, L)
    inside[0] = inside[0] * active[..., None].float()
    # The union of boxes is separable per box: count boxes covering a voxel with one batched
    # matrix product over the box axis instead of n full-volume boolean passes.
    head = inside[0]
    for axis in range(1, d - 1):
        head = (head[..., :, None] * inside[axis][..., None, :]).flatten(2)  # (B, n, prod of leading axes)
    count = torch.bmm(head.transpose(1, 2), inside[-1])  # (B, prod(leading), last)
    return (count > 0.5).view(b, *spatial)
