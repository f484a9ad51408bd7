"""LIDC-IDRI preparation on a miniature TCIA tree: DICOM series + reader XML around a sphere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import lidc
from dira3d.data.lidc_xml import (
    ReaderNodule,
    RoiOutline,
    consensus_fraction,
    group_reader_nodules,
    parse_lidc_xml,
    rasterize_nodule,
)
from dira3d.data.splits import assign_folds, proportional_sizes, split_patients

SPACING = (0.8, 0.8, 1.25)
ORIGIN = (-16.0, -12.0, -200.0)
SHAPE = (40, 40, 24)
CENTRE = np.array([20.3, 18.6, 11.8])  # sphere centre, voxel index (x, y, z)
RADIUS = 5.0  # mm


def write_series(folder: Path, volume: np.ndarray, patient: str, series_uid: str, skip: tuple[int, ...] = ()) -> None:
    """A CT series as TCIA ships it: one .dcm per slice with its position and SOP UID."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[2]):
        if k in skip:
            continue
        image = sitk.GetImageFromArray(volume[:, :, k].T.astype(np.int16))
        image.SetSpacing(SPACING[:2])
        position = (ORIGIN[0], ORIGIN[1], ORIGIN[2] + k * SPACING[2])
        tags = {"0008|0060": "CT", "0010|0020": patient, "0020|000d": series_uid + ".1", "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.3f}" for v in position),
                "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(SPACING[2]),
                "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"1-{k + 1:03d}.dcm"))
        writer.Execute(image)


def disk(k: int, centre: np.ndarray, radius: float = RADIUS) -> np.ndarray:
    """Pixels of slice k inside the sphere, boolean (x, y)."""
    i, j = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    d2 = ((i - centre[0]) * SPACING[0]) ** 2 + ((j - centre[1]) * SPACING[1]) ** 2 + ((k - centre[2]) * SPACING[2]) ** 2
    return d2 <= radius ** 2


def outline(inside: np.ndarray, centre: np.ndarray) -> list[tuple[int, int]]:
    """The ring of pixels just outside ``inside`` (as LIDC readers draw it), ordered by angle."""
    padded = np.pad(inside, 1)
    grown = np.zeros_like(inside)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            grown |= padded[1 + di:1 + di + inside.shape[0], 1 + dj:1 + dj + inside.shape[1]]
    ring = np.argwhere(grown & ~inside)
    angles = np.arctan2(ring[:, 1] - centre[1], ring[:, 0] - centre[0])
    return [tuple(map(int, p)) for p in ring[np.argsort(angles, kind="stable")]]


def roi_xml(k: int, points: list[tuple[int, int]], sop: str, inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    z = ORIGIN[2] + k * SPACING[2]
    return (f"<roi><imageZposition>{z:.3f}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
            f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>")


def sphere_nodule(nodule_id: str, centre: np.ndarray, series_uid: str, use_sop: bool, malignancy: int) -> str:
    rois = []
    for k in range(SHAPE[2]):
        inside = disk(k, centre)
        if inside.any():
            rois.append(roi_xml(k, outline(inside, centre), f"{series_uid}.{k + 1}" if use_sop else "0.0"))
    return (f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID><characteristics><subtlety>4</subtlety>"
            f"<malignancy>{malignancy}</malignancy></characteristics>{''.join(rois)}</unblindedReadNodule>")


def write_xml(path: Path, series_uid: str, sessions: list[str]) -> None:
    body = "".join(f"<readingSession><annotationVersion>3.12</annotationVersion>{s}</readingSession>" for s in sessions)
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?><LidcReadMessage xmlns="http://www.nih.gov">'
                    f"<ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>"
                    f"{body}</LidcReadMessage>")


def phantom() -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((i, j, k), CENTRE, SPACING))
    return np.where(d2 <= RADIUS ** 2, 40, -800).astype(np.int16)


