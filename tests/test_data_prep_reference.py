"""Data preparation checked against the datasets' own definitions and METHOD.md, not against the code's output.

Each test pins one fact a wrong preparation would silently break (found by a mutation audit: the code could
be changed there without any other test failing): the official splits and sizes, the geometry of resampling
and cropping, the label rules of the masks, the LIDC reader rules, the patient-level splits. Tiny synthetic
volumes only.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import brats, lidc, lits, luna16, pecad
from dira3d.data.geometry import crop_cube, resample
from dira3d.data.io import DataError, check_mask_matches, read_image, read_mask, xyz_to_image
from dira3d.data.normalize import mask_values, normalize_mr


def _image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = xyz_to_image(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


# ---------------------------------------------------------------- the protocols of METHOD.md section 4


def test_official_splits_and_sizes_are_those_of_the_method():
    """METHOD.md: LUNA16 subsets 0-4 train, 5-6 val, 7-9 test; LiTS volumes 0-99 / 100-114 / 115-129; LIDC-IDRI
    510 / 100 / 408 (cut in that order); BraTS 190 train / 95 test; PE-CAD 3-fold CV; cubes 64x64x32 (NCC, NCS)
    and 64x64x64 (ECC); HU window [-1000, 1000]; NCS at 1 mm isotropic."""
    assert luna16.OFFICIAL_SPLIT == {"training": (0, 1, 2, 3, 4), "validation": (5, 6), "test": (7, 8, 9)}
    assert lits.OFFICIAL_SPLIT == {"training": (0, 99), "validation": (100, 114), "test": (115, 129)}
    assert list(lidc.DEFAULT_SPLIT.items()) == [("training", 510), ("validation", 100), ("test", 408)]
    assert list(brats.DEFAULT_SPLIT.items()) == [("training", 190), ("test", 95)]
    assert brats.MODALITIES == ("t1", "t1ce", "t2", "flair")  # T1, T1Gd, T2, FLAIR: the channel order

    luna = luna16.build_parser().parse_args(["--src", "s", "--dst", "d"])
    assert tuple(luna.cube_size) == (64, 64, 32) and tuple(luna.window) == (-1000.0, 1000.0)
    assert (luna.train_subsets, luna.val_subsets, luna.test_subsets) == ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9])
    liver = lits.build_parser().parse_args(["--src", "s", "--dst", "d"])
    assert (tuple(liver.train_range), tuple(liver.val_range), tuple(liver.test_range)) == ((0, 99), (100, 114), (115, 129))
    pe = pecad.build_parser().parse_args(["--src", "s", "--dst", "d"])
    assert tuple(pe.cube_size) == (64, 64, 64) and pe.folds == 3 and tuple(pe.window) == (-1000.0, 1000.0)
    brain = brats.build_parser().parse_args(["--src", "s", "--dst", "d"])
    assert tuple(brain.split) == (190, 95) and tuple(brain.percentiles) == (0.5, 99.5)
    nodules = inspect.signature(lidc.prepare).parameters
    assert nodules["spacing"].default == 1.0 and tuple(nodules["crop"].default) == (64, 64, 32)
    assert tuple(nodules["split"].default) == (510, 100, 408) and tuple(nodules["window"].default) == (-1000.0, 1000.0)


# ---------------------------------------------------------------- geometry


def test_resample_size_is_the_rounded_field_of_view():
    """The new grid covers the old box to the nearest voxel: 12 x 0.7 mm = 8.4 mm is 8 voxels of 1 mm (not 9),
    12.6 mm is 13, and an axis thinner than half a new voxel still keeps one voxel."""
    image = _image(np.zeros((12, 10, 2), np.float32), spacing=(0.7, 1.26, 0.2))
    out = resample(image, 1.0)
    assert out.GetSize() == (8, 13, 1)  # 8.4 -> 8, 12.6 -> 13, 0.4 -> 1 (at least one voxel)
    with pytest.raises(ValueError, match="positive"):
        resample(image, 0.0)
    with pytest.raises(ValueError, match="positive"):
        resample(image, (1.0, -1.0, 1.0))


def test_resample_puts_no_plane_outside_the_field_of_view():
    """A field of view of a whole number and a half of new voxels (3 x 0.5 mm = 1.5 mm at 1 mm, 11 x 1 mm = 5.5 at
    2 mm) rounds down: a last plane centred on the box's edge would be all fill value (a plane of -1024 HU at the edge
    of a scan). Float noise (0.1 mm steps) does not bring that plane back, and the one voxel of an axis thinner than
    half a new voxel is centred on the old box, so it samples the scan too."""
    for (size, spacing, new, expected) in (((4, 4, 3), 0.5, 1.0, 1), ((4, 4, 11), 1.0, 2.0, 5), ((4, 4, 9), 1.0, 2.0, 4),
                                           ((4, 4, 15), 0.1, 0.2, 7), ((4, 4, 35), 0.3, 0.2, 52),
                                           ((4, 4, 2), 0.2, 1.0, 1), ((4, 4, 5), 0.2, 2.0, 1)):
        image = _image(np.full(size, 5.0, np.float32), spacing=(1.0, 1.0, spacing), origin=(3.0, -2.0, 7.0))
        for interpolator in ("linear", "nearest"):
            out = resample(image, (1.0, 1.0, new), interpolator, default_value=-1024.0)
            assert out.GetSize()[2] == expected, (size, spacing, new)
            assert np.all(sitk.GetArrayFromImage(out) == 5.0), (size, spacing, new, interpolator)


def test_crop_cube_outside_along_one_axis_only_is_all_padding():
    """A centre far outside the volume along one axis but inside along the others gives a cube of padding (the
    case of a LUNA16 candidate whose z lies beyond the scan), not an error or voxels from the other end."""
    array = np.arange(10 * 8 * 6, dtype=np.float32).reshape(10, 8, 6)
    for centre in ((-40, 4, 3), (4, -40, 3), (4, 4, 60), (-3, 4, 3)):
        cube = crop_cube(array, centre, (4, 4, 2), pad_value=-7)
        assert cube.shape == (4, 4, 2) and np.all(cube == -7), centre
    with pytest.raises(ValueError, match="positive"):
        crop_cube(array, (5, 4, 3), (0, 4, 2))


# ---------------------------------------------------------------- readers


def test_a_4d_file_with_several_volumes_is_not_read_as_its_first(tmp_path):
    """A 4D NIfTI with one volume is a 3D scan (its spacing is pixdim[1..3]; pixdim[4] is a time step); with several
    (a multi-sequence MRI, a time series) reading only the first would silently drop the others."""
    with_one = nib.Nifti1Image(np.zeros((6, 5, 4, 1), np.int16), None)
    with_one.header.set_zooms((0.8, 0.8, 2.5, 0.0))  # no time step: pixdim[4] = 0 is no voxel spacing
    with_one.set_sform(None, code=0)
    with_one.set_qform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    nib.save(with_one, tmp_path / "one.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 3), np.int16), np.eye(4)), tmp_path / "three.nii.gz")
    one = read_image(tmp_path / "one.nii.gz")
    assert one.GetSize() == (6, 5, 4) and one.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    with pytest.raises(DataError, match=r"three\.nii\.gz.*4D image"):
        read_image(tmp_path / "three.nii.gz")


def test_a_metaimage_raw_a_few_bytes_short_is_named_truncated(tmp_path):
    """LUNA16's .raw files hold 2 bytes per voxel (MET_SHORT): one short by 10 bytes is truncated (ITK itself
    says only 'No such file or directory')."""
    sitk.WriteImage(_image(np.ones((12, 10, 6), np.int16)), str(tmp_path / "scan.mhd"))
    raw = tmp_path / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"scan\.raw.*truncated: 1430 bytes.*needs 1440"):
        read_image(tmp_path / "scan.mhd")


@pytest.mark.parametrize("values, max_label, ok", [
    ((0, 1, 2), 2, True),  # LiTS: 0 background, 1 liver, 2 tumour
    ((0, 1, 3), 2, False),  # not a LiTS label
    ((0, 1, 2, 4), 255, True),  # BraTS: 1, 2, 4
    ((0, -1, 1), 255, False),  # negative
    ((0, 0.5, 1), 255, False),  # not an integer: a probability map, not a label map
])
def test_read_mask_accepts_only_integer_labels_in_range(tmp_path, values, max_label, ok):
    array = np.zeros((6, 5, 4), np.float32)
    array[1, 1, 1], array[2, 2, 2], array[3, 3, 3] = values[0], values[1], values[2]
    if len(values) > 3:
        array[4, 4, 3] = values[3]
    sitk.WriteImage(_image(array), str(tmp_path / "m.nii.gz"))
    if ok:
        assert np.array_equal(np.unique(sitk.GetArrayFromImage(read_mask(tmp_path / "m.nii.gz", max_label))),
                              sorted(set(values)))
    else:
        with pytest.raises(DataError, match=r"m\.nii\.gz.*not a label image"):
            read_mask(tmp_path / "m.nii.gz", max_label)


def test_a_mask_of_another_spacing_origin_or_direction_is_refused():
    """A mask on another voxel grid is misaligned with its image even when the size matches: half a voxel off
    is a shift, not header rounding."""
    image = _image(np.zeros((6, 5, 4), np.int16), spacing=(0.8, 0.8, 2.5))
    shifted = _image(np.ones((6, 5, 4), np.uint8), spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 1.25))
    with pytest.raises(DataError, match=r"msk.*origin"):
        check_mask_matches(image, shifted, "img", "msk")
    rounded = _image(np.ones((6, 5, 4), np.uint8), spacing=(0.8000001, 0.8, 2.5), origin=(0.0, 1e-5, 0.0))
    check_mask_matches(image, rounded, "img", "msk")  # differences of header rounding are no misalignment
    mask = _image(np.ones((6, 5, 4), np.uint8), spacing=(1.0, 0.8, 2.5))
    with pytest.raises(DataError, match=r"msk.*spacing"):
        check_mask_matches(image, mask, "img", "msk")
    flipped = _image(np.ones((6, 5, 4), np.uint8), spacing=(0.8, 0.8, 2.5))
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(DataError, match=r"msk.*direction"):
        check_mask_matches(image, flipped, "img", "msk")


def test_a_dicom_slice_given_twice_is_named_a_duplicate_not_a_missing_slice(tmp_path):
    """Two files at one slice position (a duplicated file, two series under one UID) are not a gap to restore."""
    from conftest import write_dicom_series

    write_dicom_series(tmp_path / "series", np.zeros((8, 6, 5), np.int16))
    copy = sitk.ReadImage(str(tmp_path / "series" / "slice002.dcm"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "series" / "slice002.dcm"))
    reader.ReadImageInformation()
    for key in reader.GetMetaDataKeys():
        copy.SetMetaData(key, reader.GetMetaData(key))
    copy.SetMetaData("0008|0018", "1.2.826.0.1.3680043.2.1125.3.99")  # its own SOP instance UID
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "series" / "slice002b.dcm"))
    writer.Execute(copy)
    with pytest.raises(DataError, match="two slices at the same position") as caught:
        read_image(tmp_path / "series")
    assert "missing" not in str(caught.value)


# ---------------------------------------------------------------- intensities


def test_mr_percentiles_are_the_ones_asked_for():
    """--percentiles LOW HIGH map those percentiles of the non-zero voxels to 0 and 1 (not HIGH = 100 - LOW)."""
    volume = np.concatenate([np.zeros(20), np.arange(1, 101)]).astype(np.float32)
    lo, hi = np.percentile(np.arange(1, 101), [10, 50])
    out = normalize_mr(volume, lower=10, upper=50)
    assert np.allclose(out[20:], np.clip((np.arange(1, 101) - lo) / (hi - lo), 0, 1))
    assert np.all(out[:20] == 0)


def test_label_maps_are_told_from_scans():
    """A multi-organ label map (10 labels) is a mask; a few negative values are not labels (a thresholded CT)."""
    labels = np.arange(10, dtype=np.int16).repeat(8).reshape(5, 4, 4)
    assert mask_values(labels) is not None and mask_values(labels).size == 10
    assert mask_values(np.array([[-1, 0], [1, 0]], np.int16).reshape(2, 2, 1)) is None


# ---------------------------------------------------------------- LUNA16 (candidates_V2.csv / annotations.csv)


def _luna_scan(path: Path, origin=(-40.0, -30.0, -100.0), spacing=(0.7, 0.8, 2.5)) -> sitk.Image:
    hu = np.full((16, 14, 8), -900, np.int16)
    hu[7:10, 6:9, 3:6] = 100
    image = _image(hu, spacing=spacing, origin=origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def test_luna16_rows_as_the_csv_gives_them_and_subsets_outside_every_split(tmp_path):
    """candidates_V2.csv: world x, y, z in mm and class 0/1 (nothing else). Each cube's entry carries the row's
    world_mm (x, y, z as written) and its subset; diameter_mm (annotations.csv) only for a positive; a centre
    one voxel past the last is counted as outside; a subset in no split is listed only under its subsetN key."""
    src = tmp_path / "LUNA16"
    scan = _luna_scan(src / "subset0" / "1.1.mhd")
    _luna_scan(src / "subset3" / "1.3.mhd")
    nodule = scan.TransformContinuousIndexToPhysicalPoint((8.0, 7.0, 4.0))
    past_end = scan.TransformContinuousIndexToPhysicalPoint((8.0, 7.0, 8.0))  # z index == size (z is not flipped)
    beside = (nodule[0] + 1.0, nodule[1], nodule[2])  # a negative inside the annotated nodule
    rows = ["seriesuid,coordX,coordY,coordZ,class",
            "1.1,{:.4f},{:.4f},{:.4f},1".format(*nodule), "1.1,{:.4f},{:.4f},{:.4f},0".format(*beside),
            "1.1,{:.4f},{:.4f},{:.4f},0".format(*past_end), "1.1,{:.4f},{:.4f},{:.4f},2".format(*nodule),
            "1.3,{:.4f},{:.4f},{:.4f},1".format(*nodule)]
    (src / "candidates_V2.csv").write_text("\n".join(rows) + "\n")
    (src / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                         "1.1,{:.4f},{:.4f},{:.4f},6.0\n".format(*nodule))
    with pytest.raises(ValueError, match="max-negatives-per-scan"):
        luna16.prepare(src, tmp_path / "bad", max_negatives_per_scan=-1, progress=False)
    results = luna16.prepare(src, tmp_path / "out", cube_size=(8, 8, 4), keep_going=True, progress=False,
                             splits={"training": [0], "validation": [], "test": []})
    status = {r.case_id: r for r in results}
    assert status["candidates_V2.csv data row 4"].status == "failed" and "class '2'" in status["candidates_V2.csv data row 4"].reason
    assert status["1.1"].info["candidates"] == 3 and status["1.1"].info["centre_outside_volume"] == 1
    pre = json.loads((tmp_path / "out" / "pretrain_datalist.json").read_text())
    assert [e["case_id"] for e in pre["training"]] == ["1.1"] and pre["validation"] == pre["test"] == []
    assert [(e["case_id"], e["subset"]) for e in pre["subset3"]] == [("1.3", 3)]
    ncc = json.loads((tmp_path / "out" / "ncc_datalist.json").read_text())
    assert ncc["validation"] == ncc["test"] == [] and {e["case_id"] for e in ncc["training"]} == {"1.1"}
    by_row = {e["candidate"]: e for e in ncc["training"]}
    assert sorted(by_row) == [0, 1, 2] and all(e["subset"] == 0 for e in by_row.values())
    assert by_row[0]["world_mm"] == pytest.approx(list(nodule), abs=1e-4) and by_row[0]["diameter_mm"] == 6.0
    assert by_row[1]["world_mm"] == pytest.approx(list(beside), abs=1e-4) and "diameter_mm" not in by_row[1]


# ---------------------------------------------------------------- LIDC-IDRI reader rules (docs/data.md, "What is done")


def _ring(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The closed outline of the box [x0, x1] x [y0, y1] (column, row), in drawing order."""
    top = [(x, y0) for x in range(x0, x1 + 1)]
    right = [(x1, y) for y in range(y0 + 1, y1 + 1)]
    bottom = [(x, y1) for x in range(x1 - 1, x0 - 1, -1)]
    left = [(x0, y) for y in range(y1 - 1, y0, -1)]
    return np.array(top + right + bottom + left)


