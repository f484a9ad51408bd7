"""Unit tests of visual-word building blocks: distances, references, sampling rules, crops, extractor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dira3d.visual_words import (
    CoordinateRules,
    CoordinateSamplingError,
    ReferenceSampler,
    VisualWordCrop,
    VisualWordCropd,
    VolumeAutoencoder,
    VolumeTooSmallError,
    dense_fraction,
    embed_volumes,
    hu_to_unit,
    is_mostly_lung,
    nearest_neighbours,
    pairwise_distances,
    sample_coordinate,
)
from dira3d.visual_words.coordinates import centre_range, patch_slices

# ---------------------------------------------------------------- neighbours


def test_pairwise_distances_match_hand_computation():
    q = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    e = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]])
    l2 = pairwise_distances(q, e, "l2")
    assert torch.allclose(l2, torch.tensor([[5.0, 2.0, 1.0], [math.sqrt(20), math.sqrt(5), 2.0]], dtype=l2.dtype))
    cos = pairwise_distances(q[1:], e, "cosine")  # 1 - cos(angle): (1,0) vs (3,4) -> 1 - 3/5
    assert torch.allclose(cos, torch.tensor([[0.4, 1.0, 2.0]], dtype=cos.dtype))
    with pytest.raises(ValueError, match="metric"):
        pairwise_distances(q, e, "manhattan")


def test_nearest_neighbours_find_the_cluster_of_each_query():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    emb = (centres.repeat_interleave(4, 0) + 0.1 * torch.randn(12, 3, generator=gen))  # 3 clusters of 4, in order
    idx, dist = nearest_neighbours(emb, emb, k=4)
    assert (idx[:, 0] == torch.arange(12)).all()  # every point is its own nearest neighbour
    assert (idx // 4 == (torch.arange(12) // 4)[:, None]).all()  # the other three are its cluster
    assert (dist[:, 1:] >= dist[:, :-1]).all() and (dist[:, 0] == 0).all()
    # ties are ordered by index
    idx, _ = nearest_neighbours(torch.zeros(2), torch.zeros(5, 2), k=5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="between 1 and 12"):
        nearest_neighbours(emb[0], emb, k=13)


def test_cosine_neighbours_ignore_scale():
    emb = torch.tensor([[1.0, 0.0], [100.0, 1.0], [0.0, 1.0], [0.1, 0.0]])
    idx, _ = nearest_neighbours(emb[0], emb, k=3, metric="cosine")
    assert set(idx[0].tolist()) == {0, 1, 3}  # same direction, any length


def test_reference_sampler_is_seeded_and_never_repeats():
    a = ReferenceSampler(10, seed=3)
    draws = [a.next() for _ in range(10)]
    assert sorted(draws) == list(range(10))
    b = ReferenceSampler(10, seed=3)
    assert [b.next() for _ in range(10)] == draws
    c = ReferenceSampler(10, seed=4)
    assert [c.next() for _ in range(10)] != draws
    with pytest.raises(ValueError, match="all 10 training volumes have been used"):
        a.next()
    resumed = ReferenceSampler(10, seed=3, used=set(draws[:4]))
    assert resumed.next() == draws[4]


# ---------------------------------------------------------------- sampling rules


def test_hu_threshold_on_the_window():
    assert hu_to_unit(-150) == pytest.approx(0.425)
    assert hu_to_unit(-150, (-1350, 150)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="window"):
        hu_to_unit(0, (100, 100))


def test_lung_filter_rejects_soft_tissue_and_accepts_lung():
    rng = np.random.default_rng(0)
    lung = np.clip(0.07 + 0.02 * rng.standard_normal((16, 16, 8)), 0, 1)
    soft_tissue = np.full((16, 16, 8), hu_to_unit(40))  # 0.52: water/muscle
    assert is_mostly_lung(lung) and not is_mostly_lung(soft_tissue)
    # the 15 % bound, counted by hand on 100 voxels; -150 HU itself counts as dense (>=)
    cube = np.full(100, 0.07)
    cube[:15] = 0.425
    assert dense_fraction(cube, 0.425) == pytest.approx(0.15) and is_mostly_lung(cube)
    cube[15] = 0.9
    assert not is_mostly_lung(cube)


def test_centre_range_by_hand_and_too_small_volume_is_named():
    rules = CoordinateRules(patch_size=(16, 16, 8), border=(10, 10, 4))
    # x: centre - 8 >= 10 -> 18; centre + 8 <= 64 - 10 -> 46
    assert centre_range((64, 64, 32), rules) == [(18, 46), (18, 46), (8, 24)]
    assert [s.stop - s.start for s in patch_slices((18, 18, 8), (16, 16, 8))] == [16, 16, 8]
    with pytest.raises(VolumeTooSmallError, match=r"case7\.nii\.gz has size \(64, 64, 15\).*axis z"):
        sample_coordinate(np.zeros((1, 64, 64, 15)), rules, np.random.RandomState(0), name="case7.nii.gz")
    with pytest.raises(VolumeTooSmallError, match="axis x"):  # the reference borders do not fit a 96-voxel volume
        centre_range((96, 96, 48), CoordinateRules())
    # the patch must also fit the smallest neighbour (from index 0, no border there): x <= 40 - 8
    assert centre_range((64, 64, 32), rules, fit=(40, 64, 32)) == [(18, 32), (18, 46), (8, 24)]
    with pytest.raises(CoordinateSamplingError, match=r"case7: a neighbour of size \(24, 64, 32\).*axis x") as err:
        centre_range((64, 64, 32), rules, name="case7", fit=(24, 64, 32))  # x <= 16 < 18
    assert not isinstance(err.value, VolumeTooSmallError)  # the planner rejects this reference and draws another


def test_sampled_centres_keep_borders_lung_rule_and_distance():
    rules = CoordinateRules(patch_size=(8, 8, 4), border=(4, 4, 2), min_distance=5.0, max_tries=200)
    volume = np.full((1, 48, 48, 24), 0.8, dtype=np.float32)  # dense everywhere ...
    volume[:, 20:40, 10:30, 4:20] = 0.07  # ... except a lung box
    rng = np.random.RandomState(1)
    previous: list[tuple[int, int, int]] = []
    for _ in range(6):
        c = sample_coordinate(volume, rules, rng, previous)
        (lo_x, hi_x), (lo_y, hi_y), (lo_z, hi_z) = centre_range(volume.shape[1:], rules)
        assert lo_x <= c[0] <= hi_x and lo_y <= c[1] <= hi_y and lo_z <= c[2] <= hi_z
        assert is_mostly_lung(volume[0][patch_slices(c, rules.patch_size)])
        assert all(math.dist(c, p) >= 5.0 for p in previous)
        previous.append(c)
    # the same seed gives the same centres
    again = np.random.RandomState(1)
    assert sample_coordinate(volume, rules, again, []) == previous[0]


def test_sampling_failure_is_an_error_with_reasons_not_none():
    rules = CoordinateRules(patch_size=(8, 8, 4), border=(0, 0, 0), max_tries=20)
    dense = np.full((16, 16, 8), 0.6)
    with pytest.raises(CoordinateSamplingError, match=r"20 had more than 15%"):
        sample_coordinate(dense, rules, np.random.RandomState(0), name="vol")
    # a 9x9x5 volume has only 2x2x2 centres: after the first, min-distance 5 rules out the rest
    tiny = np.zeros((9, 9, 5))
    first = sample_coordinate(tiny, rules, np.random.RandomState(0))
    with pytest.raises(CoordinateSamplingError, match="20 were closer than 5.0"):
        sample_coordinate(tiny, rules, np.random.RandomState(0), previous=[first])


# ---------------------------------------------------------------- crops


def _ramp(shape=(1, 40, 40, 20)) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)


def test_crop_is_the_patch_around_the_centre():
    vol = _ramp()
    out = VisualWordCrop((8, 6, 4))(vol, [(10, 12, 5), (30, 20, 10)])
    assert out.shape == (2, 1, 1, 8, 6, 4)
    assert torch.equal(out[0, 0], vol[:, 6:14, 9:15, 3:7])
    assert torch.equal(out[1, 0], vol[:, 26:34, 17:23, 8:12])
    with pytest.raises(ValueError, match=r"centre \(2, 12, 5\) does not fit"):
        VisualWordCrop((8, 6, 4))(vol, [(2, 12, 5)])


def test_multi_resolution_crops_are_seeded_rescaled_views():
    vol = _ramp((1, 64, 64, 16))
    crop = VisualWordCrop((16, 16, 8), multi_resolution=True)
    assert crop.side_range == (12, 20) and crop.shift_range == (-2, 2)  # 50-79 and -10..9 at 64, scaled to 16
    a = crop(vol, [(32, 32, 8)] * 2, seeds=[5, 6])
    b = crop(vol, [(32, 32, 8)], seeds=[6])
    assert a.shape == (2, 3, 1, 16, 16, 8)
    assert torch.equal(a[1], b[0])  # a crop depends on its seed only
    assert not torch.equal(a[0, 1:], a[1, 1:])
    assert torch.equal(a[0, 0], vol[:, 24:40, 24:40, 4:12])  # resolution 0 is the plain patch
    # on the ramp (value = 1024 x + 16 y + z) a crop of side s resized to 16 steps s/16 * 1024 per
    # voxel along x (interior voxels; edges are clamped); s in 12..20 and at least one is not 16
    step_x = a[:, 1:, 0, 3:-3, :, :].diff(dim=-3) / 1024
    per_crop = step_x.mean(dim=(-3, -2, -1))
    assert torch.allclose(step_x, per_crop[..., None, None, None], atol=1e-3)
    assert ((per_crop >= 12 / 16 - 1e-4) & (per_crop <= 20 / 16 + 1e-4)).all() and (per_crop != 1).any()
    # the slices (z) are the patch's own: same z values as the plain patch
    assert torch.allclose(a[:, 1:, 0, 8, 8, :].diff(dim=-1), torch.ones(()), atol=1e-3)
    # and the crops stay within centre + shift (<= 2) + half a voxel of the patch centre along x
    mean_x = (a[:, 1:].mean(dim=(-4, -3, -2, -1)) // 1024)
    assert ((mean_x - 32).abs() <= 3).all()


def test_crop_dictionary_transform_in_a_monai_pipeline():
    from monai.transforms import Compose, EnsureChannelFirstd

    data = {"image": _ramp()[0].numpy(), "vw_centres": [(10, 12, 5)], "vw_seeds": [1]}
    pipeline = Compose([EnsureChannelFirstd("image", channel_dim="no_channel"),
                        VisualWordCropd("image", patch_size=(8, 6, 4), multi_resolution=True, seeds_key="vw_seeds")])
    out = pipeline(data)
    assert out["image_patches"].shape == (1, 3, 1, 8, 6, 4)
    assert torch.equal(out["image_patches"][0, 0], _ramp()[:, 6:14, 9:15, 3:7])
    t = VisualWordCropd("image", patch_size=(8, 6, 4), multi_resolution=True).set_random_state(seed=3)
    first = t({"image": _ramp(), "vw_centres": [(20, 20, 10)]})["image_patches"]
    t.set_random_state(seed=3)
    assert torch.equal(t({"image": _ramp(), "vw_centres": [(20, 20, 10)]})["image_patches"], first)
    with pytest.raises(KeyError, match="vw_centres"):
        t({"image": _ramp()})


# ---------------------------------------------------------------- extractor


def test_autoencoder_has_no_skip_path_and_checks_sizes():
    torch.manual_seed(0)
    ae = VolumeAutoencoder(width=0.125).eval()
    x = torch.rand(2, 1, 16, 16, 8)
    assert ae.embed(x).shape == (2, 64)  # 512 * 1/8
    # the reconstruction is a function of the bottleneck alone
    assert torch.equal(ae(x), ae.decoder(ae.encode(x)))
    with torch.no_grad():
        y = ae(x)
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    with pytest.raises(ValueError, match="divisible by 8"):
        ae(torch.rand(1, 1, 12, 16, 8))


def test_embed_volumes_accepts_an_encoder_returning_bottleneck_and_skips(tmp_path):
    import nibabel as nib

    class TwoOutputEncoder(torch.nn.Module):  # the dira3d UNet.encode contract: (bottleneck, skips)
        def encode(self, x):
            return torch.cat([x, 2 * x], dim=1), [x]

    entries = []
    for i, value in enumerate((0.2, 0.6)):
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.float32), np.eye(4)), tmp_path / f"v{i}.nii.gz")
        entries.append({"image": str(tmp_path / f"v{i}.nii.gz")})
    emb = embed_volumes(TwoOutputEncoder(), entries, size=(8, 8, 8))
    assert torch.allclose(emb, torch.tensor([[0.2, 0.4], [0.6, 1.2]]), atol=1e-6)  # pooled channels


def test_extractor_from_a_pretraining_checkpoint(tmp_path):
    import nibabel as nib

    from dira3d.networks import UNet
    from dira3d.utils.checkpoint import atomic_save
    from dira3d.visual_words import extractor_from_checkpoint

    torch.manual_seed(1)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=0.125)
    meta = {"spatial_dims": 3, "in_channels": 1, "width": 0.125}
    atomic_save({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict(), "meta": meta}, tmp_path / "ck.pt")
    loaded = extractor_from_checkpoint(tmp_path / "ck.pt")
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 8), dtype=np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    emb = embed_volumes(loaded, [{"image": str(tmp_path / "v.nii.gz")}], size=(16, 16, 8))
    assert emb.shape == (1, net.bottleneck_channels)
    atomic_save({"encoder": {}, "meta": meta}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no 'encoder' weights"):
        extractor_from_checkpoint(tmp_path / "empty.pt")


def test_volume_transform_reads_raw_nrrd_like_nifti(tmp_path):
    # visual words accept raw-HU scans (raw_hu_window); NRRD / MetaImage are read with SimpleITK (MONAI needs itk)
    import SimpleITK as sitk

    from dira3d.visual_words.loading import volume_shapes, volume_transform

    array = (np.random.default_rng(1).random((10, 18, 22)) * 2000 - 1000).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.6, 0.6, 5.0))
    for name in ("ct.nrrd", "ct.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
    load = volume_transform(orient=True, raw_hu_window=(-1000.0, 1000.0))
    nrrd, nifti = (load({"image": str(tmp_path / n)})["image"] for n in ("ct.nrrd", "ct.nii.gz"))
    assert nrrd.shape == (1, 22, 18, 10) and torch.equal(nrrd, nifti)
    assert 0.0 <= float(nrrd.min()) < float(nrrd.max()) <= 1.0
    assert volume_shapes([{"image": str(tmp_path / "ct.nrrd")}]) == [(22, 18, 10)]


def test_sampled_centres_reach_both_ends_of_the_centre_range():
    """Centres are drawn from the whole inclusive range: the last centre that keeps the patch inside
    the volume (and its borders) is drawn too, not just the ones before it."""
    rules = CoordinateRules(patch_size=(8, 8, 4), border=(1, 0, 2), min_distance=0.0, max_tries=1)
    volume = np.zeros((1, 14, 12, 10), dtype=np.float32)  # all air: every centre passes the lung rule
    ranges = centre_range(volume.shape[1:], rules)
    assert ranges == [(5, 9), (4, 8), (4, 6)]
    rng = np.random.RandomState(0)
    drawn = np.array([sample_coordinate(volume, rules, rng) for _ in range(300)])
    for axis, (lo, hi) in enumerate(ranges):
        assert set(drawn[:, axis].tolist()) == set(range(lo, hi + 1)), axis
    # the extreme centres give patches that touch the borders exactly
    last = patch_slices((9, 8, 6), rules.patch_size)
    assert [s.stop for s in last] == [14 - 1, 12 - 0, 10 - 2]


def test_min_distance_is_a_strict_euclidean_bound_on_every_draw():
    """Only x varies (4..8) around an earlier centre at x = 6: with min_distance 2 only x = 4 and 8
    qualify; with 2.5 none does, even though 2 is 'almost' 2.5 (no rounding of the distance)."""
    volume = np.zeros((1, 12, 8, 4), dtype=np.float32)
    previous = [(6, 4, 2)]
    rules = CoordinateRules(patch_size=(8, 8, 4), border=(0, 0, 0), min_distance=2.0, max_tries=50)
    rng = np.random.RandomState(0)
    assert {sample_coordinate(volume, rules, rng, previous)[0] for _ in range(40)} == {4, 8}
    strict = CoordinateRules(patch_size=(8, 8, 4), border=(0, 0, 0), min_distance=2.5, max_tries=50)
    with pytest.raises(CoordinateSamplingError, match="50 were closer than 2.5 voxels"):
        sample_coordinate(volume, strict, rng, previous)