def make_patient(root: Path, number: int, skip: tuple[int, ...] = ()) -> tuple[Path, str]:
    patient, uid = f"LIDC-IDRI-{number:04d}", f"1.2.826.0.1.{number}"
    folder = root / patient / f"{uid}.0" / uid
    write_series(folder, phantom(), patient, uid, skip)
    far = CENTRE + np.array([-10.0, -9.0, 0.0])  # a second nodule seen by one reader only
    small = "<unblindedReadNodule><noduleID>s1</noduleID>" + roi_xml(5, [(30, 30)], f"{uid}.6") + "</unblindedReadNodule>"
    non_nodule = ("<nonNodule><nonNoduleID>n1</nonNoduleID><imageZposition>-190</imageZposition>"
                  "<locus><xCoord>5</xCoord><yCoord>5</yCoord></locus></nonNodule>")
    write_xml(folder / "069.xml", uid, [
        sphere_nodule("Nodule 001", CENTRE, uid, use_sop=True, malignancy=3) + small,
        sphere_nodule("IL057_1", CENTRE, uid, use_sop=False, malignancy=4) + non_nodule,  # z position only
        sphere_nodule("0", CENTRE + np.array([2.0, 0.0, 0.0]), uid, use_sop=True, malignancy=5)  # offset reader
        + sphere_nodule("far", far, uid, use_sop=True, malignancy=2),
    ])
    return folder, patient


def test_parse_and_rasterise_one_reader(tmp_path: Path) -> None:
    folder, _ = make_patient(tmp_path, 1)
    reads = parse_lidc_xml(folder / "069.xml")
    assert reads.num_readers == 3 and reads.small_nodules == 1 and reads.series_uid == "1.2.826.0.1.1"
    assert [n.reader for n in reads.nodules] == [0, 1, 2, 2]
    assert reads.nodules[0].characteristics == {"subtlety": 4, "malignancy": 3}
    voxels = rasterize_nodule(reads.nodules[0], SHAPE, lambda roi: int(roi.sop_uid.rsplit(".", 1)[1]) - 1)
    expected = np.argwhere(np.stack([disk(k, CENTRE) for k in range(SHAPE[2])], axis=-1))
    # the outline lies outside the nodule: filling it and dropping it gives exactly the sphere
    assert sorted(map(tuple, voxels.tolist())) == sorted(map(tuple, expected.tolist()))


def test_hole_and_grouping() -> None:
    ring = [(x, 2) for x in range(2, 9)] + [(8, y) for y in range(3, 9)] + [(x, 8) for x in range(7, 1, -1)] \
        + [(2, y) for y in range(7, 2, -1)]
    hole = [(4, 4), (5, 4), (6, 4), (6, 5), (6, 6), (5, 6), (4, 6), (4, 5)]
    nodule = ReaderNodule(0, "a", (RoiOutline(0.0, "", True, np.array(ring)), RoiOutline(0.0, "", False, np.array(hole))))
    voxels = rasterize_nodule(nodule, (12, 12, 1), lambda roi: 0)
    # 5x5 interior of the ring minus the single interior pixel (5, 5) of the hole outline
    assert len(voxels) == 24 and not any((v == [5, 5, 0]).all() for v in voxels)
    # two nodules 8 mm apart, each outlined by readers 0 and 1: never merged (a reader has one mark per nodule)
    centroids = [np.array([0.0, 0, 0]), np.array([8.0, 0, 0]), np.array([0.5, 0, 0]), np.array([8.5, 0, 0])]
    assert group_reader_nodules(centroids, [2.0] * 4, [0, 0, 1, 1], 10.0) == [[0, 2], [1, 3]]
    start, fraction = consensus_fraction([np.array([[1, 1, 1], [2, 1, 1]]), np.array([[2, 1, 1]])], margin=0)
    assert start.tolist() == [1, 1, 1] and fraction[:, 0, 0].tolist() == [0.5, 1.0]


