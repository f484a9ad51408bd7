"""A batch inference (``--datalist``) under ``torchrun`` splits its inputs over the processes (session 24).

It was refused in one line (every process ran every input and wrote the same files). Now rank r of W runs the inputs
r, r + W, ... on its own device, writes their predictions only, and rank 0 writes the one report of every input once
every rank's share has ended (:mod:`dira3d.evaluation.batch_ranks`). Real 2-rank gloo ``torchrun`` runs on CPU, with
the tiny untrained network of ``tests/test_inference_inputs.py``; a write is made to fail through a
``sitecustomize.py`` that the ranks import (the way ``tests/test_cli_exit.py`` puts a fault into a subprocess).
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_torchrun_command
from dira3d.evaluation.finetune import bundle_path
from test_distributed import free_port
from test_inference_batch import _report, _run, _scans
from test_inference_inputs import SEG3D, _models

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a hung run is killed through /proc (Linux)")]

BUNDLE = "lits_liver_seg"
ROOT = Path(__file__).resolve().parents[1]

# the ranks (RANK set; not torchrun's own process) fail writing the mask of the input FAIL_WRITE names, or every mask
# of rank N with FAIL_WRITE=rankN, with an I/O error (an input's own failure: the batch goes on)
SITECUSTOMIZE = textwrap.dedent('''
    import errno, os
    if os.environ.get("FAIL_WRITE") and "RANK" in os.environ:
        from dira3d.evaluation import outputs

        saved = outputs._GuardedSaveImage.__call__

        def call(self, img, meta_data=None, filename=None):
            name = os.path.basename(str(img.meta.get("filename_or_obj", "")))
            if os.environ["FAIL_WRITE"] in (name, "rank" + os.environ["RANK"]):
                raise outputs.write_error(name, OSError(errno.EIO, os.strerror(errno.EIO)))
            return saved(self, img, meta_data, filename)

        outputs._GuardedSaveImage.__call__ = call
''')


def _torchrun(tmp_path: Path, scans: list[Path], out: Path, fail: str = ""):
    """``torchrun --nproc_per_node=2 -m monai.bundle run`` of the bundle's inference.json on ``scans`` into ``out``."""
    models, _, _ = _models(tmp_path, BUNDLE)
    datalist = tmp_path / "scans.json"
    datalist.write_text(json.dumps([{"image": str(p)} for p in scans]))
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    configs = bundle_path(BUNDLE) / "configs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(configs.parent), "--ckpt_dir", str(models), "--datalist", str(datalist),
           "--output_dir", str(out), *[a for k, v in SEG3D.items() for a in (f"--{k}", json.dumps(v))]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAIL_WRITE": fail, "DIRA3D_ALL_TRACEBACKS": "",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), str(ROOT / "tests")])}
    proc = run_torchrun_command(cmd, cwd=tmp_path, env=env, timeout=150)
    return proc, proc.stdout + proc.stderr


def _voxels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_two_ranks_split_a_batch_write_what_one_process_writes_and_a_rerun_reports_a_failed_input(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    scans = _scans(tmp_path, names)
    for i, scan in enumerate(scans):  # five different scans (_scans writes the same volume under each name)
        image = nib.load(str(scan))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj) + 50.0 * i, image.affine), str(scan))
    one = tmp_path / "one"
    assert _run(BUNDLE, tmp_path, [{"image": str(p)} for p in scans], one, **SEG3D) == [0]

    out = tmp_path / "two"
    proc, log = _torchrun(tmp_path, scans, out)
    assert proc.returncode == 0, log[-3000:]
    masks = [f"{name}_seg.nii.gz" for name in names]
    assert sorted(p.name for p in out.iterdir()) == masks + ["inference_report.json"]
    for mask in masks:
        (ours, affine), (theirs, their_affine) = _voxels(out / mask), _voxels(one / mask)
        assert np.array_equal(ours, theirs) and np.array_equal(affine, their_affine), mask
    # each input run once, by one rank: rank 0 took a, c, e and rank 1 b, d (one "writing:" line per mask)
    assert sorted(re.findall(r"writing: \S+/(\w)_seg\.nii\.gz", log)) == names, log[-3000:]
    report = _report(out)
    assert report["summary"] == {"inputs": 5, "written": 5, "left out": 0, "failed": 0, "not run": 0}
    assert [(r["image"], r["status"], r["output"]) for r in report["inputs"]] == [
        (str(scan), "written", str(out / mask)) for scan, mask in zip(scans, masks)]
    assert report["exit_status"] == 0 and report["stopped"] is None
    assert log.count("inference: 5 of 5 inputs written; report:") == 1, log[-3000:]  # rank 0's alone

    # the same command again, c's write failing: its own failure, the others written again (dira3d's own files are
    # replaced, as in one process); the ranks end with 3 (torchrun's table names the first to exit with it, and may
    # have ended the other with SIGTERM by then: after the report was written), and the first run's report is replaced
    proc, log = _torchrun(tmp_path, scans, out, fail="c.nii.gz")
    assert proc.returncode == 1 and re.search(r"Root Cause.*?exitcode\s+: 3 \(pid", log, re.S), log[-3000:]
    report = _report(out)
    assert [r["status"] for r in report["inputs"]] == ["written", "written", "failed", "written", "written"]
    assert report["summary"]["inputs"] == 5 and report["exit_status"] == 3 and report["stopped"] is None
    assert "Input/output error" in report["inputs"][2]["reason"]
    assert log.count("inference: 4 of 5 inputs written (1 failed); report:") == 1, log[-3000:]
    assert log.count(f"failed: {scans[2]}: OSError: [Errno 5] could not write the prediction c.nii.gz") == 2, log[-3000:]


