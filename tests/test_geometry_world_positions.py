"""World coordinates end to end, on real files: a bright sphere (and its mask) at a known world point (LPS mm) is
written as NIfTI (identity, LPS, oblique and permuted affines, anisotropic voxels), NRRD, MetaImage (non-zero origin,
flipped axes) and a DICOM series written with pydicom (oblique or gantry-tilted ImageOrientationPatient, its files in
shuffled order with shuffled instance numbers). Every step must keep the sphere where it is in the world:
``prepare generic`` (native and resampled), ``prepare luna16`` and ``prepare pecad`` (the cube centred on the
candidate's world point), ``prepare lidc`` (reader outlines by SOP UID or by imageZposition alone), and a
segmentation bundle's ``inference.json``, whose prediction must have the input scan's own grid (size, spacing, origin,
direction as SimpleITK reads the raw input) so that it overlays it in a viewer.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dira3d.data import generic, lidc, luna16, pecad
from dira3d.evaluation import build_task_network
from dira3d.evaluation.preprocessing import write_preprocessing
from dira3d.utils import atomic_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

FLIP = np.diag([-1.0, -1.0, 1.0])  # nibabel's RAS <-> ITK's LPS
BLOB = np.array([12.3, -40.7, 85.2])  # the sphere's centre, LPS mm
RADIUS = 6.0
SHAPE = (32, 30, 16)
AT = np.array([15.3, 14.6, 7.4])  # the (continuous) voxel index the sphere's centre lies at


def _rotation(ax: float, az: float) -> np.ndarray:
    ax, az = np.radians([ax, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _sphere(shape, to_lps, centre=BLOB) -> tuple[np.ndarray, np.ndarray]:
    """(x, y, z) int16 HU volume (sphere 150 HU in -900 HU) and its uint8 mask; ``to_lps``: (N, 3) index -> LPS mm."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3).astype(float)
    inside = (np.linalg.norm(to_lps(index) - centre, axis=1) <= RADIUS).reshape(shape)
    return np.where(inside, 150, -900).astype(np.int16), inside.astype(np.uint8)


def _itk_geometry(spacing, direction, at=AT, centre=BLOB):
    """(origin, to_lps) of an ITK grid whose voxel ``at`` is the world point ``centre``."""
    direction, spacing = np.asarray(direction, float).reshape(3, 3), np.asarray(spacing, float)
    origin = centre - direction @ (np.asarray(at) * spacing)
    return origin, lambda index: origin + (direction @ (index * spacing).T).T


def write_nifti(path: Path, linear: np.ndarray, shape=SHAPE, at=AT, label: Path | None = None) -> None:
    """NIfTI written by nibabel with the RAS affine ``linear`` (3 x 3) whose voxel ``at`` is the sphere's centre."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = FLIP @ BLOB - linear @ np.asarray(at)
    hu, mask = _sphere(shape, lambda index: (FLIP @ (linear @ index.T + affine[:3, 3:4])).T)
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    if label is not None:
        nib.save(nib.Nifti1Image(mask, affine), str(label))


def write_itk(path: Path, spacing, direction, label: Path | None = None, centre=BLOB, shape=SHAPE) -> None:
    origin, to_lps = _itk_geometry(spacing, direction, centre=centre)
    for array, where in zip(_sphere(shape, to_lps, centre), (path, label)):
        if where is not None:
            image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
            image.SetOrigin(tuple(origin))
            image.SetSpacing(tuple(float(s) for s in spacing))
            image.SetDirection(tuple(np.asarray(direction, float).ravel()))
            sitk.WriteImage(image, str(where))


def write_dicom(folder: Path, row, col, spacing=(0.7, 0.8, 2.0), *, uid: str = "1.2.826.0.1.3680043.9.7",
                patient: str = "P1", seed: int = 1) -> np.ndarray:
    """A CT series with pydicom: ImageOrientationPatient ``row``/``col``, one file per slice, written in a shuffled
    order under shuffled names and instance numbers (slice k has SOP UID ``{uid}.{k + 1}``); returns the mask (x, y, z)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    origin, to_lps = _itk_geometry(spacing, np.stack([row, col, normal], 1))
    hu, mask = _sphere(SHAPE, to_lps)
    folder.mkdir(parents=True)
    for n, k in enumerate(np.random.default_rng(seed).permutation(SHAPE[2])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", f"{uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{n:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", patient, n + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = f"{uid}.0.1", uid, f"{uid}.0.2"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # between rows, between columns
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = SHAPE[1], SHAPE[0], 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T).tobytes()
        ds.save_as(str(folder / f"im{n:03d}.dcm"), enforce_file_format=True)
    return mask


OBLIQUE = _rotation(12, 20)  # columns: the row and column cosines (and the normal) of an oblique series
TILTED = (np.array([1.0, 0, 0]), np.array([0, np.cos(np.radians(20)), np.sin(np.radians(20))]))  # 20 degree gantry tilt


def _read_raw(path: Path) -> sitk.Image:
    return sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)) if path.is_dir() else str(path))