def test_prepare_consensus_crop_and_missing_slice(tmp_path: Path) -> None:
    src = tmp_path / "LIDC-IDRI"
    make_patient(src, 1)
    bad_folder, _ = make_patient(src, 2, skip=(10,))
    dst = tmp_path / "out"
    results = lidc.prepare(src, dst, min_readers=2, keep_going=True, progress=False)
    status = {r.case_id: r for r in results}
    assert status["LIDC-IDRI-0001"].status == "written"
    assert status["LIDC-IDRI-0002"].status == "failed" and str(bad_folder) in status["LIDC-IDRI-0002"].reason
    assert "missing" in status["LIDC-IDRI-0002"].reason

    datalist = json.loads((dst / "lidc_datalist.json").read_text())
    entries = [e for part in ("training", "validation", "test") for e in datalist[part]]
    assert len(entries) == 1  # the far nodule has one reader < --min-readers 2; the 1-point mark is < 3 mm
    entry = entries[0]
    assert entry["case_id"] == "LIDC-IDRI-0001" and entry["readers"] == 3 and entry["malignancy"] == 4.0
    image = nib.load(dst / entry["image"])
    mask = np.asarray(nib.load(dst / entry["label"]).dataobj)
    assert image.shape == (64, 64, 32) and mask.dtype == np.uint8 and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert entry["voxels"] == int(mask.sum())  # the written crop mask's size (fine-tuning's foreground flag)
    centroid = np.argwhere(mask).mean(axis=0)
    assert np.all(np.abs(centroid - np.array([32, 32, 16])) <= 1.0)
    sphere_mm3 = 4 / 3 * math.pi * RADIUS ** 3
    assert abs(mask.sum() - sphere_mm3) / sphere_mm3 < 0.12  # 1 mm voxels: count = volume in mm³
    # the mask centroid is the sphere centre in the world (nibabel RAS = ITK LPS with x, y negated)
    sphere_lps = np.asarray(ORIGIN) + CENTRE * np.asarray(SPACING)
    centroid_ras = image.affine @ np.append(centroid, 1.0)
    assert np.allclose(centroid_ras[:3] * [-1, -1, 1], sphere_lps, atol=0.6)
    data = image.get_fdata()
    assert data[32, 32, 16] == pytest.approx((40 + 1000) / 2000, abs=0.02) 
    assert data[20, 32, 16] == pytest.approx(0.1, abs=0.01)  # lung (−800 HU) 12 mm from the nodule
    assert data[0, 0, 0] == 0.0  # outside the 32 mm field of view: padded with air

    split = json.loads((dst / "split.json").read_text())
    assert sorted(split["training"] + split["validation"] + split["test"]) == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    assert entry in datalist[next(p for p in ("training", "validation", "test") if "LIDC-IDRI-0001" in split[p])]

    # with one reader enough the far nodule appears; unanimous consensus keeps the lens shared by the
    # centred and the offset (1.6 mm) spheres: V = π(4R + d)(2R − d)² / 12
    again = lidc.prepare(src, dst / "all", consensus=1.0, keep_going=True, progress=False)
    manifest = json.loads((dst / "all" / "manifests" / "LIDC-IDRI-0001.json").read_text())
    assert [n["readers"] for n in manifest["nodules"]] == [3, 1] and again[0].status == "written"
    lens = math.pi * (4 * RADIUS + 1.6) * (2 * RADIUS - 1.6) ** 2 / 12
    assert abs(manifest["nodules"][0]["voxels"] - lens) / lens < 0.12
    assert abs(manifest["nodules"][1]["voxels"] - sphere_mm3) / sphere_mm3 < 0.12
    # resumable: a finished series is skipped
    assert lidc.prepare(src, dst / "all", consensus=1.0, keep_going=True, progress=False)[0].status == "skipped"


def test_split_rule_is_proportional_seeded_and_disjoint() -> None:
    assert proportional_sizes(1018, (510, 100, 408)) == [510, 100, 408]
    assert proportional_sizes(285, (190, 95)) == [190, 95]
    sizes = proportional_sizes(10, (510, 100, 408))
    assert sum(sizes) == 10 and min(sizes) >= 1 and sizes[0] > sizes[2] > sizes[1] - 1
    ids = [f"P{i:03d}" for i in range(60)]
    parts = split_patients(ids, {"training": 510, "validation": 100, "test": 408}, seed=3)
    assert sum(map(len, parts.values())) == 60 and set().union(*map(set, parts.values())) == set(ids)
    assert not set(parts["training"]) & set(parts["test"]) and not set(parts["validation"]) & set(parts["test"])
    assert parts == split_patients(list(reversed(ids)), {"training": 510, "validation": 100, "test": 408}, seed=3)
    assert parts != split_patients(ids, {"training": 510, "validation": 100, "test": 408}, seed=4)
    folds = assign_folds(ids, 3, seed=0)
    assert sorted(np.bincount(list(folds.values())).tolist()) == [20, 20, 20]
    with pytest.raises(ValueError, match="duplicated"):
        split_patients(["a", "a", "b"], {"training": 1, "test": 1})