def test_lidc_hole_outline_is_nodule_and_tiny_outlines_keep_their_pixels():
    """An inclusion=FALSE outline is drawn around the hole, on nodule: with --include-outline only its interior is
    cut. An outline with no pixel inside (a 2-pixel mark of a tiny nodule) keeps its own pixels."""
    from dira3d.data.lidc_xml import ReaderNodule, RoiOutline, rasterize_nodule

    nodule = ReaderNodule(0, "a", (RoiOutline(0.0, "", True, _ring(2, 2, 8, 8)),
                                   RoiOutline(0.0, "", False, _ring(4, 4, 6, 6))))
    with_outline = rasterize_nodule(nodule, (12, 12, 1), lambda roi: 0, include_outline=True)
    assert len(with_outline) == 7 * 7 - 1 and [5, 5, 0] not in with_outline.tolist()
    tiny = ReaderNodule(0, "t", (RoiOutline(0.0, "", True, np.array([(5, 5), (6, 5)])),))
    assert sorted(rasterize_nodule(tiny, (12, 12, 1), lambda roi: 0).tolist()) == [[5, 5, 0], [6, 5, 0]]


def test_lidc_outline_beyond_the_slice_is_clipped_to_it():
    from dira3d.data.lidc_xml import ReaderNodule, RoiOutline, rasterize_nodule

    nodule = ReaderNodule(0, "edge", (RoiOutline(0.0, "", True, _ring(6, 6, 14, 14)),))
    voxels = rasterize_nodule(nodule, (12, 10, 3), lambda roi: 1)
    assert len(voxels) and voxels[:, 0].max() == 11 and voxels[:, 1].max() == 9 and voxels.min() >= 0
    assert set(voxels[:, 2].tolist()) == {1}
    outside = rasterize_nodule(nodule, (12, 10, 3), lambda roi: 3)  # a slice the image does not have
    assert len(outside) == 0