def _centroid_lps(path: Path, above: float = 0.0) -> tuple[np.ndarray, float]:
    """World centroid (LPS mm) of the voxels above ``above`` of a NIfTI read by nibabel, and its largest voxel side."""
    image = nib.load(str(path))
    index = np.argwhere(np.asarray(image.dataobj) > above).mean(axis=0)
    return FLIP @ (image.affine @ np.append(index, 1.0))[:3], float(np.linalg.norm(image.affine[:3, :3], axis=0).max())


def _scans(src: Path) -> list[str]:
    """Every format, each with its mask (``<case>_label``); returns the case ids."""
    src.mkdir()
    write_nifti(src / "identity.nii.gz", np.eye(3), label=src / "identity_label.nii.gz")
    write_nifti(src / "lps.nii.gz", np.diag([-0.8, -0.9, 2.0]), label=src / "lps_label.nii.gz")  # negative spacing
    write_nifti(src / "oblique.nii.gz", _rotation(15, 25) @ np.diag([0.8, 0.9, 2.0]), label=src / "oblique_label.nii.gz")
    write_nifti(src / "aniso.nii.gz", np.array([[0, 0, 3.5], [-0.5, 0, 0], [0, -0.6, 0]]), shape=(40, 40, 8),
                at=(20.2, 18.7, 3.6), label=src / "aniso_label.nii.gz")  # sagittal storage, 0.5 x 0.6 x 3.5 mm
    write_itk(src / "nrrd.nrrd", (0.7, 0.8, 2.5), [[0, 1, 0], [-1, 0, 0], [0, 0, -1]], label=src / "nrrd_label.nrrd")
    write_itk(src / "mhd.mhd", (0.7, 0.7, 2.5), np.diag([-1.0, 1.0, -1.0]), label=src / "mhd_label.mhd")
    mask = write_dicom(src / "dicom", OBLIQUE[:, 0], OBLIQUE[:, 1])
    label = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
    label.CopyInformation(_read_raw(src / "dicom"))
    sitk.WriteImage(label, str(src / "dicom_label.nii.gz"))
    return ["identity", "lps", "oblique", "aniso", "nrrd", "mhd", "dicom"]


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 1.5)])
def test_prepare_generic_keeps_the_sphere_and_its_mask_at_their_world_position(tmp_path, spacing):
    cases = _scans(tmp_path / "src")
    results = generic.prepare(tmp_path / "src", tmp_path / "out", modality="ct", label_suffix="_label", spacing=spacing,
                              progress=False)
    assert sorted(r.case_id for r in results if r.status == "written") == sorted(cases)
    for case in cases:
        volume, label = tmp_path / "out" / "volumes" / f"{case}.nii.gz", tmp_path / "out" / "labels" / f"{case}.nii.gz"
        image, mask = nib.load(str(volume)), nib.load(str(label))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S"), case
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4), case
        sphere, voxel = _centroid_lps(volume, above=0.5)  # 150 HU -> 0.575, -900 HU -> 0.05
        assert np.linalg.norm(sphere - BLOB) < 0.5 * voxel, (case, sphere)
        assert np.linalg.norm(_centroid_lps(label)[0] - BLOB) < 0.5 * voxel, case
        # the mask lies on the sphere: its voxels are bright (resampling blurs the rim a little)
        assert np.asarray(image.dataobj)[np.asarray(mask.dataobj) > 0].mean() > 0.5, case


class SphereInferer:
    """A stand-in for the trained network (an inferer override): logits of 'normalised input above 0.5', i.e. of
    the voxels above 0 HU, so the prediction is known exactly and any misplacement is the pipeline's."""

    def __init__(self, **kwargs) -> None:
        pass

    def __call__(self, inputs, network, *args, **kwargs):
        return (inputs - 0.5) * 50.0


