"""``--skip_written True``: a rerun of a batch inference keeps what an earlier run wrote (session 25).

A SLURM job of 1,000 CTs stopped by its time limit at input 700 ran all 1,000 again when its command was run again.
With the setting, a rerun keeps, neither read nor run, each input that the earlier ``inference_report.json`` says was
written by the same model and settings, its output dira3d's own and unchanged since
(:mod:`dira3d.evaluation.batch_resume`); the classification bundles' ``_prob.json`` still lists every input, the kept
ones' rows taken from the earlier file. Tiny untrained networks, as in ``tests/test_inference_batch.py``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

import test_inference_batch
from dira3d.evaluation.finetune import bundle_path
from dira3d.evaluation.outputs import is_own_prediction
from test_inference_batch import _report, _run, _scans
from test_inference_inputs import CLS3D, SEG3D, _nifti
from test_inference_signals import _interrupt_after

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]  # tests/conftest.py

BUNDLES = ("brats_tumor_seg", "chestxray14_cls", "chexpert_cls", "lidc_nodule_seg", "lits_liver_seg",
           "luna16_nodule_fpr", "montgomery_lung_seg", "pecad_embolism_fpr", "siim_pneumothorax_seg")


def _files(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each output's inode, mtime_ns and bytes (the report left out)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())
            if p.name != "inference_report.json"}


def _run_on(monkeypatch) -> list[str]:
    """The names of the inputs the model runs on from now on, and of those the input check reads."""
    from monai.engines import SupervisedEvaluator

    from dira3d.evaluation import inputs

    seen: list[str] = []
    step, screen = SupervisedEvaluator._iteration, inputs.screen_inputs

    def stepped(self, engine, batchdata):
        seen.extend(f"run {Path(str(f)).name}" for f in batchdata["image"].meta["filename_or_obj"])
        return step(self, engine, batchdata)

    def screened(entries, *args, **kwargs):
        seen.extend(f"read {Path(str(e['image'])).name}" for e in entries)
        return screen(entries, *args, **kwargs)

    monkeypatch.setattr(SupervisedEvaluator, "_iteration", stepped)
    monkeypatch.setattr(inputs, "screen_inputs", screened)
    return seen


def _stopped_after_b(tmp_path: Path, monkeypatch) -> tuple[list[dict], Path]:
    """A batch of a..e stopped (Ctrl-C) after b's mask was written: a and b written, the others not run."""
    datalist, out = [{"image": str(p)} for p in _scans(tmp_path, list("abcde"))], tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, "record", "b")
        with pytest.raises(KeyboardInterrupt):
            _run("lits_liver_seg", tmp_path, datalist, out, **SEG3D)
    assert [r["status"] for r in _report(out)["inputs"]] == ["written", "written", "not run", "not run", "not run"]
    return datalist, out


