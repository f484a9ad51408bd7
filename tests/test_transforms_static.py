"""The static-shape path of the distortions and views (issue 8): same output as the subset path, no host sync.

On the CPU both paths run, so they are compared bit for bit for every distortion and composition;
``HostSyncDetector`` (a dispatch mode that records every op that would make a GPU wait for the
host) proves that the static path would not stall a GPU. A CUDA-only test checks the real thing
under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dira3d.transforms import (
    ViewAugment,
    build_distortion,
    cutout,
    elastic_inplane,
    inpaint,
    local_pixel_shuffle,
    nonlinear_intensity,
    outer_cutout,
    outpaint,
    patch_swap,
    random_flip,
)
from dira3d.transforms import shuffle as shuffle_module
from dira3d.transforms.shuffle import block_owner, block_owner_static
from dira3d.utils.host_sync import HostSyncDetector


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 123) -> torch.Tensor:
    return torch.rand(shape, generator=gen(seed))


# 3D, 2D with two channels, and odd sizes (no axis a multiple of a vector width)
SHAPES = {"3d": (4, 1, 24, 24, 12), "2d": (4, 2, 32, 32), "odd3d": (5, 1, 15, 13, 7)}

# Each distortion as f(x, generator, prob, **path) -> tensor or tuple of tensors.
FUNCTIONS = {
    "nonlinear": lambda x, g, p, **k: nonlinear_intensity(x, g, prob=p, **k),
    "shuffle": lambda x, g, p, **k: local_pixel_shuffle(x, g, num_blocks=300, prob=p, **k),
    "inpaint": lambda x, g, p, **k: inpaint(x, g, prob=p, return_mask=True, **k),
    "outpaint": lambda x, g, p, **k: outpaint(x, g, prob=p, return_mask=True, **k),
    "flip": lambda x, g, p, **k: random_flip(x, 0.5 * x, g, prob=p, **k),
    "elastic": lambda x, g, p, **k: elastic_inplane(x, g, alpha=200.0, sigma=4.0, prob=p, **k),
    "cutout": lambda x, g, p, **k: cutout(x, g, prob=p, size=(3, 8), return_mask=True, **k),
    "outer_cutout": lambda x, g, p, **k: outer_cutout(x, g, prob=p, return_mask=True, **k),
    "patch_swap": lambda x, g, p, **k: patch_swap(x, g, prob=p, swaps=4, size=(2, 4), **k),
}

# Compositions with small settings; some with extreme probabilities (0 and 1 for a stage).
COMPOSITIONS = {
    "models_genesis": ("models_genesis", {"num_blocks": 300}),
    "models_genesis_all": ("models_genesis", {"num_blocks": 300, "flip_prob": 1.0, "shuffle_prob": 1.0,
                                              "nonlinear_prob": 1.0, "paint_prob": 1.0, "inpaint_share": 1.0}),
    "models_genesis_none": ("models_genesis", {"num_blocks": 300, "flip_prob": 0.0, "shuffle_prob": 0.0,
                                               "nonlinear_prob": 0.0, "paint_prob": 0.0}),
    "transvw": ("transvw", {"num_blocks": 300, "alpha": 100.0, "sigma": 3.0}),
    "transvw_shuffle_only": ("transvw", {"num_blocks": 300, "alpha": 100.0, "sigma": 3.0, "elastic_prob": 0.0,
                                         "shuffle_prob": 1.0, "nonlinear_prob": 0.0, "inpaint_prob": 0.0,
                                         "outpaint_prob": 0.0, "flip_prob": 0.5}),
    "dira2d": ("dira2d", {"cutout_size": (3, 8), "swap_size": (2, 4)}),
    "dira2d_zero_fill": ("dira2d", {"cutout_size": (3, 8), "swap_size": (2, 4), "fill": "zero",
                                    "cutout_prob": 0.5, "outer_cutout_prob": 0.5, "patch_swap_prob": 0.0}),
    "none": ("none", {}),
}


def _as_tuple(out: torch.Tensor | tuple) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _assert_same(a: tuple, b: tuple) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
        else:
            assert u.dtype == v.dtype and torch.equal(u, v), f"max difference {(u.float() - v.float()).abs().max()}"


# --- bit-identical paths on the CPU ---------------------------------------------------------

@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_distortion_gives_the_same_result_on_both_paths(name: str, prob: float, shape: str) -> None:
    fn = FUNCTIONS[name]
    for seed in (0, 1):
        x = rand(*SHAPES[shape], seed=seed + 10)
        static = _as_tuple(fn(x, gen(seed), prob, static_shapes=True))
        subset = _as_tuple(fn(x, gen(seed), prob, static_shapes=False))
        _assert_same(static, subset)
        assert torch.equal(_as_tuple(fn(x, gen(seed), prob))[0], subset[0]), "the CPU default is the subset path"
        if prob == 0.0:
            assert torch.equal(static[0], x)


@pytest.mark.parametrize("name", sorted(set(FUNCTIONS) - {"flip"}))  # flips have no selection
def test_a_given_selection_replaces_the_draw_and_consumes_the_generator_alike(name: str) -> None:
    # selected= is how a composition chooses the samples: the same draws whatever the selection
    fn = FUNCTIONS[name]
    x = rand(*SHAPES["3d"])
    for selected in ([True, False, True, False], [False] * 4, [True] * 4):
        sel = torch.tensor(selected)
        for static in (True, False):
            g = gen(3)
            out = _as_tuple(fn(x, g, 0.5, selected=sel, static_shapes=static))[0]
            after = torch.rand(1, generator=g)
            assert torch.equal(out[~sel], x[~sel])
            g_ref = gen(3)
            _as_tuple(fn(x, g_ref, 0.5, selected=torch.ones(4, dtype=torch.bool), static_shapes=static))
            assert torch.equal(after, torch.rand(1, generator=g_ref)), "the draws must not depend on the selection"


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_every_composition_gives_the_same_result_on_both_paths(name: str) -> None:
    kind, overrides = COMPOSITIONS[name]
    shapes = [SHAPES["2d"], (4, 1, 40, 36)] if kind == "dira2d" else [SHAPES["3d"], SHAPES["odd3d"], SHAPES["2d"]]
    for shape, seed in itertools.product(shapes, range(3)):
        x = rand(*shape, seed=seed + 20)
        static = build_distortion(kind, static_shapes=True, **overrides).sample(x, gen(seed))
        subset = build_distortion(kind, static_shapes=False, **overrides).sample(x, gen(seed))
        _assert_same(static[:2], subset[:2])
        assert static[2].keys() == subset[2].keys()
        _assert_same(tuple(static[2].values()), tuple(subset[2].values()))


@pytest.mark.parametrize("dims", [2, 3])
def test_views_give_the_same_result_on_both_settings(dims: int) -> None:
    x = rand(*(SHAPES["3d"] if dims == 3 else SHAPES["2d"]))
    for seed in range(3):
        static = ViewAugment(dims, static_shapes=True)(x, gen(seed))
        _assert_same(static, ViewAugment(dims, static_shapes=False)(x, gen(seed)))


def test_bad_static_shapes_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="static_shapes"):
        build_distortion("transvw", static_shapes="yes")
    with pytest.raises(ValueError, match="static_shapes"):
        ViewAugment(3, static_shapes=1)
    with pytest.raises(ValueError, match="static_shapes"):
        nonlinear_intensity(rand(2, 1, 8, 8), gen(), static_shapes="auto")
    with pytest.raises(ValueError, match="selected"):
        inpaint(rand(2, 1, 8, 8), gen(), selected=torch.ones(3, dtype=torch.bool))


# --- no host synchronisation on the static path ---------------------------------------------

def _syncs(fn, *args) -> HostSyncDetector:
    """The host synchronisations that ``fn(*args)`` would make on a GPU."""
    with HostSyncDetector() as syncs:
        fn(*args)
    return syncs


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_static_compositions_make_no_host_sync(name: str) -> None:
    kind, overrides = COMPOSITIONS[name]
    shapes = [SHAPES["2d"]] if kind == "dira2d" else [SHAPES["3d"], SHAPES["2d"]]
    for shape in shapes:
        x = rand(*shape)
        syncs = _syncs(build_distortion(kind, static_shapes=True, **overrides), x, gen(1))
        assert not syncs.events, syncs.report()
        if kind != "none" and "none" not in name:  # the detector is watching: the subset path syncs
            assert _syncs(build_distortion(kind, static_shapes=False, **overrides), x, gen(1)).events


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_static_distortions_make_no_host_sync(name: str) -> None:
    fn = FUNCTIONS[name]
    for shape in ("3d", "2d"):
        x = rand(*SHAPES[shape])
        syncs = _syncs(lambda: fn(x, gen(1), 0.5, static_shapes=True))
        assert not syncs.events, syncs.report()
        assert _syncs(lambda: fn(x, gen(1), 0.5, static_shapes=False)).events, "the subset path syncs"


@pytest.mark.parametrize("dims", [2, 3])
def test_views_make_no_host_sync(dims: int) -> None:
    x = rand(*(SHAPES["3d"] if dims == 3 else SHAPES["2d"]))
    for static in (True, None):  # views have fixed shapes on every setting
        syncs = _syncs(ViewAugment(dims, static_shapes=static), x, gen(2))
        assert not syncs.events, syncs.report()


# --- invariants on the static path ----------------------------------------------------------

@pytest.mark.parametrize("spatial", [(24, 20, 12), (40, 30)])
def test_static_shuffle_keeps_every_histogram_and_moves_values_only_inside_blocks(spatial: tuple[int, ...]) -> None:
    n = int(torch.tensor(spatial).prod())
    x = (torch.randperm(6 * n, generator=gen(1)).float() / (6 * n)).view(3, 2, *spatial)  # unique values
    sel = torch.tensor([True, False, True])
    out = local_pixel_shuffle(x, gen(3), num_blocks=400, selected=sel, static_shapes=True)
    assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    assert torch.equal(out[1], x[1]) and bool(((out != x).flatten(1).float().mean(dim=1)[sel] > 0.03).all())
    max_side = [max(1, int(s * 0.1)) for s in spatial]
    where_from = {float(v): i for i, v in enumerate(x.flatten().tolist())}
    src = torch.tensor([where_from[float(v)] for v in out.flatten().tolist()]).view(x.shape)
    coords = torch.stack(torch.unravel_index(src.flatten(), x.shape), dim=1)  # (N, 2 + D)
    dst = torch.stack(torch.unravel_index(torch.arange(x.numel()), x.shape), dim=1)
    assert torch.equal(coords[:, :2], dst[:, :2]), "a value keeps its sample and channel"
    assert bool(((coords[:, 2:] - dst[:, 2:]).abs() < torch.tensor(max_side)).all()), "moves stay inside a block"
    per_channel = coords[:, 2:].view(3, 2, n, len(spatial))
    assert torch.equal(per_channel[:, 0], per_channel[:, 1]), "channels share the permutation"


def test_static_intensity_is_monotone_in_range_and_untouched_where_unselected() -> None:
    ramp = torch.linspace(0, 1, 300).view(1, 1, 300, 1).repeat(16, 1, 1, 1)
    sel = torch.arange(16) % 3 != 0
    out = nonlinear_intensity(ramp, gen(5), selected=sel, static_shapes=True)[:, 0, :, 0]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    diffs = out.diff(dim=1)
    assert bool(((diffs >= 0).all(dim=1) | (diffs <= 0).all(dim=1)).all())
    assert torch.equal(out[~sel], ramp[~sel][:, 0, :, 0])


def test_static_painting_touches_only_the_mask_of_selected_samples() -> None:
    x = torch.full((6, 2, 30, 24, 12), 0.5)
    sel = torch.tensor([True, False, True, True, False, True])
    out, mask = inpaint(x, gen(7), selected=sel, return_mask=True, static_shapes=True)
    m = mask[:, None].expand_as(out)
    assert torch.equal(out[~m], x[~m]) and bool((out[m] != 0.5).all())
    assert not bool(mask[~sel].any())
    out, kept = outpaint(x, gen(8), selected=sel, return_mask=True, static_shapes=True)
    k = kept[:, None].expand_as(out)
    assert torch.equal(out[k], x[k]) and bool(kept[~sel].all()) and not bool(kept[sel].all())
    y = x + rand(*x.shape)
    swapped = patch_swap(y, gen(9), selected=sel, static_shapes=True)
    assert torch.equal(swapped.flatten(1).sort(1).values, y.flatten(1).sort(1).values)
    assert torch.equal(swapped[~sel], y[~sel]) and not torch.equal(swapped[sel], y[sel])


def test_static_flips_are_the_same_for_input_and_target() -> None:
    x = rand(16, 1, 8, 6, 4)
    out, target = random_flip(x, 2 * x, gen(4), prob=0.7, static_shapes=True)
    assert torch.equal(target, 2 * out)
    for i in range(16):
        candidates = [x[i].flip([1 + a for a in range(3) if f[a]]) for f in itertools.product([False, True], repeat=3)]
        assert any(torch.equal(out[i], c) for c in candidates)


@pytest.mark.parametrize("spatial, max_sides", [([9, 8, 7], [3, 2, 3]), ([12, 9], [4, 3]), ([64, 64, 32], [6, 6, 3]),
                                                ([7, 1, 5], [3, 1, 1])])
def test_block_owner_static_equals_the_horner_painter_and_the_plain_one(spatial: list[int], max_sides: list[int],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    g, d = gen(6), len(spatial)
    n = 2000 if spatial[0] == 64 else 40
    sizes = (torch.rand(3, n, d, generator=g) * torch.tensor(max_sides)).long() + 1
    starts = (torch.rand(3, n, d, generator=g) * (torch.tensor(spatial) - sizes + 1)).long()
    owner = block_owner_static(spatial, max_sides, starts.int(), sizes.int())
    assert owner.dtype == torch.int32 and torch.equal(owner, block_owner(spatial, max_sides, starts, sizes))
    if n <= 40:  # paint box after box: the last one wins
        expected = torch.full((3, *spatial), -1, dtype=torch.int32)
        for i, k in itertools.product(range(3), range(n)):
            expected[(i, *(slice(a, a + s) for a, s in zip(starts[i, k].tolist(), sizes[i, k].tolist())))] = k
        assert torch.equal(owner, expected)
    monkeypatch.setattr(shuffle_module, "_CPU_CHUNK_WRITES", 1 << 40)  # all samples in one scatter
    assert torch.equal(block_owner_static(spatial, max_sides, starts, sizes), owner)


# --- CUDA -----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transvw_on_cuda_runs_under_sync_debug_mode_error_and_matches_the_subset_path() -> None:
    x = rand(4, 1, 32, 32, 16).cuda()
    static = build_distortion("transvw", alpha=991.0 / 4, sigma=4.0, num_blocks=2000, static_shapes=True)
    subset = build_distortion("transvw", alpha=991.0 / 4, sigma=4.0, num_blocks=2000, static_shapes=False)
    assert build_distortion("transvw").sample(x, gen())[0].is_cuda  # warm-up (cuDNN handles, pinned blocks)
    static.sample(x, torch.Generator(device="cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d_static, t_static, applied = static.sample(x, gen(21))  # a CPU generator: pinned, asynchronous copies
        d_device, _, _ = static.sample(x, torch.Generator(device="cuda").manual_seed(21))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    d_subset, t_subset, applied_subset = subset.sample(x, gen(21))
    assert d_static.is_cuda and d_device.is_cuda and d_device.shape == x.shape
    assert torch.equal(d_static, d_subset) and torch.equal(t_static, t_subset)
    assert all(torch.equal(applied[k], applied_subset[k]) for k in applied)
