"""Shared helpers for the batched distortions: random draws, input checks, box masks.

Random numbers are always drawn on the *generator's* device and then moved to the input's
device. A CPU generator therefore works for any input (CUDA included); a generator on the input's
device avoids the host-to-device copy. The same seed on the same generator device gives the same
output.

Two execution paths (``static_shapes``, see :func:`resolve_static`):

- *subset* (the CPU default): only the selected samples are computed, found with ``nonzero``;
  the cheapest on a CPU, but every data-dependent size is a device-to-host synchronisation on a GPU;
- *static* (the default on any other device): every sample is computed and the result is kept
  where selected with ``torch.where``: fixed shapes, no ``nonzero``, no ``.item()``, no Python
  branch on tensor values, so a GPU never waits for the host.

Every distortion draws all its random numbers for the whole batch, selected or not, before
choosing a path, so both paths give bit-identical results for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# Noise values drawn per chunk on the CPU (a multiple of 4: whole 64-bit draws).
_CPU_NOISE_CHUNK = 1 << 18

__all__ = [
    "check_batch",
    "check_static",
    "resolve_static",
    "to_device",
    "axis_tensor",
    "uniform",
    "random_words",
    "noise_uniform",
    "fill_values",
    "randint_between",
    "bernoulli",
    "bernoulli_or",
    "take",
    "apply_to_subset",
    "box_mask",
    "paint_boxes",
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


def resolve_static(static_shapes: bool | None, device: torch.device | str) -> bool:
    """Whether to take the static-shape path on ``device``.

    Args:
        static_shapes: ``True`` (static), ``False`` (subset) or ``None`` (auto: static on any
            device but the CPU, where computing only the selected samples is cheaper).
        device: the device of the batch.

    Returns:
        ``True`` for the static path.

    Raises:
        ValueError: if ``static_shapes`` is not a bool or None.
    """
    if check_static(static_shapes) is None:
        return torch.device(device).type != "cpu"
    return static_shapes


def check_static(static_shapes: bool | None) -> bool | None:
    """Return ``static_shapes`` unchanged.

    Raises:
        ValueError: if it is not True, False or None.
    """
    if static_shapes is not None and not isinstance(static_shapes, bool):
        raise ValueError(f"static_shapes must be True, False or None (auto: static off the CPU), got {static_shapes!r}")
    return static_shapes


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move ``t`` to ``device`` without making a GPU wait for the host.

    A plain ``.to("cuda")`` of a CPU tensor is a pageable copy that waits for every queued kernel;
    staging through pinned memory makes it an asynchronous copy (the pinned block is kept until the
    copy is done by PyTorch's caching host allocator).
    """
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def axis_tensor(values: Sequence[float], device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``(len(values),)`` tensor of per-axis Python numbers, built on ``device``.

    One ``torch.full`` per value, stacked: unlike ``torch.tensor(values, device=...)``, no tensor
    is built from Python data, so a GPU gets no pageable host-to-device copy (which would wait for
    the queued kernels).
    """
    return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])


def uniform(shape: Sequence[int], generator: torch.Generator, device: torch.device | str,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) numbers drawn on ``generator.device`` and moved to ``device``."""
    u = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return to_device(u, device)


def random_words(count: int, generator: torch.Generator, device: torch.device | str, bits: int = 15) -> torch.Tensor:
    """``count`` int16 words with ``bits`` random bits each (``0 .. 2**bits - 1``), on ``device``.

    ``random_()`` on int64 gives 63 random bits per draw, read as four 16-bit words of which the
    low 15 bits are random: a quarter of the generator calls of an int32 ``randint``.

    Raises:
        ValueError: on ``bits`` outside 1..15.
    """
    if not 1 <= bits <= 15:
        raise ValueError(f"random_words gives 1 to 15 random bits per word, asked for {bits}")
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=generator.device).random_(generator=generator)
    # masked in place: the words are ours (a batch-sized temporary fewer)
    return to_device(words, device).view(torch.int16)[:count].bitwise_and_((1 << bits) - 1)