def test_a_rank_that_stops_after_its_first_failures_does_not_hang_the_others(tmp_path):
    """Rank 1 fails every write: after 3 it stops its share (the 4th not run) while rank 0 writes all of its own; the
    ranks meet only at the end, so neither waits for the other in the middle, and the report lists every input."""
    scans = _scans(tmp_path, [f"s{i}" for i in range(8)])
    out = tmp_path / "out"
    proc, log = _torchrun(tmp_path, scans, out, fail="rank1")
    assert proc.returncode != 0, log[-3000:]
    assert re.search(r"\[rank1\]: RepeatedFailureError: the batch stops: 3 inputs in a row failed", log), log[-3000:]
    report = _report(out)
    assert [r["status"] for r in report["inputs"]] == ["written", "failed"] * 3 + ["written", "not run"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"s{i}_seg.nii.gz" for i in (0, 2, 4, 6)]
                                                           + ["inference_report.json"])
    assert report["exit_status"] is None and report["stopped"].startswith("rank 1: RepeatedFailureError: the batch stops")
    assert report["inputs"][7]["reason"].startswith("the batch stopped before it: RepeatedFailureError:")
    assert log.count("inference: 4 of 8 inputs written (3 failed, 1 not run); report:") == 1, log[-3000:]


# --- without torchrun: the split, the merge of the ranks' rows, what is refused ---------------------------------------

