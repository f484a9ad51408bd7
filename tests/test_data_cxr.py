"""ChestX-ray14 and CheXpert preparation on tiny datasets in the official layouts."""

import csv
import io
import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from dira3d.data import chestxray14, chexpert
from dira3d.data.cxr import one_channel, read_grey, resize_mask, scale_box, to_uint8
from dira3d.data.command import main as prepare_main
from dira3d.data.io import DataError, DataWarning

# ---------------------------------------------------------------- ChestX-ray14

ENTRY_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
# image, findings, patient
ENTRIES = [
    ("00000001_000.png", "Cardiomegaly", "1"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1"),
    ("00000002_000.png", "No Finding", "2"),
    ("00000003_000.png", "Hernia|Infiltration|Atelectasis", "3"),
    ("00000004_000.png", "Effusion", "4"),
    ("00000005_000.png", "No Finding", "5"),
    ("00000006_000.png", "Pleural_Thickening", "6"),
    ("00000007_000.png", "Infiltration", "7"),
]
TEST = ["00000006_000.png", "00000007_000.png"]
BOX = (16.0, 8.0, 20.0, 12.0)  # x, y, w, h on the 64² source image of 00000007_000


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _nih_layout(root):
    for i, (name, findings, patient) in enumerate(ENTRIES):
        folder = root / f"images_00{1 + i % 2}" / "images"  # the archives extract to two folders here
        folder.mkdir(parents=True, exist_ok=True)
        image = np.full((64, 64), 20, np.uint8)
        if name == "00000007_000.png":
            x, y, w, h = map(int, BOX)
            image[y:y + h, x:x + w] = 230  # bright where the box is: x = column, y = row
        Image.fromarray(image).save(folder / name)
    _write_csv(root / "Data_Entry_2017_v2020.csv", ENTRY_HEADER,
               [[n, f, 0, p, 50, "M", "PA", 2500, 2048, 0.14, 0.14] for n, f, p in ENTRIES])
    (root / "train_val_list.txt").write_text("\n".join(n for n, _, _ in ENTRIES if n not in TEST) + "\n")
    (root / "test_list.txt").write_text("\n".join(TEST) + "\n")
    # the real file: "Infiltrate" spelling, split header of the box, trailing empty columns
    _write_csv(root / "BBox_List_2017.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""],
               [["00000007_000.png", "Infiltrate", *BOX, "", "", ""]])
    return root


def test_parse_findings_by_value():
    vector = chestxray14.parse_findings("Hernia|Infiltration|Atelectasis")
    assert vector == [1.0, 0, 0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0]
    assert chestxray14.parse_findings("No Finding") == [0.0] * 14
    with pytest.raises(DataError, match=r"Data_Entry.csv row 3: unknown finding 'Infiltrate'; expected 'No Finding' "
                                        r"or one of \['Atelectasis'"):
        chestxray14.parse_findings("Infiltrate", "Data_Entry.csv row 3")


def test_read_data_entry_keeps_bad_rows_as_errors(tmp_path):
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    _write_csv(path, ENTRY_HEADER, [[n, f, 0, p, 50, "M", "PA", 2500, 2048, 0.14, 0.14] for n, f, p in
                                    [("a.png", "Effusion", "1"), ("b.png", "Effusion|Covid", "2"), ("c.png", "Mass", ""),
                                     ("d.png", "Mass", "4"), ("a.png", "Mass", "1")]])
    with pytest.raises(DataError, match="row 3, column 'Finding Labels': unknown finding 'Covid'"):
        chestxray14.read_data_entry(path)  # the default still raises at the first bad row
    problems: dict[str, str] = {}
    entries = chestxray14.read_data_entry(path, problems)
    assert "d.png" not in problems and entries["d.png"]["label"][4] == 1.0 and entries["d.png"]["row"] == 5
    assert "row 3, column 'Finding Labels': unknown finding 'Covid'" in problems["b.png"]
    assert "'No Finding' or one of ['Atelectasis'" in problems["b.png"]  # the allowed values
    assert entries["b.png"]["label"] == [0.0] * 14
    assert "row 4: image c.png has no Patient ID" in problems["c.png"]
    assert "rows 2 and 6 both describe image a.png" in problems["a.png"]


def test_chestxray14_prepare(tmp_path):
    src, dst = _nih_layout(tmp_path / "nih"), tmp_path / "out"
    results = chestxray14.prepare(src, dst, size=32, val_fraction=0.4, seed=3, progress=False)
    assert [r.status for r in results] == ["written"] * len(ENTRIES)
    datalist = json.loads((dst / "chestxray14_datalist.json").read_text())
    by_image = {e["image"]: e for split in ("training", "validation", "test") for e in datalist[split]}
    assert len(by_image) == len(ENTRIES)
    assert by_image["images/00000003_000.png"]["label"] == chestxray14.parse_findings("Atelectasis|Infiltration|Hernia")
    assert by_image["images/00000001_001.png"]["label"][1] == 1.0 and by_image["images/00000001_001.png"]["label"][10] == 1.0
    assert by_image["images/00000001_001.png"]["case_id"] == "1"
    # official test list; patient-level split of the rest (5 train_val patients, 40 % → 2 for validation)
    assert sorted(e["image"] for e in datalist["test"]) == [f"images/{n}" for n in TEST]
    train_patients = {e["case_id"] for e in datalist["training"]}
    val_patients = {e["case_id"] for e in datalist["validation"]}
    assert not train_patients & val_patients and len(val_patients) == 2 and len(train_patients) == 3
    assert datalist["meta"]["labels"][3] == "Infiltration" and datalist["meta"]["size"] == 32
    png = np.asarray(Image.open(dst / "images/00000002_000.png"))
    assert png.shape == (32, 32) and png.dtype == np.uint8 and np.all(png == 20)
    # the box, rescaled ×0.5, still frames the bright rectangle of the resized image
    boxes = json.loads((dst / "bbox_datalist.json").read_text())
    (box,) = boxes["test"]
    assert box["label"] == "Infiltration" and box["label_index"] == 3 and box["case_id"] == "7"
    assert box["box"] == [8.0, 4.0, 10.0, 6.0]
    x, y, w, h = map(int, box["box"])
    image = np.asarray(Image.open(dst / box["image"])).astype(float)
    inside = image[y + 1:y + h - 1, x + 1:x + w - 1]
    outside = image.copy()
    outside[max(y - 1, 0):y + h + 1, max(x - 1, 0):x + w + 1] = np.nan
    assert inside.min() > 200 and np.nanmax(outside) < 40
    # same seed → same split; a second run resumes (all skipped)
    again = chestxray14.prepare(src, dst, size=32, val_fraction=0.4, seed=3, progress=False)
    assert {r.status for r in again} == {"skipped"}
    assert json.loads((dst / "chestxray14_datalist.json").read_text())["validation"] == datalist["validation"]


def test_chestxray14_errors(tmp_path):
    src = _nih_layout(tmp_path / "nih")
    (src / "test_list.txt").write_text("99999999_000.png\n")
    with pytest.raises(DataError, match="does not describe 1 image"):
        chestxray14.prepare(src, tmp_path / "out", progress=False)
    (src / "test_list.txt").unlink()
    with pytest.raises(DataError, match="test_list.txt"):
        chestxray14.prepare(src, tmp_path / "out", progress=False)
    assert chestxray14.main(["--src", str(src), "--dst", str(tmp_path / "o"), "--size", "4"]) == 2


def test_chestxray14_bad_box_row_stops_before_the_images(tmp_path):
    # the box file was read after all images were converted (hours for the real data set)
    src = _nih_layout(tmp_path / "nih")
    with open(src / "BBox_List_2017.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["00000007_000.png", "Mass", "abc", 1, 2, 3, "", "", ""])
    with pytest.raises(DataError, match=r"BBox_List_2017.csv: row 3: box values must be numbers"):
        chestxray14.prepare(src, tmp_path / "out", size=32, keep_going=True, progress=False)
    assert not (tmp_path / "out" / "images").exists()


def test_chestxray14_failed_last_image_writes_no_datalist(tmp_path, capsys):
    # docs/data.md: without --keep-going a failure writes no datalist; it did when nothing was left to cancel
    src = _nih_layout(tmp_path / "nih")
    last = sorted(src.rglob("*.png"), key=lambda p: p.name)[-1]
    last.write_bytes(b"not a png")
    assert chestxray14.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--size", "32"]) == 1
    assert not (tmp_path / "out" / "chestxray14_datalist.json").exists()
    assert "no datalist was written; add --keep-going" in capsys.readouterr().err
    assert chestxray14.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--size", "32", "--keep-going"]) == 0
    datalist = json.loads((tmp_path / "out" / "chestxray14_datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "test")) == len(ENTRIES) - 1


def _listed(datalist):
    return {e["image"]: e for split in ("training", "validation", "test") for e in datalist[split]}


def test_chestxray14_unknown_finding_fails_its_image_only(tmp_path, capsys):
    # an unknown finding aborted the whole batch (exit code 2), even with --keep-going
    src = _nih_layout(tmp_path / "nih")
    entry = src / "Data_Entry_2017_v2020.csv"
    entry.write_text(entry.read_text().replace("00000004_000.png,Effusion,", "00000004_000.png,Effusion|Covid,"))
    dst = tmp_path / "out"
    assert chestxray14.main(["--src", str(src), "--dst", str(dst), "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert "FAILED 00000004_000:" in err and "row 6, column 'Finding Labels': unknown finding 'Covid'" in err
    assert not (dst / "chestxray14_datalist.json").exists()
    assert chestxray14.main(["--src", str(src), "--dst", str(dst), "--size", "32", "--keep-going"]) == 0
    report = json.loads((dst / "report.json").read_text())
    failed = [c for c in report["cases"] if c["status"] == "failed"]
    assert [c["case_id"] for c in failed] == ["00000004_000"] and "Data_Entry_2017_v2020.csv" in failed[0]["reason"]
    listed = _listed(json.loads((dst / "chestxray14_datalist.json").read_text()))
    assert len(listed) == len(ENTRIES) - 1 and "images/00000004_000.png" not in listed
    assert listed["images/00000003_000.png"]["label"] == chestxray14.parse_findings("Atelectasis|Infiltration|Hernia")


def test_chestxray14_duplicate_png_fails_its_image_only(tmp_path):
    # a PNG present under two images folders aborted the whole batch, even with --keep-going
    src = _nih_layout(tmp_path / "nih")
    (first,) = src.rglob("00000002_000.png")
    copy = src / "images_009" / "images" / "00000002_000.png"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(first.read_bytes())
    results = chestxray14.prepare(src, tmp_path / "out", size=32, keep_going=True, progress=False)
    failed = [r for r in results if r.status == "failed"]
    assert [r.case_id for r in failed] == ["00000002_000"] and [r.status for r in results].count("written") == 7
    assert "duplicate" in failed[0].reason and str(first) in failed[0].reason and str(copy) in failed[0].reason
    listed = _listed(json.loads((tmp_path / "out" / "chestxray14_datalist.json").read_text()))
    assert len(listed) == len(ENTRIES) - 1 and "images/00000002_000.png" not in listed


def test_chestxray14_missing_image_is_a_failed_case(tmp_path, capsys):
    # an image of the CSV missing on disk was left out silently (exit 0) while CheXpert failed it:
    # a missing image is bad input, the failed case of that image (docs/data_2d.md)
    src = _nih_layout(tmp_path / "nih")
    next(src.rglob("00000005_000.png")).unlink()
    assert chestxray14.main(["--src", str(src), "--dst", str(tmp_path / "stop"), "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert "FAILED 00000005_000:" in err and "or add --keep-going to prepare the images that are there" in err
    assert not (tmp_path / "stop" / "chestxray14_datalist.json").exists()
    results = chestxray14.prepare(src, tmp_path / "out", size=32, keep_going=True, progress=False)
    failed = [r for r in results if r.status == "failed"]
    assert [r.case_id for r in failed] == ["00000005_000"]
    assert "Data_Entry_2017_v2020.csv: row 7: image 00000005_000.png is not under" in failed[0].reason
    assert "--keep-going" not in failed[0].reason  # given already: it said to add it (a 2D walkthrough)
    datalist = json.loads((tmp_path / "out" / "chestxray14_datalist.json").read_text())
    assert len(_listed(datalist)) == len(ENTRIES) - 1 and datalist["meta"]["images_missing_on_disk"] == 1


# ---------------------------------------------------------------- CheXpert

def test_chestxray14_dst_is_src_with_images_folder_is_refused_and_src_inside_dst_works(tmp_path):
    # the NIH archives extract to images/, where the prepared images go: --dst = --src failed with "holds none
    # of the PNG images ...; extract the archives" (every PNG under --dst was ignored), which misled; and a
    # --src inside --dst (--src /data/out/nih --dst /data/out) failed with the same message
    src = _nih_layout(tmp_path / "nih")
    (src / "images").mkdir()
    for path in list(src.glob("images_*/images/*.png")):
        path.rename(src / "images" / path.name)
    before = {p.name: p.read_bytes() for p in (src / "images").iterdir()}
    with pytest.raises(DataError, match=r"holds the downloaded images in .*images, where the prepared ones would be "
                                        r"written over them \(--dst is --src\?\); choose an output folder"):
        chestxray14.prepare(src, src, size=32, progress=False)
    assert {p.name: p.read_bytes() for p in (src / "images").iterdir()} == before  # untouched
    results = chestxray14.prepare(src, tmp_path, size=32, progress=False)  # --src inside --dst
    assert [r.status for r in results] == ["written"] * len(ENTRIES)
    assert len(_listed(json.loads((tmp_path / "chestxray14_datalist.json").read_text()))) == len(ENTRIES)


def test_chestxray14_an_earlier_output_inside_src_is_not_a_second_copy(tmp_path, capsys):
    # `--src /data/nih --dst /data/nih/prepared` worked once; every later run from that --src (another --size or
    # --dst) failed every image as "duplicate of /data/nih/prepared/images/...; keep one copy of each image"
    src = _nih_layout(tmp_path / "nih")
    assert chestxray14.main(["--src", str(src), "--dst", str(src / "prepared"), "--size", "16"]) == 0
    assert chestxray14.main(["--src", str(src), "--dst", str(src / "prepared_8"), "--size", "8"]) == 0
    assert chestxray14.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--size", "8"]) == 0
    assert "FAILED" not in capsys.readouterr().err
    for out in (src / "prepared_8", tmp_path / "out"):
        listed = _listed(json.loads((out / "chestxray14_datalist.json").read_text()))
        assert len(listed) == len(ENTRIES)
        # read from the downloads (64²), not from the 16² PNGs of the first run: the box is rescaled from 64
        box = json.loads((out / "bbox_datalist.json").read_text())["test"][0]["box"]
        assert box == [b * 8 / 64 for b in BOX]
    # only the earlier output holds them: named, not "holds none of the PNG images"
    for folder in src.glob("images_*"):
        for png in folder.rglob("*.png"):
            png.unlink()
    with pytest.raises(DataError, match=r"holds the PNGs named in the data entry CSV only in the output of an earlier "
                                        r"`dira3d prepare chestxray14` \(.*prepared.*images\)"):
        chestxray14.prepare(src, tmp_path / "out2", size=8, progress=False)


CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.ALL]


def _chex_row(path, view, values):
    """``values``: {label: cell text}; other labels blank."""
    return [path, "Female", 60, view, "AP" if view == "Frontal" else "", *[values.get(n, "") for n in chexpert.ALL]]


def _chexpert_layout(root):
    base = root / "CheXpert-v1.0-small"
    train = [
        _chex_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal",
                  {"Atelectasis": "-1.0", "Cardiomegaly": "1.0", "Edema": "0.0", "No Finding": ""}),
        _chex_row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Lateral",
                  {"Atelectasis": "-1.0", "Cardiomegaly": "1.0"}),
        _chex_row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Frontal",
                  {"Pleural Effusion": "-1.0", "Consolidation": "-1.0", "No Finding": "1.0"}),
        _chex_row("CheXpert-v1.0-small/train/patient00003/study2/view1_frontal.jpg", "Frontal",
                  {"Edema": "1.0", "Fracture": "-1.0"}),
    ]
    valid = [_chex_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal",
                       {"Atelectasis": "0.0", "Cardiomegaly": "1.0", "Consolidation": "0.0", "Edema": "0.0",
                        "Pleural Effusion": "1.0"})]
    for rows, name in ((train, "train.csv"), (valid, "valid.csv")):
        _write_csv(base / name, CHEX_HEADER, rows)
        for row in rows:
            path = root / row[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 48), 128, np.uint8)).save(path, quality=95)
    return root


def test_apply_policy_by_value():
    values = np.array([[1, -1, 0], [-1, 0, -1]], np.float32)
    np.testing.assert_array_equal(chexpert.apply_policy(values, "u-ones"), [[1, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(chexpert.apply_policy(values, "u-zeros"), [[1, 0, 0], [0, 0, 0]])
    smoothed = chexpert.apply_policy(values, "lsr", np.random.default_rng(7))
    draws = np.random.default_rng(7).uniform(0.55, 0.85, size=3).astype(np.float32)
    np.testing.assert_allclose(smoothed[values == -1], draws)  # row-major order of the uncertain entries
    np.testing.assert_array_equal(smoothed[values != -1], values[values != -1])
    assert ((draws >= 0.55) & (draws <= 0.85)).all()
    with pytest.raises(ValueError, match="--policy"):
        chexpert.apply_policy(values, "u-maybe")
    with pytest.raises(ValueError, match="rng"):
        chexpert.apply_policy(values, "lsr")


def test_chexpert_prepare_policies(tmp_path):
    src = _chexpert_layout(tmp_path / "data")
    dst = tmp_path / "zeros"
    results = chexpert.prepare(src, dst, policy="u-zeros", frontal_only=True, size=32, progress=False)
    assert len(results) == 4 and all(r.status == "written" for r in results)  # lateral dropped
    datalist = json.loads((dst / "chexpert_datalist.json").read_text())
    entries = {e["image"]: e for s in ("training", "validation", "test") for e in datalist[s]}
    first = entries["images/train/patient00001/study1/view1_frontal.png"]
    # FIVE order: Atelectasis (−1 → 0), Cardiomegaly 1, Consolidation blank → 0, Edema 0, Effusion blank → 0
    assert first["label"] == [0.0, 1.0, 0.0, 0.0, 0.0] and first["case_id"] == "patient00001"
    assert [e["image"] for e in datalist["test"]] == ["images/valid/patient64541/study1/view1_frontal.png"]
    assert datalist["test"][0]["label"] == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert datalist["meta"]["policy"] == "u-zeros" and datalist["meta"]["labels"] == list(chexpert.FIVE)
    png = np.asarray(Image.open(dst / "images/train/patient00001/study1/view1_frontal.png"))
    assert png.shape == (32, 32) and abs(int(png.mean()) - 128) <= 2  # JPEG is lossy

    ones = tmp_path / "ones"
    chexpert.prepare(src, ones, policy="u-ones", labels=chexpert.ALL, size=0, progress=False)
    datalist = json.loads((ones / "chexpert_datalist.json").read_text())
    entries = {e["image"]: e for s in ("training", "validation", "test") for e in datalist[s]}
    assert len(entries) == 5  # lateral kept
    second = entries["images/train/patient00002/study1/view1_frontal.png"]["label"]
    expected = [0.0] * 14
    for name in ("No Finding", "Consolidation", "Pleural Effusion"):
        expected[chexpert.ALL.index(name)] = 1.0
    assert second == expected
    assert np.asarray(Image.open(ones / "images/train/patient00002/study1/view1_frontal.png")).shape == (40, 48)

    lsr = tmp_path / "lsr"
    chexpert.prepare(src, lsr, policy="lsr", frontal_only=True, size=32, seed=5, progress=False)
    datalist = json.loads((lsr / "chexpert_datalist.json").read_text())
    entries = {e["image"]: e for s in ("training", "validation", "test") for e in datalist[s]}
    # uncertain entries in file order: patient00001 Atelectasis, then patient00002 Consolidation, Effusion
    draws = np.random.default_rng(5).uniform(0.55, 0.85, size=3).astype(np.float32)
    np.testing.assert_allclose(entries["images/train/patient00001/study1/view1_frontal.png"]["label"][0], draws[0])
    np.testing.assert_allclose(
        [entries["images/train/patient00002/study1/view1_frontal.png"]["label"][i] for i in (2, 4)], draws[1:])


def test_chexpert_bad_value_names_row(tmp_path, capsys):
    # a bad value aborted the whole batch (exit code 2), even with --keep-going; now it fails its image only
    src = _chexpert_layout(tmp_path / "data")
    csv_path = src / "CheXpert-v1.0-small" / "train.csv"
    csv_path.write_text(csv_path.read_text().replace("1.0,", "2.0,", 1))  # row 2, Cardiomegaly
    bad = "train/patient00001/study1/view1_frontal"
    with pytest.raises(DataError, match=r"train.csv row 2, column 'Cardiomegaly'.*'2.0' is not 1.0, 0.0, -1.0 or blank"):
        chexpert.read_labels(csv_path)  # the default still raises
    assert chexpert.main(["--src", str(src), "--dst", str(tmp_path / "stop"), "--size", "32"]) == 1
    assert f"FAILED {bad}:" in capsys.readouterr().err
    assert not (tmp_path / "stop" / "chexpert_datalist.json").exists()
    results = chexpert.prepare(src, tmp_path / "out", size=32, keep_going=True, progress=False)
    by_id = {r.case_id: r for r in results}
    assert by_id[bad].status == "failed" and [r.status for r in results].count("written") == 4
    assert re.search(r"train.csv row 2, column 'Cardiomegaly'.*'2.0' is not 1.0, 0.0, -1.0 or blank", by_id[bad].reason)
    listed = _listed(json.loads((tmp_path / "out" / "chexpert_datalist.json").read_text()))
    assert len(listed) == 4 and f"images/{bad}.png" not in listed
    with pytest.raises(DataError, match="train.csv"):
        chexpert.prepare(tmp_path / "empty_dir_missing", tmp_path / "out", progress=False)


def test_chexpert_bad_row_does_not_shift_the_lsr_draws(tmp_path):
    # the good rows' smoothed labels are the same with and without a bad row (which draws nothing)
    clean = _chexpert_layout(tmp_path / "clean")
    dirty = _chexpert_layout(tmp_path / "dirty")
    csv_path = dirty / "CheXpert-v1.0-small" / "train.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    bad_path = "CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg"
    out = io.StringIO()
    csv.writer(out).writerow(_chex_row(bad_path, "Frontal", {"Atelectasis": "-1.0", "Edema": "-1.0",
                                                             "Cardiomegaly": "2.0"}))
    csv_path.write_text("".join(lines[:2]) + out.getvalue() + "".join(lines[2:]))  # before the other -1 rows
    (dirty / bad_path).parent.mkdir(parents=True)
    Image.fromarray(np.full((40, 48), 128, np.uint8)).save(dirty / bad_path)
    labels = {}
    for name, src in (("clean", clean), ("dirty", dirty)):
        results = chexpert.prepare(src, tmp_path / f"out_{name}", policy="lsr", labels=chexpert.ALL, size=8, seed=5,
                                   keep_going=True, progress=False)
        assert [r.status for r in results].count("failed") == (name == "dirty")
        labels[name] = {k: e["label"] for k, e in _listed(
            json.loads((tmp_path / f"out_{name}" / "chexpert_datalist.json").read_text())).items()}
    assert len(labels["clean"]) == 5 and labels["dirty"] == labels["clean"]
    smoothed = [v for label in labels["clean"].values() for v in label if 0.55 <= v <= 0.85]
    assert len(smoothed) == 5  # the check is not vacuous: 5 uncertain cells, 3 of them after the bad row


def test_chexpert_missing_image_is_a_failed_case(tmp_path):
    src = _chexpert_layout(tmp_path / "data")
    (src / "CheXpert-v1.0-small/train/patient00003/study2/view1_frontal.jpg").unlink()
    results = chexpert.prepare(src, tmp_path / "out", size=8, keep_going=True, progress=False)
    failed = [r for r in results if r.status == "failed"]
    assert [r.case_id for r in failed] == ["train/patient00003/study2/view1_frontal"]
    assert re.search(r"train.csv: row 5: image \S+view1_frontal.jpg does not exist", failed[0].reason)
    assert "--keep-going" not in failed[0].reason  # given already: it said to add it (a 2D walkthrough)
    stopped = chexpert.prepare(src, tmp_path / "stop", size=8, progress=False)
    assert any("or add --keep-going to prepare the images that are there" in r.reason for r in stopped)
    datalist = json.loads((tmp_path / "out" / "chexpert_datalist.json").read_text())
    assert len(_listed(datalist)) == 4 and datalist["meta"]["images_missing_on_disk"] == 1


# ---------------------------------------------------------------- shared helpers

def test_helpers_by_value(tmp_path):
    assert scale_box([10, 20, 30, 40], (200, 100), 50) == [5.0, 5.0, 15.0, 10.0]  # rows 200, cols 100
    assert scale_box([10, 20, 30, 40], (200, 100), 0) == [10.0, 20.0, 30.0, 40.0]
    np.testing.assert_array_equal(to_uint8(np.array([[1000, 3000], [2000, 1000]], np.uint16)), [[0, 255], [128, 0]])
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 255
    np.testing.assert_array_equal(resize_mask(mask, 4), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(DataError, match="does not exist"):
        read_grey(tmp_path / "missing.png")


def _colour_variants(grey):
    """Each variant: (PNG array, PIL mode, the error it must give or None for a grey image stored in colour)."""
    opaque, clear = np.full_like(grey, 255), np.full_like(grey, 255)
    clear[0, 0] = 0
    tinted = grey.copy()
    tinted[1, 2] += 1  # one pixel off grey is enough: there is no one grey reading of it
    return {
        "rgb": (np.stack([grey] * 3, -1), "RGB", None),
        "rgba": (np.stack([grey] * 3 + [opaque], -1), "RGBA", None),
        "coloured": (np.stack([grey, tinted, grey], -1), "RGB", r"is a colour RGB image: its colour channels differ in 1 pixels"),
        "transparent": (np.stack([grey] * 3 + [clear], -1), "RGBA", r"is a RGBA image with 1 transparent pixels"),
    }


@pytest.mark.parametrize("variant", ["rgb", "rgba", "coloured", "transparent"])
def test_read_grey_takes_a_grey_image_stored_in_colour_and_refuses_a_coloured_one(tmp_path, variant):
    # RGB(A) was averaged over its channels without a word: a coloured image (a photo, an annotated
    # screenshot) became a grey one that the bundles trained on
    grey = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10
    array, mode, error = _colour_variants(grey)[variant]
    path = tmp_path / f"{variant}.png"
    Image.fromarray(array, mode=mode).save(path)
    if error:
        with pytest.raises(DataError, match=error) as info:
            read_grey(path)
        assert str(path) in str(info.value) and "replace it with the grey original" in str(info.value)
        return
    with pytest.warns(DataWarning, match=rf"{re.escape(str(path))}: stored as {mode} with equal colour channels"):
        np.testing.assert_array_equal(read_grey(path), grey)


def test_one_channel_of_grey_plus_alpha_and_of_other_channel_counts():
    # grey + alpha PNGs come through Pillow (test_read_grey_of_grey_alpha_palette_and_16_bit_pngs); other formats may give 2 channels
    grey = np.arange(6, dtype=np.uint16).reshape(2, 3) * 1000
    with pytest.warns(DataWarning, match="x.dcm: stored as grey \\+ alpha with equal colour channels and an opaque alpha"):
        np.testing.assert_array_equal(one_channel(np.stack([grey, np.full_like(grey, 65535)], -1), "x.dcm"), grey)
    with pytest.raises(DataError, match="x.dcm: is a grey \\+ alpha image with 6 transparent pixels \\(alpha below 65535\\)"):
        one_channel(np.stack([grey, np.full_like(grey, 255)], -1), "x.dcm")  # 8-bit opaque is not 16-bit opaque
    with pytest.raises(DataError, match="x.dcm: has 5 components per pixel"):
        one_channel(np.stack([grey] * 5, -1), "x.dcm")


def test_chestxray14_grey_rgba_is_prepared_with_a_warning_and_a_coloured_png_fails_its_case(tmp_path, capsys):
    """A few real ChestX-ray14 PNGs are RGBA: they are prepared as one grey channel and the report says so;
    a coloured image is a failed case naming the file (it was averaged to grey without a word)."""
    src = _nih_layout(tmp_path / "nih")
    rgba = src / "images_001" / "images" / "00000001_000.png"
    coloured = src / "images_002" / "images" / "00000001_001.png"
    grey = np.asarray(Image.open(rgba))
    variants = _colour_variants(grey)
    Image.fromarray(variants["rgba"][0], mode="RGBA").save(rgba)
    Image.fromarray(variants["coloured"][0], mode="RGB").save(coloured)
    report = tmp_path / "report.json"
    assert prepare_main(["chestxray14", "--src", str(src), "--dst", str(tmp_path / "out"), "--size", "0", "--keep-going",
                         "--report", str(report)]) == 0
    cases = {c["case_id"]: c for c in json.loads(report.read_text())["cases"]}
    assert cases["00000001_000"]["status"] == "written"
    assert cases["00000001_000"]["warnings"] == [f"{rgba}: stored as RGBA with equal colour channels and an opaque "
                                                 "alpha; prepared as one grey channel"]
    written = Image.open(tmp_path / "out" / "images" / "00000001_000.png")
    assert written.mode == "L"
    np.testing.assert_array_equal(np.asarray(written), grey)
    assert cases["00000001_001"]["status"] == "failed" and cases["00000001_001"]["reason"].startswith(f"{coloured}: is a colour RGB")
    assert not (tmp_path / "out" / "images" / "00000001_001.png").exists()
    assert sum(c["status"] == "written" for c in cases.values()) == len(ENTRIES) - 1
    err = capsys.readouterr().err
    assert str(coloured) in err and "stored as RGBA" in err  # the summary shows both


def _png_16bit_grey_alpha(path, grey):
    """A 16-bit grey + alpha PNG (colour type 4), written by hand: Pillow cannot write one."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows, cols = grey.shape
    pixels = np.stack([grey.astype(">u2"), np.full(grey.shape, 65535, ">u2")], -1)
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(rows))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", cols, rows, 16, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _palette_png(path, indices, palette, **save):
    image = Image.frombytes("P", indices.shape[::-1], indices.astype(np.uint8).tobytes())
    image.putpalette([v for colour in palette for v in colour])
    image.save(path, **save)


@pytest.mark.parametrize("variant", ["grey_alpha", "grey_alpha_clear", "palette_grey", "palette_coloured",
                                     "palette_clear", "palette_clear_unused", "grey_trns_unused", "grey_trns_used",
                                     "grey16", "grey16_trns", "grey16_alpha"])
def test_read_grey_of_grey_alpha_palette_and_16_bit_pngs(tmp_path, variant):
    # SimpleITK cannot read a grey + alpha PNG, nor a grey one with a transparent value (tRNS): "Unknown PixelType",
    # so a grey radiograph saved that way was a failed case "cannot be read"; a palette PNG was called RGB(A)
    grey = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10
    path = tmp_path / f"{variant}.png"
    greys = [(v, v, v) for v in range(256)]
    warning = error = None
    expected = grey
    if variant == "grey_alpha":
        Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(path)
        warning = "stored as grey \\+ alpha with equal colour channels and an opaque alpha; prepared as one grey channel"
    elif variant == "grey_alpha_clear":
        alpha = np.full_like(grey, 255)
        alpha[2, 3] = 128
        Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(path)
        error = "is a grey \\+ alpha image with 1 transparent pixels"
    elif variant == "palette_grey":
        _palette_png(path, grey, greys)
        warning = "stored as palette with equal colour channels; prepared as one grey channel"
    elif variant == "palette_coloured":
        palette = list(greys)
        palette[30] = (30, 0, 0)  # the colour of one pixel
        _palette_png(path, grey, palette)
        error = "is a colour palette image: its colour channels differ in 1 pixels"
    elif variant in ("palette_clear", "palette_clear_unused"):
        _palette_png(path, grey, greys, transparency=20 if variant == "palette_clear" else 255)
        if variant == "palette_clear":
            error = "is a palette image with 1 transparent pixels"
        else:
            warning = "stored as palette with equal colour channels and an opaque alpha"
    elif variant in ("grey_trns_unused", "grey_trns_used"):
        Image.fromarray(grey).save(path, transparency=20 if variant == "grey_trns_used" else 255)
        if variant == "grey_trns_used":
            error = "is a grey \\+ tRNS transparency image with 1 transparent pixels"
        else:
            warning = "stored as grey \\+ tRNS transparency with equal colour channels and an opaque alpha"
    elif variant in ("grey16", "grey16_trns"):
        expected = grey.astype(np.uint16) * 250  # up to 57,500: needs all 16 bits
        Image.fromarray(expected).save(path, **({"transparency": 65535} if variant == "grey16_trns" else {}))
        if variant == "grey16_trns":
            warning = "stored as grey \\+ tRNS transparency with equal colour channels and an opaque alpha"
    else:
        _png_16bit_grey_alpha(path, grey.astype(np.uint16) * 250)
        error = "is a 16-bit grey \\+ alpha PNG, which cannot be read without losing grey levels"
    if error:
        with pytest.raises(DataError, match=error) as info:
            read_grey(path)
        assert str(info.value).startswith(str(path)) and "remove it from the list" in str(info.value)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        array = read_grey(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    if warning:
        assert len(messages) == 1 and re.match(rf"{re.escape(str(path))}: {warning}", messages[0]), messages
    else:
        assert not messages
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)


def test_chestxray14_grey_alpha_and_palette_pngs_are_prepared_with_a_warning(tmp_path, capsys):
    """Real ChestX-ray14 downloads hold grey + alpha PNGs: they were failed cases ("Unknown PixelType"); the boxed
    image as grey + alpha also stopped the box datalist, whose size was read by SimpleITK."""
    src = _nih_layout(tmp_path / "nih")
    boxed = src / "images_002" / "images" / "00000007_000.png"  # the 8th entry: the second folder
    palette = src / "images_001" / "images" / "00000001_000.png"
    grey = np.asarray(Image.open(boxed))
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), mode="LA").save(boxed)
    Image.open(palette).convert("P").save(palette)
    report = tmp_path / "report.json"
    assert prepare_main(["chestxray14", "--src", str(src), "--dst", str(tmp_path / "out"), "--size", "32",
                         "--report", str(report)]) == 0
    cases = {c["case_id"]: c for c in json.loads(report.read_text())["cases"]}
    assert {c["status"] for c in cases.values()} == {"written"}
    assert cases["00000007_000"]["warnings"] == [f"{boxed}: stored as grey + alpha with equal colour channels and an "
                                                 "opaque alpha; prepared as one grey channel"]
    assert cases["00000001_000"]["warnings"] == [f"{palette}: stored as palette with equal colour channels; prepared "
                                                 "as one grey channel"]
    (box,) = json.loads((tmp_path / "out" / "bbox_datalist.json").read_text())["test"]
    assert box["box"] == [8.0, 4.0, 10.0, 6.0]
    written = Image.open(tmp_path / "out" / "images" / "00000007_000.png")
    assert written.mode == "L" and np.asarray(written).max() > 200


def test_chexpert_a_path_cell_leaving_the_dataset_fails_its_row_only(tmp_path):
    # a Path cell with '..' stopped the whole preparation before any image (even with keep_going)
    src = _chexpert_layout(tmp_path / "data")
    train = src / "CheXpert-v1.0-small" / "train.csv"
    bad = "CheXpert-v1.0-small/train/patient00009/../../../../outside.jpg"
    with open(train, "a", newline="") as handle:
        csv.writer(handle).writerow(_chex_row(bad, "Frontal", {"Edema": "1.0"}))
    results = chexpert.prepare(src, tmp_path / "out", frontal_only=True, size=32, keep_going=True, progress=False)
    failed = [r for r in results if r.status == "failed"]
    assert len(failed) == 1 and "train.csv" in failed[0].reason and "'..'" in failed[0].reason, failed
    assert sum(r.status == "written" for r in results) == 4
    datalist = json.loads((tmp_path / "out" / "chexpert_datalist.json").read_text())
    assert all(".." not in e["image"] for s in ("training", "validation", "test") for e in datalist[s])


def test_chestxray14_boxes_of_an_image_not_prepared_are_counted_and_named(tmp_path, capsys):
    """Found by a 2D walkthrough: a box whose image failed (or is absent from the CSV) dropped out of
    bbox_datalist.json without a word; it is now counted in the box datalist's meta, on the image's case in the
    report and in the end message."""
    src = _nih_layout(tmp_path / "nih")
    next(src.rglob("00000007_000.png")).unlink()  # the boxed test image: a failed case
    with open(src / "BBox_List_2017.csv", "a", newline="") as handle:
        csv.writer(handle).writerows([["00000007_000.png", "Mass", 1, 2, 3, 4, "", "", ""],
                                      ["99999999_000.png", "Nodule", 1, 2, 3, 4, "", "", ""]])
    dst = tmp_path / "out"
    assert chestxray14.main(["--src", str(src), "--dst", str(dst), "--size", "32", "--keep-going"]) == 0
    err = capsys.readouterr().err
    assert "WARNING 00000007_000: its 2 box(es) of BBox_List_2017.csv are left out of bbox_datalist.json" in err
    assert "3 box(es) of" in err and "on 2 image(s) not prepared (00000007_000.png, 99999999_000.png)" in err
    meta = json.loads((dst / "bbox_datalist.json").read_text())["meta"]
    assert meta["boxes_dropped"] == 3 and meta["boxes_dropped_images"] == ["00000007_000.png", "99999999_000.png"]
    case = next(c for c in json.loads((dst / "report.json").read_text())["cases"] if c["case_id"] == "00000007_000")
    assert case["status"] == "failed" and any("its 2 box(es)" in w for w in case["warnings"])


@pytest.mark.parametrize("name", ["chestxray14", "chexpert"])
def test_a_validation_list_asked_for_by_val_fraction_0_is_a_note_not_a_warning(tmp_path, capsys, name):
    """`--val-fraction 0` asks for no 'validation' list (fine-tuning holds out its own patients), yet the empty list was
    a WARNING that "no prepared case went there", advising another --val-fraction. It is one note line naming it."""
    if name == "chestxray14":
        src = tmp_path / "nih"
        _nih_layout(src)
    else:
        src = _chexpert_layout(tmp_path / "chex")
    assert prepare_main([name, "--src", str(src), "--dst", str(tmp_path / "out"), "--size", "16",
                         "--val-fraction", "0"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "'validation'" in line]
    assert lines == [f"note {name}_datalist.json: its 'validation' list is empty, as asked: --val-fraction 0 "
                     "(fine-tuning holds out its own patients)"], lines
    datalist = json.loads((tmp_path / "out" / f"{name}_datalist.json").read_text())
    assert datalist["validation"] == [] and datalist["training"] and datalist["test"]
