"""The restorative distortions against the numbers of METHOD.md (section 2, "Restorative
distortions") and the reference rules: defaults, the ranges draws reach, and the boundaries of
the probability comparisons (a U[0, 1) draw can be exactly 0.0)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from dira3d.transforms import (
    DiRA2DDistortion,
    ModelsGenesisDistortion,
    TransVWDistortion,
    cutout,
    inpaint,
    local_pixel_shuffle,
    nonlinear_intensity,
    outpaint,
    patch_swap,
)
from dira3d.transforms import _common
from dira3d.transforms.compositions import choose_one
from dira3d.transforms.intensity import bezier_lookup
from dira3d.transforms.shuffle import _random_blocks


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def defaults(function) -> dict:
    return {k: p.default for k, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


def test_defaults_are_the_reference_numbers() -> None:
    """Models Genesis: flip 0.4, shuffle 0.5, non-linear 0.9, painting 0.9 (in-painting 0.2 of it),
    10,000 shuffle blocks of side <= dim/10, up to 5 boxes / windows, curves inverted half of the
    time; TransVW: one of four at 0.25 each after an elastic warp (991, 8) of every input; 2D DiRA:
    cutout 0.3 (<= 10 boxes of 10-70 px), outer cutout 0.05, patch swap 0.3 (10 swaps of 10-15 px)."""
    mg = ModelsGenesisDistortion()
    assert (mg.flip_prob, mg.shuffle_prob, mg.nonlinear_prob, mg.paint_prob, mg.inpaint_share, mg.num_blocks) == \
        (0.4, 0.5, 0.9, 0.9, 0.2, 10000)
    tv = TransVWDistortion()
    assert tv.probs == [0.25] * 4 and (tv.elastic_prob, tv.alpha, tv.sigma, tv.num_blocks) == (1.0, 991.0, 8.0, 10000)
    d2 = DiRA2DDistortion()
    assert d2.probs == [0.3, 0.05, 0.3] and (d2.cutout_boxes, d2.cutout_size, d2.swaps, d2.swap_size) == \
        (10, (10, 70), 10, (10, 15))
    assert defaults(local_pixel_shuffle)["num_blocks"] == 10000 and defaults(local_pixel_shuffle)["max_block_fraction"] == 0.1
    assert defaults(nonlinear_intensity)["inverse_prob"] == 0.5
    assert {k: defaults(inpaint)[k] for k in ("max_boxes", "continue_prob", "min_fraction", "max_fraction", "margin")} == \
        {"max_boxes": 5, "continue_prob": 0.95, "min_fraction": (1, 6), "max_fraction": (1, 3), "margin": 3}
    assert {k: defaults(outpaint)[k] for k in ("max_windows", "continue_prob", "margin")} == \
        {"max_windows": 5, "continue_prob": 0.95, "margin": 3}
    assert (defaults(cutout)["max_boxes"], defaults(cutout)["size"]) == (10, (10, 70))
    assert (defaults(patch_swap)["swaps"], defaults(patch_swap)["size"]) == (10, (10, 15))


def test_bezier_lookup_is_the_cubic_bernstein_curve_away_from_its_midpoint() -> None:
    """At t = 0.5 the two inner Bernstein weights are equal (3/8 each), so a check there cannot tell
    r1 from r3 (or r2 from r4): compare the whole table at t = 0, 1/4, 1/2, 3/4, 1."""
    r1, r2, r3, r4 = 0.2, 0.1, 0.7, 0.9
    controls = torch.tensor([[r1, r2, r3, r4]])
    xs, ys = bezier_lookup(controls, torch.tensor([False]), num_points=5)
    t = np.linspace(0.0, 1.0, 5)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    np.testing.assert_allclose(xs[0].numpy(), r1 * b1 + r3 * b2 + b3, atol=1e-6)
    np.testing.assert_allclose(ys[0].numpy(), r2 * b1 + r4 * b2 + b3, atol=1e-6)
    _, inverted = bezier_lookup(controls, torch.tensor([True]), num_points=5)
    np.testing.assert_allclose(inverted[0].numpy(), (r2 * b1 + r4 * b2 + b3)[::-1], atol=1e-6)


def test_inpaint_box_sides_are_drawn_over_the_whole_reference_range() -> None:
    """Side = randint(dim//6, dim//3) per axis (the reference's rule): both ends are reached."""
    x = torch.full((80, 1, 49, 42), 0.5)
    _, mask = inpaint(x, gen(15), max_boxes=1, continue_prob=1.0, return_mask=True)
    for axis, s in enumerate((49, 42)):
        sides = mask.any(dim=2 - axis).sum(dim=1)  # extent of the one box along the axis
        assert int(sides.min()) == s // 6 and int(sides.max()) == s // 3, (axis, sides.unique())


def test_shuffle_blocks_reach_every_face_and_every_side() -> None:
    """Block sides 1 .. dim//10 and origins 0 .. dim - side, both inclusive: blocks touch the far face
    of each axis too (the last rows are shuffled like the others)."""
    spatial, max_sides = [40, 30, 20], [4, 3, 2]
    starts, sizes = _random_blocks(2, 4000, spatial, max_sides, gen(3), torch.device("cpu"))
    for axis, (dim, side) in enumerate(zip(spatial, max_sides)):
        s, z = starts[..., axis], sizes[..., axis]
        assert int(z.min()) == 1 and int(z.max()) == side, axis
        assert int(s.min()) == 0 and int((s + z).max()) == dim, axis


def test_probability_comparisons_hold_at_a_draw_of_exactly_zero(monkeypatch) -> None:
    """U[0, 1) includes 0.0: a probability-0 event must stay impossible on that draw (``u < p``), and
    an option of probability 0 must never be chosen by ``choose_one`` (``u >= threshold``)."""
    def zeros(shape, generator, device, dtype=torch.float32):
        return torch.zeros(tuple(shape), dtype=dtype)

    monkeypatch.setattr(_common, "uniform", zeros)
    assert not bool(_common.bernoulli(4, 0.0, gen(), "cpu").any())
    assert not bool(_common.leading_run(zeros((4, 3), None, "cpu"), 0.0).any())
    monkeypatch.setattr("dira3d.transforms.compositions.uniform", zeros)
    assert choose_one(4, [0.0, 1.0], gen(), "cpu").tolist() == [1, 1, 1, 1]  # option 0 has probability 0
    assert choose_one(4, [0.0, 0.0], gen(), "cpu").tolist() == [2, 2, 2, 2]  # both impossible: none


@pytest.mark.parametrize("threshold", [0.25, 0.5])
def test_choose_one_puts_a_draw_on_a_threshold_into_the_next_option(monkeypatch, threshold) -> None:
    """Option i covers [c_i, c_{i+1}) of the cumulative probabilities, like U[0, 1) itself."""
    monkeypatch.setattr("dira3d.transforms.compositions.uniform",
                        lambda shape, generator, device, dtype=torch.float32: torch.full(tuple(shape), threshold, dtype=dtype))
    assert choose_one(2, [0.25, 0.25, 0.25, 0.25], gen(), "cpu").tolist() == [int(threshold * 4)] * 2


def test_cutout_boxes_reach_every_face() -> None:
    """Box origins run over 0 .. dim - side inclusive: boxes touch the first and the last row and column."""
    x = torch.full((200, 1, 32, 24), 0.5)
    _, mask = cutout(x, gen(16), prob=1.0, max_boxes=1, size=(3, 8), return_mask=True)
    for face in (mask[:, 0, :], mask[:, -1, :], mask[:, :, 0], mask[:, :, -1]):
        assert bool(face.any())


def test_patch_swap_sides_are_clipped_to_half_the_axis() -> None:
    """On a 16x16 image, 10-pixel boxes are clipped to 8 (two boxes then fit side by side): a swap
    moves exactly 2 x 8 x 8 pixels."""
    x = torch.arange(200 * 16 * 16, dtype=torch.float32).view(200, 1, 16, 16)
    out = patch_swap(x, gen(17), prob=1.0, swaps=1, size=(10, 10))
    moved = (out != x).flatten(1).sum(dim=1)
    assert set(moved.tolist()) <= {0, 2 * 8 * 8} and int(moved.max()) == 2 * 8 * 8


def test_items_above_the_value_range_are_refused_too() -> None:
    from dira3d.transforms import RandDistortion

    with pytest.raises(ValueError, match=r"intensities from 0 to 2, outside value_range \[0, 1\]"):
        RandDistortion("models_genesis")(torch.linspace(0, 2, 16 * 16 * 8).view(1, 16, 16, 8))
