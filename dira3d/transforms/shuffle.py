"""Local pixel shuffling (Models Genesis), vectorised over blocks and samples.

Semantics (ours, documented because the reference's differ slightly): ``num_blocks`` boxes are
drawn per sample as in the reference (each side ``1 .. int(dim * max_block_fraction)``, origin
uniform so the box fits; from 15-bit random words, so uniform to within ``k / 2**15`` for ``k``
choices). Boxes may overlap; a voxel belongs to the *last* box that covers
it (later boxes are painted over earlier ones). Each box's visible voxels are then permuted
uniformly at random among themselves, all at once (no per-block loop). Hence:

- every box's multiset of values (over its visible voxels) is kept, so the histogram of each
  sample is kept exactly;
- voxels outside all boxes are untouched;
- all channels of a sample get the same spatial permutation (multi-modal voxels stay aligned).

The reference instead reads every window from the original and writes it into the running result,
so with overlaps it can duplicate or drop values; ours is the closest form that keeps the
invariant and needs no sequential loop over the 10,000 blocks.

How (no per-voxel or per-block Python loop): :func:`block_owner` paints, for every voxel, the index
of the last block covering it; :func:`permute_within_labels` then turns the owner map into a
permutation with two integer sorts. On the CPU the sorts run a few samples at a time so that
their working set stays in cache (sorting one 64x64x32 sample at a time is several times cheaper
per voxel than sorting 16 at once); all random numbers are drawn up front, so the result does not depend on
this chunking (nor on the device, for a CPU generator).

The static-shape path (``static_shapes``, the default off the CPU) shuffles every sample and keeps
the selected ones. The owner map is painted by :func:`block_owner_static` (fixed shapes, no class
counts read on the host) on that path and on any device but the CPU, and by :func:`block_owner`
on the CPU's subset path. The owner map, and so the result, is the same either way.
"""

from __future__ import annotations

import math

import torch

from ._common import (
    apply_to_subset,
    axis_tensor,
    bernoulli_or,
    check_batch,
    random_words,
    resolve_static,
    take,
)

__all__ = ["block_owner", "block_owner_static", "permute_within_labels", "local_pixel_shuffle"]

# Voxels sorted at once: one 64x64x32 sample on the CPU (fits the L2 cache); a GPU takes it all.
_CPU_CHUNK_VOXELS = 1 << 17
_GPU_CHUNK_VOXELS = 1 << 24
# Scatter indices (int64) written at once by block_owner_static: 2 MiB on the CPU (one 64x64x32
# sample with 10,000 blocks: its layers stay in cache, 2x faster than 16 at once), 256 MiB off it.
_CPU_CHUNK_WRITES = 1 << 18
_GPU_CHUNK_WRITES = 1 << 25


def permute_within_labels(labels: torch.Tensor, noise: torch.Tensor, noise_bits: int,
                          num_labels: int | None = None) -> torch.Tensor:
    """Gather indices that permute positions uniformly at random among equal labels.

    Args:
        labels: ``(N,)`` integer label per position, ``-1`` for positions that must stay put;
            equal labels need not be contiguous.
        noise: ``(N,)`` integer random numbers in ``[0, 2**noise_bits)``.
        noise_bits: bits of ``noise`` (at most 31).
        num_labels: an upper bound on ``labels.max() + 1`` (computed, with a sync, if omitted).

    Returns:
        ``(N,)`` long ``src`` such that ``values[src]`` is ``values`` permuted within every label:
        ``labels[src] == labels`` and ``src[i] == i`` where ``labels[i] == -1``.

    Two stable integer sorts: by ``(label, noise)`` lists each label's positions in random order,
    by ``label`` alone in position order; pairing the two lists gives the permutation (the
    ``k``-th position of a label receives its ``k``-th random pick). Keys are int32 when
    ``label + 1`` and the noise fit in 31 bits (twice as fast as int64). Equal noise within a
    label (probability ``2**-noise_bits`` per pair) keeps position order.
    """
    if num_labels is None:
        num_labels = int(labels.max()) + 1 if labels.numel() else 0
    wide = num_labels.bit_length() + noise_bits > 31
    dtype = torch.int64 if wide else torch.int32
    labels = labels.to(dtype)
    visible = labels >= 0
    key = ((labels + 1) << noise_bits) | torch.where(visible, noise.to(dtype), 0)
    picks = torch.sort(key, stable=True).indices  # unlabelled positions: noise 0, stay in order
    # Few labels: int16 sorts about twice as fast as int32.
    narrow = labels.to(torch.int16) if num_labels < 1 << 15 else labels
    slots = torch.sort(narrow, stable=True).indices
    return torch.empty_like(picks).scatter_(0, slots, picks)