def test_lidc_grouping_links_closest_pairs_first_and_by_the_larger_radius():
    """Marks are linked closest first; a large nodule's marks are linked within its equivalent radius."""
    from dira3d.data.lidc_xml import equivalent_radius_mm, group_reader_nodules

    # reader 0 at 0 mm, reader 1 at 9 mm and at 0.5 mm: the 0.5 mm mark is the same nodule, not the 9 mm one
    marks = [np.array([0.0, 0, 0]), np.array([9.0, 0, 0]), np.array([0.5, 0, 0])]
    assert group_reader_nodules(marks, [2.0] * 3, [0, 1, 1], 10.0) == [[0, 2], [1]]
    # two readers' centroids of a 30 mm mass 12 mm apart: one nodule (radius 15 mm > the 10 mm linking distance)
    far = [np.array([0.0, 0, 0]), np.array([12.0, 0, 0])]
    assert group_reader_nodules(far, [15.0, 15.0], [0, 1], 10.0) == [[0, 1]]
    assert group_reader_nodules(far, [3.0, 3.0], [0, 1], 10.0) == [[0], [1]]
    sphere_mm3 = 4 / 3 * math.pi * 3.0 ** 3
    assert equivalent_radius_mm(1000, sphere_mm3 / 1000) == pytest.approx(3.0)


