"""`dira3d localise` as a user runs it: from ChestX-ray14's official layout (`BBox_List_2017.csv` boxes in the pixels of
the 1024-pixel originals) through `dira3d prepare chestxray14` to the Grad-CAM boxes (docs/2d.md, "Localisation")."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dira3d.data import chestxray14
from dira3d.evaluation.box_inputs import prepared_size_of
from dira3d.evaluation.localise import load_box_entries, localise, main
from dira3d.networks import ResNetClassifier
from dira3d.utils import atomic_save

LABELS = list(chestxray14.LABELS)


class _SaliencyIsTheImage(nn.Module):
    """A 14-class classifier whose Grad-CAM map of every class is its input image (a 1x1 convolution of weight 1,
    global average, positive class weights): the heatmap's bright region is the lesion drawn in the image."""

    def __init__(self, classes: int = 14) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        self.fc = nn.Linear(1, classes, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.fc.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


# name, (rows, cols) of the original, lesion box [x, y, w, h] in its pixels, finding of the box file
RAW = [("00000001_000.png", (1024, 1024), (256, 512, 384, 128), "Mass"),
       ("00000002_000.png", (768, 1024), (256, 192, 384, 384), "Infiltrate"),  # not square: x and y scale apart
       ("00000003_000.png", (1024, 1024), (64, 64, 128, 128), "")]  # no box (training image)


def _official_layout(root: Path) -> Path:
    """ChestX-ray14 as downloaded: PNGs under images_00N/images, the data entry CSV, the split lists, the box file."""
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    for name, shape, (x, y, w, h), _ in RAW:
        pixels = np.full(shape, 20, np.uint8)
        pixels[y:y + h, x:x + w] = 235  # the lesion: rows are y, columns x
        Image.fromarray(pixels).save(folder / name)
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                         "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        for i, (name, shape, _, finding) in enumerate(RAW):
            writer.writerow([name, {"Infiltrate": "Infiltration", "": "No Finding"}.get(finding, finding), 0, i + 1, 50,
                             "M", "PA", shape[1], shape[0], 0.143, 0.143])
    (root / "train_val_list.txt").write_text(RAW[2][0] + "\n")
    (root / "test_list.txt").write_text(RAW[0][0] + "\n" + RAW[1][0] + "\n")
    with open(root / "BBox_List_2017.csv", "w", newline="") as handle:  # the real file's split header, empty columns
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""])
        writer.writerows([[name, finding, *map(float, box), "", "", ""] for name, _, box, finding in RAW if finding])
    return root


def test_boxes_go_from_the_originals_pixels_to_the_prepared_png_and_the_classifier_grid(tmp_path):
    """The boxes of BBox_List_2017.csv are in the original's pixels; preparation stores them in the prepared PNG's
    (x by size / width, y by size / height) and localise scales them to --roi-size: a wrong factor anywhere gives
    IoUs that are silently wrong. A classifier whose Grad-CAM map is the image finds each lesion with IoU 1."""
    src, dst = _official_layout(tmp_path / "nih"), tmp_path / "prepared"
    assert chestxray14.main(["--src", str(src), "--dst", str(dst), "--size", "128"]) == 0
    datalist = dst / "bbox_datalist.json"
    test = json.loads(datalist.read_text())["test"]
    # by hand: 1024 x 1024 -> 128: x 1/8, y 1/8; 1024 wide x 768 high -> 128: x 1/8, y 1/6
    assert [(e["label"], e["label_index"], e["box"]) for e in test] == [
        ("Mass", 4, [32.0, 64.0, 48.0, 16.0]), ("Infiltration", 3, [32.0, 32.0, 48.0, 64.0])]
    assert prepared_size_of(datalist) == 128
    result = localise(_SaliencyIsTheImage(), load_box_entries(datalist, "test", num_classes=14), tmp_path / "loc",
                      target_layer="features", roi_size=(64, 32), prepared_size=prepared_size_of(datalist))
    # on the 64 x 32 grid: x by 64/128, y by 32/128; (x0, y0, x1, y1)
    assert [b["box"] for b in result["boxes"]] == [[16, 16, 40, 20], [16, 8, 40, 24]]
    assert [b["best_iou"] for b in result["boxes"]] == [pytest.approx(1.0)] * 2
    # the predicted box back in the prepared PNG's pixels: the datalist's box
    assert [b["predicted_boxes"][0] for b in result["boxes"]] == [e["box"] for e in test]
    assert result["accuracy"]["0.6"] == 1.0 and result["mean_accuracy_over_findings"]["0.6"] == 1.0
    assert sorted(result["accuracy_per_finding"]) == ["Infiltration", "Mass"]
    assert sorted(p.name for p in (tmp_path / "loc" / "overlays").glob("*.png")) == [
        "0000_00000001_000_Mass.png", "0001_00000002_000_Infiltration.png"]