def noise_uniform(shape: Sequence[int], generator: torch.Generator, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) noise at 15-bit resolution (multiples of ``2**-15``), for the painting fills.

    Four values per 64-bit draw (:func:`random_words`): half the time of ``torch.rand`` on a CPU,
    where the fill noise is the largest draw of a composition. Half and bfloat16 batches get
    ``torch.rand`` (their mantissa would round ``1 - 2**-15`` up to 1).
    """
    if dtype not in (torch.float32, torch.float64):
        return uniform(shape, generator, device, dtype)
    count = math.prod(shape)
    out = torch.empty(count, dtype=dtype, device=device)
    # On the CPU the words are drawn a cache-sized chunk at a time (the same stream as one draw
    # when chunks are multiples of 4 words): no batch-sized int temporary to allocate and fault in.
    step = _CPU_NOISE_CHUNK if torch.device(device).type == "cpu" else max(count, 1)
    for start in range(0, count, step):
        stop = min(start + step, count)
        out[start:stop] = random_words(stop - start, generator, device)
    return out.mul_(2.0 ** -15).view(tuple(shape))


def fill_values(x: torch.Tensor, generator: torch.Generator, fill: str | torch.Tensor) -> torch.Tensor:
    """The values a painting distortion writes: fresh U[0, 1) noise, zeros, or the caller's tensor.

    Args:
        x: the batch being painted.
        generator: source of the noise.
        fill: ``"noise"`` (:func:`noise_uniform`), ``"zero"`` or a tensor shaped like ``x`` (e.g.
            one noise draw shared by two distortions that never paint the same sample).

    Returns:
        A tensor shaped like ``x`` on its device.

    Raises:
        ValueError: on another string or a tensor of another shape.
    """
    if isinstance(fill, torch.Tensor):
        if fill.shape != x.shape:
            raise ValueError(f"fill tensor must have the batch's shape {tuple(x.shape)}, got {tuple(fill.shape)}")
        return to_device(fill, x.device).to(x.dtype)
    if fill == "noise":
        return noise_uniform(x.shape, generator, x.device, dtype=x.dtype)
    if fill == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"fill must be 'noise', 'zero' or a tensor shaped like the batch, got {fill!r}")


def _at_least(value: torch.Tensor | int, floor: torch.Tensor | int) -> torch.Tensor | int:
    # elementwise max(value, floor) for any mix of tensors and Python ints (no tensor from Python data)
    if isinstance(value, torch.Tensor):
        return torch.maximum(value, floor) if isinstance(floor, torch.Tensor) else value.clamp(min=floor)
    return floor.clamp(min=value) if isinstance(floor, torch.Tensor) else max(value, floor)


def randint_between(low: torch.Tensor | int, high: torch.Tensor | int, u: torch.Tensor) -> torch.Tensor:
    """Map uniforms ``u`` in [0, 1) to integers in ``[low, high]`` (both inclusive, like ``random.randint``).

    ``low`` and ``high`` (integer tensors or Python ints) broadcast against ``u``; where
    ``high < low`` the result is ``low``. Python ints stay scalars: no tensor is built from Python
    data (on a GPU that would be a host-to-device copy).

    Returns:
        A long tensor of ``u``'s shape (broadcast with ``low`` and ``high``).
    """
    span = _at_least(high, low) - low  # >= 0
    # min() guards against u*(span+1) rounding up to span+1 for u very close to 1 in float32.
    offset = torch.floor(u * (span + 1)).long()
    offset = torch.minimum(offset, span) if isinstance(span, torch.Tensor) else offset.clamp(max=span)
    return offset + low


def bernoulli(batch: int, prob: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Per-sample boolean draws with probability ``prob`` (shape ``(batch,)``)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {prob}")
    return uniform((batch,), generator, device) < prob


def bernoulli_or(selected: torch.Tensor | None, batch: int, prob: float, generator: torch.Generator,
                 device: torch.device | str) -> torch.Tensor:
    """The caller's ``(batch,)`` boolean ``selected`` (no draw), or per-sample draws with ``prob``.

    Raises:
        ValueError: on a probability outside [0, 1] or a ``selected`` of the wrong shape or dtype.
    """
    if selected is None:
        return bernoulli(batch, prob, generator, device)
    if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool or tuple(selected.shape) != (batch,):
        got = f"{getattr(selected, 'dtype', type(selected).__name__)} of shape {tuple(getattr(selected, 'shape', ()))}"
        raise ValueError(f"selected must be a boolean tensor of shape ({batch},) (one flag per sample), got {got}")
    return to_device(selected, device)


def take(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``t[idx]`` along the batch axis, or ``t`` itself when ``idx`` is None (all samples)."""
    return t if idx is None else t[idx]


