"""A rerun into the same --dst with another setting that shapes the outputs (cube size, BraTS
channels / percentiles / spacing, LIDC crop / consensus …) must stop, naming the datalist: otherwise
the cases already written are skipped, keep the old outputs, and the new datalist's meta lies
about them (docs/data.md, "One source per --dst")."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import brats, chestxray14, chexpert, lidc, luna16, montgomery, pecad, siim
from dira3d.data.io import DataError

sys.path.insert(0, str(Path(__file__).parent))
from test_data_cxr import _chexpert_layout, _nih_layout  # noqa: E402
from test_data_cxr_seg import _montgomery_layout, _siim_layout  # noqa: E402
from test_data_lidc import make_patient as make_lidc_patient  # noqa: E402


def _ct(path: Path) -> None:
    array = np.full((12, 20, 20), -700, np.int16)
    array[4:8, 8:12, 8:12] = 40
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_luna16_rerun_with_another_cube_size_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "LUNA16", tmp_path / "out"
    _ct(src / "subset0" / "1.2.3.mhd")
    (src / "candidates_V2.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n1.2.3,10,10,12,1\n")
    luna16.prepare(src, dst, cube_size=(16, 16, 8), progress=False)
    with pytest.raises(DataError, match=r"cube_size \[16, 16, 8\] \(now \[8, 8, 4\]\)"):
        luna16.prepare(src, dst, cube_size=(8, 8, 4), progress=False)
    assert nib.load(dst / "cubes" / "1.2.3" / "0000000.nii.gz").shape == (16, 16, 8)
    assert [r.status for r in luna16.prepare(src, dst, cube_size=(16, 16, 8), progress=False)] == ["skipped"]


def test_pecad_rerun_with_another_cube_size_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "PE-CAD", tmp_path / "out"
    _ct(src / "volumes" / "pe1.nii.gz")
    (src / "candidates.csv").write_text("patient_id,x,y,z,coords,label\npe1,10,10,6,voxel,1\n")
    pecad.prepare(src, dst, cube_size=(16, 16, 16), progress=False)
    with pytest.raises(DataError, match=r"cube_size \[16, 16, 16\] \(now \[8, 8, 8\]\)"):
        pecad.prepare(src, dst, cube_size=(8, 8, 8), progress=False)


def test_brats_rerun_with_other_channels_or_spacing_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "BraTS", tmp_path / "out"
    folder = src / "HGG" / "Brats18_X_1"
    folder.mkdir(parents=True)
    brain = np.zeros((10, 10, 8), np.float32)
    brain[2:8, 2:8, 2:6] = 1
    rng = np.random.default_rng(0)
    for kind in brats.MODALITIES:
        nib.save(nib.Nifti1Image(brain * rng.uniform(100, 900, brain.shape).astype(np.float32), np.eye(4)),
                 folder / f"Brats18_X_1_{kind}.nii.gz")
    seg = np.zeros(brain.shape, np.uint8)
    seg[4:6, 4:6, 3:5] = 2
    nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / "Brats18_X_1_seg.nii.gz")
    brats.prepare(src, dst, progress=False)
    with pytest.raises(DataError, match=r"brats_datalist\.json.*channels"):
        brats.prepare(src, dst, modalities=("flair",), progress=False)
    with pytest.raises(DataError, match=r"spacing null \(now \[2\.0, 2\.0, 2\.0\]\)"):
        brats.prepare(src, dst, spacing=(2.0, 2.0, 2.0), progress=False)
    with pytest.raises(DataError, match=r"percentiles"):
        brats.prepare(src, dst, percentiles=(1.0, 99.0), progress=False)
    assert nib.load(dst / "images" / "Brats18_X_1.nii.gz").shape == (10, 10, 8, 4)
    assert [r.status for r in brats.prepare(src, dst, progress=False)] == ["skipped"]


def test_lidc_rerun_with_another_crop_or_consensus_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "LIDC-IDRI", tmp_path / "out"
    make_lidc_patient(src, 1)
    lidc.prepare(src, dst, crop=(32, 32, 16), progress=False)
    with pytest.raises(DataError, match=r"lidc_datalist\.json.*crop \[32, 32, 16\] \(now \[64, 64, 32\]\)"):
        lidc.prepare(src, dst, progress=False)
    with pytest.raises(DataError, match=r"consensus 0\.5 \(now 1\.0\)"):
        lidc.prepare(src, dst, crop=(32, 32, 16), consensus=1.0, progress=False)
    with pytest.raises(DataError, match=r"include_outline false \(now true\)"):
        lidc.prepare(src, dst, crop=(32, 32, 16), include_outline=True, progress=False)
    assert [r.status for r in lidc.prepare(src, dst, crop=(32, 32, 16), progress=False)] == ["skipped"]


def _siim_src(root: Path) -> Path:
    root.mkdir(parents=True)
    _siim_layout(root)
    return root


@pytest.mark.parametrize("module, layout", [(chestxray14, _nih_layout), (chexpert, _chexpert_layout),
                                            (montgomery, lambda root: _montgomery_layout(root)[0]),
                                            (siim, _siim_src)],
                         ids=["chestxray14", "chexpert", "montgomery", "siim"])
def test_2d_rerun_with_another_size_is_refused(module, layout, tmp_path: Path) -> None:
    """A --size 32 rerun after --size 16 used to skip every image (16² PNGs left) under a datalist
    whose meta said 32."""
    src, dst = layout(tmp_path / "src"), tmp_path / "out"
    module.prepare(src, dst, size=16, progress=False)
    with pytest.raises(DataError, match=r"size 16 \(now 32\)"):
        module.prepare(src, dst, size=32, progress=False)
    assert {r.status for r in module.prepare(src, dst, size=16, progress=False)} == {"skipped"}
    redone = module.prepare(src, dst, size=32, overwrite=True, progress=False)
    assert {r.status for r in redone} == {"written"}
