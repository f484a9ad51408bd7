"""Visual-word self-discovery against METHOD.md section 2 ("Visual words"): the reference numbers,
the patch geometry (odd sizes, non-square in-plane patches, the multi-resolution boxes), the lung
filter's threshold under another HU window, and the reference as neighbour 0."""

from __future__ import annotations

import inspect

import pytest
import torch
from monai.transforms import Resize

from dira3d.visual_words import CoordinateRules, VisualWordCrop, discover_visual_words, hu_to_unit
from dira3d.visual_words.coordinates import patch_slices


def test_rules_and_discovery_defaults_are_the_reference_numbers():
    """64x64x32 patches, 100-voxel in-plane and 30-slice borders, >= 5 voxels between class centres,
    at most 15 % of the cube at or above -150 HU, 200 tries; C = 50, K = 200 training and 30
    validation neighbours; the extractor sees volumes at 128x128x64."""
    rules = CoordinateRules()
    assert (rules.patch_size, rules.border, rules.min_distance, rules.max_dense_fraction, rules.max_tries) == \
        ((64, 64, 32), (100, 100, 30), 5.0, 0.15, 200)
    assert rules.dense_threshold == pytest.approx(hu_to_unit(-150.0))
    defaults = {k: p.default for k, p in inspect.signature(discover_visual_words).parameters.items()}
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in defaults.items() if k in (
        "classes", "neighbours", "val_neighbours", "patch_size", "border", "min_distance", "hu_window", "dense_hu",
        "max_dense_fraction", "max_tries", "extractor_size")} == {
        "classes": 50, "neighbours": 200, "val_neighbours": 30, "patch_size": (64, 64, 32), "border": (100, 100, 30),
        "min_distance": 5.0, "hu_window": (-1000.0, 1000.0), "dense_hu": -150.0, "max_dense_fraction": 0.15,
        "max_tries": 200, "extractor_size": (128, 128, 64)}


def test_patch_slices_of_odd_sizes_have_the_patch_size():
    """The patch spans centre - p//2 .. centre - p//2 + p on every axis, odd p included."""
    slices = patch_slices((10, 10, 10), (5, 4, 3))
    assert [(s.start, s.stop) for s in slices] == [(8, 13), (8, 12), (9, 12)]
    volume = torch.arange(20 * 20 * 20, dtype=torch.float32).reshape(1, 20, 20, 20)
    assert VisualWordCrop((5, 4, 3))(volume, [(10, 10, 10)]).shape == (1, 1, 1, 5, 4, 3)


def test_multi_resolution_boxes_cover_the_reference_ranges():
    """At a 64-voxel patch: in-plane square side 50..79 and shifts -10..9, both ends inclusive."""
    crop = VisualWordCrop((64, 64, 32), multi_resolution=True)
    crop.set_random_state(0)
    boxes = []
    for _ in range(1500):
        crop.randomize()
        boxes += crop._boxes
    sides, shifts = {b[0] for b in boxes}, {s for b in boxes for s in b[1:]}
    assert sides == set(range(50, 80)) and shifts == set(range(-10, 10))


@pytest.mark.parametrize("patch", [(16, 16, 8), (16, 8, 4)])
def test_multi_resolution_crop_is_the_shifted_box_resized(patch):
    """Each extra crop is the square (x side s, y side s * py / px) centred at centre + (dx, dy),
    over the patch's own slices, resized back to the patch size."""
    px, py, pz = patch
    volume = torch.rand(1, 48, 48, 20, generator=torch.Generator().manual_seed(0))
    centre = (24, 24, 10)
    crop = VisualWordCrop(patch, multi_resolution=True)
    out = crop(volume, [centre], seeds=[3])
    resize = Resize(spatial_size=patch, mode="trilinear", align_corners=False)
    for r, (side, dx, dy) in enumerate(crop._boxes, start=1):
        sy = max(1, round(side * py / px))
        x0, y0 = centre[0] + dx - side // 2, centre[1] + dy - sy // 2
        region = volume[:, x0:x0 + side, y0:y0 + sy, centre[2] - pz // 2:centre[2] - pz // 2 + pz]
        expected = torch.as_tensor(resize(region))
        torch.testing.assert_close(out[0, r], expected.float())


def test_the_lung_filter_threshold_follows_the_hu_window(monkeypatch, tmp_path):
    """-150 HU on volumes windowed to [-1000, 400] is (−150 + 1000) / 1400, not the [-1000, 1000] value."""
    from dira3d.visual_words import discover
    from dira3d.visual_words.synthetic import write_template_datalist

    class Seen(Exception):
        pass

    def capture(train, shapes, rules):
        raise Seen(rules)

    datalist = write_template_datalist(tmp_path / "data", templates=2, per_template=2, val_per_template=0,
                                       shape=(32, 32, 16))
    monkeypatch.setattr(discover, "check_volume_sizes", capture)
    with pytest.raises(Seen) as seen:
        discover_visual_words(datalist, tmp_path / "out", classes=2, neighbours=2, val_neighbours=0,
                              hu_window=(-1000.0, 400.0), dense_hu=-150.0)
    assert seen.value.args[0].dense_threshold == pytest.approx(850.0 / 1400.0)


def test_the_reference_is_neighbour_zero_even_with_an_identical_earlier_volume():
    """An exact duplicate with a lower index ties with the reference at distance 0: the reference
    still comes first and the duplicate second (each volume once)."""
    from dira3d.visual_words.discover import _neighbours

    emb = torch.tensor([[1.0, 0.0], [5.0, 5.0], [1.0, 0.0], [1.2, 0.0]])
    train = [{"case_id": f"c{i}"} for i in range(4)]
    neighbours = _neighbours(2, emb, emb[:0], train, [], {"neighbours": 3, "metric": "l2", "val_neighbours": 0})
    assert neighbours["training"]["indices"] == [2, 0, 3]
    assert neighbours["training"]["distances"][:2] == [0.0, 0.0]
