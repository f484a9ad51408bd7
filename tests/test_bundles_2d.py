"""The four 2D fine-tuning bundles on tiny synthetic data in the prepared PNG layout, and a tiny 2D grid."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from dira3d.evaluation import build_resnet_task_network, load_split
from dira3d.evaluation.finetune import BUNDLES_2D, bundle_path, run_finetune
from dira3d.networks import ResNetUNet
from dira3d.utils import atomic_save, load_checkpoint

SCHEMA = Path(__file__).resolve().parents[1].parent / "shared" / "monai" / "meta_schema_20240725.json"
CLASSES = {"chestxray14_cls": 14, "chexpert_cls": 5}
TINY_NET = {"backbone": "resnet10", "decoder_channels": (16, 16, 8, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def write_cxr(root: Path, name: str, classes: int | None, soft: bool = False, train: int = 8, test: int = 4,
              size: tuple[int, int] = (72, 56)) -> Path:
    """Prepared-layout data: 8-bit grey PNGs (width x height = size), masks 0/1 (classes None) or label lists.

    Class k of image i is positive when (i + k) is odd, so every class has both values in any two
    consecutive images; the bright rectangle is the mask (segmentation).
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)

    def entries(count: int, prefix: str) -> list[dict]:
        items = []
        for i in range(count):
            pixels = (rng.random((size[1], size[0])) * 60).astype(np.uint8)
            mask = np.zeros_like(pixels)
            if i % 4 != 3:  # some images without foreground (e.g. no pneumothorax)
                y, x = rng.integers(2, size[1] // 2), rng.integers(2, size[0] // 2)
                mask[y:y + size[1] // 3, x:x + size[0] // 4] = 1
            pixels[mask > 0] += 150
            Image.fromarray(pixels).save(root / "images" / f"{prefix}{i}.png")
            Image.fromarray(mask).save(root / "masks" / f"{prefix}{i}.png")
            entry = {"image": f"images/{prefix}{i}.png", "case_id": f"{prefix}{i // 2}"}  # two images per patient
            if classes is None:
                entry["label"] = f"masks/{prefix}{i}.png"
            else:
                label = [float((i + k) % 2) for k in range(classes)]
                if soft and prefix == "tr":  # CheXpert's label smoothing of uncertain labels (U(0.55, 0.85))
                    label = [0.7 if v else v for v in label]
                entry["label"] = label
            items.append(entry)
        return items

    datalist = {"training": entries(train, "tr"), "validation": [], "test": entries(test, "te"), "meta": {"dataset": name}}
    path = root / name
    path.write_text(json.dumps(datalist))
    return path


@pytest.fixture(scope="module")
def pretrained_2d(tmp_path_factory) -> Path:
    """A checkpoint in the pretraining format of a tiny 2D ResNetUNet (what configs/2d_tiny.json trains)."""
    torch.manual_seed(1)
    net = ResNetUNet(1, 1, **TINY_NET)
    path = tmp_path_factory.mktemp("pre") / "best.pt"
    atomic_save({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict(), "meta": {"spatial_dims": 2}}, path)
    return path


def _recompute(bundle: str, datalist: Path, out: Path) -> float:
    """Score the saved model on the test split independently: sklearn AUC per class, or Dice by hand."""
    from monai.bundle import ConfigParser

    configs = bundle_path(bundle) / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in ("train.json", "tiny.json", "evaluate.json")])
    parser.update({"datalist": str(datalist), "ckpt_dir": str(out / "models"), "output_dir": str(out), "device": "cpu",
                   "cache_rate": 0.0})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(load_checkpoint(out / "models" / "model.pt"))
    network.eval()
    dataset = parser.get_parsed_content("validate#dataset")
    assert len(dataset) == len(load_split(datalist, "test"))
    with torch.no_grad():
        preds = [torch.sigmoid(network(item["image"][None].as_tensor()))[0].numpy() for item in dataset]
    labels = [np.asarray(item["label"]) for item in dataset]
    if bundle in CLASSES:
        p, y = np.stack(preds), np.stack(labels) >= 0.5
        aucs = [roc_auc_score(y[:, k], p[:, k]) for k in range(y.shape[1]) if len(np.unique(y[:, k])) == 2]
        return float(np.mean(aucs))
    dices = []
    for pred, label in zip(preds, labels):
        a, b = pred > 0.5, label > 0.5
        dices.append(1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(dices))


