"""A bad input given to ``python -m monai.bundle run ... inference.json`` ends the run with one line naming the file.

The input check (``CheckInferenceInputd``) raised its clear error inside the evaluator's data loader, or, for a batch
where no input can be used, inside the evaluation of ``dataset.data``: MONAI's ``Failed to evaluate ConfigExpression``
wrapped it, ``StatsHandler`` logged its traceback too, and the user got about 244 lines with the error three times,
ending with MONAI's line. ``InferenceBatch.run`` now prints the error once, as the last line, and exits 1.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from dira3d.evaluation import build_task_network
from dira3d.utils import atomic_save

BUNDLE = "lits_liver_seg"


@pytest.fixture
def model(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        atomic_save(build_task_network("segmentation", 3, 1, 1, 0.125, "").state_dict(), tmp_path / "models" / "model.pt")
    return tmp_path / "models"


def _prepared(path):
    """A volume already scaled to [0, 1] by `dira3d prepare`: refused by a bundle that takes the raw CT."""
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((24, 24, 12)).astype(np.float32), np.eye(4)), str(path))
    return path


def _run(repo_root, model, out, *settings, rank=None):
    configs = repo_root / "bundles" / BUNDLE / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(repo_root / "bundles" / BUNDLE), "--ckpt_dir", str(model), "--width", "0.125",
           "--roi_size", "[16,16,8]", "--device", "cpu", "--output_dir", str(out), *settings]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if rank is not None:  # torchrun's RANK, as a rank has it before InferenceBatch joins the process group
        env.update(RANK=rank, DIRA3D_ALL_TRACEBACKS="")
    return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)


def test_a_bad_image_ends_the_run_with_one_line_naming_it(repo_root, model, tmp_path):
    image = _prepared(tmp_path / "case_prepared.nii.gz")
    proc = _run(repo_root, model, tmp_path / "out", "--image", str(image))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {image}: ") and "already prepared by `dira3d prepare`" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "Failed to evaluate" not in proc.stderr
    assert (proc.stderr + proc.stdout).count("already prepared by") == 1  # said once
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_batch_of_bad_inputs_ends_with_one_error_listing_them(repo_root, model, tmp_path):
    images = [_prepared(tmp_path / f"{name}_prepared.nii.gz") for name in ("a", "b")]
    datalist = "[" + ", ".join(f"{{'image': '{image}'}}" for image in images) + "]"
    proc = _run(repo_root, model, tmp_path / "out", "--datalist", datalist)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-3] == "error: none of the 2 inputs can be used:", proc.stderr[-3000:]
    assert [line.split(": ")[0].strip() for line in lines[-2:]] == [str(image) for image in images]
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stderr.count("none of the 2 inputs") == 1
    assert (tmp_path / "out" / "inference_report.json").is_file()  # the report lists them, as before


def test_a_missing_image_is_one_line_without_a_line_per_monai_reader(repo_root, model, tmp_path):
    # LoadImage tried each of its six readers on the missing file and logged "<Reader>: unable to load" (and a blank
    # line) for each before our error; the file's existence is checked before it
    missing = tmp_path / "no_such_scan.nii.gz"
    proc = _run(repo_root, model, tmp_path / "out", "--image", str(missing))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {missing}: does not exist; check the path", proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "unable to load" not in output and "LoadImage" not in output, output[-3000:]
    assert output.count("does not exist") == 1 and "Traceback" not in output


def test_an_output_that_would_replace_a_users_file_is_one_line_and_the_file_is_kept(repo_root, model, tmp_path):
    """The refusal to replace a file dira3d did not write (a FileExistsError naming it) ended in MONAI's wrapped
    traceback (`RuntimeError: Failed to evaluate ConfigExpression`) under plain monai.bundle run: now one line."""
    image = tmp_path / "scan.nii.gz"
    hu = np.random.default_rng(2).integers(-1000, 1000, (24, 24, 12)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 5.0, 1.0])), str(image))
    target = tmp_path / "out" / "scan_seg.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"the user's own file")
    proc = _run(repo_root, model, tmp_path / "out", "--image", str(image))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {target} exists and is not a prediction written by dira3d"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "Failed to evaluate" not in proc.stderr
    assert target.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("files", [["gone.nii.gz"], ["here.nii.gz", "gone.nii.gz"]])  # a list: one file per channel
def test_loading_a_missing_file_logs_nothing_before_its_error(files, tmp_path, caplog):
    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import LoadVolumed
    from dira3d.evaluation import SimpleITKReader

    _prepared(tmp_path / "here.nii.gz")
    paths = [str(tmp_path / name) for name in files]
    # with a reader named, as the 3D bundles' inference.json name SimpleITKReader, LoadImage tries every reader in turn
    # and logs each failure (its readers log what is not installed as they are built: before the block)
    load = LoadVolumed(keys="image", reader=SimpleITKReader(), image_only=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(DataError) as raised:
        load({"image": paths[0] if len(paths) == 1 else paths})
    assert str(raised.value) == f"{tmp_path / 'gone.nii.gz'}: does not exist; check the path"
    # (MONAI's note that nvImageCodec is not installed may come here too: not about the file)
    assert [r.getMessage() for r in caplog.records if r.name == "LoadImage" or "gone.nii.gz" in r.getMessage()] == []


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_a_rank_other_than_0_says_an_error_in_one_line(rank, repo_root, model, tmp_path):
    """Found in session 22: `torchrun ... -m monai.bundle run --config_file inference.json` printed every rank's traceback
    of an error that is not a bad input's (a bad setting here); rank 0 keeps it in full, the others say it in one line
    (inference.json's initialize calls dira3d.engines.distributed.brief_errors_on_other_ranks, as pretraining does)."""
    images = [_prepared(tmp_path / f"{name}.nii.gz") for name in ("a", "b")]
    datalist = "[" + ", ".join(f"{{'image': '{image}'}}" for image in images) + "]"
    proc = _run(repo_root, model, tmp_path / "out", "--datalist", datalist, "--inference_batch#repeated_failures",
                "three", rank=rank)
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = "ValueError: repeated_failures='three': pass the number of inputs failing the same way"
    if rank == "0":
        assert "Traceback" in proc.stderr and said in proc.stderr, proc.stderr[-3000:]
        return
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"[rank1]: {said}") and "DIRA3D_ALL_TRACEBACKS=1 prints it" in lines[-1], lines[-3:]
    assert proc.stderr.count("repeated_failures='three'") == 1, proc.stderr[-3000:]


