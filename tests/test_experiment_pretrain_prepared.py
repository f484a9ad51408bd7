"""``dira3d experiment`` with methods that pretrain themselves, on datalists that ``dira3d prepare`` writes from raw data
in the official layout (the walk of session 28: the ablation of docs/results.md at tiny settings on prepared LUNA16
phantoms, and a 2D grid on a prepared Montgomery set).

- Each pretraining's ``settings.json`` recorded the absolute paths of ``bundles/dira_pretrain``'s config files, i.e.
  where dira3d was installed: the same dira3d run from another checkout or environment refused every rerun of the
  grid ("method 'dis' was pretrained ... with other settings (configs changed)"). The bundle's configs are recorded and
  compared by name now (``train.json``), as the config names them.
- A ``datalist`` in the pretraining's overrides (a 2D pretraining on a prepared Montgomery set: 2d.json reads
  ``<dataset_dir>/chestxray14_datalist.json``) was read relative to the working folder, where every other path of the
  config is read relative to the config's folder; and a pretraining datalist that did not exist stopped the grid with
  the bundle's error, which named neither the method nor the setting to change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dira3d.data.command import main as prepare_main
from dira3d.data.synthetic import write_luna16_phantoms
from dira3d.evaluation.experiment import load_config, pretrain_method
from dira3d.evaluation.experiment_pretrain import SETTINGS_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _write(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fake_bundle(runs: list):
    def run(configs, **kwargs):
        runs.append({"configs": list(configs), **kwargs})
        models = Path(kwargs["bundle_root"]) / "models"
        models.mkdir(parents=True, exist_ok=True)
        (models / "best.pt").write_bytes(b"pretrained")
    return run


def test_a_pretraining_is_reused_by_the_same_dira3d_installed_elsewhere(tmp_path, monkeypatch):
    write_luna16_phantoms(tmp_path / "raw", count=4, size=(48, 48, 24), seed=1, false_positives=4)
    assert prepare_main(["luna16", "--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "prep")]) == 0
    stages = [{"name": "dis", "losses": ["dis"]}]
    config = load_config(_write(tmp_path / "ablation.yaml", {
        "bundle": "luna16_nodule_fpr", "datalist": "prep/ncc_datalist.json", "metric": "auc", "output_dir": "out",
        "seeds": [0], "label_fractions": [1.0], "overrides": {"tiny": True},
        "methods": {"random": None, "dis": {"pretrain": {"stages": stages}}},
        "pretrain": {"dataset_dir": "prep", "configs": ["train.json", "tiny.json"], "overrides": {"max_epochs": 2}}}))
    runs: list = []
    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", _fake_bundle(runs))
    best = pretrain_method("dis", config["methods"]["dis"], config, log=lambda _: None)
    folder = tmp_path / "out" / "pretrain" / "dis"
    assert len(runs) == 1 and Path(runs[0]["configs"][0]).is_file()  # the bundle still runs the files themselves
    record = json.loads((folder / SETTINGS_NAME).read_text())
    assert record["configs"] == ["train.json", "tiny.json"], record
    # a grid pretrained by this dira3d installed in another folder (HEAD recorded the bundle's absolute paths)
    record["configs"] = [f"/elsewhere/venv/dira3d/bundles/dira_pretrain/configs/{c}" for c in ("train.json", "tiny.json")]
    (folder / SETTINGS_NAME).write_text(json.dumps(record))
    assert pretrain_method("dis", config["methods"]["dis"], config, log=lambda _: None) == best
    assert len(runs) == 1  # reused, not refused and not pretrained again
    record["configs"] = ["train.json"]  # another stack of configs is still refused
    (folder / SETTINGS_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"method 'dis' was pretrained in .* with other settings \(configs changed\)"):
        pretrain_method("dis", config["methods"]["dis"], config, log=lambda _: None)


def _montgomery(root: Path, count: int = 8) -> Path:
    """The Montgomery set's layout: CXR_png/ and ManualMask/{left,right}Mask/ of one name per patient."""
    rng = np.random.default_rng(0)
    for number in range(1, count + 1):
        name = f"MCUCXR_{number:04d}_{number % 2}.png"
        left, right = np.zeros((40, 48), np.uint8), np.zeros((40, 48), np.uint8)
        left[8:32, 6:20], right[8:32, 28:42] = 255, 255
        image = np.clip(170 + rng.normal(0, 20, (40, 48)) - 0.4 * (left | right), 0, 255).astype(np.uint8)
        for folder, array in (("CXR_png", image), ("ManualMask/leftMask", left), ("ManualMask/rightMask", right)):
            (root / "MontgomerySet" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / "MontgomerySet" / folder / name)
    return root


def _grid_2d(tmp_path: Path, pretrain_overrides: dict) -> Path:
    """A 2D grid (docs/2d.md, 'Grids') in its own folder, pretraining on the prepared Montgomery datalist."""
    return _write(tmp_path / "grid" / "grid.yaml", {
        "bundle": "montgomery_lung_seg", "datalist": "../prep/montgomery_datalist.json", "metric": "dice",
        "output_dir": "out", "seeds": [0], "label_fractions": [1.0], "overrides": {"tiny": True, "max_epochs": 1},
        "methods": {"random": None, "dira_moco": {"pretrain": {}}},
        "pretrain": {"dataset_dir": "../prep", "configs": ["train.json", "2d.json", "2d_moco.json", "2d_tiny.json"],
                     "overrides": pretrain_overrides}})