def test_an_empty_split_names_lidc_own_split_option(tmp_path: Path, capsys) -> None:
    """One patient leaves 'validation' and 'test' empty; the warning named --train-subsets and --val-fraction
    (LUNA16's and generic's options) instead of --split and the patients it was cut over."""
    make_patient(tmp_path / "LIDC-IDRI", 1)
    lidc.prepare(tmp_path / "LIDC-IDRI", tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert "its 'validation', 'test' lists are empty" in err
    assert "--split 510 100 408 is cut over the 1 patient(s) found, so a part is empty below 3 patients" in err
    assert "subsets" not in err and "fraction" not in err
    # a task datalist: its fine-tuning holds out its own patients, only holdout=validation reads that list
    assert "fine-tuning does not need the 'validation' list" in err and "--set holdout=validation" in err


def test_an_xml_of_another_series_fails_its_series_and_a_nodule_off_the_series_is_warned(tmp_path: Path) -> None:
    """An XML whose imageSOP_UIDs match no slice and whose imageZposition values lie off the series (the read of
    another series) wrote the series as done with no nodule, said nothing on the console and was skipped by every
    rerun; one reader's nodule off the series was left out with a note in the manifest only."""
    import re

    src = tmp_path / "LIDC-IDRI"
    make_patient(src, 1)
    folder, _ = make_patient(src, 2)
    xml = folder / "069.xml"
    text = re.sub(r"<imageSOP_UID>[^<]*</imageSOP_UID>", "<imageSOP_UID>9.9.9</imageSOP_UID>", xml.read_text())
    xml.write_text(re.sub(r"<imageZposition>(-?[0-9.]+)</imageZposition>",
                          lambda m: f"<imageZposition>{float(m.group(1)) + 500:.3f}</imageZposition>", text))
    partial = next((src / "LIDC-IDRI-0001").rglob("069.xml"))
    head, far = partial.read_text().split("<noduleID>far</noduleID>")  # the far nodule's slices: not in the series
    partial.write_text(head + "<noduleID>far</noduleID>" + re.sub(r"<imageSOP_UID>[^<]*</imageSOP_UID>",
                                                                   "<imageSOP_UID>9.9.9</imageSOP_UID>",
                                                                   far.replace("<imageZposition>-", "<imageZposition>")))
    results = {r.case_id: r for r in lidc.prepare(src, tmp_path / "out", keep_going=True, progress=False)}
    failed = results["LIDC-IDRI-0002"]
    assert failed.status == "failed" and str(xml) in failed.reason and "none of its 4 readers' outlined nodules" in failed.reason
    assert "another series" in failed.reason and not (tmp_path / "out" / "manifests" / "LIDC-IDRI-0002.json").exists()
    written = results["LIDC-IDRI-0001"]
    assert written.status == "written" and written.info["nodules"] == 1
    assert len(written.warnings) == 1 and written.warnings[0].startswith(f"{partial}: 1 of its 4 readers' outlined nodules")
    assert "reader 3 nodule 'far'" in written.warnings[0]


def test_a_part_of_split_size_0_is_a_note_not_a_warning(tmp_path: Path, capsys) -> None:
    """`--split 510 0 408` asks for no 'validation' list; it was warned about as a part too few patients left empty.
    The 'test' list that one patient leaves empty still warns."""
    make_patient(tmp_path / "LIDC-IDRI", 1)
    lidc.prepare(tmp_path / "LIDC-IDRI", tmp_path / "out", split=(510, 0, 408), progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert "note lidc_datalist.json: its 'validation' list is empty, as asked: --split 510 0 408 gives it size 0" in lines
    warning = next(line for line in lines if line.startswith("WARNING lidc_datalist.json:"))
    assert "its 'test' list is empty" in warning and "'validation'" not in warning.split(": no prepared")[0], warning
