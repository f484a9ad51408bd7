"""From `dira3d finetune --bundle chestxray14_cls` to `dira3d localise` (walk of 2026-11-28, docs/2d.md "Localisation"):

- the fine-tuning's end lines named the inference command but not `dira3d localise`, the paper's evaluation of
  ChestX-ray14 (Grad-CAM on its official boxes): a chestxray14_cls run whose datalist has `bbox_datalist.json` beside
  it now ends with a `next:` line, runnable as printed;
- the `dira3d localise` line that `dira3d prepare chestxray14` prints has no --backbone / --roi-size, so for a model
  fine-tuned with --tiny (ResNet-10, 64x64) it was refused; localise now takes them from what the run recorded in its
  metrics.json (the --tiny flag: the bundle's tiny.json; --set backbone / roi_size / out_channels), the command line
  first.
"""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path

import pytest
from test_bundles_2d import write_cxr

from dira3d.data.chestxray14 import LABELS
from dira3d.evaluation import finetune
from dira3d.evaluation.localise import main as localise_main
from dira3d.networks import ResNetClassifier
from dira3d.utils import atomic_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def trained_settings(model: Path):
    return importlib.import_module("dira3d.evaluation.localise").trained_settings(model)


def _boxes_beside(datalist: Path) -> Path:
    """``bbox_datalist.json`` beside ``datalist`` as `dira3d prepare chestxray14` writes it: boxes on its test images."""
    tests = json.loads(datalist.read_text())["test"]
    boxes = [{"image": entry["image"], "case_id": entry["case_id"], "label": LABELS[i % 3], "label_index": i % 3,
              "box": [10, 8, 30, 20]} for i, entry in enumerate(tests)]
    path = datalist.parent / "bbox_datalist.json"
    path.write_text(json.dumps({"test": boxes, "meta": {"dataset": "chestxray14", "labels": list(LABELS), "size": 0}}))
    return path


def _run_printed(line: str) -> int:
    """Run a ``next:`` line of `dira3d finetune` as a user pastes it (its note in parentheses left off)."""
    words = shlex.split(line.split(None, 1)[1].rsplit(" (", 1)[0])
    assert words[:2] == ["dira3d", "localise"], words
    return localise_main(words[2:])


def test_a_tiny_chestxray14_run_ends_with_a_localise_command_that_runs_as_printed(tmp_path, capsys):
    datalist = write_cxr(tmp_path / "data", "chestxray14_datalist.json", 14)
    boxes = _boxes_beside(datalist)
    out = tmp_path / "ft"
    # --tiny: ResNet-10 (tiny.json); --set roi_size: a list, recorded in metrics.json since this change
    assert finetune.main(["--bundle", "chestxray14_cls", "--tiny", "--datalist", str(datalist), "--output-dir", str(out),
                          "--set", "max_epochs=1", "--set", "roi_size=[96,96]"]) == 0
    assert json.loads((out / "metrics.json").read_text())["settings"]["roi_size"] == [96, 96]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next:")]
    assert len(lines) == 1 and lines[0].startswith(f"next:        dira3d localise --bbox-datalist {boxes.resolve()} "
                                                   f"--model {out.resolve() / 'models' / 'model.pt'} "), lines
    assert _run_printed(lines[0]) == 0
    assert "--backbone resnet10 --roi-size 96 96, as " in capsys.readouterr().err
    result = json.loads((out / "localise" / "localisation.json").read_text())
    assert result["count"] == len(json.loads(boxes.read_text())["test"]) and result["roi_size"] == [96, 96]


