"""SIIM-ACR (DICOM + RLE) and Montgomery (PNG + left/right masks) preparation, checked by value."""

import csv
import json
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import write_dicom_radiograph

from dira3d.data import montgomery, siim
from dira3d.data.command import main as prepare_main
from dira3d.data.cxr import read_grey
from dira3d.data.io import DataError
from dira3d.data.rle import encode_rle

SHAPE = (16, 20)  # rows ≠ cols: a transposed decoding would not even fit


def _siim_layout(root, missing=False):
    rng = np.random.default_rng(0)
    component_a = np.zeros(SHAPE, np.uint8)
    component_a[2:6, 3:5] = 1
    component_b = np.zeros(SHAPE, np.uint8)
    component_b[10:12, 14:19] = 1
    images = {f"1.2.276.0.7230010.3.1.4.{i}": rng.integers(0, 256, SHAPE, dtype=np.uint8) for i in range(4)}
    ids = sorted(images)
    for i, (uid, array) in enumerate(images.items()):
        write_dicom_radiograph(root / "dicom-images-train" / f"1.2.{i}" / f"1.3.{i}" / f"{uid}.dcm", array, f"patient-{i}")
    rows = [[ids[0], " " + encode_rle(component_a)], [ids[0], " " + encode_rle(component_b)],
            [ids[1], " -1"], [ids[2], " " + encode_rle(component_b)], [ids[3], " -1"]]
    if missing:
        rows.append(["1.2.999", " -1"])  # listed without a DICOM
    with open(root / "train-rle.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", " EncodedPixels"])  # the real header has the leading space
        writer.writerows(rows)
    return images, {ids[0]: component_a | component_b, ids[1]: 0 * component_a, ids[2]: component_b,
                    ids[3]: 0 * component_a}


def test_siim_prepare_by_value(tmp_path):
    images, masks = _siim_layout(tmp_path / "siim")
    dst = tmp_path / "out"
    results = siim.prepare(tmp_path / "siim", dst, size=0, val_fraction=0.25, test_fraction=0.25, progress=False)
    assert [r.status for r in results] == ["written"] * 4
    for uid, array in images.items():
        np.testing.assert_array_equal(np.asarray(Image.open(dst / "images" / f"{uid}.png")), array)
        np.testing.assert_array_equal(np.asarray(Image.open(dst / "masks" / f"{uid}.png")), masks[uid])
    datalist = json.loads((dst / "siim_datalist.json").read_text())
    entries = [e for s in ("training", "validation", "test") for e in datalist[s]]
    assert sorted(e["case_id"] for e in entries) == [f"patient-{i}" for i in range(4)]
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [2, 1, 1]
    flags = {e["image"]: e["pneumothorax"] for e in entries}
    assert [flags[f"images/{uid}.png"] for uid in sorted(images)] == [1, 0, 1, 0]
    assert datalist["meta"]["images_without_dicom"] == 0

    resized = tmp_path / "resized"
    siim.prepare(tmp_path / "siim", resized, size=8, progress=False)
    mask = np.asarray(Image.open(resized / "masks" / f"{sorted(images)[2]}.png"))
    assert mask.shape == (8, 8) and set(np.unique(mask)) == {0, 1}


def test_siim_bad_rle_fails_the_case(tmp_path):
    _siim_layout(tmp_path / "siim")
    csv_path = tmp_path / "siim" / "train-rle.csv"
    csv_path.write_text(csv_path.read_text().replace(" -1", " 330 5", 1))  # past the 320 pixels of 16×20
    results = siim.prepare(tmp_path / "siim", tmp_path / "out", keep_going=True, progress=False)
    failed = [r for r in results if r.status == "failed"]
    assert len(failed) == 1 and "train-rle.csv" in failed[0].reason and "past the" in failed[0].reason


