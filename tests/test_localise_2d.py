"""Grad-CAM localisation on ChestX-ray14-style boxes (dira3d.evaluation.localise)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cxr_dicom import BASE, preprocessing, write_dicom
from torch import nn

from dira3d.data.errors import DataWarning
from dira3d.evaluation.localise import load_box_entries, load_cxr_image, localise, main, scale_box
from dira3d.networks import ResNetClassifier
from dira3d.utils import atomic_save


class _ImageCAM(nn.Module):
    """Grad-CAM of class 0 is the image itself; of class 1 it is empty (negative weight, ReLU'd away)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _write_boxes(root: Path, boxes: list[tuple[int, int, int, int]], labels: list[int], size=(128, 96)) -> Path:
    """PNG images (width, height = size) with one bright box each, and a bbox datalist naming them."""
    (root / "images").mkdir(parents=True)
    entries = []
    for i, ((x, y, w, h), label) in enumerate(zip(boxes, labels)):
        pixels = np.zeros((size[1], size[0]), np.uint8)  # rows are y, columns x
        pixels[y:y + h, x:x + w] = 255
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        entries.append({"image": f"images/img{i}.png", "case_id": f"p{i}", "label": f"finding{label}",
                        "label_index": label, "box": [x, y, w, h]})
    path = root / "bbox_datalist.json"
    path.write_text(json.dumps({"training": [], "test": entries}))
    return path


def test_scale_box_maps_xywh_to_the_resized_grid():
    # 128x96 image to 64x48: factors 0.5 on x and y; fractional ends are widened, the grid clips
    assert scale_box([20, 30, 40, 10], (128, 96), (64, 48)) == (10, 15, 30, 20)
    assert scale_box([21, 31, 2, 2], (128, 96), (64, 48)) == (10, 15, 12, 17)
    assert scale_box([120, 90, 50, 50], (128, 96), (64, 48)) == (60, 45, 64, 48)


def test_localise_finds_a_known_box_and_rejects_an_empty_map(tmp_path):
    # a non-square, off-centre box: swapping x and y anywhere would give IoU 0
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10), (20, 30, 40, 10)], [0, 1])
    entries = load_box_entries(datalist, "test")
    result = localise(_ImageCAM(), entries, tmp_path / "out", target_layer="features", roi_size=(64, 48))
    assert result["count"] == 2
    assert result["boxes"][0]["box"] == [10, 15, 30, 20]
    assert result["boxes"][0]["best_iou"] == pytest.approx(1.0)
    assert result["boxes"][1]["best_iou"] == 0.0  # class 1's Grad-CAM is empty: no box
    assert result["accuracy"] == {f"{d:g}": 0.5 for d in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)}
    written = json.loads((tmp_path / "out" / "localisation.json").read_text())
    assert written["accuracy"] == result["accuracy"] and written["target_layer"] == "features"
    # a model given to localise() itself: its outputs and input channels as run; its file and backbone unknown
    assert (written["num_classes"], written["in_channels"], written["model"], written["backbone"]) == (2, 1, None, None)
    overlays = sorted((tmp_path / "out" / "overlays").glob("*.png"))
    assert len(overlays) == 2 and all(Image.open(p).size[0] > 0 for p in overlays)