def test_a_rerun_with_skip_written_keeps_what_a_stopped_batch_wrote_and_runs_only_the_rest(tmp_path, monkeypatch,
                                                                                           caplog):
    datalist, out = _stopped_after_b(tmp_path, monkeypatch)
    before = _files(out)
    seen = _run_on(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d"):
        assert _run("lits_liver_seg", tmp_path, datalist, out, skip_written=True, **SEG3D) == [0]
    assert seen == ["read c.nii.gz", "read d.nii.gz", "read e.nii.gz", "run c.nii.gz", "run d.nii.gz", "run e.nii.gz"]
    after = _files(out)
    assert {name: after[name] for name in ("a_seg.nii.gz", "b_seg.nii.gz")} == before  # untouched: inode, time, bytes
    assert sorted(after) == [f"{c}_seg.nii.gz" for c in "abcde"] and all(is_own_prediction(out / n) for n in after)
    report = _report(out)
    assert report["summary"] == {"inputs": 5, "written": 5, "left out": 0, "failed": 0, "not run": 0, "kept": 2}
    assert report["exit_status"] == 0
    assert [(r["status"], r.get("skipped", False), r["output"]) for r in report["inputs"]] == [
        ("written", c in "ab", str(out / f"{c}_seg.nii.gz")) for c in "abcde"]
    log = caplog.text
    assert (f"--skip_written: 2 of the 5 inputs are kept from the earlier run (report: {out / 'inference_report.json'}), "
            "the other 3 are run") in log
    assert "inference: 5 of 5 inputs written, 2 of them kept from the earlier run; report: " in log
    # run once more with the setting: every input is kept, none is read or run
    seen.clear()
    assert _run("lits_liver_seg", tmp_path, datalist, out, skip_written=True, **SEG3D) == [0]
    assert seen == [] and _files(out) == after and _report(out)["summary"]["kept"] == 5


def test_without_skip_written_a_rerun_runs_every_input_again(tmp_path, monkeypatch):
    datalist, out = _stopped_after_b(tmp_path, monkeypatch)
    before = _files(out)
    seen = _run_on(monkeypatch)
    assert _run("lits_liver_seg", tmp_path, datalist, out, **SEG3D) == [0]
    assert seen[5:] == [f"run {c}.nii.gz" for c in "abcde"]
    after = _files(out)
    assert all(after[name][:2] != before[name][:2] for name in before)  # replaced (new inode and time)
    report = _report(out)
    assert "kept" not in report["summary"] and not any("skipped" in r for r in report["inputs"])


def _other_model():
    """``_models`` with other weights in ``model.pt`` (another seed)."""
    import torch

    def models(tmp_path, bundle):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            from test_inference_inputs import _seeded_models
            return _seeded_models(tmp_path, bundle)

    return models


@pytest.mark.parametrize(("change", "why"), [
    ("model", "the model differs from the earlier run's"),
    ("overlap", "the settings differ from the earlier run's: overlap 0.25 then, 0.5 now"),
    ("threshold", "the settings differ from the earlier run's: threshold 0.5 then, 0.3 now")])
def test_another_model_or_setting_keeps_nothing(tmp_path, monkeypatch, caplog, change, why):
    datalist, out = [{"image": str(p)} for p in _scans(tmp_path, ["a", "b"])], tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, datalist, out, **SEG3D) == [0]
    before = _files(out)
    overrides = {"overlap": {"inferer#overlap": 0.5}, "threshold": {"postprocessing#transforms#2#threshold": 0.3},
                 "model": {}}[change]
    if change == "model":
        monkeypatch.setattr(test_inference_batch, "_models", _other_model())
    with caplog.at_level(logging.INFO, logger="dira3d"):
        assert _run("lits_liver_seg", tmp_path, datalist, out, skip_written=True, **SEG3D, **overrides) == [0]
    after = _files(out)
    assert all(after[name][:2] != before[name][:2] for name in before)  # each run again
    assert not any(r.get("skipped") for r in _report(out)["inputs"]) and _report(out)["summary"]["kept"] == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--skip_written")]
    assert len(lines) == 1 and lines[0].startswith(f"--skip_written: nothing is kept from the earlier run: {why}"), lines
    assert lines[0].endswith("; every input is run")


