"""Session 23b mutation audit of dira3d.transforms.dictionary (the MONAI wrappers): the checks and outputs the
earlier tests left unpinned."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dira3d.transforms import RandDistortion, RandDistortiond, RandViews, RandViewsd


def _item(low: float = 0.0, high: float = 1.0) -> np.ndarray:
    return np.linspace(low, high, 16 * 16 * 8, dtype=np.float32).reshape(1, 16, 16, 8)


@pytest.mark.parametrize("make", [lambda r: RandDistortion("transvw", value_range=r), lambda r: RandViews(3, value_range=r),
                                  lambda r: RandDistortiond("image", value_range=r), lambda r: RandViewsd("image", value_range=r)])
@pytest.mark.parametrize("bad", [(1, 0), (0.5, 0.5)])
def test_every_wrapper_refuses_an_empty_or_reversed_value_range(make, bad):
    with pytest.raises(ValueError, match=r"must be \(low, high\) with low < high"):
        make(bad)


@pytest.mark.parametrize("make", [lambda: RandDistortiond("ct", composition="transvw"), lambda: RandViewsd("ct", spatial_dims=3)])
def test_the_range_check_names_the_item_key_and_catches_either_side(make):
    """the message names the dictionary key (`'ct'`, not the array wrapper's default 'image'); an item only below the
    range is refused as one only above it; the slack is 1e-3 of the range, so 1.01 is out."""
    transform = make()
    with pytest.raises(ValueError, match=r"'ct' has intensities from -0\.5 to 1, outside value_range \[0, 1\]"):
        transform({"ct": _item(-0.5, 1.0)})
    with pytest.raises(ValueError, match=r"'ct' has intensities from 0 to 1\.01, outside"):
        transform({"ct": _item(0.0, 1.01)})
    with pytest.raises(ValueError, match=r"'ct' has dtype torch\.int16"):
        transform({"ct": np.zeros((1, 16, 16, 8), np.int16)})
    with pytest.raises(ValueError, match=r"'ct' must be a channel-first"):
        transform({"ct": np.zeros((1, 1, 16, 16, 8), np.float32)})  # a batch, not one item
    out = transform({"ct": _item(0.0, 1.0 + 5e-4)})  # within the slack
    assert all(out[k].shape == (1, 16, 16, 8) for k in out)


def test_views_are_drawn_afresh_on_every_call_and_written_under_the_given_suffixes():
    """a dictionary transform in a dataset is called once per item: one seed for all calls gave every item (and every
    epoch) the same crops and jitter."""
    views = RandViewsd("image", spatial_dims=3, view_suffixes=("_a", "_b")).set_random_state(0)
    item = {"image": _item()}
    first, second = views(item), views(item)
    assert set(first) == {"image", "image_a", "image_b"}
    assert not torch.equal(first["image_a"], second["image_a"])
    array = RandViews(3).set_random_state(0)
    v1, v2 = array(_item())
    w1, _ = array(_item())
    assert not torch.equal(v1, v2) and not torch.equal(v1, w1)


def test_distortions_are_drawn_afresh_on_every_call_and_per_key():
    distort = RandDistortiond(["a", "b"], composition="transvw", num_blocks=50).set_random_state(0)
    item = {"a": _item(), "b": _item()}
    first, second = distort(item), distort(item)
    assert not torch.equal(first["a_distorted"], first["b_distorted"])  # a fresh draw per key
    assert not torch.equal(first["a_distorted"], second["a_distorted"])
    array = RandDistortion("transvw", num_blocks=50).set_random_state(0)
    assert not torch.equal(array(_item())[0], array(_item())[0])


@pytest.mark.parametrize("make", [lambda: RandDistortiond("ct", composition="transvw"), lambda: RandViewsd("ct", spatial_dims=3),
                                  lambda: RandViewsd("ct", spatial_dims=3, value_range=None)])
@pytest.mark.parametrize("shape", [(1, 0, 16, 8), (1, 16, 16, 0), (0, 16, 16, 8)])
def test_an_empty_item_is_refused_naming_its_key(make, shape):
    """An empty item (a crop outside the volume) failed inside PyTorch ("Expected non-zero, positive output size",
    "Kernel size can't be greater than actual input size"), naming no key; value_range=None skipped the only check."""
    with pytest.raises(ValueError, match=rf"^'ct' is empty \(shape {re.escape(str(shape))}\): nothing to distort"):
        make()({"ct": np.zeros(shape, np.float32)})