def test_lidc_consensus_box_has_a_zero_margin():
    """The vote box is padded by one voxel of 0 so the linear resampling of the mask fades out at its edge."""
    from dira3d.data.lidc_xml import consensus_fraction

    start, fraction = consensus_fraction([np.array([[3, 4, 5], [4, 4, 5]]), np.array([[4, 4, 5]])])
    assert start.tolist() == [2, 3, 4] and fraction.shape == (4, 3, 3)
    assert fraction[1:3, 1, 1].tolist() == [0.5, 1.0] and fraction.sum() == 1.5


def test_lidc_slice_lookup_by_z_within_half_a_slice_and_by_sop_uid_first(tmp_path):
    """An outline's slice is the one of its imageSOP_UID; without a known UID the slice nearest imageZposition,
    within half a slice thickness (the XML's z is rounded), else none."""
    from conftest import write_dicom_series
    from dira3d.data.lidc_xml import RoiOutline

    write_dicom_series(tmp_path / "series", np.zeros((8, 6, 5), np.int16), spacing=(0.7, 0.7, 2.0),
                       origin=(-50.0, -60.0, 100.0), sop_prefix="1.2.3")
    image = read_image(tmp_path / "series")
    slice_of = lidc._slice_lookup(tmp_path / "series", image)

    def z_roi(z: float, sop: str = "") -> RoiOutline:
        return RoiOutline(z, sop, True, np.array([(1, 1), (2, 2)]))

    assert [slice_of(z_roi(z)) for z in (99.2, 100.0, 101.1, 107.9, 108.0)] == [0, 0, 1, 4, 4]
    assert slice_of(z_roi(98.9)) is None and slice_of(z_roi(109.1)) is None
    # a z that disagrees with its SOP UID: the UID names the slice
    assert slice_of(z_roi(100.0, "1.2.3.4")) == 3 and slice_of(z_roi(float("nan"), "1.2.3.2")) == 1


