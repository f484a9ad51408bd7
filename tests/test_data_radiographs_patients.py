"""`dira3d prepare radiographs`: who is one patient in the split (the DICOM PatientID by default).

Found by a 2D walkthrough: every image was its own patient unless --patient-from / --patient-regex said otherwise, so a
patient's PA and lateral DICOMs (or two visits) could land in training and test: leakage. The DICOM PatientID
(0010,0020) now groups them; a blank one, and every non-DICOM file, stay one patient per file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from test_cxr_dicom import BASE, write_dicom

from dira3d.cli import main as cli_main
from dira3d.data import radiographs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _dicom(path, patient):
    """A pydicom-written radiograph DICOM with PatientID ``patient`` ("" = anonymised)."""
    write_dicom(path, BASE, "MONOCHROME2", 8)
    ds = pydicom.dcmread(path)
    ds.PatientID = patient
    ds.save_as(path, enforce_file_format=True)
    return path


def _folder(root):
    """Two patients with two DICOMs each (PA / lateral in different folders, one file without a suffix), two
    anonymised DICOMs and two PNGs."""
    _dicom(root / "pa" / "a1.dcm", "PAT-A")
    _dicom(root / "lateral" / "a2.dcm", "PAT-A")
    _dicom(root / "pa" / "b1.dcm", "PAT-B")
    _dicom(root / "visit2" / "b2", "PAT-B")  # a DICOM without a suffix
    _dicom(root / "pa" / "anon1.dcm", "")
    _dicom(root / "pa" / "anon2.dcm", "  ")
    (root / "png").mkdir()
    for name in ("c1", "c2"):
        Image.fromarray(BASE).save(root / "png" / f"{name}.png")
    return root


def _parts(dst):
    datalist = json.loads((dst / radiographs.DATALIST).read_text())
    parts: dict[str, set[str]] = {}
    for part in ("training", "validation", "test"):
        for entry in datalist.get(part, []):
            parts.setdefault(entry["case_id"], set()).add(part)
    return datalist, parts


def test_the_dicoms_of_one_patient_id_always_land_in_one_part(tmp_path):
    src = _folder(tmp_path / "xrays")
    dst = tmp_path / "out"
    seen_apart = set()
    for val, test in ((0.3, 0.3), (0.5, 0.0), (0.2, 0.4)):
        for seed in range(4):
            radiographs.prepare(src, dst, size=16, val_fraction=val, test_fraction=test, seed=seed, progress=False)
            datalist, parts = _parts(dst)
            entries = [e for p in ("training", "validation", "test") for e in datalist.get(p, [])]
            assert len(entries) == 8
            ids = sorted(e["case_id"] for e in entries)
            assert ids == ["PAT-A", "PAT-A", "PAT-B", "PAT-B", "pa_anon1", "pa_anon2", "png_c1", "png_c2"], ids
            assert all(len(p) == 1 for p in parts.values()), parts  # a patient's images never in two parts
            seen_apart.add(parts["PAT-A"] != parts["PAT-B"])
            assert datalist["meta"]["dicoms_without_patient_id"] == 2
            assert datalist["meta"]["split"]["patient_from"] == "dicom"
    assert seen_apart == {True, False}  # the seeds do deal the two patients out differently


def test_an_anonymised_folder_warns_once_and_patient_from_case_keeps_one_patient_per_file(tmp_path, capsys):
    src = _folder(tmp_path / "xrays")
    dst = tmp_path / "out"
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "16"]) == 0
    err = capsys.readouterr().err
    assert err.count("have no PatientID") == 1
    assert "2 DICOM file(s) have no PatientID (0010,0020) (e.g. pa_anon1, pa_anon2)" in err
    # an explicit --patient-from wins over the PatientID: every image its own patient again
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "16",
                     "--patient-from", "case"]) == 0
    assert "no PatientID" not in capsys.readouterr().err
    datalist, parts = _parts(dst)
    assert sorted(parts) == ["lateral_a2", "pa_a1", "pa_anon1", "pa_anon2", "pa_b1", "png_c1", "png_c2", "visit2_b2"]
    assert "dicoms_without_patient_id" not in datalist["meta"]
    # and the folder rule groups by path, not by PatientID
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "16",
                     "--patient-from", "parent"]) == 0
    assert sorted(_parts(dst)[1]) == ["lateral", "pa", "png", "visit2"]


def test_the_help_names_the_dicom_default(capsys):
    with pytest.raises(SystemExit):
        radiographs.main(["--help"])
    assert "dicom (default: a DICOM's PatientID" in " ".join(capsys.readouterr().out.split())


def test_dicoms_named_by_their_uid_are_found_and_grouped_by_patient(tmp_path):
    """A PACS export names each file by its SOP instance UID (``1.2.840.113619.2.55.3.5``: Python's suffix is ``.5``):
    such files were counted as other files and left out, and a folder of them held 'no radiograph'. They are found by
    their DICM tag, keep their whole name as case id, and their PatientID groups them; a text file named like a UID
    is still not taken."""
    src = tmp_path / "pacs"
    _dicom(src / "study1" / "1.2.840.113619.2.55.3.5", "PAT-U")
    _dicom(src / "study1" / "1.2.840.113619.2.55.3.17", "PAT-U")
    _dicom(src / "study2" / "1.3.6.1.4.1.9328.2", "PAT-V")
    (src / "study2" / "1.2.3.4").write_text("not an image")
    found = radiographs.find_radiographs(src)
    assert sorted(found) == ["study1_1.2.840.113619.2.55.3.17", "study1_1.2.840.113619.2.55.3.5",
                             "study2_1.3.6.1.4.1.9328.2"]
    dst = tmp_path / "out"
    assert radiographs.main(["--src", str(src), "--dst", str(dst), "--size", "32", "--val-fraction", "0.5"]) == 0
    datalist, parts = _parts(dst)
    assert sorted(parts) == ["PAT-U", "PAT-V"] and all(len(p) == 1 for p in parts.values())
    images = sorted(Path(e["image"]).name for part in ("training", "validation") for e in datalist.get(part, []))
    assert images == ["study1_1.2.840.113619.2.55.3.17.png", "study1_1.2.840.113619.2.55.3.5.png",
                      "study2_1.3.6.1.4.1.9328.2.png"]
