"""`dira3d prepare radiographs`: a folder of one's own chest X-rays (8/16-bit PNG, JPEG, DICOM) → PNGs + a 2D datalist.

Found by a 2D walkthrough: a researcher with a folder of X-rays had no `dira3d prepare` command for it. `generic`
(the only "any folder" one) ignored the PNGs and JPEGs without a word and failed the DICOM as "a single slice".
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_cxr_dicom import BASE, write_dicom

from dira3d.cli import main as cli_main
from dira3d.data import generic, radiographs
from dira3d.data.cxr import resize_image
from dira3d.data.io import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _folder(root):
    """The same radiograph (BASE: 0 and 255 present) stored five ways, in two sub-folders."""
    (root / "site_a").mkdir(parents=True)
    (root / "site_b").mkdir()
    Image.fromarray(BASE).save(root / "site_a" / "p1_8bit.png")
    Image.fromarray(BASE.astype(np.uint16) * 200 + 100).save(root / "site_a" / "p1_16bit.png")  # min-max gives BASE
    Image.fromarray(BASE).convert("RGB").save(root / "site_b" / "p2.bmp")  # grey stored as RGB: a warning
    write_dicom(root / "site_b" / "p3.dcm", 255 - BASE, "MONOCHROME1", 8)  # inverted to BASE
    write_dicom(root / "site_b" / "p4", BASE, "MONOCHROME2", 8)  # a DICOM without a suffix
    (root / "site_b" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    Image.fromarray(BASE).save(root / ".cache" / "thumb.png")  # hidden: left out
    return root


def test_a_mixed_folder_is_prepared_as_the_2d_preparations_prepare_images(tmp_path, capsys):
    src = _folder(tmp_path / "xrays")
    dst = tmp_path / "out"
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "16",
                     "--val-fraction", "0.2"]) == 0
    out = capsys.readouterr()
    datalist = json.loads((dst / "radiographs_datalist.json").read_text())
    entries = {e["case_id"]: e for part in ("training", "validation") for e in datalist[part]}
    # the DICOMs are grouped by their PatientID (write_dicom: the file's stem), the other files by case id
    assert sorted(entries) == ["p3", "p4", "site_a_p1_16bit", "site_a_p1_8bit", "site_b_p2"]
    assert len(datalist["validation"]) == 1 and "test" not in datalist
    assert datalist["meta"]["size"] == 16 and datalist["meta"]["dataset"] == "radiographs"
    expected = resize_image(BASE, 16)
    for case_id, entry in entries.items():  # every storage reads as the one radiograph
        np.testing.assert_array_equal(np.asarray(Image.open(dst / entry["image"])), expected, err_msg=case_id)
    report = {c["case_id"]: c for c in json.loads((dst / "report.json").read_text())["cases"]}
    assert "stored as RGB with equal colour channels" in report["site_b_p2"]["warnings"][0]
    assert f"dira3d pretrain --datalist {dst / 'radiographs_datalist.json'} --config 2d.json" in out.out
    assert json.loads((dst / "split.json").read_text())  # the split is recorded, so a rerun keeps it
    assert {r.status for r in radiographs.prepare(src, dst, size=16, val_fraction=0.2, progress=False)} == {"skipped"}
    assert json.loads((dst / "radiographs_datalist.json").read_text())["validation"] == datalist["validation"]


def test_a_bad_file_fails_its_case_and_patients_stay_together(tmp_path):
    src = _folder(tmp_path / "xrays")
    colour = np.stack([BASE, BASE // 2, BASE], axis=-1)
    Image.fromarray(colour).save(src / "site_a" / "photo.png")  # coloured: no one grey reading
    Image.fromarray(BASE).save(src / "site_b" / "p3.png")  # the same case id as p3.dcm
    results = radiographs.prepare(src, tmp_path / "out", size=16, val_fraction=0.5, patient_from="parent",
                                  keep_going=True, progress=False)
    failed = {r.case_id: r.reason for r in results if r.status == "failed"}
    assert sorted(failed) == ["site_a_photo", "site_b_p3"]
    assert "photo.png" in failed["site_a_photo"] and "colour" in failed["site_a_photo"]
    assert "gives the same case id 'site_b_p3'" in failed["site_b_p3"]
    datalist = json.loads((tmp_path / "out" / "radiographs_datalist.json").read_text())
    parts = {e["case_id"]: part for part in ("training", "validation") for e in datalist[part]}
    assert set(parts) == {"site_a", "site_b"} and set(parts.values()) == {"training", "validation"}  # one part each


def test_a_folder_without_radiographs_says_what_it_holds(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "ct.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"holds no radiograph: .*it holds 1 other file\(s\), e.g. \['ct.nii.gz'\]\); 3D "
                                        r"scans .* `dira3d prepare generic`"):
        radiographs.find_radiographs(tmp_path / "scans")


def test_generic_points_a_folder_of_x_rays_to_radiographs(tmp_path):
    """generic said only "no scans found" for a folder of PNGs, and "a single slice" for a radiograph DICOM."""
    src = _folder(tmp_path / "xrays")
    for dicom in (src / "site_b" / "p3.dcm", src / "site_b" / "p4"):
        dicom.unlink()
    with pytest.raises(DataError, match=r"no scans found .*; it holds 3 2D image file\(s\) \(e.g. site_a/p1_16bit.png, "
                                        r"site_a/p1_8bit.png, site_b/p2.bmp\): chest X-rays are prepared by `dira3d "
                                        r"prepare radiographs`"):
        generic.prepare(src, tmp_path / "out", modality="ct", progress=False)
    write_dicom(tmp_path / "one" / "x.dcm", BASE, "MONOCHROME2", 8)
    results = generic.prepare(tmp_path / "one", tmp_path / "out1", modality="ct", keep_going=True, progress=False)
    assert "single slice" in results[0].reason and "`dira3d prepare radiographs`" in results[0].reason


def test_the_dicomdir_of_a_patient_cd_is_left_out(tmp_path):
    """Found by a 2D walkthrough: X-rays handed out on a CD or USB stick come with a DICOMDIR (the DICOM index of the
    medium, a DICOM file without pixels). It was taken for a radiograph without a suffix and failed its case with
    "cannot be read as an image ...; re-download it", which stopped the whole batch without --keep-going."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = tmp_path / "cd"
    write_dicom(src / "IMAGES" / "IM000001", BASE, "MONOCHROME2", 8)
    write_dicom(src / "IMAGES" / "IM000002", 255 - BASE, "MONOCHROME1", 8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    index = FileDataset(str(src / "DICOMDIR"), {}, file_meta=meta, preamble=b"\0" * 128)
    index.FileSetID = "CD"
    index.save_as(src / "DICOMDIR", enforce_file_format=True)
    dst = tmp_path / "out"
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "0",
                     "--val-fraction", "0"]) == 0
    datalist = json.loads((dst / "radiographs_datalist.json").read_text())
    assert sorted(e["case_id"] for e in datalist["training"]) == ["IM000001", "IM000002"]  # their PatientIDs
    for entry in datalist["training"]:
        np.testing.assert_array_equal(np.asarray(Image.open(dst / entry["image"])), BASE)
    assert "DICOMDIR" not in {c["case_id"] for c in json.loads((dst / "report.json").read_text())["cases"]}