@pytest.mark.parametrize("name", ["oblique.nii.gz", "lps.nii.gz", "mhd.mhd", "nrrd.nrrd", "dicom"])
def test_a_prediction_has_the_input_scans_grid_and_the_sphere_where_it_is(tmp_path, name):
    from test_inference_outputs import _infer

    src = tmp_path / "src"
    src.mkdir()
    {"oblique.nii.gz": lambda path: write_nifti(path, _rotation(15, 25) @ np.diag([0.8, 0.9, 2.0])),
     "lps.nii.gz": lambda path: write_nifti(path, np.diag([-0.8, -0.9, 2.0])),
     "mhd.mhd": lambda path: write_itk(path, (0.7, 0.7, 2.5), np.diag([-1.0, 1.0, -1.0])),  # non-zero origin
     "nrrd.nrrd": lambda path: write_itk(path, (0.7, 0.8, 2.5), [[0, 1, 0], [-1, 0, 0], [0, 0, -1]]),
     "dicom": lambda path: write_dicom(path, OBLIQUE[:, 0], OBLIQUE[:, 1])}[name](src / name)
    models = tmp_path / "models"
    torch.manual_seed(0)
    atomic_save(build_task_network("segmentation", 3, 1, 1, 0.125, "").state_dict(), models / "model.pt")
    write_preprocessing(models, {"window": [-1000, 1000], "spacing": [1.5, 1.5, 2.0]})  # resampled there and back
    _infer("lits_liver_seg", src / name, models, width=0.125, roi_size=[16, 16, 8], sw_batch_size=1,
           output_dir=str(tmp_path / "out"), **{"inferer#_target_": f"{__name__}.SphereInferer"})
    raw = _read_raw(src / name)
    seg = sitk.ReadImage(str(tmp_path / "out" / f"{name.split('.')[0]}_seg.nii.gz"))
    assert seg.GetSize() == raw.GetSize()
    assert np.allclose(seg.GetSpacing(), raw.GetSpacing(), atol=1e-4)
    assert np.allclose(seg.GetOrigin(), raw.GetOrigin(), atol=1e-3)
    assert np.allclose(seg.GetDirection(), raw.GetDirection(), atol=1e-4)
    predicted, sphere = sitk.GetArrayFromImage(seg) > 0, sitk.GetArrayFromImage(raw) > 0  # the same voxels
    # resampled to 1.5 x 1.5 x 2 mm and back, a 6 mm sphere on 2.5 mm slices loses part of its rim (Dice 0.8)
    assert 2 * (predicted & sphere).sum() / (predicted.sum() + sphere.sum()) > 0.75
    centroid = seg.TransformContinuousIndexToPhysicalPoint(np.argwhere(predicted)[:, ::-1].mean(axis=0).tolist())
    assert np.linalg.norm(np.subtract(centroid, BLOB)) < 1.0  # half a voxel of the 1.5 x 1.5 x 2 mm grid (0.8 on 2.5 mm slices)


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 1.0)])
def test_luna16_cube_is_centred_on_the_candidates_world_point(tmp_path, spacing):
    """A candidate between voxel centres on .mhd scans with a non-zero origin and flipped / permuted axes."""
    src = tmp_path / "luna"
    (src / "subset0").mkdir(parents=True)
    directions = {"1.2.3.4": np.diag([-1.0, -1.0, -1.0]), "1.2.3.5": [[0, -1, 0], [1, 0, 0], [0, 0, -1]]}
    for uid, direction in directions.items():
        write_itk(src / "subset0" / f"{uid}.mhd", (0.7, 0.75, 1.25), direction)
    (src / "candidates_V2.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n"
                                           + "".join(f"{uid},{BLOB[0]},{BLOB[1]},{BLOB[2]},1\n" for uid in directions))
    luna16.prepare(src, tmp_path / "out", spacing=spacing, cube_size=(24, 24, 16), progress=False,
                   splits={"training": (0,), "validation": (), "test": ()})
    entries = json.loads((tmp_path / "out" / "ncc_datalist.json").read_text())["training"]
    assert sorted(e["case_id"] for e in entries) == sorted(directions)
    for entry in entries:
        cube = nib.load(str(tmp_path / "out" / entry["image"]))
        # the sphere lies at the cube's centre voxel (12, 12, 8), to the half voxel the candidate is off its grid
        assert np.all(np.abs(np.argwhere(np.asarray(cube.dataobj) > 0.5).mean(axis=0) - (12, 12, 8)) < 0.75)
        assert np.linalg.norm(_centroid_lps(tmp_path / "out" / entry["image"], above=0.5)[0] - BLOB) < 0.3