def _offset_table(sides_max: list[int], strides: list[int], device: torch.device) -> torch.Tensor:
    """``(prod(sides_max), prod(sides_max))`` flat offsets of the voxels of every box shape.

    Row ``shape`` (row-major over the sides minus one) lists the offsets of a box of those sides
    in row-major order; only its first ``prod(sides)`` entries are meaningful.
    """
    count = math.prod(sides_max)
    shapes = torch.cartesian_prod(*[torch.arange(1, m + 1, device=device) for m in sides_max]).view(count, -1)
    local = torch.arange(count, device=device).expand(count, -1)
    table = torch.zeros_like(local)
    for axis in range(len(sides_max) - 1, -1, -1):  # last axis fastest
        side = shapes[:, axis, None]
        table = table + (local % side) * strides[axis]
        local = local // side
    return table


def _origin(starts: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """``(B, n)`` long flat index of every block's first voxel (Python strides: no tensor from a list)."""
    origin = starts[..., 0].long() * strides[0]
    for axis in range(1, len(strides)):
        origin = origin + starts[..., axis].long() * strides[axis]
    return origin


def _trailing_offsets(trail: list[int], strides: list[int], sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat offsets of every trailing-axis cell of the largest block, and which ones each block covers.

    Args:
        trail: largest block side per trailing axis (axes 1..D-1).
        strides: their flat strides.
        sizes: ``(B, n, D)`` block sides.

    Returns:
        ``(offsets, inside)``: ``(K,)`` long flat offsets, ``K = prod(trail)``, row-major; and
        ``(B, n, K)`` boolean, true where the offset lies inside the block's trailing sides.
    """
    device = sizes.device
    offsets = torch.zeros(1, dtype=torch.long, device=device)
    inside = torch.ones(*sizes.shape[:2], 1, dtype=torch.bool, device=device)
    for axis, (m, stride) in enumerate(zip(trail, strides), start=1):
        step = torch.arange(m, device=device)
        offsets = (offsets[:, None] + step * stride).flatten()
        inside = (inside[..., :, None] & (step < sizes[..., axis, None, None])).flatten(2)
    return offsets, inside


def block_owner_static(spatial: list[int], max_sides: list[int], starts: torch.Tensor,
                       sizes: torch.Tensor) -> torch.Tensor:
    """:func:`block_owner` with fixed shapes: no class counts read on the host (for a GPU).

    Args:
        spatial: spatial sizes ``D``.
        max_sides: largest block side per axis (bounds ``sizes``).
        starts, sizes: ``(B, n, D)`` integer block origins and sides; blocks lie inside the volume.

    Returns:
        ``(B, *spatial)`` int32 owner map, equal to :func:`block_owner`'s.

    Every block writes its index at its first row along axis 0, over all ``prod(max_sides[1:])``
    trailing offsets of the largest block (18 for 6x6x3), into a layer of its own axis-0 side;
    offsets outside the block write a no-op ``-1`` at the block's first voxel. One deterministic ``scatter_reduce`` (amax: the
    last block wins) per fixed chunk of samples paints all layers; then, from the deepest layer
    down, the running map grows by one row along axis 0 and takes the max with the next layer
    (Horner's scheme, as in :func:`block_owner`, with the classes told apart by layer instead of
    by a sort). No Python loop over blocks or classes, no ``nonzero``, no ``.item()``.
    """
    b, n, d = starts.shape
    device = starts.device
    volume = math.prod(spatial)
    strides = [math.prod(spatial[i + 1:]) for i in range(d)]
    depth = max_sides[0]
    offsets, inside = _trailing_offsets(max_sides[1:], strides[1:], sizes)
    origin = _origin(starts, strides)
    layer = (sizes[..., 0].long() - 1).clamp(0, depth - 1)  # blocks of axis-0 side s go to layer s - 1
    budget = _CPU_CHUNK_WRITES if device.type == "cpu" else _GPU_CHUNK_WRITES
    step = min(b, max(1, budget // (n * offsets.numel())))  # samples per scatter: a fixed number
    ids = torch.arange(n, dtype=torch.int32, device=device)[:, None].expand(n, offsets.numel())
    ids = ids.flatten().repeat(step)  # the block index of every write of a chunk
    out = torch.empty(b, volume, dtype=torch.int32, device=device)
    for i in range(0, b, step):
        k = min(step, b - i)
        # layers of k samples, flat: (depth, k, volume)
        sample = torch.arange(k, device=device)[:, None] * volume
        base = layer[i:i + k] * (k * volume) + sample + origin[i:i + k]  # (k, n)
        # offsets outside a block write -1 (a no-op for amax) at the block's own first voxel: spread
        # over the blocks, not all onto one dummy slot (on a GPU, ~60 % of the writes would be
        # atomics on a single address, serialised)
        keep = inside[i:i + k]
        index = torch.where(keep, base[..., None] + offsets, base[..., None])
        src = torch.where(keep, ids[:index.numel()].view(index.shape), -1)
        layers = torch.full((depth * k * volume,), -1, dtype=torch.int32, device=device)
        layers.scatter_reduce_(0, index.flatten(), src.flatten(), reduce="amax")
        layers = layers.view(depth, k, spatial[0], -1)
        owner = layers[depth - 1]
        for m in range(depth - 2, -1, -1):  # grow by one row, then add the blocks one row shorter
            grown = torch.cat([owner[:, :1], torch.maximum(owner[:, 1:], owner[:, :-1])], dim=1)
            owner = torch.maximum(grown, layers[m])
        out[i:i + k] = owner.reshape(k, volume)
    return out.view(b, *spatial)


def block_owner(spatial: list[int], max_sides: list[int], starts: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Index of the last block covering each voxel (``-1`` where no block does).

    Args:
        spatial: spatial sizes ``D``.
        max_sides: largest block side per axis (bounds ``sizes``).
        starts, sizes: ``(B, n, D)`` integer block origins and sides; blocks lie inside the volume.

    Returns:
        ``(B, *spatial)`` int32 owner map.

    Blocks are painted (a deterministic ``scatter_reduce`` amax of block indices: the last block
    wins) over their trailing axes only, at their first row along axis 0, and grown along axis 0
    afterwards, which cuts the voxel writes 3.5-fold for 6x6x3 blocks. Horner style, from the
    deepest blocks down: paint the blocks of axis-0 side ``m``, grow everything painted so far by
    one row along axis 0, paint the blocks of side ``m - 1``, grow, ..., paint those of side 1.
    Blocks of one class (axis-0 side, trailing sides) are painted together, so the Python loop runs
    over at most ``prod(max_sides)`` classes (108 for 6x6x3), never over blocks or voxels.
    """
    b, n, d = starts.shape
    device = starts.device
    volume = math.prod(spatial)
    strides = [math.prod(spatial[i + 1:]) for i in range(d)]
    depth, trail = max_sides[0], max_sides[1:]
    per_layer = math.prod(trail)
    # Class id: deepest axis-0 side first (painting order), then the trailing sides. Narrow ints
    # sort several times faster than int64 (int16 for up to 2**15 classes).
    narrow = torch.int16 if depth * per_layer < 1 << 15 else torch.int32
    shape_class = (depth - sizes[..., 0]).to(narrow)
    for axis, m in enumerate(trail, start=1):
        shape_class = shape_class * m + (sizes[..., axis] - 1).to(narrow)
    base = (_origin(starts, strides) + torch.arange(b, device=device)[:, None] * volume).flatten()
    order = torch.sort(shape_class.flatten(), stable=True)
    base = base.index_select(0, order.indices)
    ids = torch.arange(n, dtype=torch.int32, device=device).repeat(b).index_select(0, order.indices)
    counts = torch.bincount(order.values, minlength=depth * per_layer).tolist()
    table = _offset_table(trail, strides[1:], device) if trail else torch.zeros(1, 1, dtype=torch.long, device=device)
    owner = torch.full((b * volume,), -1, dtype=torch.int32, device=device)
    spare = torch.empty_like(owner)  # growing ping-pongs between two buffers: one pass, no copy
    first = 0
    for cls, count in enumerate(counts):
        shape = cls % per_layer
        if count:
            cells = math.prod(shape // math.prod(trail[i + 1:]) % m + 1 for i, m in enumerate(trail))
            index = (base[first:first + count, None] + table[shape, :cells]).flatten()
            src = ids[first:first + count, None].expand(-1, cells).flatten()
            owner.scatter_reduce_(0, index, src, reduce="amax")
            first += count
        if shape == per_layer - 1 and cls < len(counts) - 1:  # a layer is done: grow by one row
            rows, grown = owner.view(b, spatial[0], -1), spare.view(b, spatial[0], -1)
            grown[:, 0] = rows[:, 0]
            torch.maximum(rows[:, 1:], rows[:, :-1], out=grown[:, 1:])
            owner, spare = spare, owner
    return owner.view(b, *spatial)


def local_pixel_shuffle(x: torch.Tensor, generator: torch.Generator, num_blocks: int = 10000,
                        max_block_fraction: float = 0.1, prob: float = 1.0, selected: torch.Tensor | None = None,
                        static_shapes: bool | None = None, inplace: bool = False) -> torch.Tensor:
    """Shuffle voxels inside many small random blocks (see the module docstring for semantics).

    Args:
        x: ``(B, C, *spatial)`` batch (2D or 3D), any device.
        generator: source of randomness (CPU or on ``x``'s device).
        num_blocks: blocks per sample (Models Genesis: 10,000); at most ``2**19``.
        max_block_fraction: largest block side as a fraction of the axis (``dim // 10`` at 0.1);
            at least 1 voxel.
        prob: per-sample probability of applying the distortion.
        selected: ``(B,)`` boolean, the samples to shuffle, instead of drawing them with ``prob``.
        static_shapes: ``True``: shuffle every sample and keep the selected ones (fixed shapes,
            no host synchronisation); ``False``: shuffle only the selected samples (cheaper on a
            CPU); ``None``: static off the CPU. Both give the same result.
        inplace: subset path only: write into ``x`` (for callers that own it); use the
            returned tensor either way.

    Returns:
        A new tensor like ``x`` with every sample's histogram kept.

    Raises:
        ValueError: on a badly shaped input or a setting out of range.
    """
    check_batch(x)
    if not 1 <= num_blocks <= 1 << 19:
        raise ValueError(f"num_blocks must be in [1, {1 << 19}], got {num_blocks}")
    if not 0.0 < max_block_fraction <= 1.0:
        raise ValueError(f"max_block_fraction must be in (0, 1], got {max_block_fraction}")
    b, c, *spatial = x.shape
    volume = math.prod(spatial)
    static = resolve_static(static_shapes, x.device)
    selected = bernoulli_or(selected, b, prob, generator, x.device)
    max_sides = [max(1, int(s * max_block_fraction)) for s in spatial]
    starts, sizes = _random_blocks(b, num_blocks, spatial, max_sides, generator, x.device)
    # Labels 0..num_blocks (owner + 1) take the high bits of an int32 sort key, 15 noise bits the rest.
    noise_bits = min(15, 31 - num_blocks.bit_length())
    # Drawn for every sample, selected or not, so that both paths consume the generator alike.
    noise = random_words(b * volume, generator, x.device, noise_bits).view(b, volume)

    def shuffle(sub: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        # off the CPU the subset path keeps the static painter too: its only sync is finding the subset
        paint = block_owner_static if static or x.device.type != "cpu" else block_owner
        owner = paint(spatial, max_sides, take(starts, idx), take(sizes, idx)).view(sub.shape[0], volume)
        return _permute_blocks(sub, owner, take(noise, idx), num_blocks, noise_bits)

    return apply_to_subset(x, selected, shuffle, inplace=inplace, static=static)


def _random_blocks(b: int, n: int, spatial: list[int], max_sides: list[int], generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, sizes)``, each ``(b, n, D)`` int32: sides in 1..max, origins in 0..dim-side.

    Both inclusive, like ``random.randint``: ``floor(w * k / 2**15)`` of a 15-bit random word ``w``
    for ``k`` choices (uniform to within ``k / 2**15``, under 0.2 % for 64 choices), in int32
    arithmetic (exact for axes below 65,536 voxels). A quarter of the generator calls and half the
    time of float32 uniforms: these tensors are large (``2 * b * n * D`` draws).
    """
    d = len(spatial)
    w = random_words(2 * b * n * d, generator, device).view(2, b, n, d).to(torch.int32)
    sizes = w[0].mul_(axis_tensor(max_sides, device, torch.int32)).bitwise_right_shift_(15).add_(1)
    choices = axis_tensor([s + 1 for s in spatial], device, torch.int32) - sizes  # origins 0 .. dim - side
    starts = w[1].mul_(choices).bitwise_right_shift_(15)
    return starts, sizes


def _permute_blocks(sub: torch.Tensor, owner: torch.Tensor, noise: torch.Tensor, num_blocks: int,
                    noise_bits: int) -> torch.Tensor:
    """Permute every sample's voxels within its blocks; all channels alike.

    Args:
        sub: ``(k, C, *spatial)`` batch.
        owner: ``(k, V)`` owner map (``-1`` outside every block).
        noise: ``(k, V)`` random words of ``noise_bits`` bits.
        num_blocks: blocks per sample (bounds the labels).
        noise_bits: bits of ``noise``.

    Returns:
        The shuffled batch, shaped like ``sub``.
    """
    n_sub, c = sub.shape[:2]
    volume = owner.shape[1]
    flat = sub.reshape(n_sub, c, volume)
    out = torch.empty_like(flat)
    budget = _CPU_CHUNK_VOXELS if sub.device.type == "cpu" else _GPU_CHUNK_VOXELS
    step = max(1, budget // volume)
    for i in range(0, n_sub, step):
        k = min(step, n_sub - i)
        labels = owner[i]
        if k > 1:  # offsetting labels per sample keeps the samples of a chunk apart
            offset = (num_blocks + 1) * torch.arange(k, device=sub.device)[:, None]
            labels = owner[i:i + k].long() + torch.where(owner[i:i + k] >= 0, offset, 0)
        src = permute_within_labels(labels.flatten(), noise[i:i + k].flatten(), noise_bits, k * (num_blocks + 1))
        # Channels share the permutation: gather along the (sample, voxel) axis of (C, k*V).
        if k == 1:
            torch.index_select(flat[i], 1, src, out=out[i])
        else:
            chunk = flat[i:i + k].transpose(0, 1).reshape(c, k * volume)
            out[i:i + k] = chunk.index_select(1, src).view(c, k, volume).transpose(0, 1)
    return out.view(sub.shape)