def test_rank_r_of_w_takes_the_inputs_r_r_plus_w_and_the_shares_cover_the_batch_once():
    from dira3d.evaluation.batch_ranks import rank_share

    assert [rank_share(5, r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    shares = [rank_share(10, r, 8) for r in range(8)]
    assert shares[0] == [0, 8] and shares[1] == [1, 9] and shares[7] == [7]
    assert sorted(i for share in shares for i in share) == list(range(10))
    assert rank_share(3, 5, 8) == []  # more ranks than inputs: a rank with none runs nothing


def _gathered(monkeypatch, records=None, error=None):
    """``gather_rows`` with the ranks' ``records`` (what all_gather_object would deliver), or ``error`` raised by it."""
    import torch.distributed as dist

    def all_gather_object(gathered, mine):
        if error is not None:
            raise error
        gathered[:] = records

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(records or [None, None]))


def test_the_ranks_rows_are_merged_in_datalist_order_and_a_stop_names_its_rank(monkeypatch):
    from dira3d.evaluation.batch_ranks import gather_rows

    rows = [{"image": f"{c}.nii.gz", "status": "not run", "reason": "?"} for c in "abcd"]
    mine = {0: {"image": "a.nii.gz", "status": "written"}, 2: {"image": "c.nii.gz", "status": "written"}}
    theirs = {1: {"image": "b.nii.gz", "status": "failed", "reason": "E"}, 3: {"image": "d.nii.gz", "status": "not run"}}
    _gathered(monkeypatch, [(mine, None, True), (theirs, "RepeatedFailureError: x", False)])
    merged, stopped, completed = gather_rows(rows, [0, 2], None, True, 0)
    assert [r["status"] for r in merged] == ["written", "failed", "written", "not run"]
    assert stopped == "rank 1: RepeatedFailureError: x" and completed is False
    # every rank stopped for the same reason (SIGTERM to all): the reason once
    _gathered(monkeypatch, [(mine, "stopped by SIGTERM", False), (theirs, "stopped by SIGTERM", False)])
    assert gather_rows(rows, [0, 2], "stopped by SIGTERM", False, 0)[1] == "stopped by SIGTERM"
    _gathered(monkeypatch, [(mine, None, True), (theirs, None, True)])
    assert gather_rows(rows, [0, 2], None, True, 0)[1:] == (None, True)


def test_a_rank_gone_before_the_gather_leaves_the_others_reporting_their_own_inputs(monkeypatch, caplog):
    import logging

    from dira3d.evaluation.batch_ranks import gather_rows

    rows = [{"image": "a.nii.gz", "status": "written"}, {"image": "b.nii.gz", "status": "not run", "reason": "?"}]
    _gathered(monkeypatch, error=RuntimeError("Connection closed by peer"))
    with caplog.at_level(logging.ERROR, logger="dira3d.evaluation.batch_ranks"):
        merged, stopped, completed = gather_rows(rows, [0], None, True, 0)
    assert merged[0] == rows[0] and merged[1]["status"] == "not run" and completed is False
    assert stopped == "the ranks' records could not be gathered: RuntimeError: Connection closed by peer"
    assert merged[1]["reason"] == f"the batch stopped before it: {stopped}"
    assert [r.getMessage() for r in caplog.records] == [
        f"rank 0: {stopped}; the report holds this rank's inputs only (see each rank's log)"]


@pytest.mark.parametrize("world", ["1", "", None])
def test_one_process_forms_no_process_group_and_runs_every_input(monkeypatch, world):
    import torch.distributed as dist

    from dira3d.evaluation import InferenceBatch

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    batch = InferenceBatch([{"image": "a.nii.gz"}, {"image": "b.nii.gz"}, {"image": "c.nii.gz"}])
    assert (batch.rank, batch.world) == (0, 1) and not dist.is_initialized()


@pytest.mark.parametrize("world", ["2", "8"])
def test_under_torchrun_one_output_file_for_every_input_is_refused_in_one_line(monkeypatch, world):
    """The classification bundles write every input's probabilities into one _prob.json, which the ranks cannot share:
    refused before any input is read or a process group is formed, saying what to do."""
    import torch.distributed as dist

    from dira3d.evaluation import InferenceBatch

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(RuntimeError) as raised:
        InferenceBatch([{"image": "a.png"}, {"image": "b.png"}], output_path="/x/prob.json")
    message = str(raised.value)
    assert "\n" not in message and f"into one file (/x/prob.json), which the {world} processes of torchrun" in message
    assert "without torchrun" in message and "own --output_path" in message and not dist.is_initialized()
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match=rf"^WORLD_SIZE={world} but no MASTER_ADDR in the environment: run the batch "
                                           "under torchrun, or unset WORLD_SIZE"):
        InferenceBatch([{"image": "a.nii.gz"}, {"image": "b.nii.gz"}], output_dir="/x")


def test_a_share_of_one_input_is_checked_as_a_batch_is(tmp_path):
    """A rank's share may be one input: it is checked and left out as in a batch, not run as a single --image is."""
    from monai.transforms import Compose, EnsureChannelFirstd

    from dira3d.evaluation import CheckInferenceInputd, screen_inputs
    from dira3d.engines.inputs import LoadVolumed
    from test_inference_inputs import _nifti

    check = Compose([LoadVolumed(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
                     CheckInferenceInputd(keys="image", spatial_dims=3)])
    entry = {"image": str(_nifti(tmp_path / "mask.nii.gz", np.random.default_rng(0).random((16, 16, 8)) > 0.5, np.uint8))}
    assert screen_inputs([entry], check) == [entry]  # a single input: its error is the answer, when it runs
    left_out: dict = {}
    with pytest.raises(Exception, match="none of the 1 inputs can be used"):
        screen_inputs([entry], check, left_out=left_out, several=True)
    assert list(left_out) == [0] and "has only 2 distinct values" in left_out[0]
