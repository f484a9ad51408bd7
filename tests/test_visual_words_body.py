"""Visual words of a user's own chest CTs stay inside the body: air around the patient has nothing dense in it, so
TransVW's "mostly lung" rule passes it as readily as lung. On the real lung1 scan prepared at 2 x 2 x 5 mm with the
README's small settings (patch 32 32 16, border 20 20 4), 41 % of the centres the lung rule accepts lay mostly in
the air in front of the patient, and one seed made a visual word of it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from dira3d.visual_words import discover_visual_words
from dira3d.visual_words.coordinates import (
    CoordinateRules, CoordinateSamplingError, outside_body, patch_slices, sample_coordinate,
)
from dira3d.visual_words.extractor import VolumeAutoencoder

BODY_RADIUS = 12


def _chest(shape=(40, 40, 8)) -> np.ndarray:
    """Air (0) around a body disk of soft tissue (0.5) holding a lung disk (0.1), on every axial slice."""
    x, y = np.ogrid[: shape[0], : shape[1]]
    r2 = (x - 20) ** 2 + (y - 20) ** 2
    slice_ = np.where(r2 <= BODY_RADIUS**2, 0.5, 0.0).astype(np.float32)
    slice_[r2 <= 9**2] = 0.1
    return np.repeat(slice_[:, :, None], shape[2], axis=2)


def _outside_share(centre, patch) -> float:
    """The patch's share outside the body disk, from the geometry (independent of outside_body)."""
    x, y = np.ogrid[:40, :40]
    outside = np.repeat(((x - 20) ** 2 + (y - 20) ** 2 > BODY_RADIUS**2)[:, :, None], 8, axis=2)
    return float(outside[patch_slices(centre, patch)].mean())


def test_outside_body_is_the_air_reaching_the_slice_edge_not_the_lung():
    air = outside_body(_chest())
    assert air[0, 0, 0] and air[39, 20, 7]  # corners and the air beside the body, on the first and last slice too
    assert not air[20, 20, 0] and not air[20, 20, 7]  # the lung, enclosed by the body, also on the edge slices
    assert not air[20, 20 + BODY_RADIUS - 1, 4]


def test_the_body_rule_keeps_patches_inside_the_body_where_the_lung_rule_alone_does_not():
    volume, patch = _chest(), (8, 8, 4)
    plain = CoordinateRules(patch_size=patch, border=(0, 0, 0), max_dense_fraction=1.0)
    body = CoordinateRules(patch_size=patch, border=(0, 0, 0), max_dense_fraction=1.0, max_outside_fraction=0.5)
    without = [_outside_share(sample_coordinate(volume, plain, np.random.RandomState(s)), patch) for s in range(40)]
    assert max(without) > 0.9  # the reference rules take patches of pure outside air
    with_rule = [_outside_share(sample_coordinate(volume, body, np.random.RandomState(s)), patch) for s in range(40)]
    assert max(with_rule) <= 0.5 + 1e-6, with_rule
    with pytest.raises(CoordinateSamplingError, match=r"5 lay more than 50% outside the body"):
        sample_coordinate(np.zeros((40, 40, 8), np.float32), CoordinateRules(
            patch_size=patch, border=(0, 0, 0), max_tries=5, max_outside_fraction=0.5), np.random.RandomState(0))
    with pytest.raises(ValueError, match=r"--max-outside-fraction"):
        CoordinateRules(max_outside_fraction=1.5)


def _datalist(folder, meta) -> str:
    folder.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i in range(4):
        volume = np.clip(_chest() + rng.normal(0, 0.01, (40, 40, 8)), 0, 1).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / f"v{i}.nii.gz"))
        entries.append({"image": f"v{i}.nii.gz", "case_id": f"v{i}"})
    path = folder / "pretrain_datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": [], **({"meta": meta} if meta else {})}))
    return str(path)


def test_a_datalist_prepared_as_ct_gets_the_body_rule_and_others_keep_transvw_rules(tmp_path):
    settings = dict(classes=4, neighbours=2, val_neighbours=0, patch_size=(8, 8, 4), border=(0, 0, 0),
                    max_dense_fraction=1.0, extractor_size=(16, 16, 8))
    torch.manual_seed(0)
    extractor = VolumeAutoencoder(width=0.125).eval()
    own = _datalist(tmp_path / "own", {"dataset": "generic", "modality": "ct"})
    manifest = discover_visual_words(own, tmp_path / "vw_own", extractor=extractor, **settings)
    assert manifest["params"]["max_outside_fraction"] == 0.5
    assert all(_outside_share(c["centre"], (8, 8, 4)) <= 0.5 for c in manifest["classes"]), manifest["classes"]
    off = discover_visual_words(own, tmp_path / "vw_off", extractor=extractor, body_filter="off", **settings)
    assert off["params"]["max_outside_fraction"] == 1.0
    plain = _datalist(tmp_path / "plain", None)  # no meta.modality (LUNA16, synthetic): TransVW's rules as they are
    assert discover_visual_words(plain, tmp_path / "vw_plain", extractor=extractor, **settings)["params"][
        "max_outside_fraction"] == 1.0
    with pytest.raises(ValueError, match=r"body_filter must be one of"):
        discover_visual_words(own, tmp_path / "bad", extractor=extractor, body_filter="maybe", **settings)


def test_a_refused_reference_names_the_setting_to_change_and_its_value():
    """`all N training volumes have been used as references; ... relax the coordinate rules (borders,
    --max-dense-fraction, --min-distance ...)` named no number: the user had to guess which rule and how far."""
    volume, patch = np.random.default_rng(0).uniform(0, 1, (40, 40, 8)).astype(np.float32), (8, 8, 4)
    dense = CoordinateRules(patch_size=patch, border=(0, 0, 0), max_dense_fraction=0.0, max_tries=30)
    with pytest.raises(CoordinateSamplingError) as err:
        sample_coordinate(volume, dense, np.random.RandomState(0))
    value = float(str(err.value).split("--max-dense-fraction ")[1].split()[0])
    # the value given takes a patch: rerun with it on the same draws succeeds
    centre = sample_coordinate(volume, CoordinateRules(patch_size=patch, border=(0, 0, 0), max_dense_fraction=value,
                                                       max_tries=30), np.random.RandomState(0))
    assert 0 < value < 1 and centre is not None
    outside = CoordinateRules(patch_size=patch, border=(0, 0, 0), max_dense_fraction=1.0, max_outside_fraction=0.0,
                              max_tries=30)
    with pytest.raises(CoordinateSamplingError, match=r"--max-outside-fraction 0\.\d+ would take .*--body-filter off"):
        small = np.zeros((40, 40, 8), np.float32)  # a body of 5 x 5 voxels: every 8 x 8 patch is partly outside
        small[18:23, 18:23] = 0.5
        sample_coordinate(small, outside, np.random.RandomState(0))
    # a neighbour with fewer slices than the reference's border leaves: the border that fits is named
    rules = CoordinateRules(patch_size=patch, border=(0, 0, 2))
    with pytest.raises(CoordinateSamplingError, match=r"use --border with z 1 or less"):
        sample_coordinate(volume, rules, np.random.RandomState(0), fit=(40, 40, 5))
    assert sample_coordinate(volume, CoordinateRules(patch_size=patch, border=(0, 0, 1), max_dense_fraction=1.0),
                             np.random.RandomState(0), fit=(40, 40, 5))[2] == 3  # the border named fits
    with pytest.raises(CoordinateSamplingError, match=r"use --patch-size with z 3 or less"):
        sample_coordinate(volume, rules, np.random.RandomState(0), fit=(40, 40, 3))
