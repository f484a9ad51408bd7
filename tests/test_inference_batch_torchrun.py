"""A batch inference (``--datalist``) under ``torchrun`` splits its inputs over the processes (session 24).

It was refused in one line (every process ran every input and wrote the same files). Now rank r of W runs the inputs
r, r + W, ... on its own device, writes their predictions only, and rank 0 writes the one report of every input once
every rank's share has ended (:mod:`dira3d.evaluation.batch_ranks`). The classification bundles, which write every
input's probabilities into one file, were still refused: now each rank's rows travel with its report's rows and rank 0
writes that one file as one process does. Real 2-rank gloo ``torchrun`` runs on CPU, with the tiny untrained network
of ``tests/test_inference_inputs.py``; a write or a model run is made to fail through a ``sitecustomize.py`` that the
ranks import (the way ``tests/test_cli_exit.py`` puts a fault into a subprocess).
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
from dira3d.evaluation.outputs import is_own_prediction
from test_inference_inputs import CLS3D, SEG3D, _models, _nifti

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a hung run is killed through /proc (Linux)")]

BUNDLE = "lits_liver_seg"
ROOT = Path(__file__).resolve().parents[1]

# the ranks (RANK set; not torchrun's own process) fail writing the mask of the input FAIL_WRITE names, or every mask
# of rank N with FAIL_WRITE=rankN, with an I/O error (an input's own failure: the batch goes on); the model run on the
# input FAIL_MODEL names fails (out of GPU memory: that input's own failure), and on the one FAIL_DISK names with a full
# disk (its rank's share stops); with MARKS (a folder), the run on an input that STALL names (a comma-separated list)
# leaves MARKS/<name>.started and waits 60 s in it (for the test's signal), and each rank leaves MARKS/rank<RANK>.exit
# holding the status that monai.bundle's run ends it with
SITECUSTOMIZE = textwrap.dedent('''
    import errno, os
    if (os.environ.get("FAIL_MODEL") or os.environ.get("FAIL_DISK")) and "RANK" in os.environ:
        from monai.engines import SupervisedEvaluator

        iteration = SupervisedEvaluator._iteration

        def fails(self, engine, batchdata):
            names = [os.path.basename(str(f)) for f in batchdata["image"].meta["filename_or_obj"]]
            if os.environ["FAIL_DISK"] in names:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if os.environ["FAIL_MODEL"] in names:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return iteration(self, engine, batchdata)

        SupervisedEvaluator._iteration = fails
    if os.environ.get("FAIL_WRITE") and "RANK" in os.environ:
        from dira3d.evaluation import outputs

        saved = outputs._GuardedSaveImage.__call__

        def call(self, img, meta_data=None, filename=None):
            name = os.path.basename(str(img.meta.get("filename_or_obj", "")))
            if os.environ["FAIL_WRITE"] in (name, "rank" + os.environ["RANK"]):
                raise outputs.write_error(name, OSError(errno.EIO, os.strerror(errno.EIO)))
            return saved(self, img, meta_data, filename)

        outputs._GuardedSaveImage.__call__ = call
    if os.environ.get("STALL") and "RANK" in os.environ:
        import time
        from monai.engines import SupervisedEvaluator

        stalled = SupervisedEvaluator._iteration

        def waits(self, engine, batchdata):
            names = {os.path.basename(str(f)) for f in batchdata["image"].meta["filename_or_obj"]}
            for name in names & set(os.environ["STALL"].split(",")):
                open(os.path.join(os.environ["MARKS"], name + ".started"), "w").close()
                time.sleep(60)
            return stalled(self, engine, batchdata)

        SupervisedEvaluator._iteration = waits
    if os.environ.get("MARKS") and "RANK" in os.environ:
        import functools
        from monai.bundle import scripts

        run = scripts.run

        @functools.wraps(run)
        def recorded(*args, **kwargs):
            code = "an error"
            try:
                run(*args, **kwargs)
                code = 0
            except SystemExit as err:
                code = err.code
                raise
            finally:
                with open(os.path.join(os.environ["MARKS"], "rank" + os.environ["RANK"] + ".exit"), "w") as f:
                    f.write(str(code))

        scripts.run = recorded
''')


def torchrun_command(tmp_path: Path, scans: list[Path], out: Path, bundle: str = BUNDLE, **faults: str
                     ) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``torchrun --nproc_per_node=2 -m monai.bundle run`` of the bundle's inference.json
    on ``scans`` into ``out`` (a classification bundle: into ``out/prob.json``), with ``faults``
    (:data:`SITECUSTOMIZE`'s variables: ``FAIL_WRITE="c.nii.gz"``, ``STALL=...``, ...)."""
    models, _, _ = _models(tmp_path, bundle)
    datalist = tmp_path / "scans.json"
    datalist.write_text(json.dumps([{"image": str(p)} for p in scans]))
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    configs = bundle_path(bundle) / "configs"
    target, settings = (("--output_path", str(out / "prob.json")), CLS3D) if bundle.endswith("_fpr") else \
        (("--output_dir", str(out)), SEG3D)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
           "--bundle_root", str(configs.parent), "--ckpt_dir", str(models), "--datalist", str(datalist),
           *target, *[a for k, v in settings.items() for a in (f"--{k}", json.dumps(v))]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAIL_WRITE": "", "FAIL_MODEL": "", "FAIL_DISK": "", "STALL": "",
           "MARKS": "", **faults, "DIRA3D_ALL_TRACEBACKS": "",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), str(ROOT / "tests")])}
    return cmd, env