def _cxr14_box_datalist(root: Path) -> Path:
    """A box datalist as `dira3d prepare chestxray14` writes it (meta.labels: the 14 findings), one Effusion box."""
    (root / "images").mkdir(parents=True)
    pixels = np.full((64, 64), 20, np.uint8)
    pixels[10:30, 20:40] = 235
    Image.fromarray(pixels).save(root / "images" / "a.png")
    path = root / "bbox_datalist.json"
    path.write_text(json.dumps({"test": [{"image": "images/a.png", "case_id": "1", "label": "Effusion",
                                          "label_index": LABELS.index("Effusion"), "box": [20, 10, 20, 20]}],
                                "meta": {"dataset": "chestxray14", "labels": LABELS, "size": 64}}))
    return path


def test_a_classifier_of_another_bundle_is_refused_naming_the_model_and_the_findings(tmp_path, capsys):
    """A chexpert_cls model (5 classes) on the ChestX-ray14 boxes: the error said 'pass --num-classes 5', and with it
    the run scored the Grad-CAM of CheXpert's class 2 (Consolidation) on the Effusion boxes without a word."""
    datalist = _cxr14_box_datalist(tmp_path / "data")
    atomic_save(ResNetClassifier(1, 5, backbone="resnet10").state_dict(), tmp_path / "chexpert.pt")
    argv = ["--bbox-datalist", str(datalist), "--model", str(tmp_path / "chexpert.pt"), "--output-dir",
            str(tmp_path / "loc"), "--backbone", "resnet10", "--roi-size", "64", "64"]
    for extra in ([], ["--num-classes", "5"]):
        with pytest.raises(SystemExit):
            main(argv + extra)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{tmp_path / 'chexpert.pt'} is a classifier of 5 classes, but the boxes of {datalist} count 14 " \
               "findings" in err and "chexpert_cls has 5 classes" in err and "--bundle chestxray14_cls" in err, err
        assert "pass --num-classes 5" not in err
        assert not (tmp_path / "loc").exists()
    # the classifier of the box datalist's findings runs
    atomic_save(ResNetClassifier(1, 14, backbone="resnet10").state_dict(), tmp_path / "cxr14.pt")
    assert main([a if a != str(tmp_path / "chexpert.pt") else str(tmp_path / "cxr14.pt") for a in argv]) == 0
    assert json.loads((tmp_path / "loc" / "localisation.json").read_text())["count"] == 1


def test_a_prepared_image_gone_leaves_its_boxes_out_and_a_moved_datalist_is_named(tmp_path):
    """An image of the box datalist deleted after `dira3d prepare` stopped the whole run at the first such box (a
    FileNotFoundError naming it alone), where an empty or unreadable image leaves its boxes out and the others are
    scored; with every image missing (the datalist copied away from its images folder) the run still stops, saying so."""
    src, dst = _official_layout(tmp_path / "nih"), tmp_path / "prepared"
    assert chestxray14.main(["--src", str(src), "--dst", str(dst), "--size", "128"]) == 0
    datalist = dst / "bbox_datalist.json"
    (dst / "images" / "00000001_000.png").unlink()  # the Mass box's image
    entries = load_box_entries(datalist, "test", num_classes=14)
    with pytest.warns(UserWarning, match=r"box 0 left out: \S+00000001_000\.png: does not exist"):
        result = localise(_SaliencyIsTheImage(), entries, tmp_path / "loc", target_layer="features", roi_size=(64, 32),
                          prepared_size=128)
    assert result["count"] == 1 and [b["label"] for b in result["boxes"]] == ["Infiltration"]
    assert result["boxes"][0]["best_iou"] == pytest.approx(1.0)
    assert [(s["image"], s["label"]) for s in result["skipped"]] == [(str(dst / "images" / "00000001_000.png"), "Mass")]
    moved = tmp_path / "elsewhere" / "bbox_datalist.json"
    moved.parent.mkdir()
    moved.write_text(datalist.read_text())
    with pytest.raises(FileNotFoundError, match=r"00000001_000\.png named by .* does not exist, nor do the images of its "
                                                r"1 other box\(es\); relative paths are read from the datalist's folder"):
        load_box_entries(moved, "test", num_classes=14)
