"""The peak memory of preparing one scan (dira3d.data.pipeline.normalise_image), found on full-size CTs.

`dira3d prepare generic` on 512x512x300 int16 chest CTs (150 MiB each) peaked at 1.5 GiB per volume (and per
--workers process): the CT was copied to (x, y, z) order and back around its voxel-by-voxel windowing, two more
copies of the volume (int16 and float32). It is now scaled on SimpleITK's own buffer; the output is the same to the
bit (checked against the earlier code on the real scans, CT and MR, with and without --spacing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data.pipeline import normalise_image

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _warm_up(modality: str) -> None:
    """One small scan first: the libraries' one-time set-up (ITK's threads, numpy's) is not the scan's copies."""
    normalise_image(sitk.GetImageFromArray(np.arange(1, 4097, dtype=np.int16).reshape(16, 16, 16)), modality)


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _CLEAR_REFS.exists(), reason="the peak RSS is reset through Linux's /proc/self/clear_refs")
def test_windowing_a_ct_holds_few_copies_of_it():
    shape = (160, 256, 256)  # z, y, x: 20 MiB of int16
    array = np.random.default_rng(0).integers(-1024, 2000, shape).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.7, 1.0))
    # ITK's identity direction is LPS (as DICOM and most NRRD / MetaImage files): RAS flips x and y
    expected = np.clip((np.flip(array, (1, 2)).astype(np.float32) + 1000) / 2000, 0, 1)
    del array
    _warm_up("ct")
    if not _reset_peak():
        pytest.skip("/proc/self/clear_refs cannot be written here")
    base = _peak_bytes()
    out = normalise_image(image, "ct")
    peak = (_peak_bytes() - base) / (np.prod(shape) * 2)
    # the RAS copy (1x; at this size the allocator keeps the one DICOMOrient made on its way: 2x) and the float32 image
    # (2x), filled a slab of slices at a time: about 4 copies of the int16 scan (the limit, 5, leaves a margin); it was
    # 9, then 6 with a whole float32 scaled array copied into its image
    assert peak < 5.0, f"peak {peak:.1f} x the int16 scan"
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(out), expected)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(out.GetDirection()) == "RAS"


@pytest.mark.skipif(not _CLEAR_REFS.exists(), reason="the peak RSS is reset through Linux's /proc/self/clear_refs")
def test_scaling_an_mr_holds_few_copies_of_it():
    """normalize_mr held a float32 copy, a mask, the foreground twice and two float32 results: 6.6x a 256x256x180
    int16 MR above the scan (docs/reliability.md, "Memory of MR normalisation in `prepare`")."""
    shape = (160, 256, 256)  # z, y, x: 20 MiB of int16
    rng = np.random.default_rng(0)
    array = (rng.integers(1, 1500, shape) * (rng.random(shape) < 0.5)).astype(np.int16)  # half background
    image = sitk.GetImageFromArray(array)
    del array
    _warm_up("mr")
    if not _reset_peak():
        pytest.skip("/proc/self/clear_refs cannot be written here")
    base = _peak_bytes()
    normalise_image(image, "mr")
    peak = (_peak_bytes() - base) / (np.prod(shape) * 2)
    # as for the CT (4x; it was 8x): the foreground values (1x here) are gone before the image is filled
    assert peak < 5.0, f"peak {peak:.1f} x the int16 scan"