def test_siim_pneumothorax_flag_says_whether_the_mask_written_has_foreground(tmp_path):
    """The flag came from the CSV (any RLE but -1) before the mask was resized: a pneumothorax that vanished in the
    resize gave pneumothorax 1 for an empty stored mask, and the fine-tuning holdout kept it as its case with
    foreground. It now says what the stored mask holds, with a warning for that case."""
    images, _ = _siim_layout(tmp_path / "siim")
    tiny_id = sorted(images)[3]  # " -1" in the layout: give it a pneumothorax of one pixel
    tiny = np.zeros(SHAPE, np.uint8)
    tiny[7, 9] = 1
    csv_path = tmp_path / "siim" / "train-rle.csv"
    csv_path.write_text(csv_path.read_text().replace(f"{tiny_id}, -1", f"{tiny_id}, {encode_rle(tiny)}"))
    dst, report = tmp_path / "out", tmp_path / "report.json"
    results = siim.prepare(tmp_path / "siim", dst, size=8, report_path=report, progress=False)
    assert [r.status for r in results] == ["written"] * 4
    masks = {uid: np.asarray(Image.open(dst / "masks" / f"{uid}.png")) for uid in images}
    assert not masks[tiny_id].any()  # 1 of the 5 source pixels under each stored pixel: area average 0.2 < 0.5

    def flags() -> dict[str, int]:
        datalist = json.loads((dst / "siim_datalist.json").read_text())
        return {e["image"]: e["pneumothorax"] for s in ("training", "validation", "test") for e in datalist[s]}

    assert flags() == {f"images/{uid}.png": int(masks[uid].any()) for uid in images}
    assert [flags()[f"images/{uid}.png"] for uid in sorted(images)] == [1, 0, 1, 0]
    cases = {c["case_id"]: c for c in json.loads(report.read_text())["cases"]}
    assert cases[tiny_id]["info"] == {"pixels": 1, "mask_pixels": 0}
    assert len(cases[tiny_id]["warnings"]) == 1 and "the pneumothorax of 1 pixel(s)" in cases[tiny_id]["warnings"][0]
    assert "mask written is empty, so the entry's pneumothorax is 0" in cases[tiny_id]["warnings"][0]
    assert not any(c["warnings"] for uid, c in cases.items() if uid != tiny_id)

    # a rerun skips the cases and reads each flag from its mask PNG: a datalist whose flag came from the CSV (an
    # earlier version) is rewritten with the masks' flags; a mask PNG that cannot be read is redone
    datalist = json.loads((dst / "siim_datalist.json").read_text())
    for entry in (e for s in ("training", "validation", "test") for e in datalist[s]):
        entry["pneumothorax"] = 1 if entry["image"] == f"images/{tiny_id}.png" else entry["pneumothorax"]
    (dst / "siim_datalist.json").write_text(json.dumps(datalist))
    (dst / "masks" / f"{sorted(images)[0]}.png").write_bytes(b"not a png")
    again = {r.case_id: r for r in siim.prepare(tmp_path / "siim", dst, size=8, progress=False)}
    redone = again[sorted(images)[0]]
    assert redone.status == "written" and any("cannot be read as a PNG" in w for w in redone.warnings), redone.warnings
    assert [again[uid].status for uid in sorted(images)[1:]] == ["skipped"] * 3
    assert [flags()[f"images/{uid}.png"] for uid in sorted(images)] == [1, 0, 1, 0]


def test_monochrome1_dicom_is_read_bone_bright(tmp_path):
    array = np.arange(SHAPE[0] * SHAPE[1], dtype=np.uint16).reshape(SHAPE) % 256
    write_dicom_radiograph(tmp_path / "a.dcm", array.astype(np.uint8), "p")
    dataset = pydicom.dcmread(tmp_path / "a.dcm")
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "b.dcm")
    np.testing.assert_array_equal(read_grey(tmp_path / "a.dcm"), array)
    np.testing.assert_array_equal(read_grey(tmp_path / "b.dcm"), 255 - array)  # inverted once, not twice