@pytest.mark.parametrize("bundle, beside, expected", [
    ("chestxray14_cls", False, "localise:    no "),  # how to get the boxes, no command that cannot run
    ("chexpert_cls", True, None),  # only ChestX-ray14 has the official boxes
])
def test_the_localise_line_is_for_chestxray14_runs_with_their_boxes(tmp_path, capsys, monkeypatch, bundle, beside,
                                                                     expected):
    datalist = write_cxr(tmp_path / "data", "datalist.json", 14, train=2, test=2)
    if beside:
        _boxes_beside(datalist)
    monkeypatch.setattr(finetune, "run_finetune", lambda *args, **kwargs: {
        "metrics": {"auc": 0.5}, "bundle": bundle, "settings": {"datalist": str(datalist.resolve()), "tiny": True}})
    assert finetune.main(["--bundle", bundle, "--tiny", "--output-dir", str(tmp_path / "ft")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert not [line for line in printed if line.startswith("next:")]
    found = [line for line in printed if "dira3d localise" in line]
    if expected is None:
        assert not found, found
    else:
        assert len(found) == 1 and found[0].startswith(expected) and "BBox_List_2017.csv" in found[0], found


def _recorded_run(root: Path, record: dict | str, backbone: str = "resnet10", classes: int = 14) -> Path:
    """``root/models/model.pt`` (a ``backbone`` classifier of ``classes`` outputs) and ``root/metrics.json``."""
    atomic_save(ResNetClassifier(1, classes, backbone=backbone).state_dict(), root / "models" / "model.pt")
    (root / "metrics.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return root / "models" / "model.pt"


def test_localise_builds_a_tiny_model_as_its_metrics_json_records_it(tmp_path, capsys):
    datalist = _boxes_beside(write_cxr(tmp_path / "data", "chestxray14_datalist.json", 14, train=2, test=3))
    model = _recorded_run(tmp_path / "ft", {"bundle": "chestxray14_cls", "settings": {"tiny": True}})
    assert trained_settings(model) == ({"backbone": "resnet10", "roi_size": [64, 64]}, tmp_path / "ft" / "metrics.json")
    # the line `dira3d prepare chestxray14` prints, without --backbone / --roi-size
    assert localise_main(["--bbox-datalist", str(datalist), "--model", str(model), "--output-dir", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "localisation.json").read_text())["roi_size"] == [64, 64]
    # the command line wins over the record: ResNet-50 does not fit these weights
    with pytest.raises(SystemExit):
        localise_main(["--bbox-datalist", str(datalist), "--model", str(model), "--output-dir", str(tmp_path / "b"),
                       "--backbone", "resnet50"])
    assert "the weights fit other settings: pass --backbone resnet10" in capsys.readouterr().err
    assert localise_main(["--bbox-datalist", str(datalist), "--model", str(model), "--output-dir", str(tmp_path / "c"),
                          "--roi-size", "32", "32"]) == 0
    assert json.loads((tmp_path / "c" / "localisation.json").read_text())["roi_size"] == [32, 32]


def test_localisation_json_names_the_model_it_localised_and_how_it_was_built(tmp_path, capsys):
    """localisation.json recorded roi_size but not the backbone or the outputs: two runs on ResNet-10 and ResNet-18
    fine-tunings could not be told apart. It now records the model file, backbone, in_channels and num_classes."""
    datalist = _boxes_beside(write_cxr(tmp_path / "data", "chestxray14_datalist.json", 14, train=2, test=2))
    model = _recorded_run(tmp_path / "ft", {"bundle": "chestxray14_cls", "settings": {"tiny": True, "backbone": "resnet18"}},
                          backbone="resnet18")
    assert localise_main(["--bbox-datalist", str(datalist), "--model", str(model), "--output-dir", str(tmp_path / "a")]) == 0
    written = json.loads((tmp_path / "a" / "localisation.json").read_text())
    assert {k: written[k] for k in ("model", "backbone", "in_channels", "num_classes", "roi_size")} == {
        "model": str(model.resolve()), "backbone": "resnet18", "in_channels": 1, "num_classes": 14, "roi_size": [64, 64]}
    other = _recorded_run(tmp_path / "ft10", {"bundle": "chestxray14_cls", "settings": {"tiny": True}})  # the command line
    assert localise_main(["--bbox-datalist", str(datalist), "--model", str(other), "--output-dir", str(tmp_path / "b"),
                          "--backbone", "resnet10", "--roi-size", "32", "64"]) == 0
    written = json.loads((tmp_path / "b" / "localisation.json").read_text())
    assert (written["model"], written["backbone"], written["roi_size"]) == (str(other.resolve()), "resnet10", [32, 64])

def test_the_set_values_win_over_tiny_json_and_other_records_are_left_alone(tmp_path, capsys):
    settings = {"tiny": True, "backbone": "resnet18", "roi_size": [128, 96], "out_channels": 3}
    model = _recorded_run(tmp_path / "set", {"bundle": "chestxray14_cls", "settings": settings})
    assert trained_settings(model)[0] == {"backbone": "resnet18", "roi_size": [128, 96], "num_classes": 3}
    assert trained_settings(_recorded_run(tmp_path / "full", {"bundle": "chestxray14_cls", "settings": {"tiny": False}})) \
        == ({}, tmp_path / "full" / "metrics.json")
    # a 3D run's record (its roi_size has three sizes): the weights check says what the model is
    assert trained_settings(_recorded_run(tmp_path / "3d", {"bundle": "luna16_nodule_fpr", "settings": {"tiny": True}})) \
        == ({}, None)
    atomic_save({}, tmp_path / "alone" / "model.pt")  # a model outside a fine-tuning's models/: no record read
    (tmp_path / "metrics.json").write_text(json.dumps({"bundle": "chestxray14_cls", "settings": {"tiny": True}}))
    assert trained_settings(tmp_path / "alone" / "model.pt") == ({}, None)
    # a broken record: one line naming it and what to pass instead
    datalist = _boxes_beside(write_cxr(tmp_path / "data", "chestxray14_datalist.json", 14, train=2, test=2))
    for record in ("{not json", {"bundle": "chestxray14_cls", "settings": {"roi_size": [64]}}):
        model = _recorded_run(tmp_path / "bad", record)
        with pytest.raises(SystemExit):
            localise_main(["--bbox-datalist", str(datalist), "--model", str(model), "--output-dir", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert str(tmp_path / "bad" / "metrics.json") in err and "pass --backbone, --roi-size and --num-classes" in err, err