def test_localise_reports_the_mean_over_findings_of_their_accuracy(tmp_path):
    # the paper reports the mean over the 8 findings; finding0 has three boxes (all found), finding1 one (missed):
    # pooled 3 of 4 = 0.75, mean over findings (1 + 0) / 2 = 0.5
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)] * 4, [0, 0, 0, 1])
    result = localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features",
                      roi_size=(64, 48))
    deltas = [f"{d:g}" for d in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    assert result["accuracy"] == {d: 0.75 for d in deltas}
    assert result["accuracy_per_finding"] == {"finding0": {d: 1.0 for d in deltas}, "finding1": {d: 0.0 for d in deltas}}
    assert result["mean_accuracy_over_findings"] == {d: 0.5 for d in deltas}
    written = json.loads((tmp_path / "out" / "localisation.json").read_text())
    assert written["mean_accuracy_over_findings"] == result["mean_accuracy_over_findings"]


def test_boxes_without_a_label_name_are_grouped_by_their_label_index(tmp_path):
    """A box datalist of your own may carry label_index alone: its findings are told apart by the index (grouping by
    the missing name put every box in one finding "None", and the mean over findings became the pooled accuracy)."""
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)] * 4, [0, 0, 0, 1])
    content = json.loads(datalist.read_text())
    for entry in content["test"]:
        del entry["label"]
    datalist.write_text(json.dumps(content))
    result = localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features",
                      roi_size=(64, 48))
    deltas = [f"{d:g}" for d in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    assert result["accuracy_per_finding"] == {"0": {d: 1.0 for d in deltas}, "1": {d: 0.0 for d in deltas}}
    assert result["mean_accuracy_over_findings"] == {d: 0.5 for d in deltas}
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").glob("*.png")) == [
        "0000_img0_0.png", "0001_img1_0.png", "0002_img2_0.png", "0003_img3_1.png"]


def test_localise_command_with_a_resnet_classifier(tmp_path):
    torch.manual_seed(0)
    datalist = _write_boxes(tmp_path / "data", [(10, 20, 30, 30), (60, 40, 20, 30), (5, 5, 40, 20)], [0, 2, 1])
    model = ResNetClassifier(1, 3, backbone="resnet10")
    atomic_save(model.state_dict(), tmp_path / "model.pt")
    argv = ["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir", str(tmp_path / "loc"),
            "--backbone", "resnet10", "--num-classes", "3", "--roi-size", "64", "64", "--target-layer", "encoder.layer3",
            "--max-overlays", "2"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "loc" / "localisation.json").read_text())
    assert result["count"] == 3 and len(list((tmp_path / "loc" / "overlays").glob("*.png"))) == 2
    ious = [b["best_iou"] for b in result["boxes"]]
    for delta, value in result["accuracy"].items():  # accuracy is the share of boxes reaching δ
        assert value == pytest.approx(np.mean([iou >= float(delta) for iou in ious]))
    before = (tmp_path / "loc" / "localisation.json").read_bytes()
    with pytest.raises(SystemExit):  # the earlier run's results are kept
        main(argv)
    assert (tmp_path / "loc" / "localisation.json").read_bytes() == before
    assert main(argv + ["--overwrite", "--threshold", "0.3"]) == 0
    assert json.loads((tmp_path / "loc" / "localisation.json").read_text())["threshold"] == 0.3
    with pytest.raises(SystemExit):  # a layer the classifier does not have: a clean command-line error
        main(argv[:-4] + ["--target-layer", "encoder.nope", "--overwrite"])
    with pytest.raises(SystemExit):  # wrong number of classes for the saved weights
        main([a if a != "3" else "5" for a in argv])


