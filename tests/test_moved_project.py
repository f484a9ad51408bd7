"""A project folder moved or copied elsewhere (``mv project_A project_B``, an rsync to another machine), found by a walk
of moving work: the records it holds name absolute paths under the old place. From the new place a finished
pretraining was refused as 'a finished run on other data', and a finished ``dira3d experiment`` as fine-tuned from
another checkpoint, with other settings (``datalist``) and pretrained on another ``dataset_dir``; rerun from the new
place they are the same runs, and nothing is read from or written to the old place, also where it is still there."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml

from dira3d.engines.finished import finished_note
from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.utils.files import same_or_moved


def test_same_or_moved_reads_a_path_recorded_before_its_folders_moved_together():
    assert same_or_moved("/p/A/prepared", "/p/B/prepared", "/p/B/runs/exp/pretrain/dis")
    assert same_or_moved("/p/A/prepared/x.json", "/p/B/prepared/x.json", "/p/B/runs/exp", "/p/A/runs/exp")
    assert same_or_moved("/p/A/x", "/p/A/x", "/anywhere")
    # other data, or a record whose folder was elsewhere then
    assert not same_or_moved("/p/A/other", "/p/B/prepared", "/p/B/runs/exp/pretrain/dis")
    assert not same_or_moved("/p/A/prepared/x.json", "/p/B/prepared/x.json", "/p/B/runs/exp", "/p/C/runs/exp")
    assert not same_or_moved("/p/A/prepared/x.json", "/fast/prepared/x.json", "/p/B/runs/exp")
    assert not same_or_moved(None, "/p/B/x", "/p/B") and not same_or_moved("", "/p/B/x", "/p/B")


def _finished_last_pt(models, data_source):
    models.mkdir(parents=True)
    torch.save({"trainer": {"epoch": 2}, "meta": {"data_source": data_source, "num_classes": 5}}, models / "last.pt")


def test_a_finished_pretraining_moved_with_its_data_is_still_finished(tmp_path):
    old, new = tmp_path / "A", tmp_path / "B"
    _finished_last_pt(old / "runs" / "pre" / "models", str(old / "prepared" / "pretrain_datalist.json"))
    shutil.copytree(old, new)  # the old place left as it was: nothing there is read
    data = {"data_source": str(new / "prepared" / "pretrain_datalist.json"), "num_classes": 5}
    assert "has already finished" in finished_note(new / "runs" / "pre" / "models", 2, data=data)
    # other data at the new place is still refused, and so is another number of classes
    with pytest.raises(ValueError, match="finished run on other data"):
        finished_note(new / "runs" / "pre" / "models", 2, data={**data, "data_source": str(new / "other.json")})
    with pytest.raises(ValueError, match="num_classes"):
        finished_note(new / "runs" / "pre" / "models", 2, data={**data, "num_classes": 6})


def _project(root, seeds):
    (root / "prepared").mkdir(parents=True, exist_ok=True)
    if not (root / "ckpt.pt").is_file():  # a new project (a moved one keeps its files)
        (root / "prepared" / "dl.json").write_text('{"training": []}')
        (root / "ckpt.pt").write_bytes(b"weights")
    cfg = {"bundle": "luna16_nodule_fpr", "datalist": "prepared/dl.json", "metric": "auc", "output_dir": "runs/exp",
           "seeds": seeds, "label_fractions": [1.0],
           "methods": {"random": None, "mine": "ckpt.pt", "dira": {"pretrain": {"lambda_adv": 0.5}}},
           "overrides": {"tiny": True, "width": 1.0}, "pretrain": {"dataset_dir": "prepared"}}
    (root / "experiment.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(root / "experiment.yaml")


def _runner(calls):
    def run(bundle, overrides):
        calls.append(overrides)
        return {"auc": 0.6 + (0.1 if overrides["pretrained"] else 0.0) + 0.01 * overrides["seed"]}
    return run


def _state(folder):
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("old_left", [False, True], ids=["moved", "copied"])
def test_an_experiment_moved_with_its_data_reuses_its_runs_and_never_touches_the_old_place(tmp_path, monkeypatch,
                                                                                           old_left):
    old, new = tmp_path / "A", tmp_path / "B"
    pretrainings = []

    def fake_bundle(configs, **kwargs):  # the pretraining bundle: writes best.pt where it is told
        pretrainings.append(kwargs)
        models = tmp_path / kwargs["bundle_root"] / "models"
        models.mkdir(parents=True, exist_ok=True)
        (models / "best.pt").write_bytes(b"pretrained")

    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", fake_bundle)
    run_experiment(_project(old, [0]), runner=_runner([]), log=lambda _: None)
    assert len(pretrainings) == 1
    (shutil.copytree if old_left else shutil.move)(old, new)
    before = _state(old) if old_left else None

    calls = []
    rows = run_experiment(_project(new, [0, 1]), runner=_runner(calls), log=lambda _: None)
    assert len(pretrainings) == 1  # the moved pretraining is reused, not refused nor redone
    assert [c["seed"] for c in calls] == [1, 1, 1] and len(rows) == 6  # seed 0 reused, seed 1 run
    assert all(str(old) not in json.dumps(c) for c in calls)
    with open(new / "runs" / "exp" / "results.csv") as handle:
        written = list(csv.DictReader(handle))
    assert {r["run_dir"].rsplit("/", 3)[0] for r in written} == {str(new / "runs")}
    assert {r["checkpoint"] for r in written} == {"", str(new / "ckpt.pt"),
                                                  str(new / "runs" / "exp" / "pretrain" / "dira" / "models" / "best.pt")}
    recorded = (new / "runs" / "exp" / "experiment.json").read_text() + (new / "runs" / "exp" / "checkpoints.json").read_text()
    assert str(old) not in recorded
    if old_left:
        assert _state(old) == before  # nothing written at the old place
    else:
        assert not old.exists()

    # the records still guard what they guarded: another datalist content at the same place is refused
    (new / "prepared" / "dl.json").write_text('{"training": [], "test": []}')
    with pytest.raises(ValueError, match="changed since the runs"):
        run_experiment(_project(new, [0, 1, 2]), runner=_runner([]), log=lambda _: None)


def test_a_datalist_copied_alone_to_a_faster_disk_is_the_same_datalist(tmp_path):
    """``cp -r prepared /fast/prepared`` and the config pointed there: the same name and content, the same runs."""
    config = _project(tmp_path / "A", [0])
    config["methods"].pop("dira")
    run_experiment(config, runner=_runner([]), log=lambda _: None)
    shutil.copytree(tmp_path / "A" / "prepared", tmp_path / "fast" / "prepared")
    calls = []
    rows = run_experiment({**config, "seeds": [0, 1], "datalist": str(tmp_path / "fast" / "prepared" / "dl.json")},
                          runner=_runner(calls), log=lambda _: None)
    assert [c["seed"] for c in calls] == [1, 1] and len(rows) == 4
    assert {c["datalist"] for c in calls} == {str(tmp_path / "fast" / "prepared" / "dl.json")}