def _montgomery_layout(root):
    base = root / "MontgomerySet"
    expected = {}
    for number, tb in ((1, 0), (2, 1), (3, 0)):
        name = f"MCUCXR_{number:04d}_{tb}.png"
        left, right = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
        left[3:13, 2:8] = 255
        right[3:13, 11:17 - number] = 255
        for folder, array in (("CXR_png", np.full(SHAPE, 40 * number, np.uint8)), ("ManualMask/leftMask", left),
                              ("ManualMask/rightMask", right)):
            (base / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(base / folder / name)
        expected[name] = ((left > 0) | (right > 0)).astype(np.uint8)
    return root, expected


def test_montgomery_merges_left_and_right(tmp_path):
    src, expected = _montgomery_layout(tmp_path / "data")
    dst = tmp_path / "out"
    assert prepare_main(["montgomery", "--src", str(src), "--dst", str(dst), "--size", "0",
                         "--val-fraction", "0.34", "--test-fraction", "0.33"]) == 0
    for name, lungs in expected.items():
        np.testing.assert_array_equal(np.asarray(Image.open(dst / "masks" / name)), lungs)
        assert lungs.sum() == 60 + 10 * (6 - int(name[7:11]))  # 10×6 left + 10×(6 − n) right pixels
    datalist = json.loads((dst / "montgomery_datalist.json").read_text())
    entries = {e["case_id"]: e for s in ("training", "validation", "test") for e in datalist[s]}
    assert {k: v["tuberculosis"] for k, v in entries.items()} == {"MCUCXR_0001": 0, "MCUCXR_0002": 1, "MCUCXR_0003": 0}
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    assert entries["MCUCXR_0002"]["label"] == "masks/MCUCXR_0002_1.png"


def test_montgomery_val_fraction_0_gives_the_patents_train_test_split(tmp_path):
    # docs/data_2d.md: fine-tuning does not read `validation`; --val-fraction 0 gives the patent's 80 / 20 % form
    src, _ = _montgomery_layout(tmp_path / "data")
    dst = tmp_path / "out"
    assert prepare_main(["montgomery", "--src", str(src), "--dst", str(dst), "--size", "0",
                         "--val-fraction", "0", "--test-fraction", "0.34"]) == 0
    datalist = json.loads((dst / "montgomery_datalist.json").read_text())
    assert [len(datalist.get(s, [])) for s in ("training", "validation", "test")] == [2, 0, 1]


def test_montgomery_missing_mask_and_merge_errors(tmp_path):
    src, _ = _montgomery_layout(tmp_path / "data")
    missing = src / "MontgomerySet" / "ManualMask" / "rightMask" / "MCUCXR_0002_1.png"
    missing.unlink()
    # an image without a mask is a failed case of its own (docs/data.md), not a stop of the whole run
    results = montgomery.prepare(src, tmp_path / "out", keep_going=True, progress=False)
    assert [r.status for r in results] == ["written", "failed", "written"]
    assert "rightMask" in results[1].reason and "MCUCXR_0002_1.png" in results[1].reason
    datalist = json.loads((tmp_path / "out" / "montgomery_datalist.json").read_text())
    assert sorted(e["case_id"] for s in ("training", "validation", "test") for e in datalist[s]) == [
        "MCUCXR_0001", "MCUCXR_0003"]
    # without --keep-going the run stops, and no datalist is written
    assert prepare_main(["montgomery", "--src", str(src), "--dst", str(tmp_path / "o2")]) == 1
    assert not (tmp_path / "o2" / "montgomery_datalist.json").exists()
    with pytest.raises(DataError, match="differ in size"):
        montgomery.merge_lungs(np.zeros((2, 3)), np.zeros((3, 2)), "l.png / r.png")
    with pytest.raises(ValueError, match="--test-fraction"):
        montgomery.prepare(src, tmp_path / "out", val_fraction=0.5, test_fraction=0.5, progress=False)


def test_siim_dicom_without_patient_id_fails_its_case_only(tmp_path):
    # the PatientID was read after every image was converted: one DICOM without it stopped the
    # run with exit code 2 and no datalist, even with --keep-going
    src = tmp_path / "data"
    images, _ = _siim_layout(src)
    uid = sorted(images)[1]
    path = next(src.rglob(f"{uid}.dcm"))
    image = sitk.GetImageFromArray(images[uid])
    image.SetMetaData("0008|0018", uid)
    sitk.WriteImage(image, str(path))
    results = siim.prepare(src, tmp_path / "out", size=0, keep_going=True, progress=False)
    assert [r.status for r in results].count("written") == 3
    failed = [r for r in results if r.status == "failed"]
    assert [r.case_id for r in failed] == [uid] and "PatientID" in failed[0].reason
    datalist = json.loads((tmp_path / "out" / "siim_datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "test")) == 3


def test_siim_image_without_dicom_is_a_failed_case(tmp_path, capsys):
    # an ImageId without its DICOM was left out silently (exit 0), while CheXpert failed the same
    # problem: a missing image is bad input, the failed case of that image (docs/data_2d.md)
    images, _ = _siim_layout(tmp_path / "siim", missing=True)
    src = tmp_path / "siim"
    assert prepare_main(["siim", "--src", str(src), "--dst", str(tmp_path / "stop"), "--size", "0"]) == 1
    err = capsys.readouterr().err
    assert "FAILED 1.2.999:" in err and "or add --keep-going to prepare the images that are there" in err
    assert not (tmp_path / "stop" / "siim_datalist.json").exists()
    results = siim.prepare(src, tmp_path / "out", size=0, keep_going=True, progress=False)
    by_id = {r.case_id: r for r in results}
    assert by_id["1.2.999"].status == "failed" and [r.status for r in results].count("written") == 4
    assert "train-rle.csv" in by_id["1.2.999"].reason and "ImageId 1.2.999 has no DICOM" in by_id["1.2.999"].reason
    assert "--keep-going" not in by_id["1.2.999"].reason  # given already: it said to add it (a 2D walkthrough)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["failed"] == 1
    datalist = json.loads((tmp_path / "out" / "siim_datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "test")) == 4
    assert datalist["meta"]["images_without_dicom"] == 1


def test_siim_duplicate_dicom_fails_its_case_only(tmp_path):
    # a DICOM present twice stopped the whole run (exit code 2), even with --keep-going
    src = tmp_path / "siim"
    images, _ = _siim_layout(src)
    uid = sorted(images)[2]
    first = next(src.rglob(f"{uid}.dcm"))
    copy = src / "dicom-images-train" / "again" / "again" / f"{uid}.dcm"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(first.read_bytes())
    results = siim.prepare(src, tmp_path / "out", size=0, keep_going=True, progress=False)
    failed = [r for r in results if r.status == "failed"]
    assert [r.case_id for r in failed] == [uid] and [r.status for r in results].count("written") == 3
    assert str(first) in failed[0].reason and str(copy) in failed[0].reason and "duplicate" in failed[0].reason
    datalist = json.loads((tmp_path / "out" / "siim_datalist.json").read_text())
    assert f"images/{uid}.png" not in {e["image"] for s in ("training", "validation", "test") for e in datalist[s]}


def test_montgomery_grey_rgb_image_and_mask_are_prepared_with_warnings_and_a_coloured_image_fails(tmp_path):
    # an RGB export was averaged to grey without a word, and so was a coloured image
    src, expected = _montgomery_layout(tmp_path / "data")
    base = src / "MontgomerySet"
    image, mask = base / "CXR_png" / "MCUCXR_0001_0.png", base / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png"
    for path in (image, mask):
        Image.fromarray(np.stack([np.asarray(Image.open(path))] * 3, -1)).save(path)
    coloured = base / "CXR_png" / "MCUCXR_0003_0.png"
    grey = np.asarray(Image.open(coloured))
    Image.fromarray(np.stack([grey, grey // 2, grey], -1)).save(coloured)
    results = montgomery.prepare(src, tmp_path / "out", size=0, keep_going=True, progress=False)
    assert [r.status for r in results] == ["written", "written", "failed"]
    assert results[0].warnings == [f"{path}: stored as RGB with equal colour channels; prepared as one grey channel"
                                   for path in (image, mask)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "images" / "MCUCXR_0001_0.png")), 40)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / "MCUCXR_0001_0.png")),
                                  expected["MCUCXR_0001_0.png"])
    assert results[2].reason.startswith(f"{coloured}: is a colour RGB image") and not results[1].warnings


@pytest.mark.parametrize("name", ["montgomery", "siim"])
def test_an_empty_split_names_only_the_prepares_own_options(tmp_path, capsys, name):
    """One patient prepared: the 'validation' and 'test' lists are empty, and the warning named LUNA16's
    --train-subsets / --val-subsets / --test-subsets, which these prepares lack (write_datalist's default advice)."""
    if name == "montgomery":
        src, _ = _montgomery_layout(tmp_path / "data")
        for path in src.rglob("MCUCXR_000[23]_*.png"):
            path.unlink()
    else:
        src = tmp_path / "data"
        _siim_layout(src)
        for i in (1, 2, 3):
            shutil.rmtree(src / "dicom-images-train" / f"1.2.{i}")
    assert prepare_main([name, "--src", str(src), "--dst", str(tmp_path / "out"), "--size", "8", "--keep-going"]) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "lists are empty" in line)
    assert "its 'validation', 'test' lists are empty" in warning and "subsets" not in warning, warning
    assert warning.endswith("; --val-fraction / --test-fraction are cut over the 1 patient(s) prepared and round to "
                            "whole patients, each part needing one: prepare more patients, or, with enough, rerun with "
                            "a larger fraction for the empty list (the PNGs written are kept)"), warning


@pytest.mark.parametrize("name", ["montgomery", "siim"])
def test_a_validation_list_asked_for_by_val_fraction_0_is_a_note_not_a_warning(tmp_path, capsys, name):
    """`--val-fraction 0` (docs/data_2d.md's 80 / 20 % form: fine-tuning holds out its own patients) still warned that
    'validation' was empty because "no prepared case went there" and said to rerun with a larger fraction. It is one
    note line naming the setting; a fraction that rounds to no patient (one patient prepared) still warns, with the
    rerun advice, as does the 'test' list that rounded to none beside the 'validation' list asked for."""
    if name == "montgomery":
        src, _ = _montgomery_layout(tmp_path / "data")
    else:
        src = tmp_path / "data"
        _siim_layout(src)
    common = ["--src", str(src), "--size", "8", "--keep-going"]
    assert prepare_main([name, "--dst", str(tmp_path / "zero"), "--val-fraction", "0", *common]) == 0
    err = capsys.readouterr().err
    assert "WARNING" not in err and f"note {name}_datalist.json: its 'validation' list is empty, as asked: " \
        "--val-fraction 0 (fine-tuning holds out its own patients)\n" in err, err
    datalist = json.loads((tmp_path / "zero" / f"{name}_datalist.json").read_text())
    assert datalist["validation"] == [] and datalist["training"] and datalist["test"]
    if name == "montgomery":  # one patient left: the fractions round to none
        for path in src.rglob("MCUCXR_000[23]_*.png"):
            path.unlink()
    else:
        for i in (1, 2, 3):
            shutil.rmtree(src / "dicom-images-train" / f"1.2.{i}")
    assert prepare_main([name, "--dst", str(tmp_path / "one"), "--val-fraction", "0", *common]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "'validation'" in line] == [
        f"note {name}_datalist.json: its 'validation' list is empty, as asked: --val-fraction 0 (fine-tuning holds "
        "out its own patients)"]
    assert any(line.startswith(f"WARNING {name}_datalist.json: its 'test' list is empty: no prepared case went "
                               "there") for line in lines), lines
    assert prepare_main([name, "--dst", str(tmp_path / "rounded"), "--val-fraction", "0.1", *common]) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "'validation'" in line)
    assert warning.startswith(f"WARNING {name}_datalist.json: its 'validation', 'test' lists are empty: no prepared "
                              "case went there") and "rerun with a larger fraction" in warning, warning