def test_localise_command_refuses_a_threshold_outside_0_1_and_explains_a_pretraining_checkpoint(tmp_path, capsys):
    """Found by a user walkthrough: `--threshold 5` ran and reported 0 % everywhere; a pretraining
    checkpoint given as --model was answered with 'pass --backbone / --num-classes / --roi-size'."""
    datalist = _write_boxes(tmp_path / "data", [(10, 20, 30, 30)], [0])
    model = ResNetClassifier(1, 3, backbone="resnet10")
    atomic_save(model.state_dict(), tmp_path / "model.pt")
    argv = ["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir", str(tmp_path / "loc"),
            "--backbone", "resnet10", "--num-classes", "3", "--roi-size", "64", "64"]
    with pytest.raises(SystemExit):
        main(argv + ["--threshold", "5"])
    assert "--threshold 5 must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "loc" / "localisation.json").exists()
    pretraining = {"encoder": {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")},
                   "decoder": {}, "dis_head": {}, "meta": {"spatial_dims": 2, "backbone": "resnet10"}}
    atomic_save(pretraining, tmp_path / "best.pt")
    with pytest.raises(SystemExit):
        main([a if a != str(tmp_path / "model.pt") else str(tmp_path / "best.pt") for a in argv])
    assert "pretraining checkpoint" in capsys.readouterr().err


def test_box_datalist_errors_name_the_problem(tmp_path):
    datalist = _write_boxes(tmp_path / "data", [(1, 1, 4, 4)], [0])
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_box_entries(datalist, "validation")
    (tmp_path / "data" / "images" / "img0.png").unlink()
    with pytest.raises(FileNotFoundError, match="img0.png"):
        load_box_entries(datalist, "test")


@pytest.mark.parametrize("value", [3, 14, -1, 1.5, "2", True, None])
def test_label_index_outside_the_classifier_names_the_file_the_entry_and_the_range(tmp_path, capsys, value):
    """A label_index the 3-class classifier does not have stopped Grad-CAM with an IndexError traceback, after
    overlays of the earlier boxes were written; a negative one was refused as 'not a whole number'."""
    datalist = _write_boxes(tmp_path / "data", [(10, 20, 30, 30), (60, 40, 20, 30)], [0, 1])
    content = json.loads(datalist.read_text())
    content["test"][1]["label_index"] = value
    datalist.write_text(json.dumps(content))
    atomic_save(ResNetClassifier(1, 3, backbone="resnet10").state_dict(), tmp_path / "model.pt")
    argv = ["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir", str(tmp_path / "loc"),
            "--backbone", "resnet10", "--num-classes", "3", "--roi-size", "64", "64", "--target-layer", "encoder.layer3"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert (f"dira3d localise: error: entry 1 of split 'test' in {datalist} has label_index {value!r}; expected a whole "
            "number from 0 to 2 (the classifier has 3 classes: --num-classes 3)") in err, err
    assert not (tmp_path / "loc" / "overlays").exists()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:  # without a class count: only its kind
        assert load_box_entries(datalist, "test")[1]["label_index"] == value
    else:
        with pytest.raises(ValueError, match=r"entry 1 of split 'test' in .* expected a whole number from 0 \(the finding's"):
            load_box_entries(datalist, "test")


def test_localise_refuses_a_label_index_its_model_does_not_have(tmp_path):
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10), (20, 30, 40, 10)], [0, 2])  # _ImageCAM has 2 classes
    with pytest.raises(ValueError, match=r"box entry 1 \(image \S+img1.png\) has label_index 2; expected a whole number "
                                         r"from 0 to 1 \(the classifier has 2 classes"):
        localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features", roi_size=(64, 48))
    assert not list((tmp_path / "out").glob("**/*.png")) and not (tmp_path / "out" / "localisation.json").exists()


def _colour(path: Path) -> None:
    """Rewrite the grey PNG at ``path`` as a coloured RGB one (its red channel differs from green and blue)."""
    grey = np.asarray(Image.open(path))
    Image.fromarray(np.stack([255 - grey, grey, grey], -1)).save(path)


def test_localise_refuses_a_colour_png_naming_it(tmp_path):
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)], [0])
    path = tmp_path / "data" / "images" / "img0.png"
    _colour(path)
    with pytest.warns(UserWarning, match=r"box 0 left out: \S+img0\.png: is a colour RGB image"), \
            pytest.raises(ValueError, match=rf"{path}: is a colour RGB image: its colour channels differ in 12288 pixels"):
        localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features", roi_size=(64, 48))