@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_2d_bundle_trains_and_scores(bundle, tmp_path, pretrained_2d):
    classes = CLASSES.get(bundle)
    datalist = write_cxr(tmp_path / "data", f"{bundle}.json", classes, soft=bundle == "chexpert_cls")
    overrides = {"datalist": str(datalist), "pretrained": str(pretrained_2d), "seed": 0}
    result = run_finetune(bundle, overrides, output_dir=tmp_path / "out", tiny=True)
    metric = "dice" if classes is None else "auc"
    value = result["metrics"][metric]
    assert 0.0 <= value <= 1.0 and result["epochs"] == 2
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"][metric] == pytest.approx(value)
    if classes is None:
        assert 0.0 <= result["metrics"]["iou"] <= value + 1e-6  # IoU <= Dice per case
    # the reported test metric is what an independent computation on the saved model gives
    assert _recompute(bundle, datalist, tmp_path / "out") == pytest.approx(value, abs=1e-5)


def write_grid_labels(root: Path, name: str, classes: int, train: int, test: int, soft: bool = False, size: int = 64) -> Path:
    """Multi-label PNGs where every label is visible in its own place: class k positive <=> a bright square
    in cell k of a 4 x 4 grid (random labels, each class both positive and negative in every split)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    cell = size // 4

    def entries(count: int, prefix: str) -> list[dict]:
        items = []
        for i in range(count):
            label = (rng.random(classes) < 0.5).astype(float)
            label[i % classes], label[(i + 1) % classes] = 1.0, 0.0
            pixels = (rng.random((size, size)) * 60).astype(np.uint8)
            for k in np.flatnonzero(label):
                row, col = divmod(int(k), 4)
                pixels[row * cell + 3:(row + 1) * cell - 3, col * cell + 3:(col + 1) * cell - 3] += 150
            Image.fromarray(pixels).save(root / "images" / f"{prefix}{i}.png")
            values = [0.7 if soft and prefix == "tr" and v else float(v) for v in label]  # CheXpert's smoothed labels
            items.append({"image": f"images/{prefix}{i}.png", "label": values, "case_id": f"{prefix}{i // 2}"})
        return items

    path = root / name
    path.write_text(json.dumps({"training": entries(train, "tr"), "validation": [], "test": entries(test, "te"),
                                "meta": {"dataset": name}}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["montgomery_lung_seg", "chexpert_cls"])
def test_2d_bundle_learns_an_easy_task(bundle, tmp_path):
    """From scratch, a few epochs on an easy task must score far above chance on the test split: a silent bug
    (label channel or order, intensity scaling that blanks the images, loss or metric on the wrong channel,
    a post-transform that thresholds everything away, the wrong model selected) keeps a model near chance.
    Measured: Dice 0.99 (chance, all foreground: 0.11), mean AUC 0.97 (chance 0.5); with an intensity window that
    blanks the images (a_min 220): Dice 0.25, AUC 0.5."""
    if bundle in CLASSES:
        datalist = write_grid_labels(tmp_path / "data", f"{bundle}.json", CLASSES[bundle], train=32, test=16, soft=True)
    else:
        datalist = write_cxr(tmp_path / "data", f"{bundle}.json", None, train=32, test=8, size=(64, 64))
    overrides = {"datalist": str(datalist), "pretrained": "", "seed": 0, "max_epochs": 10, "patience": 10}
    result = run_finetune(bundle, overrides, output_dir=tmp_path / "out", tiny=True)
    if bundle in CLASSES:
        assert result["metrics"]["auc"] > 0.85, result
    else:
        assert result["metrics"]["dice"] > 0.8, result


def test_resnet_task_network_loads_the_2d_checkpoint(pretrained_2d):
    ckpt = load_checkpoint(pretrained_2d)
    seg = build_resnet_task_network("segmentation", 1, 1, pretrained=str(pretrained_2d), **TINY_NET)
    assert torch.equal(seg.encoder.layer1[0].conv1.weight, ckpt["encoder"]["layer1.0.conv1.weight"])
    assert torch.equal(seg.decoder.head[0].weight, ckpt["decoder"]["head.0.weight"])
    cls = build_resnet_task_network("classification", 1, 14, pretrained=str(pretrained_2d), bn_momentum=None, **TINY_NET)
    assert torch.equal(cls.encoder.conv1.weight, ckpt["encoder"]["conv1.weight"]) and cls.encoder.bn1.momentum is None
    with pytest.raises(ValueError):  # a ResNet-18 checkpoint does not fit a ResNet-10 task network (strict)
        build_resnet_task_network("classification", 1, 14, backbone="resnet18", pretrained=str(pretrained_2d))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_resnet_task_network("classification", 1, 14, pretrained="missing.pt")



def test_a_checkpoint_of_other_network_settings_is_refused_naming_the_settings_that_fit(pretrained_2d, tmp_path):
    # a 2d_tiny.json checkpoint given to a bundle at its default resnet50 failed with 19 shape mismatches and
    # "Build the network with the checkpoint's width / in_channels / out_channels, or load fewer parts"
    with pytest.raises(ValueError) as err:
        build_resnet_task_network("classification", 1, 14, pretrained=str(pretrained_2d))
    message = str(err.value)
    assert "fit backbone resnet10 (read from its weights), but the task network is built with backbone resnet50" in message
    assert "`dira3d finetune --tiny`" in message and "--set backbone=resnet10" in message
    assert "--backbone resnet10` for monai.bundle run" in message
    assert "Build the network" not in message and "decoder_channels" not in message  # a classifier loads no decoder
    with pytest.raises(ValueError) as err:  # the decoder of a segmenter too; a list value quoted for the shell
        build_resnet_task_network("segmentation", 1, 1, backbone="resnet10", pretrained=str(pretrained_2d))
    message = str(err.value)
    assert "fit decoder_channels [16, 16, 8, 8, 8]" in message and "built with decoder_channels [256, 128, 64, 32, 16]" in message
    assert '--set "decoder_channels=[16,16,8,8,8]"' in message and "--tiny" in message
    resnet18 = ResNetUNet(1, 1, backbone="resnet18", decoder_channels=TINY_NET["decoder_channels"])
    atomic_save({"encoder": resnet18.encoder.state_dict(), "decoder": resnet18.decoder.state_dict()}, tmp_path / "r18.pt")
    with pytest.raises(ValueError) as err:  # settings that are not tiny.json's: no --tiny
        build_resnet_task_network("classification", 1, 14, pretrained=str(tmp_path / "r18.pt"))
    assert "--set backbone=resnet18" in str(err.value) and "--tiny" not in str(err.value)

@pytest.mark.parametrize("bundle", BUNDLES_2D)
def test_2d_bundle_metadata_and_network(bundle):
    from monai.bundle import verify_metadata, verify_net_in_out

    configs = bundle_path(bundle) / "configs"
    for part in ("train", "evaluate", "inference", "multi_gpu_train", "metadata", "tiny"):
        json.loads((configs / f"{part}.json").read_text())
    assert (configs / "logging.conf").is_file() and (configs.parent / "LICENSE").is_file()
    assert (configs.parent / "docs" / "README.md").is_file()
    meta = json.loads((configs / "metadata.json").read_text())
    out = meta["network_data_format"]["outputs"]["pred"]
    assert out["num_channels"] == CLASSES.get(bundle, 1) == len(out["channel_def"])
    # the real ResNet-50 network at the documented 224x224 input shape
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
                      device="cpu", n=1)
    if SCHEMA.is_file():
        verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(SCHEMA))
    else:
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA} (no internet to download it)")


def test_tiny_2d_grid_end_to_end(tmp_path):
    from dira3d.evaluation.experiment import run_experiment

    data = tmp_path / "cxr"
    datalist = write_cxr(data, "chestxray14_datalist.json", 14)
    # the pretraining bundle validates on the 'validation' split of the same datalist
    content = json.loads(datalist.read_text())
    content["validation"] = content["test"][:2]
    datalist.write_text(json.dumps(content))
    config = {
        "bundle": "chestxray14_cls", "datalist": str(datalist), "metric": "auc", "output_dir": str(tmp_path / "grid"),
        "baseline": "random", "seeds": [0], "label_fractions": [1.0],
        "methods": {"random": None, "dira_moco": {"pretrain": {}}},
        "overrides": {"tiny": True},
        "pretrain": {"dataset_dir": str(data), "configs": ["train.json", "2d.json", "2d_moco.json", "2d_tiny.json"],
                     "overrides": {"max_epochs": 2}},
    }
    rows = run_experiment(config, log=lambda message: None)
    assert sorted(r["method"] for r in rows) == ["dira_moco", "random"]
    with open(tmp_path / "grid" / "results.csv") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 2 and all(0.0 <= float(r["value"]) <= 1.0 for r in written)
    best = tmp_path / "grid" / "pretrain" / "dira_moco" / "models" / "best.pt"
    assert load_checkpoint(best)["meta"]["spatial_dims"] == 2
    dira_row = next(r for r in written if r["method"] == "dira_moco")
    assert dira_row["checkpoint"] == str(best)
    settings = json.loads((Path(dira_row["run_dir"]) / "metrics.json").read_text())["settings"]
    assert settings["pretrained"] == str(best)
    table = (tmp_path / "grid" / "table.md").read_text()
    assert "random" in table and "dira_moco" in table


def test_2d_inference_writes_mask_and_probabilities(tmp_path):
    from monai.bundle import ConfigWorkflow

    image = tmp_path / "cxr.png"
    Image.fromarray((np.arange(72 * 56) % 251).astype(np.uint8).reshape(56, 72)).save(image)  # 72 wide, 56 high
    for bundle, out in (("siim_pneumothorax_seg", 1), ("chestxray14_cls", 14)):
        kind = "classification" if out > 1 else "segmentation"
        models = tmp_path / bundle
        models.mkdir()
        atomic_save(build_resnet_task_network(kind, 1, out, **TINY_NET).state_dict(), models / "model.pt")
        configs = bundle_path(bundle) / "configs"
        flow = ConfigWorkflow(config_file=[str(configs / "inference.json"), str(configs / "tiny.json")], workflow_type=None,
                              meta_file=str(configs / "metadata.json"), logging_file=False, ckpt_dir=str(models),
                              image=str(image), device="cpu")
        flow.initialize()
        flow.run()
        flow.finalize()
    mask = np.asarray(Image.open(tmp_path / "cxr_seg.png"))
    assert mask.shape == (56, 72) and set(np.unique(mask)) <= {0, 1}  # on the input grid, values 0/1 like the masks
    probs = json.loads((tmp_path / "cxr_prob.json").read_text())
    assert probs["classes"][0] == "Atelectasis" and len(probs["classes"]) == 14
    (row,) = probs["predictions"]
    assert len(row["probabilities"]) == 14 and all(0 <= p <= 1 for p in row["probabilities"])


def test_multilabel_splits_keep_every_class():
    from dira3d.evaluation.datalists import holdout_by_patient, select_fraction

    # 40 patients; class 2 is positive in one patient only (p7), class 1 in two (p3, p30)
    entries = [{"image": f"{i}.png", "case_id": f"p{i}", "label": [float(i % 2), float(i in (3, 30)), float(i == 7)]}
               for i in range(40)]
    for seed in range(5):
        subset = select_fraction(entries, 0.1, seed)
        assert any(e["label"][2] for e in subset) and any(e["label"][1] for e in subset)
        assert len(subset) <= 4 + 3  # 10 % of the patients plus at most one per missing class (3 classes)
        assert subset == select_fraction(entries, 0.1, seed)  # seeded
    train, held = holdout_by_patient(entries, 0.1, 0)
    assert {e["case_id"] for e in train}.isdisjoint({e["case_id"] for e in held})
    # class 1 has two patients: one goes to the holdout, one stays in training; p7 (class 2) stays in training
    assert any(e["label"][1] for e in held) and any(e["label"][1] for e in train)
    assert any(e["label"][2] for e in train) and not any(e["label"][2] for e in held)


def test_multilabel_holdout_holds_both_values_of_a_class_when_training_can_spare_them():
    # the holdout was completed with a positive of each class only: one patient positive for class 0 (all but two
    # patients are) made a holdout whose class 0 AUC, and so the mean AUC, was undefined
    from dira3d.evaluation.datalists import holdout_by_patient
    from dira3d.evaluation.metrics import mean_auc

    entries = [{"image": f"{i}.png", "case_id": f"p{i}", "label": [float(i < 8), 0.0]} for i in range(10)]
    for seed in range(6):
        train, held = holdout_by_patient(entries, 0.1, seed)
        assert {e["case_id"] for e in train}.isdisjoint({e["case_id"] for e in held})
        for part in (train, held):  # both values of class 0 on each side
            assert {e["label"][0] for e in part} == {0.0, 1.0}, (seed, part)
        assert len(held) == 2  # one drawn patient, plus one of the other value
        mean_auc(np.linspace(0, 1, len(held))[:, None].repeat(2, 1), np.array([e["label"] for e in held]))
    # training cannot spare its only negative (p8): a holdout drawn positive stays as drawn
    few = entries[:9]
    drawn_positive = 0
    for seed in range(6):
        train, held = holdout_by_patient(few, 0.1, seed)
        if "p8" not in {e["case_id"] for e in held}:
            drawn_positive += 1
            assert len(held) == 1 and any(e["label"][0] == 0.0 for e in train)
    assert drawn_positive


def test_undefined_mean_auc_names_the_split_and_what_to_do(tmp_path, capsys):
    """`dira3d finetune --label-fraction 0.1` on a small dataset stopped with 'mean AUC is undefined: no class has both
    positive and negative samples in the evaluation split': it was the early-stopping holdout, not the test split."""
    from dira3d.evaluation.finetune import main
    from dira3d.evaluation.metrics import mean_auc

    with pytest.raises(ValueError, match=r"on the test split \(1 sample\(s\)\): no class has both positive and negative "
                                         r"samples in it; the datalist's test entries must hold"):
        mean_auc(np.array([[0.3, 0.6]]), np.array([[1.0, 0.0]]), "test")
    datalist = write_cxr(tmp_path / "data", "cxr.json", 14, train=40, test=4)
    content = json.loads(datalist.read_text())
    for i, entry in enumerate(content["training"]):  # one image a patient, one class each: training spares none
        entry["case_id"], entry["label"] = f"p{i}", [float(k == i % 3) for k in range(14)]
    datalist.write_text(json.dumps(content))
    args = ["--bundle", "chestxray14_cls", "--tiny", "--datalist", str(datalist), "--label-fraction", "0.1"]
    assert main(args + ["--output-dir", str(tmp_path / "small")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("dira3d finetune: error: mean AUC is undefined on the early-stopping holdout (1 sample(s)"), line
    assert "use a larger label fraction (--label-fraction) or more training data" in line
    # the test split of one class is named as the test split (train.json and evaluate.json tell MeanAUC their split)
    for entry in content["test"]:
        entry["label"] = [1.0] * 14
    datalist.write_text(json.dumps(content))
    assert main(args[:-1] + ["1.0", "--output-dir", str(tmp_path / "full")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "mean AUC is undefined on the test split (4 sample(s))" in line, line


def test_mean_auc_by_hand():
    from dira3d.evaluation.metrics import MeanAUCMetric, mean_auc, per_class_auc

    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.8, 0.6, 0.5], [0.3, 0.4, 0.5]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0.7, 1, 0]])  # soft 0.7 counts as positive
    # class 0: positives {0.9, 0.8, 0.3} vs negative {0.1}: AUC 1; class 1: positives {0.8, 0.4} vs {0.2, 0.6}: 3/4
    values = per_class_auc(scores, labels)
    assert values[:2] == [1.0, 0.75] and np.isnan(values[2])  # class 2 has no positive: no AUC
    assert mean_auc(scores, labels) == pytest.approx(0.875)
    # a label of exactly 0.5 is positive (>= 0.5): class 1 then has positives {0.8, 0.4, 0.2} vs {0.6}: 1/3
    half = labels.copy()
    half[0, 1] = 0.5
    assert per_class_auc(scores, half)[1] == pytest.approx(1 / 3)
    metric = MeanAUCMetric()
    metric(torch.as_tensor(scores[:2]), torch.as_tensor(labels[:2]))
    metric(torch.as_tensor(scores[2:]), torch.as_tensor(labels[2:]))
    assert metric.aggregate() == pytest.approx(0.875)
    with pytest.raises(ValueError, match="no class has both"):
        mean_auc(scores[:1], labels[:1])