def test_an_output_deleted_or_replaced_since_is_run_again(tmp_path, monkeypatch, caplog):
    datalist, out = [{"image": str(p)} for p in _scans(tmp_path, list("abc"))], tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, datalist, out, **SEG3D) == [0]
    (out / "a_seg.nii.gz").unlink()
    (out / "b_seg.nii.gz").unlink()  # b's replaced by a copy of c's (dira3d's own, the same size)
    (out / "b_seg.nii.gz").write_bytes((out / "c_seg.nii.gz").read_bytes())
    before = _files(out)
    seen = _run_on(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d"):
        assert _run("lits_liver_seg", tmp_path, datalist, out, skip_written=True, **SEG3D) == [0]
    assert [s for s in seen if s.startswith("run")] == ["run a.nii.gz", "run b.nii.gz"]
    assert _files(out)["c_seg.nii.gz"] == before["c_seg.nii.gz"] and _files(out)["b_seg.nii.gz"] != before["b_seg.nii.gz"]
    assert all(is_own_prediction(out / f"{n}_seg.nii.gz") for n in "abc")
    assert [r.get("skipped", False) for r in _report(out)["inputs"]] == [False, False, True]
    assert (f"--skip_written: 2 input(s) written by the earlier run are run again: {datalist[0]['image']}: "
            f"{out / 'a_seg.nii.gz'} is gone; {datalist[1]['image']}: {out / 'b_seg.nii.gz'} changed since the earlier "
            "run") in caplog.text


def test_an_output_edited_in_place_is_not_kept_and_not_replaced(tmp_path, caplog):
    """An output changed since, its size and time as before (edited in place, its time put back): its ctime tells,
    which no one sets. It is not kept, and as a file that is not dira3d's own it stops the run before any input is read
    (not replaced)."""
    datalist, out = [{"image": str(p)} for p in _scans(tmp_path, list("ab"))], tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, datalist, out, **SEG3D) == [0]
    mask = out / "b_seg.nii.gz"
    stat, data = mask.stat(), bytearray(mask.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mask.write_bytes(bytes(data))
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = _files(out)
    with caplog.at_level(logging.INFO, logger="dira3d"), pytest.raises(Exception) as raised:
        _run("lits_liver_seg", tmp_path, datalist, out, skip_written=True, **SEG3D)
    error = raised.value
    while error is not None and not isinstance(error, FileExistsError):
        error = error.__cause__ or error.__context__
    assert "b_seg.nii.gz exists and is not a prediction written by dira3d" in str(error), repr(raised.value)
    assert _files(out) == before
    assert (f"--skip_written: 1 input(s) written by the earlier run are run again: {datalist[1]['image']}: {mask} "
            "changed since the earlier run") in caplog.text


def test_a_classification_rerun_writes_every_inputs_row_as_a_run_in_one_go_does(tmp_path, monkeypatch):
    """The earlier run failed on cand1 (its row is not in prob.json): the rerun runs cand1 only and writes the file with
    every row in datalist order, the kept ones' from the earlier file, equal to a run of all three in one go."""
    from monai.engines import SupervisedEvaluator

    rng = np.random.default_rng(0)
    cubes = [_nifti(tmp_path / f"cand{i}.nii.gz", rng.random((16, 16, 8))) for i in range(3)]
    datalist, out, whole = [{"image": str(p)} for p in cubes], tmp_path / "out", tmp_path / "whole"
    iteration = SupervisedEvaluator._iteration

    def fails_on_cand1(self, engine, batchdata):
        if any(Path(str(f)).name == "cand1.nii.gz" for f in batchdata["image"].meta["filename_or_obj"]):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return iteration(self, engine, batchdata)

    with monkeypatch.context() as patch:
        patch.setattr(SupervisedEvaluator, "_iteration", fails_on_cand1)
        assert _run("luna16_nodule_fpr", tmp_path, datalist, out, **CLS3D) == [3]
    assert [Path(p["image"]).name for p in json.loads((out / "prob.json").read_text())["predictions"]] == [
        "cand0.nii.gz", "cand2.nii.gz"]
    seen = _run_on(monkeypatch)
    assert _run("luna16_nodule_fpr", tmp_path, datalist, out, skip_written=True, **CLS3D) == [0]
    assert seen == ["read cand1.nii.gz", "run cand1.nii.gz"]
    assert _run("luna16_nodule_fpr", tmp_path, datalist, whole, **CLS3D) == [0]
    resumed, one_go = (json.loads((d / "prob.json").read_text()) for d in (out, whole))
    assert resumed["predictions"] == one_go["predictions"] and is_own_prediction(out / "prob.json")
    assert [Path(p["image"]).name for p in resumed["predictions"]] == ["cand0.nii.gz", "cand1.nii.gz", "cand2.nii.gz"]
    rows = _report(out)["inputs"]
    assert [(r["status"], r.get("skipped", False)) for r in rows] == [("written", True), ("written", False),
                                                                    ("written", True)]
    # every input kept: the evaluator does not run, and the file is written again with the same rows
    seen.clear()
    assert _run("luna16_nodule_fpr", tmp_path, datalist, out, skip_written=True, **CLS3D) == [0]
    assert seen == [] and json.loads((out / "prob.json").read_text())["predictions"] == one_go["predictions"]


def test_a_row_missing_from_the_earlier_probabilities_file_is_run_again(tmp_path):
    from dira3d.evaluation import ProbabilityWriter
    from dira3d.evaluation.batch_resume import kept_inputs, output_states

    prob = tmp_path / "prob.json"
    ProbabilityWriter(prob, ["nodule"]).write([{"image": "a.nii.gz", "probabilities": [0.25]}])
    rows = output_states([{"image": image, "status": "written", "output": str(prob)} for image in ("a.nii.gz", "b.nii.gz")])
    kept, again = kept_inputs({0: "a.nii.gz", 1: "b.nii.gz"}, {0: str(prob), 1: str(prob)}, rows, single_file=True)
    assert list(kept) == [0] and kept[0]["row"] == {"image": "a.nii.gz", "probabilities": [0.25]}
    assert again == [f"b.nii.gz: its row is not in {prob}"]
    prob.write_text(prob.read_text().replace("0.25", "0.5"))  # not dira3d's own any more
    rows = output_states(rows)
    assert kept_inputs({0: "a.nii.gz"}, {0: str(prob)}, rows, single_file=True)[0] == {}


def test_a_report_from_elsewhere_or_without_made_by_keeps_nothing(tmp_path):
    from dira3d.evaluation.batch_resume import earlier_rows, made_by_record

    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    made_by = made_by_record({"model": str(model), "settings": {"roi_size": (64, 64, 32)}})
    assert made_by["settings"] == {"roi_size": [64, 64, 32]} and made_by["model"]["size"] == 7
    report = tmp_path / "inference_report.json"
    assert earlier_rows(report, made_by) == ([], f"no earlier report at {report}")
    report.write_text(json.dumps({"made_by": made_by, "inputs": [{"image": "a", "status": "written"}]}))
    assert earlier_rows(report, made_by)[1] == f"{report} is not a report dira3d wrote, or it was changed since"
    assert earlier_rows(report, None)[1].startswith("this inference.json gives inference_batch no made_by")


def test_every_inference_bundle_has_skip_written_off_and_fingerprints_the_settings_that_change_a_prediction():
    """Every top-level setting of inference.json goes into made_by but those that say where the outputs go, the device,
    the batch sizes and the network's training settings; a setting added later is caught here."""
    exempt = {"imports", "bundle_root", "ckpt_dir", "pretrained", "in_channels_policy", "bn_momentum", "sw_batch_size",
              "device", "network_def", "network", "image", "dataset_dir", "output_dir", "output_postfix", "output_ext",
              "output_path", "overwrite", "report_path", "skip_written", "datalist", "preprocessing", "inference_batch",
              "dataset", "dataloader", "inferer", "postprocessing", "handlers", "evaluator", "initialize", "run"}
    for bundle in BUNDLES:
        config = json.loads((bundle_path(bundle) / "configs" / "inference.json").read_text(encoding="utf-8"))
        assert config["skip_written"] is False and config["inference_batch"]["skip_written"] == "@skip_written", bundle
        made_by = config["inference_batch"]["made_by"]
        assert made_by["model"] == "@handlers#0#load_path" and "model.pt" in config["handlers"][0]["load_path"], bundle
        settings = made_by["settings"]
        top = {k for k in config if k not in exempt}
        assert {k: v for k, v in settings.items() if k in top} == {k: f"@{k}" for k in top}, bundle
        for key, ref in settings.items():  # the others name the setting in the component that holds it
            if key not in top:
                *path, last = ref[1:].split("#")
                node = config
                for part in path:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                assert last == key and key in node, (bundle, key, ref)
        if config["inferer"]["_target_"] == "SlidingWindowInferer":
            assert {"overlap", "mode"} <= set(settings), bundle
        if any(t["_target_"] == "AsDiscreted" for t in config["postprocessing"]["transforms"]):
            assert "threshold" in settings, bundle


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a hung run is killed through /proc (Linux)")
def test_under_torchrun_each_rank_keeps_its_share_and_rank_0_writes_the_file_of_a_run_in_one_go(tmp_path):
    """Two gloo ranks on CPU (``tests/test_inference_batch_torchrun.py``): the model fails on cand1 (rank 1's); the rerun
    with the setting runs cand1 alone, rank 0 runs nothing, and rank 0 writes prob.json, each rank's kept rows with cand1's,
    as one process running the three in one go writes it."""
    from conftest import run_torchrun_command
    from test_inference_batch_torchrun import torchrun_command

    rng = np.random.default_rng(0)
    cubes = [_nifti(tmp_path / f"cand{i}.nii.gz", rng.random((16, 16, 8))) for i in range(3)]
    out, one = tmp_path / "two", tmp_path / "one"
    assert _run("luna16_nodule_fpr", tmp_path, [{"image": str(p)} for p in cubes], one, **CLS3D) == [0]
    cmd, env = torchrun_command(tmp_path, cubes, out, "luna16_nodule_fpr", FAIL_MODEL="cand1.nii.gz")
    proc = run_torchrun_command(cmd, cwd=tmp_path, env=env, timeout=150)
    assert [r["status"] for r in _report(out)["inputs"]] == ["written", "failed", "written"], proc.stderr[-3000:]
    cmd, env = torchrun_command(tmp_path, cubes, out, "luna16_nodule_fpr")
    proc = run_torchrun_command(cmd + ["--skip_written", "true"], cwd=tmp_path, env=env, timeout=150)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "[rank 0/2] --skip_written: 2 of the 2 inputs are kept from the earlier run" in log, log[-3000:]
    assert "[rank 1/2] --skip_written: 0 of the 1 inputs are kept from the earlier run" in log, log[-3000:]
    written, expected = (json.loads((d / "prob.json").read_text())["predictions"] for d in (out, one))
    assert [p["image"] for p in written] == [p["image"] for p in expected] == [str(c) for c in cubes]
    for ours, theirs in zip(written, expected):
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-6), ours["image"]
    report = _report(out)
    assert [(r["status"], r.get("skipped", False)) for r in report["inputs"]] == [("written", True), ("written", False),
                                                                                ("written", True)]
    assert log.count("inference: 3 of 3 inputs written, 2 of them kept from the earlier run; report:") == 1, log[-3000:]