@pytest.mark.parametrize("fault", ["no boxes", "weights do not fit", "label_index", "model missing"])
def test_a_refused_localise_run_leaves_no_empty_output_dir(tmp_path, capsys, fault):
    """A run refused at its start (a segmentation datalist instead of the box one, weights of another classifier, a
    label_index the classifier lacks) left an empty --output-dir (or one holding an empty overlays/) behind."""
    datalist = _write_boxes(tmp_path / "data", [(10, 20, 30, 30)], [0 if fault != "label_index" else 5])
    if fault == "no boxes":
        datalist.write_text(json.dumps({"training": [{"image": "images/img0.png", "label": "images/img0.png"}]}))
    atomic_save(ResNetClassifier(1, 3 if fault != "weights do not fit" else 4, backbone="resnet10").state_dict(),
                tmp_path / "model.pt")
    argv = ["--bbox-datalist", str(datalist), "--model", str(tmp_path / ("model.pt" if fault != "model missing" else "nope.pt")),
            "--output-dir", str(tmp_path / "loc"), "--backbone", "resnet10", "--num-classes", "3", "--roi-size", "64", "64"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "dira3d localise: error:" in capsys.readouterr().err
    assert not (tmp_path / "loc").exists()
    (tmp_path / "loc").mkdir()  # a folder the user made is kept
    with pytest.raises(SystemExit):
        main(argv)
    assert (tmp_path / "loc").is_dir()


def test_localise_refused_by_its_model_leaves_no_empty_output_dir(tmp_path):
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)], [2])  # _ImageCAM has 2 classes
    with pytest.raises(ValueError, match="has label_index 2"):
        localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features", roi_size=(64, 48))
    assert not (tmp_path / "out").exists()


def test_localise_leaves_out_a_box_whose_image_is_bad_and_scores_the_others(tmp_path, capsys):
    # a PNG that is not an image stopped the run with MONAI's RuntimeError traceback of every reader, naming no
    # file, and a colour PNG stopped every box after it: each is left out, named, and the others are scored
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)] * 3, [0, 0, 0])
    images = tmp_path / "data" / "images"
    (images / "img0.png").write_bytes(b"not a png")
    _colour(images / "img2.png")
    with pytest.warns(UserWarning, match=r"box 2 left out: \S+img2\.png: is a colour RGB image"), \
            pytest.warns(UserWarning, match=r"box 0 left out: \S+img0\.png: cannot be read as an image"):
        result = localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features",
                          roi_size=(64, 48))
    assert result["count"] == 1 and [b["image"] for b in result["boxes"]] == [str(images / "img1.png")]
    assert result["accuracy"]["0.6"] == 1.0  # the good box is found as before
    assert [s["image"] for s in result["skipped"]] == [str(images / "img0.png"), str(images / "img2.png")]
    assert "is a colour RGB image" in result["skipped"][1]["reason"]
    assert json.loads((tmp_path / "out" / "localisation.json").read_text())["skipped"] == result["skipped"]
    # the command: the numbers, then one line per left-out box; a run whose every image is bad stops with the first
    torch.save(ResNetClassifier(1, 2, backbone="resnet10").state_dict(), tmp_path / "model.pt")
    assert main(["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir",
                 str(tmp_path / "cli"), "--num-classes", "2", "--backbone", "resnet10", "--roi-size", "64", "64"]) == 0
    err = capsys.readouterr().err
    assert err.count("dira3d localise: warning: left out (not in the accuracies): ") == 2 and "img0.png: cannot be read" in err
    assert "Traceback" not in err and "UserWarning" not in err
    with warnings.catch_warnings(record=True) as caught:  # pytest records warnings: stderr alone cannot show one
        warnings.simplefilter("always")
        assert main(["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir",
                     str(tmp_path / "cli"), "--num-classes", "2", "--backbone", "resnet10", "--roi-size", "64", "64",
                     "--overwrite"]) == 0
    assert not [str(w.message) for w in caught if "left out" in str(w.message)]  # the lines after the numbers only
    assert capsys.readouterr().err.count("left out (not in the accuracies)") == 2
    (images / "img1.png").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir", str(tmp_path / "cli2"),
              "--num-classes", "2", "--backbone", "resnet10", "--roi-size", "64", "64"])
    assert re.search(r"dira3d localise: error: \S+img0\.png: cannot be read as an image", capsys.readouterr().err)
    assert not (tmp_path / "cli2" / "localisation.json").exists()