@pytest.mark.parametrize("bundle,raw", [("chexpert_cls", "image"), ("montgomery_lung_seg", "image"), ("montgomery_lung_seg", "mask")])
def test_2d_finetune_refuses_unprepared_pngs_before_training(bundle, raw, tmp_path, capsys):
    """A 16-bit PNG (raw detector values / HU + 1024) was clipped to white by the bundle's 0..255 scaling, and a
    0/255 mask trained on targets of 255, both without a word: refused while caching, naming the file."""
    from dira3d.evaluation.finetune import main

    datalist = write_cxr(tmp_path / "data", f"{bundle}.json", CLASSES.get(bundle), train=4, test=2)
    folder = tmp_path / "data" / ("images" if raw == "image" else "masks")
    for path in sorted(folder.glob("*.png")):
        pixels = np.asarray(Image.open(path)).astype(np.uint16)
        Image.fromarray(pixels * 16 + 1024 if raw == "image" else pixels * 255).save(path)
    code = main(["--bundle", bundle, "--datalist", str(datalist), "--output-dir", str(tmp_path / "out"), "--tiny"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dira3d finetune: error: "), err
    if raw == "image":
        expected = r"images/tr\d\.png: has intensities from \d+ to \d+, outside \[0, 255\]: .*8-bit"
    else:
        expected = r"masks/tr\d\.png: has intensities from 0 to 255, outside \[0, 1\]: masks must hold 0"
    task = bundle.split("_")[0]
    assert re.search(expected + rf".*run `dira3d prepare {task} \.\.\.` \(docs/data_2d\.md\) or fix the datalist", lines[0]), err
    assert "Traceback" not in err and not (tmp_path / "out" / "models" / "model.pt").exists()  # nothing was trained


def test_2d_finetune_refuses_a_3d_volume_naming_it(tmp_path, capsys):
    """A 3D NIfTI in a 2D bundle's datalist (a prepared CT instead of a chest X-ray PNG) loaded as 3D and failed
    later inside MONAI's Resized without naming the file; pretraining's 2D setting still takes 3D volumes."""
    import nibabel as nib

    from dira3d.engines.inputs import check_volume
    from dira3d.evaluation.finetune import main

    datalist = write_cxr(tmp_path / "data", "montgomery_lung_seg.json", None, train=4, test=2)
    content = json.loads(datalist.read_text())
    volume = tmp_path / "data" / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 8)).astype(np.float32), np.eye(4)), volume)
    original = [dict(entry) for entry in content["training"]]
    for at in (0, len(original) - 1):  # the first entry: the datalist's check; a later one: the check as it loads
        content["training"] = [dict(entry) for entry in original]
        content["training"][at]["image"] = str(volume)
        datalist.write_text(json.dumps(content))
        code = main(["--bundle", "montgomery_lung_seg", "--datalist", str(datalist), "--output-dir",
                     str(tmp_path / f"out{at}"), "--tiny"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(r"dira3d finetune: error: .*ct\.nii\.gz(: loaded as a 3D image of shape \(64, 64, 8\); this 2D "
                         r"bundle fine-tunes on 2D images|\) is a 3D volume, but this bundle's network is 2D)", err), err
        if at == 0:  # refused before any image is cached (since montgomery 0.1.54), naming the datalist
            assert f"error: datalist {datalist}: entry 0 of split " in err, err
    check_volume(torch.zeros(1, 64, 64, 8), "ct.nii.gz", spatial_dims=2)  # pretraining: its slices give 2D patches


@pytest.mark.parametrize("bundle, key, mode", [("chestxray14_cls", "image", "RGBA"), ("chexpert_cls", "image", "RGB"),
                                               ("siim_pneumothorax_seg", "image", "RGB"), ("montgomery_lung_seg", "label", "RGB")])
def test_2d_finetune_refuses_a_colour_png_naming_it(bundle, key, mode, tmp_path, capsys):
    """An RGB(A) PNG in the datalist (a ChestX-ray14 RGBA image not run through `dira3d prepare`) loaded as 3 or 4
    channels and failed in collation or in the first convolution, naming no file; a grey one next to it loads."""
    from dira3d.evaluation.finetune import main

    datalist = write_cxr(tmp_path / "data", f"{bundle}.json", CLASSES.get(bundle), train=4, test=2)
    content = json.loads(datalist.read_text())
    path = tmp_path / "data" / content["training"][1][key]
    grey = np.asarray(Image.open(path))
    Image.fromarray(np.stack([grey] * 3 + ([np.full_like(grey, 255)] if mode == "RGBA" else []), -1), mode=mode).save(path)
    code = main(["--bundle", bundle, "--datalist", str(datalist), "--output-dir", str(tmp_path / "out"), "--tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    channels = len(mode)
    assert re.search(rf"dira3d finetune: error: \S*{path.name}: has {channels} channels \(loaded shape \({channels}, 72, 56\)\), "
                     r"not 1: a colour \(RGB/RGBA\) image\? run `dira3d prepare <dataset>` \(docs/data_2d\.md\), which turns "
                     r"a grey image stored in colour into one channel", err), err
    assert str(path) in err and not (tmp_path / "out" / "models" / "model.pt").exists()


def test_load_split_checks_label_vectors_for_a_classifier(tmp_path):
    five = write_cxr(tmp_path / "five", "five.json", 5, train=4, test=2)
    assert len(load_split(five, "test", num_labels=5)) == 2 and len(load_split(five, "test")) == 2
    content = json.loads(five.read_text())
    content["meta"]["labels"] = [f"finding{k}" for k in range(5)]
    five.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"five\.json: entry 0 of split 'train' \(image \S+tr\d\.png\) has 5 labels "
                                         r"\(finding0, .*finding4\), but the network has out_channels 14: pass a datalist "
                                         r"with the bundle's 14 labels .* or train on these 5 with --set out_channels=5"):
        load_split(five, "train", num_labels=14)
    masks = write_cxr(tmp_path / "seg", "seg.json", None, train=4, test=2)
    with pytest.raises(ValueError, match=r"seg\.json: entry 0 of split 'test' \(image \S+te0\.png\) has label '\S+te0\.png', "
                                         r"a file \(a segmentation datalist\?\); this classification bundle takes a list of 5"):
        load_split(masks, "test", num_labels=5)
    # the validation split is checked too, and a label of true / false (not 1 / 0) is refused, naming it
    content = json.loads(five.read_text())
    content["validation"] = content["test"]
    five.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"five\.json: entry 0 of split 'validation' .* has 5 labels .* out_channels 14"):
        load_split(five, "validation", num_labels=14)
    content["test"][1]["label"] = [True, False, True, False, True]
    five.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"entry 1 of split 'test' .* has label \[True, False, True, False, True\]; "
                                         r"expected a list of 5 numbers \(1 = finding present\)"):
        load_split(five, "test", num_labels=5)


@pytest.mark.parametrize("bundle", ["chestxray14_cls", "chexpert_cls"])
@pytest.mark.parametrize("config, split_id", [("train.json", "train#datalist"), ("train.json", "validate#datalist"),
                                              ("evaluate.json", "validate#datalist")])
def test_every_split_a_classification_bundle_loads_is_checked_against_out_channels(bundle, config, split_id, tmp_path):
    """The training split, the early-stopping holdout and the split evaluate.json scores each pass num_labels: a
    datalist of another number of labels is refused naming it, whichever of them is loaded."""
    from monai.bundle import ConfigParser

    folder = bundle_path(bundle) / "configs"
    datalist = write_cxr(tmp_path / "data", "three.json", 3, train=8, test=2)
    parser = ConfigParser()
    parser.read_config([str(folder / "train.json")] + ([str(folder / config)] if config != "train.json" else []))
    parser["datalist"] = str(datalist)
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content(split_id)
    error = raised.value
    while error is not None and not isinstance(error, ValueError):
        error = error.__cause__
    assert error is not None and re.search(rf"three\.json: entry \d+ of split '\w+' .* has 3 labels, but the network "
                                           rf"has out_channels {CLASSES[bundle]}", str(error)), repr(raised.value)


def test_chexpert_bundle_refuses_a_datalist_of_all_14_observations_naming_it(tmp_path, capsys):
    """`dira3d prepare chexpert --labels all` (documented) writes 14 labels; chexpert_cls has 5 outputs: training
    ran and failed at the first step with torch's "Target size ([2, 14]) must be the same as input size ([2, 5])"."""
    from dira3d.evaluation.finetune import main

    datalist = write_cxr(tmp_path / "data", "chexpert_datalist.json", 14, train=4, test=2)
    code = main(["--bundle", "chexpert_cls", "--datalist", str(datalist), "--output-dir", str(tmp_path / "out"), "--tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r"dira3d finetune: error: datalist \S*chexpert_datalist\.json: entry 0 of split '(train|test)' .* has 14 "
                     r"labels, but the network has out_channels 5: .*`dira3d prepare chexpert` with the default "
                     r"--labels five", err), err
    assert not (tmp_path / "out" / "models" / "model.pt").exists()


def test_finetune_refuses_bad_test_labels_before_training(tmp_path):
    """A test label that is not a list of out_channels numbers was found only after the whole training (the
    up-front check of the test split did not know the bundle is multi-label); now before any training."""
    datalist = write_grid_labels(tmp_path / "data", "chexpert.json", CLASSES["chexpert_cls"], train=8, test=4)
    content = json.loads(datalist.read_text())
    content["test"][2]["label"] = content["test"][2]["label"][:3]  # 3 numbers for a 5-output classifier
    datalist.write_text(json.dumps(content))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"(?s)split .test.*te2.png.*has 3 labels.*out_channels 5"):
        run_finetune("chexpert_cls", {"datalist": str(datalist), "pretrained": "", "seed": 0}, output_dir=out, tiny=True)
    assert not (out / "models" / "model.pt").exists() and not (out / "metrics.json").exists()
