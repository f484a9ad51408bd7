"""A prepared data folder moved alone, without the output folder (``mv prepared /fast/prepared``, the config then
pointed there), found by a walk of moving work: ``dira3d experiment`` refused its pretrainings with 'dataset_dir
changed', naming neither place, and a finished ``dira3d pretrain`` said 'other data' with no way on for the same data.
Where the records hold the data's checksums (``settings.json``'s ``dataset_files`` and ``datalist_sha256``,
``experiment.json``'s ``datalist_sha256``) the same data moved is the same data; other data, and a record without
checksums, are refused naming the recorded and the new place and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dira3d.engines.finished import finished_note
from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.utils.files import moved_note


def _config(root, data, seeds, pretrain_datalist=None, datalist=None):
    """An experiment in ``root`` (output ``root/runs/exp``) on the prepared folder ``data`` (``datalist``: default its
    dl.json)."""
    pretrain = {"dataset_dir": str(data)}
    if pretrain_datalist:
        pretrain["overrides"] = {"datalist": str(pretrain_datalist)}
    cfg = {"bundle": "luna16_nodule_fpr", "datalist": str(datalist or data / "dl.json"), "metric": "auc", "output_dir": "runs/exp",
           "seeds": seeds, "label_fractions": [1.0], "methods": {"random": None, "dira": {"pretrain": {"lambda_adv": 0.5}}},
           "overrides": {"tiny": True, "width": 1.0}, "pretrain": pretrain}
    (root / "experiment.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(root / "experiment.yaml")


def _runner(calls):
    def run(bundle, overrides):
        calls.append(overrides)
        return {"auc": 0.6 + 0.01 * overrides["seed"]}
    return run


@pytest.fixture
def pretrainings(monkeypatch):
    made = []

    def fake_bundle(configs, **kwargs):  # the pretraining bundle: writes best.pt where it is told
        made.append(kwargs)
        models = Path(kwargs["bundle_root"]) / "models"
        models.mkdir(parents=True, exist_ok=True)
        (models / "best.pt").write_bytes(b"pretrained")

    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", fake_bundle)
    return made


def _first_run(tmp_path, pretrain_datalist=False):
    root, data = tmp_path / "A", tmp_path / "A" / "prepared"
    data.mkdir(parents=True)
    (data / "dl.json").write_text('{"training": []}')
    (data / "pretrain_datalist.json").write_text('{"training": [{"image": "a.nii.gz"}]}')
    extra = None
    if pretrain_datalist:  # a pretraining datalist of its own, outside dataset_dir
        extra = tmp_path / "A" / "lists" / "mine.json"
        extra.parent.mkdir()
        extra.write_text('{"training": [{"image": "b.nii.gz"}]}')
    run_experiment(_config(root, data, [0], extra), runner=_runner([]), log=lambda _: None)
    return root, data, extra


def test_a_dataset_dir_moved_alone_is_the_same_data(tmp_path, pretrainings):
    root, data, _ = _first_run(tmp_path)
    settings = json.loads((root / "runs" / "exp" / "pretrain" / "dira" / "settings.json").read_text())
    assert set(settings["dataset_files"]) == {"dl.json", "pretrain_datalist.json"}
    fast = tmp_path / "fast" / "prepared"
    shutil.move(data, fast)
    calls = []
    rows = run_experiment(_config(root, fast, [0, 1]), runner=_runner(calls), log=lambda _: None)
    assert len(pretrainings) == 1  # the pretraining is reused, not refused nor redone
    assert [c["seed"] for c in calls] == [1, 1] and len(rows) == 4  # seed 0 reused
    assert {c["datalist"] for c in calls} == {str(fast / "dl.json")}


def test_other_data_at_the_new_place_is_refused_naming_both_places(tmp_path, pretrainings):
    root, data, _ = _first_run(tmp_path)
    other = tmp_path / "fast" / "prepared"
    shutil.copytree(data, other)
    (other / "pretrain_datalist.json").write_text('{"training": [{"image": "other.nii.gz"}]}')  # prepared again
    with pytest.raises(ValueError) as err:
        run_experiment(_config(root, other, [0, 1]), runner=_runner([]), log=lambda _: None)
    message = str(err.value)
    assert f"dataset_dir was {data}, now {other}, whose data are not the ones recorded (pretrain_datalist.json of " \
           "dataset_dir not the same: sha256 in settings.json)" in message, message
    assert "Give the method a new name or use another output_dir" in message and len(pretrainings) == 1


def test_a_record_without_checksums_names_both_places_and_how_to_go_on(tmp_path, pretrainings):
    root, data, _ = _first_run(tmp_path)
    record = root / "runs" / "exp" / "pretrain" / "dira" / "settings.json"
    settings = json.loads(record.read_text())
    del settings["dataset_files"]  # as an earlier dira3d wrote it
    record.write_text(json.dumps(settings))
    fast = tmp_path / "fast" / "prepared"
    shutil.move(data, fast)
    with pytest.raises(ValueError) as err:
        run_experiment(_config(root, fast, [0, 1]), runner=_runner([]), log=lambda _: None)
    message = str(err.value)
    assert f"(dataset_dir changed); dataset_dir was {data}, now {fast}: if that is the same data moved there, the " \
           f"record (made before dira3d recorded checksums of the data) cannot tell; write the new place into " \
           f"dataset_dir of {record} to go on with it; otherwise its checkpoint" in message, message
    settings["dataset_dir"] = str(fast)  # the way on it names
    record.write_text(json.dumps(settings))
    calls = []
    run_experiment(_config(root, fast, [0, 1]), runner=_runner(calls), log=lambda _: None)
    assert [c["seed"] for c in calls] == [1, 1] and len(pretrainings) == 1


def test_a_pretraining_datalist_moved_alone_is_known_by_its_content(tmp_path, pretrainings):
    root, data, extra = _first_run(tmp_path, pretrain_datalist=True)
    moved = tmp_path / "fast" / "mine.json"
    moved.parent.mkdir()
    shutil.move(extra, moved)
    run_experiment(_config(root, data, [0, 1], moved), runner=_runner([]), log=lambda _: None)
    assert len(pretrainings) == 1
    moved.write_text('{"training": [{"image": "c.nii.gz"}]}')  # other content at the new place
    with pytest.raises(ValueError, match=f"overrides.datalist was {extra}, now {moved}, whose data are not the ones "
                                         r"recorded \(the datalist's content not the same"):
        run_experiment(_config(root, data, [0, 1], moved), runner=_runner([]), log=lambda _: None)


def _without_pretraining(root, data, seeds, datalist=None):
    config = _config(root, data, seeds, datalist=datalist)
    config["methods"].pop("dira")
    return config


def test_a_finetuning_datalist_moved_alone(tmp_path):
    """Renamed too: the recorded sha256 says it is the same datalist; an experiment.json without one names both."""
    root, data = tmp_path / "A", tmp_path / "A" / "prepared"
    data.mkdir(parents=True)
    (data / "dl.json").write_text('{"training": []}')
    run_experiment(_without_pretraining(root, data, [0]), runner=_runner([]), log=lambda _: None)
    fast = tmp_path / "fast"
    fast.mkdir()
    shutil.move(data / "dl.json", fast / "renamed.json")
    config = _without_pretraining(root, data, [0, 1], fast / "renamed.json")
    calls = []
    run_experiment(config, runner=_runner(calls), log=lambda _: None)
    assert [c["seed"] for c in calls] == [1]
    record = root / "runs" / "exp" / "experiment.json"
    settings = json.loads(record.read_text())
    assert settings["datalist"] == str(fast / "renamed.json")
    settings["datalist"] = str(data / "dl.json")  # as an earlier dira3d recorded it: no sha256
    del settings["datalist_sha256"]
    record.write_text(json.dumps(settings))
    with pytest.raises(ValueError) as err:
        run_experiment({**config, "seeds": [0, 1, 2]}, runner=_runner([]), log=lambda _: None)
    assert f"(datalist changed; the earlier ones are in {record}); datalist was {data / 'dl.json'}, now " \
           f"{fast / 'renamed.json'}: if that is the same data moved there" in str(err.value), str(err.value)
    # other content at a new place, both recorded: other data
    settings["datalist_sha256"] = "0" * 64
    record.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="whose data are not the ones recorded \\(its sha256 differs\\)"):
        run_experiment({**config, "seeds": [0, 1, 2]}, runner=_runner([]), log=lambda _: None)


def test_a_finished_pretraining_whose_datalist_moved_alone_says_how_to_go_on(tmp_path):
    models = tmp_path / "runs" / "pre" / "models"
    models.mkdir(parents=True)
    torch.save({"trainer": {"epoch": 2}, "meta": {"data_source": str(tmp_path / "prepared" / "dl.json"),
                                                  "num_classes": 5}}, models / "last.pt")
    new = str(tmp_path / "fast" / "prepared" / "dl.json")
    with pytest.raises(ValueError) as err:
        finished_note(models, 2, data={"data_source": new, "num_classes": 5})
    message = str(err.value)
    assert f"data_source {str(tmp_path / 'prepared' / 'dl.json')!r}, this run's {new!r}" in message
    assert "if these are the same data moved there" in message and "a larger max_epochs continues it" in message
    with pytest.raises(ValueError) as err:  # another number of classes is other data, whatever the place
        finished_note(models, 2, data={"data_source": str(tmp_path / "prepared" / "dl.json"), "num_classes": 6})
    assert "same data moved" not in str(err.value)


def test_moved_note_words():
    assert moved_note([("dataset_dir", "/a", "/b")], "x differs", "f") == \
        "dataset_dir was /a, now /b, whose data are not the ones recorded (x differs); "
    assert moved_note([("datalist", "/a", "/b")], None, "datalist of /r.json").endswith(
        "write the new place into datalist of /r.json to go on with it; otherwise ")


def test_a_dataset_dir_prepared_again_at_the_same_place_is_refused(tmp_path, pretrainings):
    """``dira3d prepare ... --dst prepared`` rerun on other data into the same folder: the pretraining on the old data
    was reused silently, and the table mixed it with runs on the new data."""
    root, data, _ = _first_run(tmp_path)
    (data / "extra.json").write_text("{}")  # a JSON file added beside the recorded ones is no other data
    run_experiment(_config(root, data, [0, 1]), runner=_runner([]), log=lambda _: None)
    assert len(pretrainings) == 1
    (data / "pretrain_datalist.json").write_text('{"training": [{"image": "other.nii.gz"}]}')  # prepared again
    calls = []
    with pytest.raises(ValueError) as err:
        run_experiment(_config(root, data, [0, 1, 2]), runner=_runner(calls), log=lambda _: None)
    message = str(err.value)
    assert f"method 'dira' was pretrained in {root / 'runs' / 'exp' / 'pretrain' / 'dira'} with other settings (the " \
           f"data of dataset_dir changed); dataset_dir {data} holds other data than recorded " \
           "(pretrain_datalist.json not the same: sha256 in settings.json; prepared again there?); its checkpoint" in message, message
    assert "Give the method a new name or use another output_dir (or delete that folder" in message
    assert calls == [] and len(pretrainings) == 1  # refused before any run, the old pretraining not reused
    shutil.rmtree(root / "runs" / "exp" / "pretrain" / "dira")  # the way on it names: pretrained again on the new data
    (root / "runs" / "exp" / "results.csv").unlink()
    run_experiment(_config(root, data, [0]), runner=_runner([]), log=lambda _: None)
    assert len(pretrainings) == 2


def test_a_pretraining_datalist_prepared_again_at_the_same_place_is_refused(tmp_path, pretrainings):
    root, data, extra = _first_run(tmp_path, pretrain_datalist=True)
    extra.write_text('{"training": [{"image": "c.nii.gz"}]}')
    with pytest.raises(ValueError, match=r"\(the data of overrides\.datalist changed\); overrides\.datalist "
                                         f"{extra} holds other data than recorded \\(its content"):
        run_experiment(_config(root, data, [0, 1], extra), runner=_runner([]), log=lambda _: None)
    assert len(pretrainings) == 1


def test_a_record_without_checksums_at_the_same_place_is_reused_as_before(tmp_path, pretrainings):
    """settings.json of before 2026-11-28 (no dataset_files, no datalist_sha256) cannot tell: reused, as it was."""
    root, data, extra = _first_run(tmp_path, pretrain_datalist=True)
    record = root / "runs" / "exp" / "pretrain" / "dira" / "settings.json"
    settings = json.loads(record.read_text())
    del settings["dataset_files"], settings["datalist_sha256"]
    record.write_text(json.dumps(settings))
    (data / "pretrain_datalist.json").write_text('{"training": [{"image": "other.nii.gz"}]}')
    extra.write_text('{"training": [{"image": "c.nii.gz"}]}')
    calls = []
    run_experiment(_config(root, data, [0, 1], extra), runner=_runner(calls), log=lambda _: None)
    assert [c["seed"] for c in calls] == [1, 1] and len(pretrainings) == 1


def test_a_recorded_file_gone_from_the_dataset_dir_is_named(tmp_path, pretrainings):
    root, data, _ = _first_run(tmp_path)
    (data / "pretrain_datalist.json").rename(data / "renamed.json")
    with pytest.raises(ValueError, match=r"\(pretrain_datalist\.json \(gone\) not the same: sha256 in settings\.json"):
        run_experiment(_config(root, data, [0, 1]), runner=_runner([]), log=lambda _: None)
    assert len(pretrainings) == 1


def test_a_dataset_dir_moved_alone_with_a_json_file_added_is_the_same_data(tmp_path, pretrainings):
    """A prepare rerun after the experiment adds prepared.json beside the recorded datalists (dira3d prepare writes it
    from 2026-11-28): moved alone, the folder still holds every recorded file unchanged, so it is the same data."""
    root, data, _ = _first_run(tmp_path)
    (data / "prepared.json").write_text('{"desc": "generic", "written_by": "dira3d prepare"}')
    fast = tmp_path / "fast" / "prepared"
    shutil.move(data, fast)
    calls = []
    rows = run_experiment(_config(root, fast, [0, 1]), runner=_runner(calls), log=lambda _: None)
    assert len(pretrainings) == 1 and [c["seed"] for c in calls] == [1, 1] and len(rows) == 4