def apply_to_subset(x: torch.Tensor, selected: torch.Tensor,
                    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], inplace: bool = False,
                    static: bool = False) -> torch.Tensor:
    """Apply ``fn`` to the samples where ``selected`` is true, leave the others as they are.

    ``fn(sub, idx)`` distorts the batch ``sub``, whose samples are ``x[idx]``; ``idx`` is None when
    ``sub`` is the whole batch. Per-sample parameters are read with :func:`take`, so ``fn`` never
    looks for the selected samples itself.

    Args:
        x: ``(B, ...)`` batch.
        selected: ``(B,)`` boolean.
        fn: the distortion of a batch, as above.
        inplace: subset path only: write the result into ``x`` (for callers that own ``x``)
            instead of a copy.
        static: compute every sample and keep the result where selected (``torch.where``): fixed
            shapes, no synchronisation with the host. Otherwise only the selected samples are
            computed (found with ``nonzero``: cheaper on a CPU, a synchronisation on a GPU).

    Returns:
        The batch with the selected samples distorted.
    """
    if static:
        keep = selected.view(-1, *([1] * (x.ndim - 1)))
        return torch.where(keep, fn(x, None), x)
    idx = torch.nonzero(selected, as_tuple=False).flatten()  # on a GPU the one sync: the count
    if idx.numel() == selected.numel():
        return fn(x, None)
    out = x if inplace else x.clone()
    if idx.numel():
        out[idx] = fn(x[idx], idx)
    return out


def paint_boxes(x: torch.Tensor, selected: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor,
                active: torch.Tensor, fill: torch.Tensor, inside: bool, inplace: bool = False,
                static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``fill`` inside (``inside``) or outside the union of the active boxes of the selected samples.

    The write is one ``torch.where`` over the batch on both paths; they differ in the box mask:
    the static path computes it for every sample (fixed shapes), the subset path only for the
    selected ones (found with ``nonzero``) and scatters it into an all-false mask, which on a CPU
    is cheaper than both (the mask is the costly part) and than gathering the selected samples.

    Args:
        x: ``(B, C, *spatial)`` batch.
        selected: ``(B,)`` boolean, the samples to paint; the others are returned unchanged.
        starts, sizes, active: the boxes, as for :func:`box_mask`.
        fill: values shaped like ``x``.
        inside: paint inside the boxes (in-painting, cutout) or outside them (out-painting).
        inplace: write into ``x`` (for callers that own it).
        static: the static path (no host synchronisation).

    Returns:
        ``(painted, mask)``: ``mask`` ``(B, *spatial)`` is the painted voxels when ``inside``,
        else the kept ones (every voxel of an unselected sample).
    """
    b, spatial = x.shape[0], list(x.shape[2:])
    if static:
        boxes = box_mask(starts, sizes, active, spatial)
        painted = (boxes if inside else ~boxes) & selected.view(-1, *([1] * len(spatial)))
    else:
        painted = torch.zeros(b, *spatial, dtype=torch.bool, device=x.device)
        idx = torch.nonzero(selected, as_tuple=False).flatten()
        if idx.numel():
            boxes = box_mask(starts[idx], sizes[idx], active[idx], spatial)
            painted[idx] = boxes if inside else ~boxes
    out = torch.where(painted[:, None], fill, x, out=x if inplace else None)
    return out, (painted if inside else ~painted)


def leading_run(u: torch.Tensor, prob: float, first_always: bool = False) -> torch.Tensor:
    """Boolean ``(B, n)``: item j is active while every draw up to j succeeded (``u < prob``).

    This is the reference's ``while cnt > 0 and random.random() < p`` loop, vectorised: the number
    of active items is a geometric count truncated at ``n``.
    """
    ok = u < prob
    if first_always:
        ok = ok | (torch.arange(u.shape[1], device=u.device) == 0)
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
