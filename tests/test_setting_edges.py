"""Edge cases of the task bundles' settings and outputs, refused in one line naming the setting (session 27).

- ``--bn_momentum abc`` (``python -m monai.bundle run``, or ``dira3d finetune --tiny --set bn_momentum=abc``: tiny.json
  sets it null, so ``check_overrides`` cannot tell its kind) failed at the first training step, after the data were
  cached, in MONAI's traceback (``batch_norm(): argument 'momentum' must be float, not str``); so did a text
  ``learning_rate`` or ``width`` under ``monai.bundle run`` (:func:`dira3d.utils.check_numbers`).
- ``roi_size=[16,16]`` for a 3D bundle failed while the data were cached with MONAI's "Sequence must have length 3,
  got 2.", naming no setting (:func:`dira3d.utils.check_sizes`).
- ``--output_path probs.csv`` of a classification bundle's ``inference.json`` wrote JSON into a file named ``.csv``
  (:func:`dira3d.evaluation.check_probability_path`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dira3d.data.errors import DataError
from dira3d.evaluation import InferenceBatch, ProbabilityWriter, check_probability_path
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D, bundle_path
from dira3d.utils import check_numbers, check_sizes

CLASSIFICATION = ("luna16_nodule_fpr", "pecad_embolism_fpr", "chestxray14_cls", "chexpert_cls")


@pytest.mark.parametrize(("settings", "expected"), [
    ({"bn_momentum": "abc"}, "bn_momentum='abc' is not a number; give --bn_momentum a number"),
    ({"learning_rate": True}, "learning_rate=True is not a number"),
    ({"learning_rate": None}, "learning_rate=None is not a number"),
    ({"width": [1.0]}, "width=[1.0] is not a number"),
    ({"learning_rate": math.nan}, "learning_rate=nan is not a finite number"),
    ({"width": math.inf}, "width=inf is not a finite number"),
])
def test_check_numbers_refuses_what_is_not_a_number_naming_it(settings, expected):
    with pytest.raises(DataError) as err:
        check_numbers(**settings)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_check_numbers_takes_numbers_and_null_where_allowed():
    assert check_numbers(learning_rate=1e-3, width=1) == {"learning_rate": 1e-3, "width": 1.0}
    assert check_numbers(or_null=True, bn_momentum=None) == {"bn_momentum": None}
    assert check_numbers(or_null=True, bn_momentum=0.1) == {"bn_momentum": 0.1}
    with pytest.raises(DataError, match=r"^bn_momentum='abc' is not a number; .*, or null$"):
        check_numbers(or_null=True, bn_momentum="abc")


@pytest.mark.parametrize(("dims", "value", "expected"), [
    (3, [16, 16], "roi_size=[16, 16] has 2 numbers, but the network is 3D; give 3 whole numbers >= 1"),
    (3, [16], "roi_size=[16] has 1 number, but the network is 3D"),
    (2, [64, 64, 64], "roi_size=[64, 64, 64] has 3 numbers, but the network is 2D; give 2 whole numbers >= 1"),
    (3, "abc", "roi_size='abc' is not a list of sizes; give 3 whole numbers"),
    (3, 32, "roi_size=32 is not a list of sizes"),
    (3, None, "roi_size=None is not a list of sizes"),
    (3, [16, 16, 8.5], "roi_size=[16, 16, 8.5] is not 3 whole numbers >= 1"),
    (3, [16, 16, 0], "roi_size=[16, 16, 0] is not 3 whole numbers >= 1"),
    (2, [64, "a"], "roi_size=[64, 'a'] is not 2 whole numbers >= 1"),
    (2, [64, True], "roi_size=[64, True] is not 2 whole numbers >= 1"),
])
def test_check_sizes_refuses_a_size_that_does_not_fit_the_network_naming_it(dims, value, expected):
    with pytest.raises(DataError) as err:
        check_sizes(dims, roi_size=value)
    assert str(err.value).startswith(expected), str(err.value)
    assert "one per axis of the" in str(err.value) and "\n" not in str(err.value)


def test_check_sizes_takes_one_whole_number_per_axis():
    assert check_sizes(3, roi_size=[16, 16, 8.0]) == {"roi_size": [16, 16, 8]}
    assert check_sizes(2, roi_size=(224, 224)) == {"roi_size": [224, 224]}


def _initialize(bundle: str, name: str) -> list[str]:
    return json.loads((bundle_path(bundle) / "configs" / name).read_text(encoding="ascii"))["initialize"]


@pytest.mark.parametrize("bundle", [*BUNDLES, *BUNDLES_2D])
def test_every_task_bundle_checks_its_number_and_size_settings_in_initialize(bundle):
    dims = 3 if bundle in BUNDLES else 2
    for name in ("train.json", "multi_gpu_train.json", "evaluate.json", "inference.json"):
        steps = _initialize(bundle, name)
        # multiple: the network's downsampling (8: the 3D U-Net encoder; 32: the 2D ResNets), since 2026-11-28
        assert f"$dira3d.utils.check_sizes({dims}, multiple={8 if dims == 3 else 32}, roi_size=@roi_size)" in steps, \
            (bundle, name)
        if name in ("train.json", "multi_gpu_train.json"):  # bn_momentum and learning_rate: check_ranges refuses text
            ranges = next(step for step in steps if step.startswith("$dira3d.utils.check_ranges("))
            assert "bn_momentum=(@bn_momentum, '[0, 1] or null')" in ranges, (bundle, name)
            assert "learning_rate=(@learning_rate, '[0, inf)')" in ranges, (bundle, name)
        else:
            assert "$dira3d.utils.check_numbers(or_null=True, bn_momentum=@bn_momentum)" in steps, (bundle, name)
        if dims == 3:
            assert "$dira3d.utils.check_numbers(width=@width)" in steps, (bundle, name)
        # before anything is written (check_output_settings creates the output folders)
        first_output = next(i for i, step in enumerate(steps) if "check_output_settings" in step)
        assert all(i < first_output for i, step in enumerate(steps)
                   if "check_numbers" in step or "check_sizes" in step or "check_ranges" in step)


@pytest.mark.parametrize("bundle", CLASSIFICATION)
def test_classification_inference_checks_the_probability_file_name_first(bundle):
    steps = _initialize(bundle, "inference.json")
    check = steps.index("$dira3d.evaluation.check_probability_path(@output_path)")
    assert check < next(i for i, step in enumerate(steps) if "check_output_settings" in step)


@pytest.mark.parametrize("name", ["probs.csv", "probs", "probs.json.txt", "probs.tsv"])
def test_the_probabilities_file_must_be_named_json(tmp_path, name):
    target = tmp_path / name
    for make in (lambda: check_probability_path(target), lambda: ProbabilityWriter(target, ["nodule"]),
                 lambda: InferenceBatch([{"image": "a.nii.gz"}], report_path=None, output_path=target)):
        with pytest.raises(DataError) as err:
            make()
        assert str(err.value).startswith(f"output_path={str(target)!r}: the probabilities are written as JSON, so "
                                          "the file name must end in .json; pass --output_path with a .json file"), \
            str(err.value)
    assert not target.exists()
    assert check_probability_path(tmp_path / "probs.JSON") == tmp_path / "probs.JSON"
    assert ProbabilityWriter(tmp_path / "p.json", ["nodule"]).output_path == tmp_path / "p.json"


def _bundle_run(tmp_path: Path, bundle: str, files: list[str], *options: str) -> subprocess.CompletedProcess:
    configs = bundle_path(bundle) / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", json.dumps([str(configs / name) for name in files]),
           "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(tmp_path / "run"), "--device", "cpu",
           "--datalist", str(tmp_path / "not_read.json"), *options]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), out[-3000:]
    assert "Traceback" not in out and "Failed to" not in out, out[-3000:]


COMMANDS = [
    (["train.json", "tiny.json"], ["--bn_momentum", "abc"], "error: bn_momentum='abc' is not a number"),
    (["train.json", "tiny.json"], ["--roi_size", "[16,16]"],
     "error: roi_size=[16, 16] has 2 numbers, but the network is 3D; give 3 whole numbers >= 1"),
    (["train.json", "evaluate.json", "tiny.json"], ["--width", "abc"], "error: width='abc' is not a number"),
]


@pytest.mark.parametrize(("files", "options", "expected"), COMMANDS, ids=[" ".join(o) for _, o, _ in COMMANDS])
def test_monai_bundle_run_refuses_them_in_one_line_before_anything_is_written(tmp_path, files, options, expected):
    proc = _bundle_run(tmp_path, "luna16_nodule_fpr", files, *options)
    _one_error_line(proc, expected)
    assert not (tmp_path / "run").exists()


def test_classification_inference_refuses_a_csv_output_before_anything_is_written(tmp_path):
    proc = _bundle_run(tmp_path, "luna16_nodule_fpr", ["inference.json"], "--image", str(tmp_path / "cube.nii.gz"),
                       "--output_path", str(tmp_path / "out" / "probs.csv"))
    _one_error_line(proc, f"error: output_path={str(tmp_path / 'out' / 'probs.csv')!r}: the probabilities are written "
                          "as JSON")
    assert not (tmp_path / "out").exists()


def test_dira3d_finetune_tiny_refuses_a_text_bn_momentum_in_one_line(tmp_path):
    """tiny.json sets bn_momentum null, so ``--set bn_momentum=abc`` passed check_overrides (a null default shows no
    kind) and failed at the first training step."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": 0, "case_id": "p0"}]}))
    cmd = [sys.executable, "-m", "dira3d", "finetune", "--bundle", "luna16_nodule_fpr", "--datalist", str(datalist),
           "--tiny", "--output-dir", str(tmp_path / "ft"), "--set", "bn_momentum=abc"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("dira3d finetune: error: bn_momentum='abc' is not a number"), out[-3000:]