def test_a_rank_stopped_by_a_signal_still_hands_rank_0_the_rows_it_kept(monkeypatch, tmp_path):
    """Rank 0 of 2 kept a (its row from the earlier prob.json) and was stopped by SIGTERM in c; rank 1 completed b and
    d. Rank 0 writes prob.json with a's kept row and rank 1's (rank 0 ran none to the end: no row of its own), and
    the report has a written and skipped (the gather faked, as in tests/test_inference_batch_ranks_stop.py)."""
    import torch.distributed as dist

    import dira3d.evaluation.batch as batch_module
    from dira3d.evaluation import InferenceBatch, ProbabilityWriter
    from dira3d.evaluation.batch_resume import state_of
    from dira3d.utils.interrupts import TerminatedBySignal

    target, report = tmp_path / "prob.json", tmp_path / "report.json"
    rows = {name: {"image": f"{name}.nii.gz", "probabilities": [p]} for name, p in zip("abcd", (0.125, 0.25, 0.5, 0.75))}
    theirs = ({i: {"image": f"{n}.nii.gz", "status": "written", "output": str(target)} for i, n in ((1, "b"), (3, "d"))},
              None, True, ([1, 3], [rows["b"], rows["d"]]))
    monkeypatch.setattr(batch_module, "join_ranks", lambda: (0, 2, False))
    monkeypatch.setattr(dist, "all_gather_object", lambda gathered, mine: gathered.__setitem__(slice(None), [mine, theirs]))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    batch = InferenceBatch([{"image": f"{n}.nii.gz"} for n in "abcd"], report_path=report, output_path=target)
    ProbabilityWriter(target, ["nodule"], batch=batch)
    batch.kept = {0: {"state": state_of(target), "row": rows["a"]}}
    batch._order = [2]  # c, to run

    def stopped():
        raise TerminatedBySignal()

    with pytest.raises(TerminatedBySignal):
        batch.run(type("Evaluator", (), {"run": lambda self: stopped()})())
    assert json.loads(target.read_text())["predictions"] == [rows["a"], rows["b"], rows["d"]]
    written = json.loads(report.read_text())["inputs"]
    assert [(r["status"], r.get("skipped", False)) for r in written] == [
        ("written", True), ("written", False), ("not run", False), ("written", False)]