def test_lidc_slice_lookup_by_z_finds_no_slice_in_a_series_whose_slices_do_not_move_along_z(tmp_path):
    """A sagittal series (its slices step along x: the z step per slice is 0) has no slice at an imageZposition: the
    outline is left out (None), not a ZeroDivisionError for the whole case; its SOP UIDs still name slices."""
    import SimpleITK as sitk

    from dira3d.data.lidc_xml import RoiOutline

    (tmp_path / "series").mkdir()
    image = sitk.Image(5, 6, 8, sitk.sitkInt16)
    image.SetSpacing((0.7, 0.7, 2.0))
    image.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))  # slices along x, columns along z
    slice_of = lidc._slice_lookup(tmp_path / "series", image)
    assert slice_of(RoiOutline(0.0, "", True, np.array([(1, 1), (2, 2)]))) is None


def test_lidc_two_series_of_one_patient_share_its_part_and_malignancy_is_the_median(tmp_path):
    """docs/data.md: entries carry case_id = the patient id (a second series is <patient>_s2 only in manifests/),
    the split is by patient, and malignancy is the median of the readers' ratings (1, 2, 5 -> 2, not the mean)."""
    from conftest import write_dicom_series
    from test_data_lidc import CENTRE, phantom, sphere_nodule, write_series, write_xml

    src = tmp_path / "LIDC-IDRI"
    for uid in ("1.2.826.0.1.71", "1.2.826.0.1.72"):
        folder = src / "LIDC-IDRI-0007" / f"{uid}.0" / uid
        write_series(folder, phantom(), "LIDC-IDRI-0007", uid)
        write_xml(folder / "069.xml", uid, [sphere_nodule(f"r{m}", CENTRE, uid, use_sop=True, malignancy=m) for m in (1, 2, 5)])
    # the patient's chest radiograph (CR, read in IdriReadMessage files) is no CT series: ignored
    (src / "LIDC-IDRI-0007" / "cr").mkdir()
    write_dicom_series(src / "LIDC-IDRI-0007" / "cr" / "1", np.zeros((16, 16, 1), np.int16), modality="CR")
    # a patient whose series cannot be read fails, and keeps its place in the split
    (src / "LIDC-IDRI-0008" / "s" / "1").mkdir(parents=True)
    (src / "LIDC-IDRI-0008" / "s" / "1" / "1-001.dcm").write_bytes(b"not a DICOM file")
    results = lidc.prepare(src, tmp_path / "out", split=(1, 1, 1), keep_going=True, progress=False)
    assert sorted((r.case_id, r.status) for r in results) == [
        ("LIDC-IDRI-0007", "written"), ("LIDC-IDRI-0007_s2", "written"), ("LIDC-IDRI-0008", "failed")]
    datalist = json.loads((tmp_path / "out" / "lidc_datalist.json").read_text())
    listed = [(part, e["case_id"], e["malignancy"]) for part in ("training", "validation", "test") for e in datalist[part]]
    assert len(listed) == 2 and len({part for part, _, _ in listed}) == 1
    assert all(case == "LIDC-IDRI-0007" and rating == 2.0 for _, case, rating in listed)
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert sorted(split["training"] + split["validation"] + split["test"]) == ["LIDC-IDRI-0007", "LIDC-IDRI-0008"]


