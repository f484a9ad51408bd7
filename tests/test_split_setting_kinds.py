"""A task bundle's ``fold``, ``seed``, ``label_fraction`` and ``holdout`` of the wrong kind are refused in one line.

``python -m monai.bundle run`` (python-fire) passes ``--fold 2`` as the number 2, but ``--fold 1.5`` as a float,
``--fold two`` / ``--fold true`` as text and ``--fold True`` as a bool. Such a fold failed in a bare ``int()`` deep in
``load_split`` (MONAI's "Failed to evaluate ConfigExpression" traceback), or was cut to fold 1 (1.5) without a word; a
text seed failed in MONAI's ``set_determinism`` in ``initialize``, a seed of 1.5 drew with seed 1, and a label fraction
of True kept every label. :func:`dira3d.evaluation.check_split_settings` (the first ``initialize`` step of the task
bundles' train.json, multi_gpu_train.json and evaluate.json, and the start of ``load_split``) refuses them naming the
setting; a whole number written as a float (2.0, as a JSON or YAML file may give it) is that number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dira3d.data.errors import DataError
from dira3d.evaluation import check_split_settings, load_split
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D, bundle_path
from test_bundles_finetune import make_classification

REFUSED = [
    ("fold", 1.5, "fold=1.5 is not a whole number; give one of the datalist's fold numbers"),
    ("fold", "two", "fold='two' is not a number; give one of the datalist's fold numbers"),
    ("fold", "true", "fold='true' is not a number"),
    ("fold", True, "fold=True is not a number"),
    ("fold", "null", "or null to test on its 'test' list (--fold None on the command line"),
    ("fold", float("inf"), "fold=inf is not a whole number"),
    # load_split's seed draws the split: the task bundles pass their split_seed, and the message says so
    ("seed", 1.5, "seed=1.5 of the label subset and early-stopping holdout (a task bundle's split_seed, by default its "
                  "seed) must be a whole number >= 0"),
    ("seed", "two", "seed='two' of the label subset and early-stopping holdout"),
    ("seed", None, "seed=None of the label subset and early-stopping holdout"),
    ("seed", -1, "seed=-1 of the label subset and early-stopping holdout"),
    ("label_fraction", "0.5", "label_fraction='0.5' is not a number; give the share in (0, 1]"),
    ("label_fraction", True, "label_fraction=True is not a number"),
    ("holdout", False, "holdout=False is not a number; give the share in [0, 1)"),
]


@pytest.fixture(scope="module")
def folds_datalist(tmp_path_factory) -> Path:
    """A PE-CAD-like datalist: 24 candidates of 12 patients in three folds, all under "training"."""
    return make_classification(tmp_path_factory.mktemp("data"), "pecad_datalist.json", (8, 8, 4), folds=True)


@pytest.mark.parametrize(("name", "value", "expected"), REFUSED, ids=[f"{n}={v!r}" for n, v, _ in REFUSED])
def test_load_split_refuses_a_setting_of_the_wrong_kind_naming_it(folds_datalist, name, value, expected):
    settings = {"fold": 1, name: value}
    for split in ("train", "holdout", "test"):
        with pytest.raises(DataError) as err:
            load_split(folds_datalist, split, **settings)
        assert expected in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


def test_a_whole_number_written_as_a_float_is_that_number(folds_datalist):
    for split in ("train", "holdout", "test"):
        assert load_split(folds_datalist, split, fold=2.0, seed=3.0) == load_split(folds_datalist, split, fold=2, seed=3)
    assert check_split_settings(label_fraction=1, seed=2.0, holdout="validation", fold=-1.0) == {
        "label_fraction": 1.0, "seed": 2, "holdout": "validation", "fold": -1}
    assert check_split_settings() == {"label_fraction": 1.0, "seed": 0, "holdout": 0.1, "fold": None}
    # the range checks stay where the settings are used, with their messages
    with pytest.raises(DataError, match=r"fold=7 is not in datalist"):
        load_split(folds_datalist, "test", fold=7.0)
    with pytest.raises(DataError, match=r"label_fraction=1.5 is outside \(0, 1\]"):
        load_split(folds_datalist, "train", fold=1, label_fraction=1.5)


def test_every_task_bundle_checks_the_split_settings_first_in_initialize(repo_root):
    step = ("$dira3d.evaluation.check_split_settings(label_fraction=@label_fraction, seed=@seed, holdout=@holdout, "
            "fold=@fold)")
    for bundle in (*BUNDLES, *BUNDLES_2D):
        for name in ("train.json", "multi_gpu_train.json", "evaluate.json"):
            config = json.loads((repo_root / "bundles" / bundle / "configs" / name).read_text(encoding="ascii"))
            assert config["initialize"][0] == step, (bundle, name)


def _run(tmp_path: Path, datalist: Path, files: list[str], *options: str) -> subprocess.CompletedProcess:
    configs = bundle_path("pecad_embolism_fpr") / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", json.dumps([str(configs / name) for name in files]),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(tmp_path / "run"), "--device", "cpu", "--datalist", str(datalist), *options]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


COMMANDS = [
    (["train.json", "tiny.json"], ["--fold", "1.5"], "error: fold=1.5 is not a whole number"),
    (["train.json", "evaluate.json", "tiny.json"], ["--fold", "two"], "error: fold='two' is not a number"),
    (["train.json", "evaluate.json", "tiny.json"], ["--fold", "true"], "error: fold='true' is not a number"),
    (["train.json", "tiny.json"], ["--seed", "two"], "error: seed='two' is not a number"),
]


@pytest.mark.parametrize(("files", "options", "expected"), COMMANDS, ids=[" ".join(o) for _, o, _ in COMMANDS])
def test_monai_bundle_run_refuses_them_in_one_line_before_anything_is_written(tmp_path, folds_datalist, files, options,
                                                                               expected):
    proc = _run(tmp_path, folds_datalist, files, *options)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), out[-3000:]
    assert "Traceback" not in out and "Failed to" not in out, out[-3000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.*")), out[-3000:]


@pytest.mark.parametrize(("value", "expected"), [
    (1.5, "seed=1.5 is not a whole number; give a whole number >= 0"), ("two", "seed='two' is not a number"),
    (None, "seed=None is not a number"), (True, "seed=True is not a number"), (-1, "seed=-1 is negative")])
def test_the_bundles_first_check_names_the_run_seed(value, expected):
    """The task bundles' first initialize step checks the run's seed (set_determinism's) before MONAI uses it."""
    with pytest.raises(DataError) as err:
        check_split_settings(seed=value)
    assert str(err.value).startswith(expected), str(err.value)
