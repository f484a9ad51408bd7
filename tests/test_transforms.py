"""Tests of dira3d.transforms: invariants of every distortion, composition statistics, views, wrappers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import requires_cuda

from dira3d.transforms import (
    DiRA2DDistortion,
    ModelsGenesisDistortion,
    RandDistortiond,
    RandViewd,
    RandViewsd,
    TransVWDistortion,
    ViewAugment,
    build_distortion,
    cutout,
    elastic_inplane,
    gaussian_blur,
    inpaint,
    local_pixel_shuffle,
    nonlinear_intensity,
    outer_cutout,
    outpaint,
    patch_swap,
    random_flip,
    random_views,
)
from dira3d.transforms.intensity import _interpolate, bezier_lookup
from dira3d.transforms.shuffle import block_owner, permute_within_labels


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 123) -> torch.Tensor:
    return torch.rand(shape, generator=gen(seed))


SHAPES = [(3, 1, 24, 24, 12), (3, 2, 32, 32)]

# Each distortion as f(x, generator) with settings that always apply it.
DISTORTIONS = {
    "nonlinear": lambda x, g: nonlinear_intensity(x, g),
    "shuffle": lambda x, g: local_pixel_shuffle(x, g, num_blocks=300),
    "inpaint": lambda x, g: inpaint(x, g),
    "outpaint": lambda x, g: outpaint(x, g),
    "flip": lambda x, g: random_flip(x, x, g, prob=0.9)[0],
    "elastic": lambda x, g: elastic_inplane(x, g, alpha=200.0, sigma=4.0),
    "cutout": lambda x, g: cutout(x, g, prob=1.0, size=(3, 8)),
    "outer_cutout": lambda x, g: outer_cutout(x, g, prob=1.0),
    "patch_swap": lambda x, g: patch_swap(x, g, prob=1.0, swaps=4, size=(2, 4)),
}


@pytest.mark.parametrize("shape", SHAPES, ids=["3d", "2d"])
@pytest.mark.parametrize("name", sorted(DISTORTIONS))
def test_shape_range_and_seeds(name: str, shape: tuple[int, ...]) -> None:
    x = rand(*shape)
    fn = DISTORTIONS[name]
    out = fn(x, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, fn(x, gen(1))), "same seed must give the same output"
    assert not torch.equal(out, fn(x, gen(2))), "a different seed must give a different output"
    assert not torch.equal(out, x)


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="spatial"):
        inpaint(torch.rand(8, 8), gen())
    with pytest.raises(ValueError, match="floating"):
        nonlinear_intensity(torch.zeros(1, 1, 8, 8, dtype=torch.long), gen())
    with pytest.raises(ValueError, match="probability"):
        local_pixel_shuffle(torch.rand(1, 1, 8, 8), gen(), prob=1.5)


# --- non-linear intensity -------------------------------------------------------------------

def test_bezier_is_monotone_with_exact_endpoints_and_inverts_half_the_time() -> None:
    ramp = torch.linspace(0, 1, 500).view(1, 1, 500, 1).repeat(64, 1, 1, 1)
    out = nonlinear_intensity(ramp, gen(5))[:, 0, :, 0]
    increasing = (out.diff(dim=1) >= 0).all(dim=1)
    decreasing = (out.diff(dim=1) <= 0).all(dim=1)
    assert bool((increasing | decreasing).all()), "every curve must be monotone"
    assert torch.allclose(out[increasing, 0], torch.zeros(1)) and torch.allclose(out[increasing, -1], torch.ones(1))
    assert torch.allclose(out[decreasing, 0], torch.ones(1)) and torch.allclose(out[decreasing, -1], torch.zeros(1))
    assert 16 <= int(decreasing.sum()) <= 48  # inverse_prob 0.5 over 64 curves
    assert float(out.std(dim=1).min()) > 0.05  # not a constant map


def test_bezier_interpolation_matches_numpy_interp() -> None:
    controls = torch.tensor([[0.9, 0.1, 0.2, 0.8]])
    xs, ys = bezier_lookup(controls, torch.tensor([False]), num_points=2000)
    values = torch.rand(1, 3000, generator=gen())
    ours = _interpolate(values, xs, ys)
    expected = np.interp(values.numpy()[0], xs.numpy()[0], ys.numpy()[0])
    np.testing.assert_allclose(ours.numpy()[0], expected, atol=2e-3)
    # The curve itself at t: x = 3(1-t)^2 t r1 + 3(1-t) t^2 r3 + t^3; at t = 0.5: 0.375*0.9 + 0.375*0.2 + 0.125.
    assert abs(float(np.interp(0.5375, xs[0].numpy(), ys[0].numpy())) - (0.375 * 0.1 + 0.375 * 0.8 + 0.125)) < 0.05


def test_randint_between_takes_python_ints_and_tensors_alike() -> None:
    from dira3d.transforms._common import randint_between

    u = torch.linspace(0, 1 - 1e-7, 1000)
    assert set(randint_between(2, 5, u).tolist()) == {2, 3, 4, 5}
    low, high = torch.full((1000,), 2), torch.full((1000,), 5)
    for lo, hi in ((low, 5), (2, high), (low, high)):
        assert torch.equal(randint_between(lo, hi, u), randint_between(2, 5, u))
    assert bool((randint_between(7, torch.full((1000,), 3), u) == 7).all())  # high < low gives low
    assert bool((randint_between(torch.full((1000,), 7), 3, u) == 7).all())


def test_noise_fill_is_uniform_on_a_15_bit_grid() -> None:
    from dira3d.transforms._common import noise_uniform

    u = noise_uniform((200_000,), gen(1), "cpu")
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**15, torch.floor(u * 2**15))
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12 ** -0.5) < 0.01
    assert noise_uniform((4,), gen(1), "cpu", dtype=torch.float16).dtype == torch.float16


def test_prob_zero_leaves_input_untouched() -> None:
    x = rand(4, 1, 16, 16, 8)
    assert torch.equal(nonlinear_intensity(x, gen(), prob=0.0), x)
    assert torch.equal(local_pixel_shuffle(x, gen(), prob=0.0, num_blocks=50), x)
    assert torch.equal(inpaint(x, gen(), prob=0.0), x)
    assert torch.equal(outpaint(x, gen(), prob=0.0), x)
    assert torch.equal(elastic_inplane(x, gen(), prob=0.0), x)


# --- local pixel shuffling ------------------------------------------------------------------

@pytest.mark.parametrize("spatial", [(24, 20, 12), (40, 30)])
def test_shuffle_keeps_histogram_and_moves_values_only_locally(spatial: tuple[int, ...]) -> None:
    b, c = 2, 2
    n = int(np.prod(spatial))
    # Unique values: each output value tells where it came from.
    x = torch.stack([torch.randperm(n * c, generator=gen(s)).float() / (n * c) for s in range(b)]).view(b, c, *spatial)
    out = local_pixel_shuffle(x, gen(3), num_blocks=400)
    assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    moved = (out != x).flatten(1).float().mean(dim=1)
    assert bool((moved > 0.03).all())
    max_side = torch.tensor([max(1, int(s * 0.1)) for s in spatial])
    for i in range(b):
        lookup = {float(v): idx for idx, v in np.ndenumerate(x[i].numpy())}
        for dst, v in np.ndenumerate(out[i].numpy()):
            src = lookup[float(v)]
            assert src[0] == dst[0], "a voxel must keep its channel"  # same permutation for all channels
            assert all(abs(a - bb) < m for a, bb, m in zip(src[1:], dst[1:], max_side.tolist())), (src, dst)


def test_shuffle_channels_share_the_permutation() -> None:
    x = rand(2, 1, 20, 20, 10)
    out = local_pixel_shuffle(torch.cat([x, 1 - x], dim=1), gen(4), num_blocks=200)
    assert torch.allclose(out[:, 1], 1 - out[:, 0])


@pytest.mark.parametrize("num_labels", [None, 1 << 20])  # int32 keys, and int64 keys (wide labels)
def test_permute_within_labels_is_a_permutation_inside_each_label(num_labels: int | None) -> None:
    labels = torch.randint(-1, 30, (600,), generator=gen(1), dtype=torch.int32)  # not contiguous; -1 = fixed
    noise = torch.randint(0, 1 << 11, (600,), generator=gen(2), dtype=torch.int32)
    src = permute_within_labels(labels, noise, 11, num_labels)
    assert torch.equal(src.sort().values, torch.arange(600))
    assert torch.equal(labels[src], labels)
    fixed = labels == -1
    assert torch.equal(src[fixed], torch.arange(600)[fixed])
    assert int((src != torch.arange(600))[~fixed].sum()) > 500 * 0.9
    # Hand-made case: position k of a label takes the label's k-th position in (noise, position) order.
    src = permute_within_labels(torch.tensor([1, 0, 1, -1, 1]), torch.tensor([5, 7, 2, 9, 5]), 3)
    assert src.tolist() == [2, 1, 0, 3, 4]


@pytest.mark.parametrize("spatial, max_sides", [([9, 8, 7], [3, 2, 3]), ([12, 9], [4, 3])])
def test_block_owner_is_the_last_block_covering_each_voxel(spatial: list[int], max_sides: list[int]) -> None:
    g, d = gen(6), len(spatial)
    sizes = (torch.rand(2, 40, d, generator=g) * torch.tensor(max_sides)).long() + 1
    starts = (torch.rand(2, 40, d, generator=g) * (torch.tensor(spatial) - sizes + 1)).long()
    owner = block_owner(spatial, max_sides, starts, sizes)
    expected = torch.full((2, *spatial), -1, dtype=torch.int32)
    for i, k in itertools.product(range(2), range(40)):  # paint box after box: the last one wins
        box = tuple(slice(a, a + s) for a, s in zip(starts[i, k].tolist(), sizes[i, k].tolist()))
        expected[(i, *box)] = k
    assert owner.dtype == torch.int32 and torch.equal(owner, expected)


def test_shuffle_does_not_depend_on_how_many_samples_are_sorted_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # One sample per sort (int32 keys, the CPU default at 64x64x32) and all samples in one sort
    # (int64 keys, as on a GPU) must agree exactly: this is what makes CUDA match the CPU.
    from dira3d.transforms import shuffle as shuffle_module
    x = rand(3, 2, 20, 20, 10)
    monkeypatch.setattr(shuffle_module, "_CPU_CHUNK_VOXELS", 1)
    one_at_a_time = local_pixel_shuffle(x, gen(8), num_blocks=300)
    monkeypatch.setattr(shuffle_module, "_CPU_CHUNK_VOXELS", 1 << 24)
    assert torch.equal(local_pixel_shuffle(x, gen(8), num_blocks=300), one_at_a_time)


def test_few_blocks_leave_most_voxels_untouched() -> None:
    x = rand(3, 1, 30, 30, 20)
    out = local_pixel_shuffle(x, gen(), num_blocks=1)
    changed = (out != x).flatten(1).sum(dim=1)
    assert bool((changed <= 3 * 3 * 2).all())  # one block of at most 3x3x2 voxels


# --- painting -------------------------------------------------------------------------------

@pytest.mark.parametrize("spatial", [(36, 30, 18), (42, 36)])
def test_inpaint_one_box_has_reference_sides_and_outside_is_untouched(spatial: tuple[int, ...]) -> None:
    x = torch.full((6, 2, *spatial), 0.5)
    out, mask = inpaint(x, gen(7), max_boxes=1, continue_prob=1.0, return_mask=True)
    assert torch.equal(out[~mask[:, None].expand_as(out)], x[~mask[:, None].expand_as(x)])
    assert bool((out[mask[:, None].expand_as(out)] != 0.5).all())  # noise inside
    for m in mask:
        idx = torch.nonzero(m)
        lo, hi = idx.min(dim=0).values, idx.max(dim=0).values
        sides = hi - lo + 1
        assert int(m.sum()) == int(sides.prod()), "one box: the mask is a full box"
        for axis, s in enumerate(spatial):
            assert s // 6 <= int(sides[axis]) <= s // 3
            assert int(lo[axis]) >= 3 and int(hi[axis]) <= s - 4


def test_inpaint_box_count_follows_the_continue_coin() -> None:
    x = torch.full((200, 1, 24, 24, 12), 0.5)
    _, mask = inpaint(x, gen(8), continue_prob=0.5, return_mask=True)
    empty = float((mask.flatten(1).sum(dim=1) == 0).float().mean())
    assert 0.38 <= empty <= 0.62  # P(no box) = 1 - 0.5


@pytest.mark.parametrize("spatial", [(42, 35, 21), (49, 42)])
def test_outpaint_keeps_windows_and_fills_the_rest(spatial: tuple[int, ...]) -> None:
    x = rand(6, 1, *spatial)
    out, kept = outpaint(x, gen(9), max_windows=1, return_mask=True)
    k = kept[:, None]
    assert torch.equal(out[k], x[k])
    assert float((out[~k] != x[~k]).float().mean()) > 0.99
    for m in kept:
        idx = torch.nonzero(m)
        sides = idx.max(dim=0).values - idx.min(dim=0).values + 1
        assert int(m.sum()) == int(sides.prod())
        for axis, s in enumerate(spatial):
            assert s - 4 * s // 7 <= int(sides[axis]) <= s - 3 * s // 7
    many = outpaint(x, gen(10), return_mask=True)[1]
    assert bool((many.flatten(1).sum(dim=1) >= kept.flatten(1).sum(dim=1).min() // 2).all())


def test_cutout_and_outer_cutout_masks() -> None:
    x = rand(8, 1, 40, 40)
    out, mask = cutout(x, gen(1), prob=1.0, max_boxes=3, size=(4, 9), fill="zero", return_mask=True)
    m = mask[:, None]
    assert torch.equal(out[~m], x[~m]) and bool((out[m] == 0).all()) and bool(mask.flatten(1).any(dim=1).all())
    out, kept = outer_cutout(x, gen(2), prob=1.0, return_mask=True)
    k = kept[:, None]
    assert torch.equal(out[k], x[k]) and float((out[~k] != x[~k]).float().mean()) > 0.99
    share = kept.flatten(1).float().mean(dim=1)
    assert bool((share >= 0.25 ** 2 - 0.01).all()) and bool((share <= 0.75 ** 2 + 0.01).all())


def test_patch_swap_keeps_the_multiset_and_moves_whole_boxes() -> None:
    x = torch.arange(2 * 30 * 30, dtype=torch.float32).view(2, 1, 30, 30) / 1800
    out = patch_swap(x, gen(3), prob=1.0, swaps=1, size=(5, 5))
    assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    for i in range(2):
        changed = (out[i, 0] != x[i, 0]).sum()
        assert int(changed) in (0, 50)  # one swap of two disjoint 5x5 boxes (or a skipped overlap)
    assert int((out != x).sum()) > 0


# --- spatial --------------------------------------------------------------------------------

def test_flip_is_applied_equally_to_input_and_target() -> None:
    x = rand(32, 1, 8, 6, 4)
    target = x * 0.5
    out, tgt = random_flip(x, target, gen(4), prob=0.7)
    assert torch.allclose(tgt, out * 0.5)
    flips = list(itertools.product([False, True], repeat=3))
    for i in range(32):
        candidates = [x[i].flip([1 + a for a in range(3) if f[a]]) if any(f) else x[i] for f in flips]
        assert any(torch.equal(out[i], c) for c in candidates)
    assert 0 < int((out != x).flatten(1).any(dim=1).sum()) < 32


@pytest.mark.parametrize("name", ["models_genesis", "transvw", "dira2d", "none"])
def test_a_separate_restoration_target_gets_the_input_flips_and_nothing_else(name: str) -> None:
    x = rand(8, 1, 16, 16, 8)
    comp = build_distortion(name, flip_prob=0.7) if name in ("models_genesis", "transvw") else build_distortion(name)
    distorted, target = comp(x, gen(5))
    distorted2, target2 = comp(x, gen(5), target=x * 0.5)  # same draws: only the target differs
    assert torch.equal(distorted2, distorted)
    assert torch.allclose(target2, target * 0.5)


def test_views_return_their_crop_before_the_intensity_steps() -> None:
    x = rand(6, 1, 16, 16, 8)
    aug = ViewAugment(3, scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=1.0, noise_prob=1.0, blur_prob=1.0)
    v1, v2 = aug(x, gen(3))
    c1, c2, clean = aug(x, gen(3), return_clean=True)
    assert torch.equal(c1, v1) and torch.equal(c2, v2)  # the views do not change
    assert torch.allclose(clean, x, atol=1e-5)  # an identity crop, no jitter / noise / blur
    assert (v1 - x).abs().mean() > 0.01


def test_elastic_warp_is_inplane_and_identity_without_displacement() -> None:
    base = rand(2, 1, 24, 24, 1)
    x = base.expand(2, 1, 24, 24, 6).contiguous()  # constant along z
    out = elastic_inplane(x, gen(5), alpha=300.0, sigma=4.0)
    assert torch.allclose(out, out[..., :1].expand_as(out)), "the same field must warp every slice"
    assert float((out - x).abs().mean()) > 0.01
    assert torch.allclose(elastic_inplane(x, gen(5), alpha=0.0), x, atol=1e-5)


# --- compositions ---------------------------------------------------------------------------

def _border_changed(distorted: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (distorted[:, :, 0] != x[:, :, 0]).flatten(1).all(dim=1)


def test_transvw_applies_exactly_one_with_the_given_frequencies() -> None:
    x = rand(400, 1, 16, 16, 8)
    comp = TransVWDistortion(elastic_prob=0.0, num_blocks=100)
    distorted, target, applied = comp.sample(x, gen(11))
    assert torch.equal(target, x)
    chosen = torch.stack([applied[n] for n in comp.names], dim=1)
    assert bool((chosen.sum(dim=1) == 1).all())
    freq = chosen.float().mean(dim=0)
    assert bool(((freq - 0.25).abs() < 0.08).all()), freq
    # The record is truthful: each flagged sample shows its distortion's signature.
    sh = applied["shuffle"]
    assert torch.equal(distorted[sh].flatten(1).sort(1).values, x[sh].flatten(1).sort(1).values)
    assert bool(_border_changed(distorted, x)[applied["outpaint"]].all())  # border (margin 3) is always noise
    assert not bool(_border_changed(distorted, x)[applied["inpaint"]].any())  # boxes stay 3 voxels inside
    nl = applied["nonlinear"]
    order = x[nl].flatten(1).argsort(dim=1)
    mapped = distorted[nl].flatten(1).gather(1, order).diff(dim=1)
    assert bool(((mapped >= -1e-6).all(dim=1) | (mapped <= 1e-6).all(dim=1)).all())


def test_models_genesis_probabilities_and_flips() -> None:
    x = rand(400, 1, 16, 16, 8)
    distorted, target, applied = ModelsGenesisDistortion(num_blocks=100).sample(x, gen(12))
    expected = {"shuffle": 0.5, "nonlinear": 0.9, "inpaint": 0.9 * 0.2, "outpaint": 0.9 * 0.8}
    for name, p in expected.items():
        assert abs(float(applied[name].float().mean()) - p) < 0.08, name
    assert not bool((applied["inpaint"] & applied["outpaint"]).any())
    flipped = float((target != x).flatten(1).any(dim=1).float().mean())
    assert abs(flipped - 0.368) < 0.08  # P(net flip) for up to 3 flips with p 0.4 over 3 axes
    untouched = ~(applied["shuffle"] | applied["nonlinear"] | applied["inpaint"] | applied["outpaint"])
    assert torch.equal(distorted[untouched], target[untouched])


def test_dira2d_choice_frequencies() -> None:
    x = rand(400, 1, 32, 32)
    comp = DiRA2DDistortion(cutout_size=(3, 8), swap_size=(2, 4))
    distorted, target, applied = comp.sample(x, gen(13))
    chosen = torch.stack([applied[n] for n in comp.names], dim=1)
    assert bool((chosen.sum(dim=1) <= 1).all())
    for i, p in enumerate((0.3, 0.05, 0.3)):
        assert abs(float(chosen[:, i].float().mean()) - p) < 0.07
    none = ~chosen.any(dim=1)
    assert abs(float(none.float().mean()) - 0.35) < 0.08
    assert torch.equal(distorted[none], x[none]) and torch.equal(target, x)


def test_build_distortion_names_overrides_and_errors() -> None:
    x = rand(2, 1, 16, 16, 8)
    d, t = build_distortion("none")(x, gen())
    assert torch.equal(d, x) and torch.equal(t, x)
    comp = build_distortion("transvw", inpaint_prob=1.0, shuffle_prob=0, nonlinear_prob=0, outpaint_prob=0)
    assert comp.probs == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unknown distortion"):
        build_distortion("genesis")
    with pytest.raises(ValueError, match="no setting"):
        build_distortion("models_genesis", flip=0.1)
    with pytest.raises(ValueError, match="sum"):
        build_distortion("transvw", shuffle_prob=0.9)


# --- views ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=["3d", "2d"])
def test_views_are_independent_reproducible_and_in_range(shape: tuple[int, ...]) -> None:
    x = rand(*shape)
    aug = ViewAugment(len(shape) - 2)
    v1, v2 = aug(x, gen(1))
    w1, w2 = aug(x, gen(1))
    assert v1.shape == x.shape and torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.equal(v1, v2)
    assert float(v1.min()) >= 0 and float(v1.max()) <= 1
    with pytest.raises(ValueError, match="unknown view setting"):
        ViewAugment(2, colour=0.4)


def test_view_without_augmentation_is_identity_and_blur_keeps_the_mean() -> None:
    x = rand(2, 1, 16, 16, 8)
    plain = ViewAugment(3, scale=(1.0, 1.0), flip_prob=0, jitter_prob=0, gamma_prob=0, noise_prob=0, blur_prob=0)
    assert torch.allclose(random_views(x, gen(), plain.settings), x, atol=1e-5)
    flat = torch.full((2, 1, 12, 12), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat, atol=1e-6)
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    assert torch.allclose(blurred[0], x[0]) and float(blurred[1].std()) < float(x[1].std())
    # A fixed radius (the views use ceil(3 * largest configured sigma)): a sample's blur no longer
    # depends on the other samples' sigmas.
    other = gaussian_blur(x, torch.tensor([1.9, 1.5]), radius=6)
    assert torch.equal(gaussian_blur(x, torch.tensor([0.3, 1.5]), radius=6)[1], other[1])
    with pytest.raises(ValueError, match="radius"):
        gaussian_blur(x, torch.tensor([0.3, 1.5]), radius=0)


def _jitter_only(dims: int, **overrides: object) -> ViewAugment:
    return ViewAugment(dims, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0, jitter_prob=1.0, gamma_prob=0,
                       noise_prob=0, blur_prob=0, **overrides)


def test_2d_brightness_jitter_scales_as_moco_colour_jitter() -> None:
    # METHOD.md section 3: T(.) has MoCo-v2's ColorJitter(0.4, 0.4, ...): brightness multiplies by U[0.6, 1.4]
    # (black stays black), it does not add U(-0.4, 0.4); contrast 0 isolates the brightness step
    x = 0.1 + 0.4 * rand(16, 1, 12, 12)
    v1, v2 = _jitter_only(2, contrast=0.0)(x, gen(3))
    ratios = torch.cat([v1, v2]) / torch.cat([x, x])
    per_sample = ratios.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-5)  # one factor per view
    factors = per_sample[:, 0]
    assert float(factors.min()) >= 0.6 - 1e-6 and float(factors.max()) <= 1.4 + 1e-6
    assert float((factors - 1).abs().max()) > 0.1  # the factors are drawn, not 1
    black = torch.zeros(4, 1, 8, 8)
    assert torch.equal(_jitter_only(2, contrast=0.0)(black, gen(3))[0], black)
    # contrast about the mean after the brightness step, as ColorJitter does it: a flat image stays flat
    flat = torch.full((4, 1, 8, 8), 0.5)
    out = _jitter_only(2)(flat, gen(4))[0]
    assert torch.allclose(out, out.flatten(1)[:, :1, None, None].expand_as(out))
    assert ViewAugment(2).settings.brightness_kind == "scale" and ViewAugment(3).settings.brightness_kind == "shift"


def test_3d_brightness_jitter_is_a_shift() -> None:
    # 3D (our CT setting): brightness adds U(-b, b) to the [0, 1] intensities, so air (0) can brighten
    black = torch.zeros(8, 1, 8, 8, 8)
    v1, _ = _jitter_only(3, contrast=0.0)(black, gen(5))
    assert float(v1.max()) > 0.0 and float(v1.max()) <= 0.2 + 1e-6
    with pytest.raises(ValueError, match="brightness_kind must be one of"):
        random_views(black, gen(), _jitter_only(3, brightness_kind="add").settings)


# --- MONAI wrappers -------------------------------------------------------------------------

def test_dictionary_wrappers_are_reproducible_through_set_random_state() -> None:
    item = {"image": np.random.default_rng(0).random((1, 16, 16, 8), dtype=np.float32)}
    first = RandDistortiond("image", composition="transvw", num_blocks=50).set_random_state(3)(item)
    again = RandDistortiond("image", composition="transvw", num_blocks=50).set_random_state(3)(item)
    other = RandDistortiond("image", composition="transvw", num_blocks=50).set_random_state(4)(item)
    assert first["image_distorted"].shape == (1, 16, 16, 8)
    assert torch.equal(first["image_distorted"], again["image_distorted"])
    assert not torch.equal(first["image_distorted"], other["image_distorted"])
    assert torch.equal(first["image_target"], torch.as_tensor(item["image"]))  # TransVW: no flips by default
    static = RandDistortiond("image", composition="transvw", num_blocks=50, static_shapes=True).set_random_state(3)
    assert torch.equal(static(item)["image_distorted"], first["image_distorted"])  # both paths agree
    views = RandViewsd("image", spatial_dims=3).set_random_state(5)(item)
    assert views["image_view1"].shape == (1, 16, 16, 8) and not torch.equal(views["image_view1"], views["image_view2"])
    assert RandViewd is RandViewsd
    with pytest.raises(ValueError, match="channel-first"):
        RandDistortiond("image")({"image": np.zeros((4, 4), dtype=np.float32)})


# --- CUDA -----------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("name", ["models_genesis", "transvw", "dira2d"])
def test_cuda_matches_cpu_with_a_cpu_generator(name: str) -> None:
    x = rand(4, 1, 32, 32, 16) if name != "dira2d" else rand(4, 1, 64, 64)
    comp = build_distortion(name)
    d_cpu, t_cpu = comp(x, gen(21))
    d_gpu, t_gpu = comp(x.cuda(), gen(21))
    assert d_gpu.is_cuda and torch.allclose(d_gpu.cpu(), d_cpu, atol=1e-4)
    assert torch.equal(t_gpu.cpu(), t_cpu)
    # A generator on the device works too.
    d_dev, _ = comp(x.cuda(), torch.Generator(device="cuda").manual_seed(21))
    assert d_dev.is_cuda and d_dev.shape == x.shape


def test_transvw_elastic_warp_scales_with_the_patch():
    """64-voxel patches get the reference warp (alpha 991, sigma 8); others the same relative warp."""
    from dira3d.transforms.compositions import default_distortion_args

    assert default_distortion_args("transvw", (64, 64, 32)) == {"alpha": 991.0, "sigma": 8.0}
    assert default_distortion_args("transvw", (32, 32, 16)) == {"alpha": 991.0 / 4, "sigma": 4.0}
    assert default_distortion_args("models_genesis", (32, 32, 16)) == {}


def test_bezier_inverse_prob_is_the_probability_of_a_decreasing_curve() -> None:
    ramp = torch.linspace(0, 1, 200).view(1, 1, 200, 1).repeat(40, 1, 1, 1)
    for inverse_prob, decreasing_share in ((0.0, 0.0), (1.0, 1.0), (0.2, 0.2)):
        out = nonlinear_intensity(ramp, gen(6), inverse_prob=inverse_prob)[:, 0, :, 0]
        decreasing = out[:, 0] > out[:, -1]  # 1 -> 0 instead of 0 -> 1
        assert abs(float(decreasing.float().mean()) - decreasing_share) <= 0.15, inverse_prob


def test_outpaint_window_sides_are_drawn_over_the_whole_reference_range() -> None:
    """Side = dim - randint(3*dim//7, 4*dim//7): uniform between its two ends, not stuck at one of them."""
    x = rand(60, 1, 49, 42)
    _, kept = outpaint(x, gen(14), max_windows=1, return_mask=True)
    for axis, s in enumerate((49, 42)):
        sides = kept.any(dim=2 - axis).sum(dim=1).float()  # extent of the one window along the axis
        lo, hi = s - 4 * s // 7, s - 3 * s // 7
        assert int(sides.min()) == lo and int(sides.max()) == hi, (axis, sides.unique())
        assert abs(float(sides.mean()) - (lo + hi) / 2) < 1.0