def _torchrun(tmp_path: Path, scans: list[Path], out: Path, fail: str = "", bundle: str = BUNDLE, fail_model: str = "",
              fail_disk: str = ""):
    """Run :func:`torchrun_command` to its end: ``(the process, its output)``."""
    cmd, env = torchrun_command(tmp_path, scans, out, bundle, FAIL_WRITE=fail, FAIL_MODEL=fail_model,
                                FAIL_DISK=fail_disk)
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
    # each input run once, by one rank: rank 0 took a, c, e and rank 1 b, d (one "writing:" line per mask, naming its
    # rank: the ranks log into the one console)
    assert sorted(re.findall(r"writing: \S+/(\w)_seg\.nii\.gz", log)) == names, log[-3000:]
    ranks = re.findall(r" - INFO - \[rank (\d)/2\] writing: \S+/(\w)_seg\.nii\.gz\n", log)
    assert sorted(ranks, key=lambda pair: pair[1]) == [("0", "a"), ("1", "b"), ("0", "c"), ("1", "d"), ("0", "e")], \
        log[-3000:]
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


def test_two_ranks_split_a_classification_batch_and_rank_0_writes_the_one_probabilities_file_of_one_process(tmp_path):
    """LUNA16 FP reduction: the candidate cubes split over the ranks, and rank 0 writes the one prob.json, every rank's
    rows in datalist order, the same as one process's (it was refused under torchrun). Then a failed input's row is
    left out of it, as in one process; a rank that stopped (a full disk) hands over the rows of the inputs it ran, as
    one process that stops writes them (it handed over none: their inputs were failed, and run again by a rerun with
    --skip_written True); the report says why for each input not written."""
    rng = np.random.default_rng(0)  # five different cubes as `dira3d prepare luna16` writes them, in [0, 1]
    cubes = [_nifti(tmp_path / f"cand{i}.nii.gz", rng.random((16, 16, 8))) for i in range(5)]
    one = tmp_path / "one"
    assert _run("luna16_nodule_fpr", tmp_path, [{"image": str(p)} for p in cubes], one, **CLS3D) == [0]
    expected = json.loads((one / "prob.json").read_text())

    out = tmp_path / "two"
    proc, log = _torchrun(tmp_path, cubes, out, bundle="luna16_nodule_fpr")
    assert proc.returncode == 0, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["inference_report.json", "prob.json"]
    written = json.loads((out / "prob.json").read_text())
    assert list(written) == list(expected) == ["classes", "predictions", "written_by", "sha256"]
    assert written["classes"] == expected["classes"] == ["nodule"]
    assert [p["image"] for p in written["predictions"]] == [p["image"] for p in expected["predictions"]] == [
        str(c) for c in cubes]
    for ours, theirs in zip(written["predictions"], expected["predictions"]):
        assert list(ours) == ["image", "probabilities"]
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-6), ours["image"]
    assert is_own_prediction(out / "prob.json")  # marked as dira3d's own: a rerun may replace it
    report = _report(out)
    assert report["summary"] == {"inputs": 5, "written": 5, "left out": 0, "failed": 0, "not run": 0}
    assert [(r["image"], r["status"], r["output"]) for r in report["inputs"]] == [
        (str(c), "written", str(out / "prob.json")) for c in cubes]
    assert report["exit_status"] == 0 and report["stopped"] is None
    assert log.count("inference: 5 of 5 inputs written; report:") == 1, log[-3000:]  # rank 0's alone

    # the same command again (the first run's prob.json removed: a stopped run leaves an earlier file holding rows it
    # did not reach, as one process does), the model failing on cand2 (rank 0's: its own failure, rank 0 goes on) and
    # a full disk at cand3 (rank 1's: rank 1 stops after cand1, whose row it hands over); rank 0 writes the rows of
    # cand0, cand1 and cand4
    (out / "prob.json").unlink()
    proc, log = _torchrun(tmp_path, cubes, out, bundle="luna16_nodule_fpr", fail_model="cand2.nii.gz",
                          fail_disk="cand3.nii.gz")
    assert proc.returncode == 1, log[-3000:]
    written = json.loads((out / "prob.json").read_text())
    assert [p["image"] for p in written["predictions"]] == [str(cubes[i]) for i in (0, 1, 4)]
    for ours, theirs in zip(written["predictions"], [expected["predictions"][i] for i in (0, 1, 4)]):
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-6), ours["image"]
    report = _report(out)
    full = "OSError: [Errno 28] No space left on device"
    assert [r["status"] for r in report["inputs"]] == ["written", "written", "failed", "failed", "written"]
    assert [r.get("reason") for r in report["inputs"]] == [
        None, None, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", full, None]
    assert report["exit_status"] is None and report["stopped"] == f"rank 1: {full}"
    assert log.count("inference: 3 of 5 inputs written (2 failed); report:") == 1, log[-3000:]
    # each input run once: cand2 by rank 0 alone (its warning and rank 0's summary)
    assert log.count(f"failed: {cubes[2]}: RuntimeError: CUDA out of memory") == 2, log[-3000:]

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
    _gathered(monkeypatch, [(mine, None, True, None), (theirs, "RepeatedFailureError: x", False, None)])
    merged, stopped, completed, held = gather_rows(rows, [0, 2], None, True, 0)
    assert [r["status"] for r in merged] == ["written", "failed", "written", "not run"]
    assert stopped == "rank 1: RepeatedFailureError: x" and completed is False and held is None
    # every rank stopped for the same reason (SIGTERM to all): the reason once
    _gathered(monkeypatch, [(mine, "stopped by SIGTERM", False, None), (theirs, "stopped by SIGTERM", False, None)])
    assert gather_rows(rows, [0, 2], "stopped by SIGTERM", False, 0)[1] == "stopped by SIGTERM"
    _gathered(monkeypatch, [(mine, None, True, None), (theirs, None, True, None)])
    assert gather_rows(rows, [0, 2], None, True, 0)[1:] == (None, True, None)


def _probability(name: str) -> dict:
    return {"image": name, "probabilities": [len(name) / 10]}


def test_the_ranks_rows_of_the_one_probabilities_file_are_merged_in_datalist_order(monkeypatch):
    """Rank 0 ran inputs 0, 2, 4 and rank 1 inputs 1, 3: the file lists them 0 to 4, as one process writes it; a rank
    that hands over none (it stopped before its writer took a row) has its inputs absent; a rank with rows that are not
    one per input (an output_transform of one's own) has them after the others'."""
    from dira3d.evaluation.batch_ranks import gather_rows

    rows = [{"image": f"{c}.nii.gz", "status": "written"} for c in "abcde"]
    ours = ([0, 2, 4], [_probability(n) for n in ("a", "c", "e")])
    theirs = ([1, 3], [_probability(n) for n in ("b", "d")])
    mine, others = {i: rows[i] for i in (0, 2, 4)}, {i: rows[i] for i in (1, 3)}
    _gathered(monkeypatch, [(mine, None, True, ours), (others, None, True, theirs)])
    held = gather_rows(rows, [0, 2, 4], None, True, 0, ours)[3]
    assert [p["image"] for p in held] == ["a", "b", "c", "d", "e"] and held[1] == _probability("b")
    _gathered(monkeypatch, [(mine, None, True, ours), (others, "OSError: [Errno 28] No space left on device", False, None)])
    assert [p["image"] for p in gather_rows(rows, [0, 2, 4], None, True, 0, ours)[3]] == ["a", "c", "e"]
    extra = ([1, 3], [_probability(n) for n in ("b1", "b2", "d1")])
    _gathered(monkeypatch, [(mine, None, True, ours), (others, None, True, extra)])
    assert [p["image"] for p in gather_rows(rows, [0, 2, 4], None, True, 0, ours)[3]] == ["a", "c", "e", "b1", "b2", "d1"]
    # no rank handed over a row (SIGTERM to all before any input was run): no file, as in one process
    _gathered(monkeypatch, [(mine, "stopped by SIGTERM", False, None), (others, "stopped by SIGTERM", False, None)])
    assert gather_rows(rows, [0, 2, 4], "stopped by SIGTERM", False, 0)[3] is None
    # a share that completed with every input failed hands over no rows, but the file is written (as one process does)
    _gathered(monkeypatch, [(mine, None, True, ([], [])), (others, None, True, None)])
    assert gather_rows(rows, [0, 2, 4], None, True, 0, ([], []))[3] == []


def test_rank_0_failing_to_write_the_gathered_file_fails_the_inputs_written_there(tmp_path):
    """As when one process's writer fails at the end: the written inputs are failed with the error, which is returned
    (the batch raises it after the report); the file of another writer is not replaced."""
    from dira3d.evaluation import ProbabilityWriter
    from dira3d.evaluation.batch_ranks import write_gathered

    target = tmp_path / "prob.json"
    writer = ProbabilityWriter(target, ["nodule"])
    rows = [{"image": "a", "status": "written", "output": str(target)}, {"image": "b", "status": "failed", "reason": "E"}]
    assert write_gathered(writer, [_probability("a")], rows) is None
    assert json.loads(target.read_text())["predictions"] == [_probability("a")] and rows[0]["status"] == "written"
    target.write_text("my notes\n")  # a file put there during the run
    error = write_gathered(writer, [_probability("a")], rows)
    assert isinstance(error, FileExistsError) and target.read_text() == "my notes\n"
    assert rows[0] == {"image": "a", "status": "failed", "reason": f"the batch stopped before {target} was written: "
                       f"FileExistsError: {error}"} and rows[1] == {"image": "b", "status": "failed", "reason": "E"}


def test_rank_0_failing_to_write_the_one_file_writes_the_report_saying_so_and_raises_the_error(monkeypatch, tmp_path):
    """Rank 0 of 2 (the gather faked): every rank completed, and a file dira3d did not write was put at output_path
    during the run. As in one process, the file is kept, the report names the inputs written there as failed with the
    error, and the batch raises it (python -m monai.bundle run: exit 1 with its line)."""
    import torch.distributed as dist

    from dira3d.evaluation import InferenceBatch, ProbabilityWriter

    target = tmp_path / "prob.json"
    batch = InferenceBatch([{"image": "a.nii.gz"}, {"image": "b.nii.gz"}], report_path=tmp_path / "report.json",
                           output_path=target)
    writer = ProbabilityWriter(target, ["nodule"], batch=batch)
    batch.world = 2  # rank 0 of 2, which ran input 0; rank 1 ran input 1
    batch.done, writer.rows = {0}, [_probability("a")]

    def all_gather_object(gathered, mine):
        theirs = ({1: {"image": "b.nii.gz", "status": "written", "output": str(target)}}, None, True,
                  ([1], [_probability("b")]))
        gathered[:] = [mine, theirs]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    target.write_text("my notes\n")
    evaluator = type("Evaluator", (), {"run": lambda self: None})()
    with pytest.raises(FileExistsError) as raised:
        batch.run(evaluator)
    assert target.read_text() == "my notes\n"
    report = json.loads((tmp_path / "report.json").read_text())
    reason = f"FileExistsError: {raised.value}"
    assert report["exit_status"] is None and report["stopped"] == reason
    assert [(r["status"], r["reason"]) for r in report["inputs"]] == [
        ("failed", f"the batch stopped before {target} was written: {reason}")] * 2

def test_under_torchrun_the_writer_keeps_its_rows_for_the_batch_and_one_without_the_batch_is_refused(monkeypatch, tmp_path):
    """Linked to the batch (the bundles' batch=@inference_batch), a rank's writer writes nothing when its share ends:
    rank 0 writes every rank's rows. One not linked would write the file with its rank's share on every rank: refused
    when the run starts, in one line naming the setting and saying what to do: a user's error (DataError), which
    ``python -m monai.bundle run`` ends with in one ``error:`` line (it was a RuntimeError: rank 0's traceback)."""
    from types import SimpleNamespace

    from dira3d.data.errors import DataError
    from dira3d.engines import distributed
    from dira3d.evaluation import ProbabilityWriter
    from dira3d.utils.bundle_errors import user_error_in

    target = tmp_path / "prob.json"
    batch = SimpleNamespace(world=2, writer=None)
    writer = ProbabilityWriter(target, ["nodule"], batch=batch)
    assert batch.writer is writer
    writer.rows = [_probability("a")]
    writer._write(None)
    assert not target.exists() and writer.rows == [_probability("a")]
    batch.world = 1  # one process: written when the run completes, as before
    writer._write(None)
    assert json.loads(target.read_text())["predictions"] == [_probability("a")]
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    with pytest.raises(DataError) as raised:
        ProbabilityWriter(target, ["nodule"])._reset(None)
    wrapped = RuntimeError("Failed to evaluate ConfigExpression")  # as MONAI wraps it: found behind, one line
    wrapped.__cause__ = raised.value
    assert user_error_in(wrapped) is raised.value
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        f'the ProbabilityWriter of {target} has no "batch" setting: under torchrun each of the 2 processes would write')
    assert 'give the writer "batch": "@inference_batch" in inference.json' in message and "without torchrun" in message


