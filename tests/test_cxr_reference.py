"""2D chest X-ray preparation checked against the datasets' own definitions and hand computations, not the code.

Each test pins one fact a wrong preparation would silently break (found by a mutation audit of dira3d.data.cxr,
rle, siim, chexpert, chestxray14, montgomery, radiographs and cxr_splits: the code could be changed there without
any other test failing): the official label lists and their order, the SIIM-ACR run-length encoding as Kaggle
defines it, the resizing of images and masks, the 8-bit scaling, the patient-level splits and the settings'
defaults that docs/data_2d.md states. Tiny synthetic images only.
"""

from __future__ import annotations

import csv
import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_dicom_radiograph

from dira3d.data import chestxray14, chexpert, montgomery, radiographs, siim
from dira3d.data.cxr import check_size, image_resize_mode, resize_image, resize_mask, to_uint8
from dira3d.data.cxr_splits import patient_split, split_entries
from dira3d.data.rle import decode_rle, encode_rle

# ---------------------------------------------------------------- the datasets' official label lists


def test_chestxray14_labels_are_the_14_findings_of_wang_et_al_in_their_order_and_spelling():
    """Wang et al. 2017 / the NIH Data_Entry_2017 spelling (``Pleural_Thickening`` with an underscore): the label
    vector's order is what every published per-class AUC refers to."""
    assert chestxray14.LABELS == (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
        "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
    # "No Finding" is all zeros, not a 15th class; several findings are joined by '|'
    assert chestxray14.parse_findings("No Finding") == [0.0] * 14
    assert chestxray14.parse_findings("Hernia|Effusion") == [0.0, 0.0, 1.0] + [0.0] * 10 + [1.0]


def test_chexpert_labels_are_the_14_observations_and_the_5_competition_tasks():
    """Irvin et al. 2019: the 14 observations in the order of the columns of train.csv / valid.csv, and the five
    competition tasks (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion) in the paper's order."""
    assert chexpert.ALL == (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
        "Support Devices")
    assert chexpert.FIVE == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    # the uncertain-label policies (U-Ones default, U-Zeros, label smoothing of U-Ones in U(0.55, 0.85))
    assert chexpert.POLICIES == ("u-ones", "u-zeros", "lsr") and chexpert.LSR_RANGE == (0.55, 0.85)


# ---------------------------------------------------------------- SIIM-ACR run-length encoding (Kaggle's definition)


def _kaggle_decode(rle: str, rows: int, cols: int) -> np.ndarray:
    """The competition's definition, written out: walk a column-major flattening; each start is counted from the
    end of the previous run (0-based); "-1" is an empty mask."""
    flat = np.zeros(rows * cols, np.uint8)
    if rle.strip() != "-1":
        values = [int(v) for v in rle.split()]
        position = 0
        for start, length in zip(values[0::2], values[1::2]):
            position += start
            flat[position:position + length] = 1
            position += length
    return flat.reshape(cols, rows).T  # column by column


def _kaggle_encode(mask: np.ndarray) -> str:
    """Column by column, top to bottom: (pixels since the end of the previous run, run length) per run."""
    pairs, run_start, run_length, since_end = [], None, 0, 0
    for value in (mask.T.reshape(-1) > 0):
        if value:
            if run_start is None:
                run_start, run_length = since_end, 0
            run_length += 1
        elif run_start is not None:
            pairs += [run_start, run_length]
            run_start, since_end = None, 0
        if not value:
            since_end += 1
    if run_start is not None:
        pairs += [run_start, run_length]
    return " ".join(map(str, pairs)) if pairs else "-1"


def test_rle_decodes_the_example_of_the_competition_page():
    """train-rle.csv's example "387620 23 996 33 ..." on a 1024 x 1024 image: 387620 = 378 · 1024 + 548, so the first
    run is column 378, rows 548-570; the next starts 996 pixels after it ends (388639 = 379 · 1024 + 543): column
    379, rows 543-575."""
    mask = decode_rle("387620 23 996 33", (1024, 1024))
    assert mask.sum() == 56
    assert mask[548:571, 378].all() and mask[543:576, 379].all()
    assert not mask[547, 378] and not mask[571, 378] and not mask[542, 379] and not mask[576, 379]


@pytest.mark.parametrize("shape", [(9, 7), (7, 9), (1, 12), (12, 1)])
def test_rle_agrees_with_the_definition_written_out_on_random_masks(shape):
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    for density in (0.0, 0.1, 0.5, 0.9, 1.0):
        mask = (rng.random(shape) < density).astype(np.uint8)
        reference = _kaggle_encode(mask)
        assert encode_rle(mask) == reference
        np.testing.assert_array_equal(decode_rle(reference, shape), _kaggle_decode(reference, *shape))
        np.testing.assert_array_equal(decode_rle(reference, shape), mask)


def test_rle_run_ends_exactly_at_the_next_start():
    """A run's end is exclusive: "0 2 1 1" on one column of 4 sets rows 0, 1 and 3, not 2."""
    np.testing.assert_array_equal(decode_rle("0 2 1 1", (4, 1))[:, 0], [1, 1, 0, 1])
    np.testing.assert_array_equal(decode_rle("3 1", (4, 1))[:, 0], [0, 0, 0, 1])  # a run on the last pixel


# ---------------------------------------------------------------- 8-bit scaling and resizing (docs/data_2d.md)


def test_to_uint8_min_max_scales_and_keeps_a_constant_image_black():
    """Not 8-bit: lowest value → 0, highest → 255, rounded to the nearest level; a constant image has no range
    and stays constant at 0 (black), whatever its value; an 8-bit image is kept as it is, not stretched."""
    np.testing.assert_array_equal(to_uint8(np.array([[100, 200], [300, 351]], np.uint16)), [[0, 102], [203, 255]])
    np.testing.assert_array_equal(to_uint8(np.full((3, 4), 4095, np.uint16)), np.zeros((3, 4), np.uint8))
    np.testing.assert_array_equal(to_uint8(np.full((2, 2), -7.5, np.float32)), np.zeros((2, 2), np.uint8))
    eight = np.array([[10, 20], [30, 40]], np.uint8)
    assert to_uint8(eight) is eight
    for bad in (np.nan, np.inf):  # no range to scale: refused, not turned into arbitrary levels
        with pytest.raises(ValueError, match="NaN or infinite"):
            to_uint8(np.array([[0.0, 1.0], [bad, 2.0]], np.float32))


def test_resize_image_area_averages_when_shrinking():
    """4 x 4 → 2 x 2: each output pixel is the mean of its 2 x 2 block (area averaging, no aliasing), rounded to the
    nearest level (not truncated)."""
    image = np.array([[0, 40, 100, 100],
                      [80, 120, 100, 100],
                      [0, 0, 255, 0],
                      [0, 0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(resize_image(image, 2), [[60, 100], [0, 64]])  # 255 / 4 = 63.75 rounds to 64
    # 6 → 2: the mean of each 3 pixels (30), where a bilinear resize would sample pixels 1 and 4 (0 and 30)
    row = np.tile(np.array([0, 0, 90, 30, 30, 30], np.uint8), (6, 1))
    np.testing.assert_array_equal(resize_image(row, 2), [[30, 30], [30, 30]])


def test_resize_image_is_bilinear_without_aligned_corners_when_enlarging():
    """2 → 4 along a row: output pixel centres at source coordinates -0.25, 0.25, 0.75, 1.25 (half-pixel centres,
    clamped at the border): 0, 25, 75, 100. align_corners=True would give 0, 33, 67, 100, nearest 0, 0, 100, 100."""
    image = np.array([[0, 100], [0, 100]], np.uint8)
    np.testing.assert_array_equal(resize_image(image, 4), [[0, 25, 75, 100]] * 4)


def test_resize_image_enlarging_one_side_is_bilinear():
    """8 rows x 2 columns → 4 x 4: a side is enlarged, so bilinear (docs: area only when no side is enlarged); area
    would repeat the columns (0, 0, 100, 100)."""
    image = np.tile(np.array([0, 100], np.uint8), (8, 1))
    assert image_resize_mode(image.shape, 4) == {"mode": "bilinear", "align_corners": False}
    assert image_resize_mode((8, 6), 4) == {"mode": "area"} and image_resize_mode((4, 4), 4) == {"mode": "area"}
    np.testing.assert_array_equal(resize_image(image, 4), [[0, 25, 75, 100]] * 4)


def test_resize_mask_keeps_blocks_at_least_half_foreground():
    """4 x 4 → 2 x 2 by area average and threshold 0.5: 2 of 4 pixels → 1 (0.5 is kept), 1 of 4 → 0 even when it is
    the block's top-left pixel (which nearest-neighbour would pick), 3 of 4 → 1. Values > 1 (0/255 masks) count."""
    mask = np.array([[1, 0, 255, 0],
                     [1, 0, 0, 0],
                     [1, 1, 0, 9],
                     [0, 1, 9, 9]], np.uint8)
    out = resize_mask(mask, 2)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[1, 0], [1, 1]])


# ---------------------------------------------------------------- the settings docs/data_2d.md states


@pytest.mark.parametrize("module, val, test", [(siim, 0.1, 0.2), (montgomery, 0.1, 0.2), (radiographs, 0.1, 0.0),
                                               (chestxray14, 0.1, None), (chexpert, 0.1, None)],
                         ids=["siim", "montgomery", "radiographs", "chestxray14", "chexpert"])
def test_defaults_of_the_2d_preparations(module, val, test):
    """docs/data_2d.md: 512² PNGs, seed 0; SIIM-ACR and Montgomery 70 / 10 / 20 % of the patients; your own X-rays
    10 % validation and no test part; ChestX-ray14 and CheXpert keep their official test sets and hold out 10 % of
    the training patients. The command line and the Python function agree."""
    args = vars(module.build_parser().parse_args(["--src", "s", "--dst", "d"]))
    defaults = inspect.signature(module.prepare).parameters
    assert args["size"] == defaults["size"].default == 512
    for size in (1, 4, 7):  # 0 keeps the native size; a side below 8 pixels is refused, naming --size
        with pytest.raises(ValueError, match=f"--size {size} is too small"):
            module.prepare("s", "d", size=size)
    assert check_size(0) == 0 and check_size(8) == 8
    assert args["seed"] == defaults["seed"].default == 0
    assert args["val_fraction"] == defaults["val_fraction"].default == val
    if test is None:
        assert "test_fraction" not in args and "test_fraction" not in defaults
    else:
        assert args["test_fraction"] == defaults["test_fraction"].default == test


def test_chexpert_defaults_are_u_ones_and_the_five_tasks(monkeypatch):
    """The command's defaults reach prepare: --policy u-ones, --labels five (and all = the 14 observations)."""
    defaults = inspect.signature(chexpert.prepare).parameters
    assert defaults["policy"].default == "u-ones" and defaults["labels"].default == chexpert.FIVE
    assert defaults["frontal_only"].default is False
    seen = []
    monkeypatch.setattr(chexpert, "run_prepare", lambda name, prepare, args, **kwargs: seen.append(kwargs) or 0)
    chexpert.main(["--src", "s", "--dst", "d"])
    chexpert.main(["--src", "s", "--dst", "d", "--labels", "all", "--policy", "lsr", "--frontal-only"])
    assert (seen[0]["policy"], seen[0]["labels"], seen[0]["frontal_only"]) == ("u-ones", chexpert.FIVE, False)
    assert (seen[1]["policy"], seen[1]["labels"], seen[1]["frontal_only"]) == ("lsr", chexpert.ALL, True)


# ---------------------------------------------------------------- SIIM-ACR end to end


def test_siim_keeps_a_patients_images_together_and_a_half_covered_mask_block(tmp_path):
    """Two images of each of three patients (DICOM PatientID): each patient's images fall in one part, the parts
    are patient_split of the PatientIDs, and case_id is the PatientID. The mask is resized as a mask (area average
    ≥ 0.5 kept): a 2 x 2 block with 2 of its 4 pixels in the pneumothorax is foreground at half the size (an 8-bit
    image's rounding, 0.5 → 0, would lose it and call the case negative)."""
    src, dst = tmp_path / "siim", tmp_path / "out"
    half = np.zeros((16, 16), np.uint8)
    half[0:2, 2] = 1  # block (rows 0-1, cols 2-3): 2 of 4 pixels
    rows, patient_of = [], {}
    for p in range(3):
        for k in range(2):
            uid = f"1.2.{p}.{k}"
            write_dicom_radiograph(src / "dicom-images-train" / uid / f"{uid}.dcm", np.full((16, 16), 50 * k + p, np.uint8),
                         f"P{p}")
            patient_of[uid] = f"P{p}"
            rows.append([uid, " " + (encode_rle(half) if (p, k) == (0, 0) else "-1")])
    with open(src / "train-rle.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["ImageId", " EncodedPixels"], *rows])
    siim.prepare(src, dst, size=8, val_fraction=1 / 3, test_fraction=1 / 3, seed=2, progress=False)
    datalist = json.loads((dst / "siim_datalist.json").read_text())
    parts = {part: sorted({e["case_id"] for e in datalist[part]}) for part in ("training", "validation", "test")}
    expected = patient_split(["P0", "P1", "P2"], 1 / 3, 1 / 3, seed=2)
    assert parts == {part: sorted(ids) for part, ids in expected.items()}
    for part in parts:
        for entry in datalist[part]:
            uid = entry["image"].split("/")[-1][:-4]
            assert entry["case_id"] == patient_of[uid]
    assert len(datalist["training"]) == len(datalist["validation"]) == len(datalist["test"]) == 2
    stored = np.zeros((8, 8), np.uint8)
    stored[0, 1] = 1
    np.testing.assert_array_equal(np.asarray(Image.open(dst / "masks" / "1.2.0.0.png")), stored)
    flags = {e["image"]: e["pneumothorax"] for part in parts for e in datalist[part]}
    assert flags == {f"images/{uid}.png": int(uid == "1.2.0.0") for uid in patient_of}


# ---------------------------------------------------------------- the patient-level split


def test_patient_split_sizes_seed_and_order():
    """Sizes are the fractions of the patients (largest remainder); duplicates are one patient; the split depends on
    the set of ids and the seed only, not on the order the images came in; no test part without --test-fraction."""
    ids = [f"p{i:02d}" for i in range(20)]
    split = patient_split(ids, 0.15, 0.2, seed=4)
    assert [len(split[k]) for k in ("training", "validation", "test")] == [13, 3, 4]
    assert sorted(sum(split.values(), [])) == ids
    assert patient_split(ids[::-1] + ids[:5], 0.15, 0.2, seed=4) == split
    assert patient_split(ids, 0.15, 0.2, seed=5) != split
    assert set(patient_split(ids, 0.1)) == {"training", "validation"}
    assert [len(v) for v in patient_split(ids, 0.15).values()] == [17, 3]
    for val, test in ((1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (-0.1, 0.0)):
        with pytest.raises(ValueError, match="fraction"):
            patient_split(ids, val, test)


def test_split_entries_keeps_each_patients_entries_in_one_part_in_their_order():
    entries = [(f"p{i % 4}", {"n": i}) for i in range(12)]  # 4 patients, 3 entries each, interleaved
    split, lists = split_entries(entries, 0.25, 0.25, seed=1)
    assert split == patient_split([p for p, _ in entries], 0.25, 0.25, seed=1)
    for part, ids in split.items():
        assert [e["n"] for e in lists[part]] == [i for i in range(12) if f"p{i % 4}" in ids]


# ---------------------------------------------------------------- Montgomery end to end


def test_montgomery_lung_mask_is_left_or_right_of_0_255_masks_resized_as_a_mask(tmp_path):
    """The masks come as 0/255 PNGs (0/1 works too); the lung is left ∪ right; the stored mask is 0/1 and resized as a mask (a block
    half covered stays lung); case_id is MCUCXR_NNNN and the last digit of the name is the tuberculosis flag."""
    root = tmp_path / "MontgomerySet"
    for folder in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
        (root / folder).mkdir(parents=True)
    left, right = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    left[4:12, 2:6] = 255
    right[4:12, 10:14] = 1  # a 0/1 mask counts as well: any non-zero pixel is lung
    right[0:2, 0] = 1  # 2 of the 4 pixels of the top-left 2 x 2 block
    for name, flag in (("MCUCXR_0001_0.png", 0), ("MCUCXR_0002_1.png", 1)):
        Image.fromarray(np.full((16, 16), 100 + flag, np.uint8)).save(root / "CXR_png" / name)
        Image.fromarray(left).save(root / "ManualMask/leftMask" / name)
        Image.fromarray(right).save(root / "ManualMask/rightMask" / name)
    dst = tmp_path / "out"
    montgomery.prepare(tmp_path, dst, size=8, val_fraction=0.0, test_fraction=0.5, progress=False)
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 1:3] = 1
    expected[2:6, 5:7] = 1
    expected[0, 0] = 1
    for name in ("MCUCXR_0001_0", "MCUCXR_0002_1"):
        np.testing.assert_array_equal(np.asarray(Image.open(dst / "masks" / f"{name}.png")), expected)
    datalist = json.loads((dst / "montgomery_datalist.json").read_text())
    entries = {e["image"]: e for part in ("training", "test") for e in datalist[part]}
    assert {k: (e["case_id"], e["tuberculosis"]) for k, e in entries.items()} == {
        "images/MCUCXR_0001_0.png": ("MCUCXR_0001", 0), "images/MCUCXR_0002_1.png": ("MCUCXR_0002", 1)}
    assert datalist["meta"]["label"] == "left ∪ right lung"


# ---------------------------------------------------------------- CheXpert end to end


def test_chexpert_split_is_by_patient_and_valid_csv_is_the_test_set(tmp_path):
    """train.csv is split by patientNNNNN (the frontal and lateral views of patient00001 stay together, and the
    parts are patient_split of the patients); valid.csv is the test part as it is; each entry keeps its view."""
    from test_data_cxr import _chexpert_layout

    src, dst = _chexpert_layout(tmp_path / "data"), tmp_path / "out"
    # seed 2: a split of the 4 images instead of the 3 patients would put patient00001 in both parts
    chexpert.prepare(src, dst, size=8, val_fraction=0.34, seed=2, progress=False)
    datalist = json.loads((dst / "chexpert_datalist.json").read_text())
    expected = patient_split(["patient00001", "patient00002", "patient00003"], 0.34, seed=2)
    assert not {e["case_id"] for e in datalist["training"]} & {e["case_id"] for e in datalist["validation"]}
    for part in ("training", "validation"):
        assert sorted({e["case_id"] for e in datalist[part]}) == sorted(expected[part])
        for entry in datalist[part]:
            assert entry["image"].split("/")[2] == entry["case_id"]
    views = {e["image"].split("/", 2)[2]: e["view"] for part in ("training", "validation", "test") for e in datalist[part]}
    assert views == {"patient00001/study1/view1_frontal.png": "Frontal", "patient00001/study1/view2_lateral.png": "Lateral",
                     "patient00002/study1/view1_frontal.png": "Frontal", "patient00003/study2/view1_frontal.png": "Frontal",
                     "patient64541/study1/view1_frontal.png": "Frontal"}
    assert [(e["image"], e["case_id"]) for e in datalist["test"]] == [
        ("images/valid/patient64541/study1/view1_frontal.png", "patient64541")]


# ---------------------------------------------------------------- ChestX-ray14 end to end


def test_chestxray14_official_test_list_patient_split_and_boxes_of_a_non_square_image(tmp_path):
    """test_list.txt is the test part as it is; train_val_list.txt is split by Patient ID (patient_split of its
    patients); the view is the CSV's View Position; a box is rescaled by the source PNG's own width (x, w) and
    height (y, h): 64 rows x 32 columns to 32 x 32 is x 1 across and x 0.5 down; a box is listed under the part of
    its image; the labels come from Data_Entry_2017_v2020.csv when the older Data_Entry_2017.csv is there too."""
    from test_data_cxr import BOX, ENTRIES, TEST, _nih_layout

    src, dst = _nih_layout(tmp_path / "nih"), tmp_path / "out"
    tall = next(src.rglob("00000007_000.png"))
    Image.fromarray(np.full((64, 32), 20, np.uint8)).save(tall)
    with open(src / "BBox_List_2017.csv", "a", newline="") as handle:  # a box on a train_val image
        csv.writer(handle).writerow(["00000001_000.png", "Cardiomegaly", 32, 32, 8, 8, "", "", ""])
    # the older label file beside the v2020 one (the v2020 revision wins): every image "No Finding" there
    with open(src / "Data_Entry_2017.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["Image Index", "Finding Labels", "Patient ID"],
                                      *[[n, "No Finding", p] for n, _, p in ENTRIES]])
    chestxray14.prepare(src, dst, size=32, val_fraction=0.4, seed=7, progress=False)
    datalist = json.loads((dst / "chestxray14_datalist.json").read_text())
    assert sorted(e["image"] for e in datalist["test"]) == [f"images/{n}" for n in TEST]
    patient_of = {name: patient for name, _, patient in ENTRIES}
    expected = patient_split([patient_of[n] for n in patient_of if n not in TEST], 0.4, seed=7)
    for part in ("training", "validation"):
        assert sorted(e["image"][7:] for e in datalist[part]) == sorted(
            n for n in patient_of if n not in TEST and patient_of[n] in expected[part])
    assert {e["view"] for part in ("training", "validation", "test") for e in datalist[part]} == {"PA"}
    labels = {e["image"][7:]: e["label"] for part in ("training", "validation", "test") for e in datalist[part]}
    assert labels == {n: chestxray14.parse_findings(f) for n, f, _ in ENTRIES}
    boxes = json.loads((dst / "bbox_datalist.json").read_text())
    (box,) = boxes["test"]
    x, y, w, h = BOX
    assert box["box"] == [x, y / 2, w, h / 2] and box["label"] == "Infiltration" and box["label_index"] == 3
    part = next(p for p in ("training", "validation") if patient_of["00000001_000.png"] in expected[p])
    assert [(b["image"], b["label_index"], b["box"]) for b in boxes[part]] == [
        ("images/00000001_000.png", 1, [16.0, 16.0, 4.0, 4.0])]  # 64² source: x 0.5


# ---------------------------------------------------------------- the 2D bundles' inference step


def test_prepare_radiographd_rounds_other_formats_to_whole_levels_before_resizing():
    """docs (PrepareRadiographd): values of a format that is not 8-bit are rounded to whole grey levels and clipped
    to 0..255 before the preparation's resize: 100.6 is level 101 (not 100, truncated), 300 is 255, -5 is 0."""
    from monai.data import MetaTensor

    from dira3d.evaluation.radiographs import PrepareRadiographd

    image = np.full((1, 16, 16), 100.6, np.float32)
    image[0, :, 8:] = 300.0
    image[0, :2, :2] = -5.0
    out = PrepareRadiographd("image", 8)({"image": MetaTensor(torch.as_tensor(image))})["image"]
    expected = np.full((8, 8), 101.0)
    expected[:, 4:] = 255.0
    expected[0, 0] = 0.0
    np.testing.assert_array_equal(np.asarray(out)[0], expected)