def test_pecad_dicom_volumes_with_oblique_or_reversed_slices_give_centred_cubes(tmp_path):
    src = tmp_path / "PE-CAD"
    write_dicom(src / "volumes" / "PE01", OBLIQUE[:, 0], OBLIQUE[:, 1])
    write_dicom(src / "volumes" / "PE02", (-1.0, 0, 0), (0, 1.0, 0), seed=3)  # normal -z: z falls slice by slice
    voxel = _read_raw(src / "volumes" / "PE01").TransformPhysicalPointToContinuousIndex(tuple(BLOB))
    rows = [f"PE01,{BLOB[0]},{BLOB[1]},{BLOB[2]},world,1", f"PE01,{voxel[0]:.4f},{voxel[1]:.4f},{voxel[2]:.4f},voxel,1",
            f"PE02,{BLOB[0]},{BLOB[1]},{BLOB[2]},world,1"]
    (src / "candidates.csv").write_text("patient_id,x,y,z,coords,label\n" + "\n".join(rows) + "\n")
    pecad.prepare(src, tmp_path / "out", cube_size=(24, 24, 16), progress=False)
    entries = json.loads((tmp_path / "out" / "pecad_datalist.json").read_text())["training"]
    assert len(entries) == 3
    for entry in entries:
        cube = nib.load(str(tmp_path / "out" / entry["image"]))
        assert np.all(np.abs(np.argwhere(np.asarray(cube.dataobj) > 0.5).mean(axis=0) - (12, 12, 8)) < 0.75)
        assert np.linalg.norm(_centroid_lps(tmp_path / "out" / entry["image"], above=0.5)[0] - BLOB) < 0.3


def _lidc_series(src: Path, number: int, row, col, by_sop: bool) -> None:
    """A LIDC-IDRI patient: the series (shuffled files) and one reader's outlines of the sphere, each ROI naming
    its slice by SOP UID, or by imageZposition alone (the z of the slice's ImagePositionPatient)."""
    from test_data_lidc import outline, write_xml

    uid = f"1.2.826.0.1.3680043.9.{number}"
    folder = src / f"LIDC-IDRI-{number:04d}" / f"{uid}.0" / uid
    mask = write_dicom(folder, row, col, spacing=(0.8, 0.8, 1.25), uid=uid, patient=f"LIDC-IDRI-{number:04d}")
    first = _read_raw(folder)
    rois = []
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        z = first.TransformIndexToPhysicalPoint((0, 0, int(k)))[2]
        edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                        for x, y in outline(mask[:, :, k].astype(bool), AT))
        rois.append(f"<roi><imageZposition>{z:.3f}</imageZposition><imageSOP_UID>{f'{uid}.{k + 1}' if by_sop else '0.0'}"
                    f"</imageSOP_UID><inclusion>TRUE</inclusion>{edges}</roi>")
    write_xml(folder / "069.xml", uid, [f"<unblindedReadNodule><noduleID>1</noduleID>{''.join(rois)}</unblindedReadNodule>"])


def test_lidc_outlines_by_sop_uid_or_z_position_land_on_the_sphere_of_a_tilted_or_reversed_series(tmp_path):
    """The slice of an outline given by imageZposition alone on a gantry-tilted series is (z - origin z) / the z step
    per slice: it was taken as the slice of the world point (origin x, origin y, z), cos²(tilt) times the true
    index, so slice k landed about 0.12 k slices early with a 20 degree tilt (here the mask 0.8 mm from the sphere,
    outlines of two slices on one; further from the first slice, a slice or more off)."""
    src = tmp_path / "LIDC-IDRI"
    geometries = {1: (*TILTED, True), 2: (*TILTED, False), 3: (OBLIQUE[:, 0], OBLIQUE[:, 1], False),
                  4: ((-1.0, 0, 0), (0, 1.0, 0), False)}
    for number, (row, col, by_sop) in geometries.items():
        _lidc_series(src, number, row, col, by_sop)
    results = lidc.prepare(src, tmp_path / "out", progress=False, split=(1, 1, 1))
    assert [r.status for r in results] == ["written"] * 4
    datalist = json.loads((tmp_path / "out" / "lidc_datalist.json").read_text())
    entries = sorted((e for part in datalist.values() if isinstance(part, list) for e in part), key=lambda e: e["case_id"])
    assert len(entries) == 4
    sphere_mm3 = 4 / 3 * np.pi * RADIUS ** 3
    for entry in entries:  # 1 mm crops: a voxel is a mm³
        assert abs(entry["voxels"] - sphere_mm3) / sphere_mm3 < 0.1, entry
        assert np.linalg.norm(_centroid_lps(tmp_path / "out" / entry["label"])[0] - BLOB) < 0.5, entry["case_id"]