def test_a_rank_gone_before_the_gather_leaves_the_others_reporting_their_own_inputs(monkeypatch, caplog):
    import logging

    from dira3d.evaluation.batch_ranks import gather_rows

    rows = [{"image": "a.nii.gz", "status": "written"}, {"image": "b.nii.gz", "status": "not run", "reason": "?"}]
    _gathered(monkeypatch, error=RuntimeError("Connection closed by peer"))
    with caplog.at_level(logging.ERROR, logger="dira3d.evaluation.batch_ranks"):
        merged, stopped, completed, held = gather_rows(rows, [0], None, True, 0, ([0], [_probability("a")]))
    assert merged[0] == rows[0] and merged[1]["status"] == "not run" and completed is False
    assert held == [_probability("a")]  # the one file holds this rank's rows (rank 0 writes them)
    assert stopped == "the ranks' records could not be gathered: RuntimeError: Connection closed by peer"
    assert merged[1]["reason"] == f"the batch stopped before it: {stopped}"
    assert [r.getMessage() for r in caplog.records] == [
        f"rank 0: {stopped}; the report holds this rank's inputs only (see each rank's log)"]
    # another rank writes no report: its line says where its inputs stand (it said the report held them)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dira3d.evaluation.batch_ranks"):
        gather_rows(rows, [1], None, True, 1)
    assert [r.getMessage() for r in caplog.records] == [
        f"rank 1: {stopped}; rank 0's report, if it writes one, has this rank's inputs as not run (this log names each "
        "one written)"]


