"""MR (and CT) normalisation without whole-volume temporaries gives the bytes the former code gave.

``normalize_mr`` held a float32 copy of the scan, a boolean mask, the foreground twice and two float32 results at
once (6.6 times an int16 MR above the scan inside ``dira3d prepare``); ``normalise_image`` then copied the result
into an image. The references below are the former code, kept verbatim.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import pipeline
from dira3d.data.io import to_ras
from dira3d.data.normalize import normalize_mr, window_hu


def _former_window_hu(array, lo=-1000.0, hi=1000.0):
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _former_normalize_mr(array, mask=None, lower=0.5, upper=99.5):
    data = np.asarray(array, dtype=np.float32)
    select = data != 0 if mask is None else np.asarray(mask, dtype=bool)
    values = data[select]
    if values.size == 0:
        raise ValueError("MR volume has no foreground voxels to take percentiles from (all zero or empty mask)")
    p_lo, p_hi = np.percentile(values, [lower, upper])
    if not p_hi > p_lo:
        raise ValueError(f"MR volume is constant in its foreground (percentiles {p_lo} and {p_hi}); cannot normalise it")
    out = (data - np.float32(p_lo)) / np.float32(p_hi - p_lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _mr(dtype, shape=(11, 13, 9), seed=0):
    rng = np.random.default_rng(seed)
    volume = rng.gamma(2.0, 300.0, shape) * (rng.random(shape) < 0.6)
    if np.dtype(dtype).kind == "f":
        volume[0, 0, :3] = [1e-50, -1e-46, 3e-39]  # zero, zero and a subnormal once in float32
        return volume.astype(dtype)
    return np.clip(volume, 0, np.iinfo(dtype).max).astype(dtype)


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8", "float32", "float64"])
@pytest.mark.parametrize("percentiles", [(0.5, 99.5), (0.0, 100.0), (2.0, 97.3)])
def test_normalize_mr_gives_the_former_bytes(dtype, percentiles):
    volume = _mr(dtype)
    expected = _former_normalize_mr(volume, None, *percentiles)
    got = normalize_mr(volume, None, *percentiles)
    assert got.dtype == np.float32 and got.shape == volume.shape
    assert got.tobytes() == expected.tobytes()
    mask = _mr("uint8", seed=1) > 0
    assert normalize_mr(volume, mask, *percentiles).tobytes() == _former_normalize_mr(volume, mask, *percentiles).tobytes()
    flat = volume[0].ravel()  # a 1-D array takes the whole-array path
    assert normalize_mr(flat, None, *percentiles).tobytes() == _former_normalize_mr(flat, None, *percentiles).tobytes()


@pytest.mark.parametrize("volume", [np.zeros((4, 5, 6), np.int16), np.full((4, 5, 6), 7, np.int16),
                                    np.where(np.arange(120).reshape(4, 5, 6) % 2, np.nan, 3.0)])  # fmt: skip
def test_normalize_mr_refuses_what_it_refused(volume):
    with pytest.raises(ValueError) as former:
        _former_normalize_mr(volume)
    with pytest.raises(ValueError) as now:
        normalize_mr(volume)
    assert str(now.value) == str(former.value)


@pytest.mark.parametrize("dtype", ["int16", "float32", "float64"])
def test_window_hu_gives_the_former_bytes(dtype):
    volume = (np.random.default_rng(3).normal(-300, 700, (6, 7, 8))).astype(dtype)
    for window in [(-1000.0, 1000.0), (-160.0, 240.5)]:
        assert window_hu(volume, *window).tobytes() == _former_window_hu(volume, *window).tobytes()


def _former_normalise_image(image, modality, window=(-1000.0, 1000.0), percentiles=(0.5, 99.5)):
    image = to_ras(image)
    array = sitk.GetArrayViewFromImage(image)
    scaled = _former_window_hu(array, *window) if modality == "ct" else _former_normalize_mr(array, None, *percentiles)
    out = sitk.GetImageFromArray(scaled)
    out.CopyInformation(image)
    return out


@pytest.mark.parametrize("modality,dtype", [("mr", "int16"), ("mr", "float32"), ("ct", "int16"), ("ct", "float64")])
def test_normalise_image_gives_the_former_image_slab_by_slab(modality, dtype, monkeypatch):
    volume = _mr(dtype, shape=(10, 12, 9)) if modality == "mr" else (np.random.default_rng(4).normal(-400, 600, (10, 12, 9))).astype(dtype)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-100.0, 20.0, 7.5))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))  # not RAS: to_ras permutes and flips
    # slabs of 3 slices of 9 x 12: 10 slices in slabs that do not divide them
    monkeypatch.setattr(pipeline, "_SLAB_BYTES", 3 * 9 * 12 * 4)
    got = pipeline.normalise_image(image, modality, percentiles=(1.0, 99.0))
    expected = _former_normalise_image(image, modality, percentiles=(1.0, 99.0))
    assert got.GetPixelID() == expected.GetPixelID() == sitk.sitkFloat32
    assert (got.GetSize(), got.GetSpacing(), got.GetOrigin(), got.GetDirection()) == (
        expected.GetSize(), expected.GetSpacing(), expected.GetOrigin(), expected.GetDirection())
    assert sitk.GetArrayViewFromImage(got).tobytes() == sitk.GetArrayViewFromImage(expected).tobytes()


def test_normalize_mr_holds_little_more_than_its_result():
    volume = _mr("int16", shape=(40, 64, 64))
    result_bytes = volume.size * 4
    normalize_mr(volume[:2])  # numpy's first-call set-up is not the function's memory
    tracemalloc.start()
    try:
        normalize_mr(volume)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the former code peaked at a float32 copy, a mask, the foreground and two float32 results: above 3x the result
    assert peak < 1.3 * result_bytes, f"peak {peak / result_bytes:.2f}x the float32 result"