def test_lidc_readers_of_a_large_nodule_are_one_nodule():
    """Two readers' outlines of a 28 mm mass whose centroids lie 12 mm apart (more than --group-mm 10) are linked
    by the mass's equivalent radius (about 15 mm): one nodule with two readers, not two nodules."""
    from dira3d.data.lidc_xml import LidcReads, ReaderNodule, RoiOutline

    image = _image(np.zeros((64, 40, 20), np.int16))  # 1 mm voxels

    def mass(reader: int, x0: int) -> ReaderNodule:
        rois = tuple(RoiOutline(float(k), "", True, _ring(x0, 5, x0 + 29, 34)) for k in range(1, 19))
        return ReaderNodule(reader, f"m{reader}", rois)

    reads = LidcReads(Path("x.xml"), "1.2", 2, [mass(0, 5), mass(1, 17)], 0)
    nodules, notes = lidc.consensus_nodules(image, reads, lambda roi: int(roi.z_mm), consensus=0.5)
    assert [n["readers"] for n in nodules] == [2] and notes == []


# ---------------------------------------------------------------- LiTS-2017 and BraTS 2018


def _lits_case(folder: Path, number: int, labels: dict[tuple[int, int, int], int] | None = None) -> None:
    hu = np.full((8, 8, 4), -900, np.int16)
    hu[2:6, 2:6, 1:3] = 60
    seg = np.zeros((8, 8, 4), np.uint8)
    if labels is None:
        seg[2:6, 2:6, 1:3] = 1
        seg[3, 3, 1] = 2
    for (x, y, z), value in (labels or {}).items():
        seg[x, y, z] = value
    sitk.WriteImage(_image(hu), str(folder / f"volume-{number}.nii"))
    sitk.WriteImage(_image(seg), str(folder / f"segmentation-{number}.nii"))


def test_lits_ranges_are_inclusive_and_labels_are_0_1_2(tmp_path):
    """Volumes 0-99 train, 100-114 validation, 115-129 test, both ends included; a label other than 0, 1 (liver)
    and 2 (tumour) fails its case; a liver that vanishes on the --spacing grid fails its case."""
    src = tmp_path / "LiTS"
    src.mkdir()
    for number in (99, 100, 114, 115, 129):
        _lits_case(src, number)
    _lits_case(src, 7, {(3, 3, 1): 1, (4, 4, 1): 3})
    _lits_case(src, 8, {(0, 0, 0): 1})  # one liver voxel, which a 4 mm grid does not sample
    results = {r.case_id: r for r in lits.prepare(src, tmp_path / "out", keep_going=True, progress=False)}
    assert results["lits-007"].status == "failed" and "not a label image" in results["lits-007"].reason
    datalist = json.loads((tmp_path / "out" / "lits_datalist.json").read_text())
    assert {k: [e["volume"] for e in datalist[k]] for k in ("training", "validation", "test")} == {
        "training": [8, 99], "validation": [100, 114], "test": [115, 129]}
    coarse = {r.case_id: r for r in lits.prepare(src, tmp_path / "coarse", spacing=(4.0, 4.0, 4.0), keep_going=True,
                                                 progress=False)}
    assert coarse["lits-008"].status == "failed" and "empty after resampling" in coarse["lits-008"].reason
    assert coarse["lits-099"].status == "written"
    with pytest.raises(ValueError, match="reversed"):
        lits.prepare(src, tmp_path / "x", splits={"training": (10, 5), "validation": (100, 114), "test": (115, 129)})