@pytest.mark.parametrize("world", ["1", "", None])
def test_one_process_forms_no_process_group_and_runs_every_input(monkeypatch, world):
    import logging

    import torch.distributed as dist

    from dira3d.evaluation import InferenceBatch

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    factory = logging.getLogRecordFactory()
    batch = InferenceBatch([{"image": "a.nii.gz"}, {"image": "b.nii.gz"}, {"image": "c.nii.gz"}])
    assert (batch.rank, batch.world) == (0, 1) and not dist.is_initialized()
    assert logging.getLogRecordFactory() is factory  # its log lines are as before: no rank in them


@pytest.mark.parametrize("world", ["2", "8"])
def test_under_torchrun_without_master_addr_a_batch_is_refused_in_one_line(monkeypatch, world):
    """WORLD_SIZE above 1 without torchrun's MASTER_ADDR: refused before any input is read, saying what to do; the
    same for one output file of every input (the classification bundles', which was refused under torchrun itself)."""
    import torch.distributed as dist

    from dira3d.evaluation import InferenceBatch

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for target in ({"output_dir": "/x"}, {"output_path": "/x/prob.json"}):
        with pytest.raises(RuntimeError, match=rf"^WORLD_SIZE={world} but no MASTER_ADDR in the environment: run the "
                                               "batch under torchrun, or unset WORLD_SIZE to run it in one process$"):
            InferenceBatch([{"image": "a.nii.gz"}, {"image": "b.nii.gz"}], **target)
        assert not dist.is_initialized()


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