@pytest.fixture()
def montgomery_prepared(tmp_path):
    assert prepare_main(["montgomery", "--src", str(_montgomery(tmp_path / "raw")), "--dst", str(tmp_path / "prep"),
                         "--size", "64"]) == 0
    return tmp_path / "prep" / "montgomery_datalist.json"


def test_the_pretrainings_datalist_is_read_relative_to_the_configs_folder(tmp_path, monkeypatch, montgomery_prepared):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the command runs from another folder than the config's
    config = load_config(_grid_2d(tmp_path, {"datalist": "../prep/montgomery_datalist.json"}))
    runs: list = []
    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", _fake_bundle(runs))
    pretrain_method("dira_moco", config["methods"]["dira_moco"], config, log=lambda _: None)
    assert runs[0]["datalist"] == str(montgomery_prepared), runs[0]
    # a pretraining recorded with the relative path (it worked from the config's folder) is reused, not refused
    folder = tmp_path / "grid" / "out" / "pretrain" / "dira_moco"
    record = json.loads((folder / SETTINGS_NAME).read_text())
    record["overrides"]["datalist"] = "../prep/montgomery_datalist.json"
    (folder / SETTINGS_NAME).write_text(json.dumps(record))
    (folder / "done.json").write_text(json.dumps({"method": "dira_moco", "overrides": record["overrides"]}))
    pretrain_method("dira_moco", config["methods"]["dira_moco"], config, log=lambda _: None)
    assert len(runs) == 1


def test_a_missing_pretraining_datalist_names_the_method_and_the_setting(tmp_path, monkeypatch, montgomery_prepared):
    config = load_config(_grid_2d(tmp_path, {}))  # 2d.json reads chestxray14_datalist.json from the dataset_dir
    with pytest.raises(FileNotFoundError) as err:  # the real bundle, stopped at its datalist
        pretrain_method("dira_moco", config["methods"]["dira_moco"], config, log=lambda _: None)
    message = str(err.value)
    assert f"pretrain dataset_dir {tmp_path / 'prep'}" in message and "has no chestxray14_datalist.json" in message
    assert "method 'dira_moco'" in message and "overrides: {datalist: FILE}" in message, message
    config = load_config(_grid_2d(tmp_path, {"datalist": "../prep/typo.json"}))
    with pytest.raises(FileNotFoundError, match=r"datalist .*typo\.json of the pretraining of method 'dira_moco'"):
        pretrain_method("dira_moco", config["methods"]["dira_moco"], config, log=lambda _: None)


def test_a_changed_setting_of_the_pretrain_section_names_every_method_it_changed(tmp_path, monkeypatch):
    """The ablation's `pretrain: {overrides: {max_epochs: ...}}` changed for a rerun changes all three arms: the
    refusal named 'dis' alone, and each fix its doc gives (delete its folder and rows) met the next method's."""
    from dira3d.evaluation.experiment import run_experiment

    write_luna16_phantoms(tmp_path / "raw", count=4, size=(48, 48, 24), seed=1, false_positives=4)
    assert prepare_main(["luna16", "--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "prep")]) == 0
    grid = {"bundle": "luna16_nodule_fpr", "datalist": "prep/ncc_datalist.json", "metric": "auc", "output_dir": "out",
            "seeds": [0], "label_fractions": [1.0], "overrides": {"tiny": True},
            "methods": {"random": None, "dis": {"pretrain": {"stages": [{"name": "dis", "losses": ["dis"]}]}},
                        "dira": {"pretrain": {}}, "dira_lsgan": {"pretrain": {"adversarial_kind": "lsgan"}}},
            "pretrain": {"dataset_dir": "prep", "configs": ["train.json", "tiny.json"], "overrides": {"max_epochs": 3}}}
    pretrainings: list = []
    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", _fake_bundle(pretrainings))
    runs: list = []

    def runner(bundle, overrides):
        runs.append(overrides)
        return {"auc": 0.5 + 0.1 * len(runs)}

    run_experiment(load_config(_write(tmp_path / "ablation.yaml", grid)), runner=runner, log=lambda _: None)
    assert len(pretrainings) == 3 and len(runs) == 4
    grid["pretrain"]["overrides"]["max_epochs"] = 4
    grid["methods"]["dira_lsgan"]["pretrain"]["max_epochs"] = 3  # its own setting keeps it as it was
    with pytest.raises(ValueError) as err:
        run_experiment(load_config(_write(tmp_path / "ablation.yaml", grid)), runner=runner, log=lambda _: None)
    message = str(err.value)
    assert message.startswith("methods 'dis', 'dira' were pretrained with other settings: "), message
    assert f"'dira' in {tmp_path / 'out' / 'pretrain' / 'dira'} (overrides.max_epochs changed)" in message
    assert "dira_lsgan" not in message and "delete those folders and their rows in results.csv" in message
    assert len(pretrainings) == 3 and len(runs) == 4