def test_brats_segmentation_on_another_grid_fails_its_patient(tmp_path):
    """The _seg file must lie on the grid of the sequences (BraTS ships them co-registered): a segmentation shifted
    by a voxel would label the wrong voxels."""
    src = tmp_path / "BraTS" / "HGG"
    for pid, shift in (("Brats18_A_1", 0.0), ("Brats18_B_1", 1.0)):
        folder = src / pid
        folder.mkdir(parents=True)
        brain = np.zeros((6, 5, 4), np.float32)
        brain[1:5, 1:4, 1:3] = np.arange(1, 25, dtype=np.float32).reshape(4, 3, 2)
        for kind in brats.MODALITIES:
            nib.save(nib.Nifti1Image(brain, np.eye(4)), folder / f"{pid}_{kind}.nii.gz")
        seg = (brain > 20).astype(np.uint8) * 2
        affine = np.eye(4)
        affine[0, 3] = shift
        nib.save(nib.Nifti1Image(seg, affine), folder / f"{pid}_seg.nii.gz")
    results = {r.case_id: r for r in brats.prepare(src.parent, tmp_path / "out", keep_going=True, progress=False)}
    assert results["Brats18_A_1"].status == "written"
    assert results["Brats18_B_1"].status == "failed" and "Brats18_B_1_seg.nii.gz" in results["Brats18_B_1"].reason
    assert "origin" in results["Brats18_B_1"].reason


def test_brats_file_names_are_matched_whatever_their_case(tmp_path):
    folder = tmp_path / "LGG" / "Brats18_X_1"
    folder.mkdir(parents=True)
    for kind in ("T1", "t1ce", "T2", "FLAIR", "seg"):
        (folder / f"Brats18_X_1_{kind}.nii.gz").write_bytes(b"")
    found = brats.find_patients(tmp_path)["Brats18_X_1"]
    assert all(found[k] is not None for k in (*brats.MODALITIES, "seg")) and found["grade"] == "LGG"
    assert found["t1"].name == "Brats18_X_1_T1.nii.gz" and found["t1ce"].name == "Brats18_X_1_t1ce.nii.gz"


# ---------------------------------------------------------------- PE-CAD (the layout of docs/data.md)


def test_pecad_coordinates_bounds_world_mm_and_folds_by_the_documented_rule(tmp_path):
    """coords world (mm, x y z) or voxel (0-based x y z, continuous: -0.4 lies in the first voxel, the size itself
    is outside); another coords word is a bad row; cubes lie on the volume's voxel grid even for a world point
    between voxel centres; folds: sorted patient ids permuted by default_rng(seed), fold = position % k."""
    src = tmp_path / "PE-CAD"
    (src / "volumes").mkdir(parents=True)
    size = (10, 9, 8)
    rows = ["patient_id,x,y,z,coords,label"]
    for n, pid in enumerate(("PE05", "PE01", "PE03", "PE02")):
        hu = np.full(size, 40, np.int16)
        hu[5, 4, 3] = 1000
        image = _image(hu, spacing=(0.7, 0.8, 1.5), origin=(-10.0 * n, 5.0, -300.0))
        sitk.WriteImage(image, str(src / "volumes" / f"{pid}.nii.gz"))
        world = image.TransformContinuousIndexToPhysicalPoint((5.3, 3.8, 3.2))  # nearest voxel (5, 4, 3)
        rows.append(f"{pid},{world[0]:.5f},{world[1]:.5f},{world[2]:.5f},world,1")
        rows.append(f"{pid},-0.4,0,0,voxel,0")
        if pid == "PE03":  # a point inside the volume, in a coordinate kind the layout does not have
            rows.append("PE03,{:.4f},{:.4f},{:.4f},pixel,0".format(*image.TransformIndexToPhysicalPoint((1, 1, 1))))
    rows.append("PE01,10,0,0,voxel,0")
    (src / "candidates.csv").write_text("\n".join(rows) + "\n")
    results = {r.case_id: r for r in pecad.prepare(src, tmp_path / "out", cube_size=(4, 4, 4), keep_going=True,
                                                   progress=False)}
    assert results["PE01"].status == "failed" and "row 10 (candidate 9)" in results["PE01"].reason
    assert "outside the volume" in results["PE01"].reason
    assert results["PE03"].status == "failed" and "row 7 (candidate 6)" in results["PE03"].reason
    assert "got 'pixel'" in results["PE03"].reason
    assert results["PE02"].status == results["PE05"].status == "written"
    entries = json.loads((tmp_path / "out" / "pecad_datalist.json").read_text())["training"]
    assert len(entries) == 8  # the two good rows of each patient, also of the failed ones
    for entry in entries:
        cube = nib.load(tmp_path / "out" / entry["image"])
        source = sitk.ReadImage(str(src / "volumes" / f"{entry['case_id']}.nii.gz"))
        index, voxel, value = ((5.3, 3.8, 3.2), (5, 4, 3), 1.0) if entry["label"] else ((-0.4, 0, 0), (0, 0, 0), 0.52)
        assert entry["world_mm"] == pytest.approx(list(source.TransformContinuousIndexToPhysicalPoint(index)), abs=1e-3)
        assert cube.get_fdata()[2, 2, 2] == pytest.approx(value)  # 1000 HU / 40 HU at the cube centre
        # the cube's centre voxel is the volume's voxel nearest the point, on the volume's voxel grid
        centre_lps = (cube.affine @ np.array([2, 2, 2, 1.0]))[:3] * [-1, -1, 1]
        assert np.allclose(centre_lps, source.TransformIndexToPhysicalPoint(voxel), atol=1e-4)
    ids = sorted(["PE01", "PE02", "PE03", "PE05"])
    order = np.random.default_rng(0).permutation(len(ids))
    expected = {ids[i]: position % 3 for position, i in enumerate(order)}
    assert json.loads((tmp_path / "out" / "split.json").read_text())["folds"] == expected
    assert {e["case_id"]: e["fold"] for e in entries} == expected