def test_a_mask_among_the_radiographs_fails_its_case(tmp_path, capsys):
    """`dira3d prepare radiographs --src MontgomerySet` (a dataset's folder, its ManualMask/ beside CXR_png/) prepared
    the lung masks as X-rays, without a word, for pretraining on; the 2D bundles' inference refuses such a file."""
    src = tmp_path / "MontgomerySet"
    (src / "CXR_png").mkdir(parents=True)
    Image.fromarray(BASE).save(src / "CXR_png" / "MCUCXR_0001_0.png")
    lungs = np.zeros(BASE.shape, np.uint8)
    lungs[2:-2, 2:6] = 255
    (src / "ManualMask" / "leftMask").mkdir(parents=True)
    Image.fromarray(lungs).save(src / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png")
    Image.fromarray((lungs > 0).astype(np.uint16)).save(src / "ManualMask" / "labels16.png")  # 0/1 in 16 bits
    dst = tmp_path / "out"
    argv = ["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "16", "--val-fraction", "0"]
    assert cli_main(argv) == 1 and not (dst / "radiographs_datalist.json").exists()
    capsys.readouterr()
    assert cli_main(argv + ["--keep-going"]) == 0
    err = capsys.readouterr().err
    for case, path, values in (("ManualMask_leftMask_MCUCXR_0001_0", "ManualMask/leftMask/MCUCXR_0001_0.png", "0, 255"),
                               ("ManualMask_labels16", "ManualMask/labels16.png", "0, 255")):
        assert f"FAILED {case}: {src / path}: has only 2 distinct values ({values}): it looks like a mask, not a " \
               "radiograph; move it (and its mask folder) out of --src" in err
    datalist = json.loads((dst / "radiographs_datalist.json").read_text())
    assert [e["case_id"] for e in datalist["training"]] == ["CXR_png_MCUCXR_0001_0"]


def test_an_earlier_output_inside_src_is_not_prepared_again_and_dst_src_is_refused(tmp_path):
    """`--src xrays --dst xrays/prepared`, then `--dst xrays/prepared_8 --size 8`: the first run's PNGs were prepared
    as more radiographs (`prepared_images_site_a_p1_8bit`), copies a split could put in another part than their
    originals; `--dst xrays` wrote into xrays/images and every rerun added the last run's PNGs."""
    src = _folder(tmp_path / "xrays")
    first = radiographs.prepare(src, src / "prepared", size=16, val_fraction=0.2, progress=False)
    assert {r.status for r in first} == {"written"}
    again = radiographs.prepare(src, src / "prepared_8", size=8, val_fraction=0.2, progress=False)
    assert sorted(r.case_id for r in again) == sorted(r.case_id for r in first)
    datalist = json.loads((src / "prepared_8" / "radiographs_datalist.json").read_text())
    assert len([e for part in ("training", "validation") for e in datalist[part]]) == len(first)
    with pytest.raises(DataError, match=r"is --src: the prepared PNGs would be written into its images/ among the "
                                        r"radiographs.*choose an output folder of its own with --dst"):
        radiographs.prepare(src, src, size=8, progress=False)
    assert not (src / "images").exists()


def test_a_validation_list_asked_for_by_val_fraction_0_is_a_note_not_a_warning(tmp_path, capsys):
    """`--val-fraction 0` asks for no 'validation' list, yet the empty list was a WARNING that "no prepared case went
    there" with a rerun; it is one note line naming the setting and what reads the list. A --val-fraction that rounds
    to no patient still warns."""
    src = tmp_path / "one"
    src.mkdir()
    Image.fromarray(BASE).save(src / "p1.png")
    for fraction, out in (("0", "zero"), ("0.1", "rounded")):
        assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(tmp_path / out), "--size", "16",
                         "--val-fraction", fraction]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "'validation'" in line]
        assert len(lines) == 1, lines
        if fraction == "0":
            assert lines[0] == ("note radiographs_datalist.json: its 'validation' list is empty, as asked: "
                                "--val-fraction 0 (2D pretraining with 2d.json validates on that list: --override "
                                "validation=false pretrains without)"), lines
        else:
            assert lines[0].startswith("WARNING radiographs_datalist.json: its 'validation' list is empty: no "
                                       "prepared case went there") and "rerun" in lines[0], lines