def _sixteen_bit(path: Path, low: int = 1000, high: int = 40000) -> None:
    """Rewrite the 0/255 PNG at ``path`` as a raw 16-bit grey PNG of ``low`` / ``high`` (a detector's own values)."""
    grey = np.asarray(Image.open(path))
    Image.fromarray(np.where(grey > 0, high, low).astype(np.uint16)).save(path)


def test_localise_reads_each_radiograph_as_the_bundle_inference_does(tmp_path):
    """localise read its images with MONAI's PILReader and clipped them to 0..255: a raw 16-bit PNG came white, a
    DICOM was not read, a grey PNG stored as RGB was refused as 3 channels. It now reads them as the 2D bundles'
    inference.json does (LoadRadiographd, read_radiograph): the same network input as the bundle, which is that of
    the 8-bit PNG `dira3d prepare` writes."""
    bundle = preprocessing("chestxray14_cls")
    Image.fromarray(BASE).save(tmp_path / "prepared.png")
    files = {"16-bit PNG": tmp_path / "raw16.png", "MONOCHROME1 DICOM": tmp_path / "m1.dcm", "grey RGB": tmp_path / "rgb.png"}
    Image.fromarray((300 + 100 * BASE.astype(np.uint16)).astype(np.uint16)).save(files["16-bit PNG"])
    write_dicom(files["MONOCHROME1 DICOM"], 4095 - (100 + 10 * BASE.astype(np.uint16)), "MONOCHROME1", 12)
    Image.fromarray(np.stack([BASE] * 3, -1)).save(files["grey RGB"])
    expected, size = load_cxr_image(tmp_path / "prepared.png", (224, 224))
    assert torch.equal(expected, torch.as_tensor(bundle({"image": str(tmp_path / "prepared.png")})["image"]))
    for kind, path in files.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # the grey RGB image's "one grey channel" warning
            image, image_size = load_cxr_image(path, (224, 224))
            by_bundle = torch.as_tensor(bundle({"image": str(path)})["image"])
        assert image_size == size, kind
        assert torch.allclose(image, expected, atol=1e-6), kind
        assert torch.allclose(image, by_bundle, atol=1e-6), kind


def test_localise_finds_the_box_of_a_raw_16bit_png(tmp_path):
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10), (50, 10, 30, 60)], [0, 0])
    for name in ("img0.png", "img1.png"):
        _sixteen_bit(tmp_path / "data" / "images" / name)
    result = localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features",
                      roi_size=(64, 48))
    assert result["count"] == 2 and not result["skipped"]
    assert result["accuracy"]["0.6"] == 1.0  # clipped to 0..255 the whole image was white: no box found


def test_localise_leaves_out_an_image_outside_0_255_naming_it(tmp_path):
    """A 2D NIfTI (not a radiograph file: MONAI reads it as it is) with values above 255 was clipped to white and
    scored without a word; it is now left out, named, and the other boxes are scored."""
    import nibabel as nib

    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)] * 2, [0, 0])
    images = tmp_path / "data" / "images"
    pixels = np.asarray(Image.open(images / "img0.png")).T.astype(np.float32) * 4  # (x, y), 0..1020
    nib.save(nib.Nifti1Image(pixels, np.eye(4)), images / "img0.nii.gz")
    content = json.loads(datalist.read_text())
    content["test"][0]["image"] = "images/img0.nii.gz"
    datalist.write_text(json.dumps(content))
    with pytest.warns(UserWarning, match=r"box 0 left out: \S+img0\.nii\.gz: has intensities from 0 to 1020, outside \[0, 255\]"):
        result = localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features",
                          roi_size=(64, 48))
    assert result["count"] == 1 and [s["image"] for s in result["skipped"]] == [str(images / "img0.nii.gz")]
    assert result["accuracy"]["0.6"] == 1.0


