"""The pretraining bundle's ``seed`` of the wrong kind is refused in one line before anything runs (session 25).

``python -m monai.bundle run ... --seed two`` passes text, ``--seed 1.5`` a float: text failed in MONAI's
``set_determinism`` inside its "Failed to evaluate ConfigExpression" traceback, 1.5 ran as seed 1 without a word.
``dira3d.utils.check_seed`` is now the first ``initialize`` step of ``train.json`` and ``multi_gpu_train.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dira3d.data.errors import DataError
from dira3d.utils import check_seed


@pytest.mark.parametrize(("value", "expected"), [
    ("two", "seed='two' is not a number; give a whole number >= 0, e.g. --seed 0"),
    (True, "seed=True is not a number"), (None, "seed=None is not a number"),
    (1.5, "seed=1.5 is not a whole number"), (float("nan"), "seed=nan is not a whole number"),
    (-1, "seed=-1 is negative")])
def test_check_seed_refuses_what_is_not_a_whole_number_at_least_0(value, expected):
    with pytest.raises(DataError) as err:
        check_seed(value)
    assert str(err.value) == expected if expected.endswith("0") else str(err.value).startswith(expected)


def test_check_seed_takes_whole_numbers_also_written_as_floats():
    assert [check_seed(v) for v in (0, 7, 2.0)] == [0, 7, 2]
    assert isinstance(check_seed(2.0), int)


@pytest.mark.parametrize("name", ["train.json", "multi_gpu_train.json"])
def test_the_pretraining_bundle_checks_the_seed_first(repo_root, name):
    config = json.loads((repo_root / "bundles" / "dira_pretrain" / "configs" / name).read_text())
    assert config["initialize"][0] == "$dira3d.utils.check_seed(@seed)"


def test_monai_bundle_run_refuses_a_text_seed_in_one_line_with_nothing_written(repo_root, tmp_path):
    folder = repo_root / "bundles" / "dira_pretrain"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(folder / "configs" / "train.json"),
           "--meta_file", str(folder / "configs" / "metadata.json"), "--bundle_root", str(folder),
           "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--seed", "two"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: seed='two' is not a number; give a whole number >= 0, e.g. --seed 0"], out[-3000:]
    assert "Traceback" not in out and "Failed to" not in out, out[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], out[-3000:]