# ---------------------------------------------------------------- the split rule (dira3d.data.splits docstring)


def test_every_part_gets_a_patient_when_there_are_enough_and_new_patients_fill_the_earliest_tie():
    from dira3d.data.splits import assign_folds, extend_split, proportional_sizes

    # largest remainder gives 2 / 0 / 1 and 3 / 0 / 2: the empty part takes one from the largest
    assert proportional_sizes(3, (510, 100, 408)) == [1, 1, 1]
    assert proportional_sizes(5, (510, 100, 408)) == [2, 1, 2]
    assert proportional_sizes(2, (510, 100, 408)) == [1, 0, 1]  # fewer patients than parts: no such promise
    # a rerun with two new patients: validation and test are one short each; the tie goes to the earlier part
    ids = ["a", "b", "c"]
    new = [p for p in (ids[i] for i in np.random.default_rng(0).permutation(3)) if p != "a"]
    kept = extend_split(ids, {"training": 1, "validation": 1, "test": 1}, 0, {"training": ["a"]})
    assert kept == {"training": ["a"], "validation": [new[0]], "test": [new[1]]}
    with pytest.raises(ValueError, match="folds"):
        assign_folds(ids, 1)


# ---------------------------------------------------------------- generic folders


def test_generic_label_suffix_ends_the_stem_and_a_mask_lost_on_the_new_grid_fails(tmp_path):
    """--label-suffix _label marks a_label.nii.gz as the mask of a.nii.gz, not b_labelled.nii.gz (a scan); a mask
    that no voxel of the --spacing grid samples fails its case instead of being written empty."""
    from dira3d.data import generic

    src = tmp_path / "scans"
    src.mkdir()
    hu = np.full((8, 8, 4), -1000, np.int16)
    hu[2:6, 2:6, 1:3] = 40
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[0, 0, 0] = 1
    for name, array in (("a", hu), ("a_label", mask), ("b_labelled", hu)):
        sitk.WriteImage(_image(array), str(src / f"{name}.nii.gz"))
    found = generic.discover(src, "", "_label")
    assert [(cid, image.name, label and label.name) for cid, image, label in found] == [
        ("a", "a.nii.gz", "a_label.nii.gz"), ("b_labelled", "b_labelled.nii.gz", None)]
    results = {r.case_id: r for r in generic.prepare(src, tmp_path / "out", modality="ct", label_suffix="_label",
                                                     spacing=(4.0, 4.0, 4.0), keep_going=True, progress=False)}
    assert results["a"].status == "failed" and "a_label.nii.gz" in results["a"].reason
    assert "empty after resampling" in results["a"].reason and results["b_labelled"].status == "written"



def test_ct_volumes_are_resampled_linearly():
    """docs/data.md: images are resampled linearly (masks nearest). A CT ramp of 100 HU per 2 mm voxel resampled to
    1 mm: the voxel centred 1.25 old voxels in holds -875 HU (0.0625), not a neighbour's -900 or -800."""
    from dira3d.data.generic import normalise_image

    ramp = np.broadcast_to((-1000 + 100 * np.arange(6))[:, None, None], (6, 4, 4)).astype(np.int16)
    image = _image(ramp, spacing=(2.0, 2.0, 2.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # already RAS: the x axis is kept
    out = normalise_image(image, "ct", spacing=(1.0, 1.0, 1.0))
    assert out.GetSize() == (12, 8, 8)
    assert sitk.GetArrayFromImage(out)[4, 4, 3] == pytest.approx((-875 + 1000) / 2000)


# ---------------------------------------------------------------- datalists


def test_only_a_test_list_may_be_bare_paths(tmp_path):
    """The Medical Segmentation Decathlon's 'test' list is bare paths; a 'training' list of bare paths is an error
    (its entries have no keys), not images without labels."""
    from dira3d.data.datalist import DatalistError, datalist_entries

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": ["a.nii.gz"], "test": ["b.nii.gz"]}))
    assert datalist_entries(path, "test") == [{"image": str(tmp_path / "b.nii.gz")}]
    with pytest.raises(DatalistError, match="entry 0 is a str"):
        datalist_entries(path, "training")
