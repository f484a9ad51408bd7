"""A bundle run refused under plain ``python -m monai.bundle run`` leaves none of the output folders it created behind.

Every bundle's ``initialize`` creates its output folders (``check_output_settings``: ``models/`` and ``eval/`` under
``--bundle_root``) before its later checks and its run steps: a refusal after that (``--early_stop_patience -3`` of the
pretraining bundle, a missing datalist of any bundle) left them, empty, behind; only the ``dira3d`` commands removed
theirs (``removed_if_failed_empty``). A folder that existed before, or one that holds anything, stays as it was.

The pretraining bundle's ``--early_stop_patience -3`` also printed a 53-line traceback, not one ``error:`` line as its
other settings do; its other settings that MONAI's traceback reported (``validation``, ``val_interval``, ``pair``,
``amp``, ``on_nonfinite``, ``shuffle_bn``, ``stages``, ``dis_hidden``, ``proj_dim``, ``compile``, a ``spatial_dims``
other than 2 or 3) are pinned in-process below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dira3d.data.errors import DataError
from dira3d.utils.atomic import check_output_settings, remove_created_empty_folders
from dira3d.utils.folder_lock import LOCK_NAME

# a 3D segmentation, a 3D classification and a 2D bundle (a missing datalist: refused in the first run step), and the
# pretraining bundle (a bad early_stop_patience: refused in initialize, after the output folders were created)
CASES = {
    "lits_liver_seg": ["--datalist", "{tmp}/missing_datalist.json"],
    "luna16_nodule_fpr": ["--datalist", "{tmp}/missing_datalist.json"],
    "montgomery_lung_seg": ["--datalist", "{tmp}/missing_datalist.json"],
    "dira_pretrain": ["--early_stop_patience", "-3"],
}


def _monai_bundle_run(bundle: str, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    configs = Path(__file__).parent.parent / "bundles" / bundle / "configs"
    files = [str(configs / "train.json"), str(configs / "tiny.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files),
           "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(tmp_path / "root"), "--device", "cpu",
           *(option.format(tmp=tmp_path) for option in options)]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_a_refused_bundle_run_leaves_no_empty_folder_it_created(bundle, tmp_path):
    had = tmp_path / "had"  # the user's folder, with a file: untouched
    had.mkdir()
    (had / "notes.txt").write_text("mine")
    new = tmp_path / "new" / "deeper" / "models"  # created by the run with its parents: all removed again
    proc = _monai_bundle_run(bundle, tmp_path, *CASES[bundle], "--ckpt_dir", str(new), "--output_dir", str(had))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    expected = "early_stop_patience=-3 must be a whole number >= 1" if bundle == "dira_pretrain" else "missing_datalist"
    assert expected in errors[0], errors
    assert not (tmp_path / "new").exists(), sorted(map(str, (tmp_path / "new").rglob("*")))
    assert sorted(p.name for p in had.iterdir()) == ["notes.txt"] and (had / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "root").exists()  # bundle_root itself: never created


def test_remove_created_empty_folders_removes_only_what_check_output_settings_made_and_left_empty(tmp_path):
    existed = tmp_path / "existed"  # the user's empty folder: stays
    existed.mkdir()
    written = tmp_path / "written"  # created, then written to: stays
    locked = tmp_path / "parent" / "locked"  # created with its parent; only a released lock file in it: both go
    check_output_settings(a_dir=existed, b_dir=written, report_path=locked / "report.csv")
    assert written.is_dir() and locked.is_dir()
    (written / "model.pt").write_bytes(b"weights")
    (locked / LOCK_NAME).write_text("process 1")
    removed = remove_created_empty_folders()  # (and those an earlier test of this process left empty)
    assert {locked.absolute(), locked.parent.absolute()} <= set(removed)
    assert not {existed.absolute(), written.absolute(), tmp_path.absolute()} & set(removed)
    assert existed.is_dir() and (written / "model.pt").read_bytes() == b"weights" and not locked.parent.exists()
    assert remove_created_empty_folders() == []  # each folder once


def test_a_folder_that_holds_a_file_keeps_its_created_parents(tmp_path):
    kept, empty = tmp_path / "run" / "models", tmp_path / "run" / "eval"
    check_output_settings(ckpt_dir=kept, output_dir=empty)
    (kept / "last.pt").write_bytes(b"checkpoint")
    removed = remove_created_empty_folders()
    assert empty.absolute() in removed and not {kept.absolute(), kept.parent.absolute()} & set(removed)
    assert (kept / "last.pt").is_file() and not empty.exists()


# ---------------------------------------------------------------- the pretraining bundle's other settings

def _early_stop(value):
    from dira3d.engines import check_early_stop_patience

    return check_early_stop_patience(value)


def _stages(value):
    from dira3d.engines.stages import StageSchedule

    return StageSchedule(value)


def _dis_head(hidden, proj_dim=128, dis_mode="visual_words"):
    from dira3d.engines import build_dis_head

    return build_dis_head(dis_mode, 3, 8, num_classes=2, hidden=hidden, proj_dim=proj_dim)


def _evaluator_interval(value):
    from dira3d.engines import DiRAEvaluator

    return DiRAEvaluator("cpu", [], interval=value)


def _pair(value):
    from dira3d.engines import RandPatchPaird

    return RandPatchPaird("image", [16, 16, 8], pair=value)


def _spatial_dims(value):
    from dira3d.engines import RandPatchPaird

    return RandPatchPaird("image", [16, 16, 8], spatial_dims=value)


def _amp(value):
    import torch

    from dira3d.engines.optim import autocast_context

    return autocast_context(value, torch.device("cpu"))


def _on_nonfinite(value):
    from dira3d.engines.faults import NonFiniteGuard

    return NonFiniteGuard(value)


def _shuffle_bn(value):
    from dira3d.engines.shuffle_bn import check_shuffle_bn

    return check_shuffle_bn(value, "visual_words")


def _compile(value):
    from dira3d.engines.performance import compile_modules

    return compile_modules({}, backend=value)


def _validation(value):
    from dira3d.engines import check_early_stop_patience

    return check_early_stop_patience(None, validation=value)


@pytest.mark.parametrize("call, value, expected", [
    (_early_stop, -3, "early_stop_patience=-3 must be a whole number >= 1"),
    (_early_stop, float("nan"), "early_stop_patience=nan must be a whole number >= 1"),  # int(nan): a bare ValueError
    (_early_stop, float("inf"), "early_stop_patience=inf must be a whole number >= 1"),  # int(inf): an OverflowError
    (_validation, "maybe", "validation='maybe' is not a boolean"),
    (_evaluator_interval, 0, "val_interval=0: validate every N epochs needs a whole number N >= 1"),
    (_pair, "bogus", "pair='bogus' is not supported"),
    (_spatial_dims, 4, "spatial_dims=4 is not supported"),
    (_amp, "bogus", "amp='bogus' is not supported"),
    (_on_nonfinite, "bogus", "on_nonfinite='bogus' is not supported"),
    (_shuffle_bn, "maybe", "shuffle_bn='maybe' must be true, false or null"),
    (_shuffle_bn, True, "shuffle_bn=True applies to dis_mode='moco' only"),
    (_stages, [], "stages: the list is empty"),
    (_stages, [{"name": "a", "losses": ["x"]}], r"stages\[0\] \(a\): unknown loss term"),
    (_dis_head, 0, "dis_hidden=0: the width of a layer of the visual_words head must be a whole number >= 1"),
    (lambda value: _dis_head(1024, value, "barlow"), 0, "proj_dim=0: the width of a layer of the barlow head"),
    (_compile, "maybe", r"compile backend 'maybe' \(the bundles' compile setting\) is not supported"),
])
def test_pretraining_settings_are_refused_as_data_errors(call, value, expected):
    """A DataError is what the bundle error hook prints as one ``error:`` line under ``python -m monai.bundle run``
    (``dira3d.utils.bundle_errors.user_error_in``); a plain ValueError kept MONAI's traceback of 50 to 170 lines."""
    with pytest.raises(DataError, match=expected):
        call(value)