# --- models/preprocessing.json beside the model: garbled, or of the wrong form ----------------------------------

@pytest.mark.parametrize("content, problem", [
    ("{not json", "the model's preprocessing record {} is not valid JSON (Expecting property name"),
    ('{"spacing": "1.0"}', "{}: spacing '1.0' is not null or three positive voxel sizes in mm"),
    ('{"window": "lung", "spacing": [1, 1, 2]}', "{}: window 'lung' is not two numbers"),
])
def test_a_bad_preprocessing_json_ends_the_run_with_one_line_naming_it(content, problem, repo_root, model, tmp_path):
    # it is read while MONAI evaluates the config ($dira3d.evaluation.trained_spacing(@ckpt_dir), ...): its error came
    # wrapped in "Failed to evaluate ConfigExpression", some 60 lines of chained tracebacks
    (model / "preprocessing.json").write_text(content)
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 300, (24, 24, 12)).astype(np.float32), np.eye(4)), str(image))
    proc = _run(repo_root, model, tmp_path / "out", "--image", str(image))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: " + problem.format(model / "preprocessing.json")), proc.stderr[-3000:]
    assert "fine-tune again" in last and "delete it" in last
    assert "Traceback" not in proc.stderr + proc.stdout and "Failed to evaluate" not in proc.stderr
    assert (proc.stderr + proc.stdout).count("preprocessing.json") == 1


def test_other_programs_keep_the_traceback_of_such_an_error(tmp_path):
    # the one-line hook is for `python -m monai.bundle` only: a script of one's own that lets it out sees where
    script = ("import dira3d\nfrom dira3d.data.errors import DataError\n"
              "raise RuntimeError('Failed to evaluate') from DataError('x.json', 'garbled')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: Failed to evaluate" in proc.stderr
    assert "error: x.json" not in proc.stderr