def test_the_model_check_runs_on_the_first_usable_image_when_the_first_box_is_bad(tmp_path):
    """The label_index check ran on box 0's image only: with box 0's image bad, a box of a class the model does not have
    reached Grad-CAM (an IndexError naming nothing) instead of the error naming it, before any overlay is written."""
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)] * 3, [0, 0, 2])  # _ImageCAM has 2 classes
    (tmp_path / "data" / "images" / "img0.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="box 0 left out"), \
            pytest.raises(ValueError, match=r"box entry 2 \(image \S+img2\.png\) has label_index 2"):
        localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features",
                 roi_size=(64, 48))
    assert not (tmp_path / "out").exists()


def test_a_flat_heatmap_is_counted_and_named_and_the_command_labels_its_numbers(tmp_path, capsys, monkeypatch):
    """Found by a 2D walkthrough: a tiny classifier's encoder.layer4 maps were zero everywhere, so every box scored
    IoU 0 without a word, and the command printed an unlabelled dict (the share of all boxes, not the paper's
    mean over findings)."""
    import dira3d.evaluation.localise as module

    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10), (20, 30, 40, 10)], [0, 1])
    result = localise(_ImageCAM(), load_box_entries(datalist, "test"), tmp_path / "out", target_layer="features",
                      roi_size=(64, 48))
    assert [b["flat_heatmap"] for b in result["boxes"]] == [False, True] and result["flat_heatmaps"] == 1
    assert json.loads((tmp_path / "out" / "localisation.json").read_text())["flat_heatmaps"] == 1
    assert module.flat_message(result).startswith("1 of 2 Grad-CAM heatmaps at features are zero everywhere")
    assert "try --target-layer" not in module.flat_message(result)  # only said of encoder.layer4

    atomic_save(ResNetClassifier(1, 3, backbone="resnet10").state_dict(), tmp_path / "model.pt")
    monkeypatch.setattr(module, "gradcam_maps", lambda model, images, layer, class_idx: np.zeros((1, 64, 64), np.float32))
    argv = ["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir", str(tmp_path / "loc"),
            "--backbone", "resnet10", "--num-classes", "3", "--roi-size", "64", "64"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out[:out.index("\nresults: ")])
    assert set(printed) == {"mean_accuracy_over_findings", "accuracy", "count"} and printed["count"] == 2
    assert f"results: {tmp_path / 'loc' / 'localisation.json'} (mean_accuracy_over_findings: the paper's number" in out
    assert "warning: 2 of 2 Grad-CAM heatmaps at encoder.layer4 are zero everywhere" in err
    assert "try --target-layer encoder.layer3" in err
    # the bar over the boxes is drawn on a terminal only: captured stderr, like a log, gets none (tests/test_progress.py)
    assert "localise:" not in err.replace("dira3d localise:", "") and "box/s" not in err


@pytest.mark.parametrize(("meta", "option", "expected"), [({"size": 96}, [], 96), ({}, [], 512), ({"size": 0}, [], 0),
                                                          ({"size": 96}, ["--prepared-size", "512"], 512)])
def test_the_prepared_size_defaults_to_the_box_datalists_own(tmp_path, meta, option, expected):
    """Found by a 2D walkthrough: boxes prepared with `--size 128` were localised through a 512 resize (the default),
    so the classifier saw an image its training (the 128 PNG straight to roi_size) never gave it."""
    datalist = _write_boxes(tmp_path / "data", [(20, 30, 40, 10)], [0], size=(96, 96))
    datalist.write_text(json.dumps({**json.loads(datalist.read_text()), "meta": meta}))
    atomic_save(ResNetClassifier(1, 3, backbone="resnet10").state_dict(), tmp_path / "model.pt")
    assert main(["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--output-dir",
                 str(tmp_path / "loc"), "--backbone", "resnet10", "--num-classes", "3", "--roi-size", "64", "64",
                 "--target-layer", "encoder.layer3", *option]) == 0
    assert json.loads((tmp_path / "loc" / "localisation.json").read_text())["prepared_size"] == expected
