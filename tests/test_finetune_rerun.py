"""A fine-tuning run into a folder that holds an earlier one, two runs at once, a run stopped mid-way.

MONAI bundles overwrite by default: ``python -m monai.bundle run --config_file train.json`` a second time with
the same ``bundle_root`` replaced the first run's ``models/model.pt`` at its first validation and drew its
TensorBoard curves over the first run's, without a word, and two runs at once replaced each other's model in
turn. ``train.json`` now refuses (``--overwrite True`` replaces) and locks ``ckpt_dir``, as ``dira3d finetune``
does for its ``--output-dir``; ``preprocessing.json`` beside the model always describes that model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dira3d.engines.inputs import setting_error_in
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D, bundle_path
from dira3d.utils.folder_lock import FolderInUseError
from test_folder_lock import hold_in_another_process, try_in_another_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

EARLIER_MODEL = b"the earlier run's model"
MR = {"modality": "mr", "percentiles": [0.5, 99.5]}


def _flow(bundle: str, root: Path, files=("train.json",), **overrides):
    from monai.bundle import ConfigWorkflow

    configs = bundle_path(bundle) / "configs"
    return ConfigWorkflow(config_file=[str(configs / f) for f in files], meta_file=str(configs / "metadata.json"),
                          logging_file=False, workflow_type=None, bundle_root=str(root), **overrides)


def _earlier_run(root: Path) -> None:
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes(EARLIER_MODEL)
    (root / "models" / "preprocessing.json").write_text(json.dumps(MR))
    (root / "eval").mkdir()
    (root / "eval" / "events.out.tfevents.1.host.1.0").write_bytes(b"the earlier run's curves")
    (root / "eval" / "metrics.csv").write_text("auc\t0.9\n")


@pytest.mark.parametrize("bundle", BUNDLES + BUNDLES_2D)
def test_train_json_refuses_to_replace_an_earlier_model_unless_told(bundle, tmp_path):
    root = tmp_path / "run"
    _earlier_run(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for files in (("train.json",), ("train.json", "multi_gpu_train.json")):  # refused before the process group starts
        with pytest.raises(Exception) as err:
            _flow(bundle, root, files).initialize()
        cause = setting_error_in(err.value) or err.value.__cause__
        assert isinstance(cause, FileExistsError), err.value
        assert f"ckpt_dir {root / 'models'} already holds a model.pt" in str(cause) and "--overwrite True" in str(cause)
        assert {p: p.read_bytes() for p in before} == before
    assert try_in_another_process(root / "models").returncode == 0  # a refused run keeps no lock
    # --overwrite True: the earlier curves and metrics.csv go now, the earlier model (and the file that describes it)
    # stays until this run's first validation replaces it
    flow = _flow(bundle, root, overwrite=True)
    flow.initialize()
    try:
        assert (root / "models" / "model.pt").read_bytes() == EARLIER_MODEL
        assert json.loads((root / "models" / "preprocessing.json").read_text()) == MR
        assert not list((root / "eval").iterdir())
    finally:
        flow.finalize()


def test_train_json_refuses_the_curves_of_a_run_stopped_before_its_first_validation(tmp_path):
    root = tmp_path / "run"
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "events.out.tfevents.1.host.1.0").write_bytes(b"curves")
    with pytest.raises(Exception) as err:
        _flow("lits_liver_seg", root).initialize()
    cause = setting_error_in(err.value) or err.value.__cause__
    assert isinstance(cause, FileExistsError) and f"output_dir {root / 'eval'} holds the TensorBoard files" in str(cause)
    assert (root / "eval" / "events.out.tfevents.1.host.1.0").read_bytes() == b"curves"


def test_two_training_runs_into_one_ckpt_dir_are_refused_and_the_lock_goes_with_the_run(tmp_path):
    root = tmp_path / "run"
    holder = hold_in_another_process(root / "models")
    try:
        with pytest.raises(Exception) as err:
            _flow("luna16_nodule_fpr", root).initialize()
        cause = setting_error_in(err.value)
        assert isinstance(cause, FolderInUseError) and f"ckpt_dir {root / 'models'} is in use by process {holder.pid}" in str(cause)
    finally:
        holder.kill()
        holder.wait()
    flow = _flow("luna16_nodule_fpr", root)
    flow.initialize()  # the holder is gone: this run locks the folder until its finalize
    refused = try_in_another_process(root / "models")
    assert refused.returncode == 1 and "in use by process" in refused.stderr
    flow.finalize()
    assert try_in_another_process(root / "models").returncode == 0


def test_a_model_write_cut_short_by_a_kill_leaves_no_temporary_file_for_the_next_run(tmp_path):
    root = tmp_path / "run"
    (root / "models").mkdir(parents=True)
    stray = root / "models" / ".model.pt.ab12cd_3.tmp"  # what atomic_save leaves when SIGKILL hits mid-write
    stray.write_bytes(b"half a model")
    kept = root / "models" / ".model.pt.notes.tmp"  # not one of ours
    kept.write_bytes(b"mine")
    held = root / "models" / ".model.pt.h0ld1ng0.tmp"  # a live writer's (it holds the flock atomic_path takes): kept
    held.write_bytes(b"being written")
    fcntl = pytest.importorskip("fcntl", reason="a live writer holds its temporary file with POSIX flock")
    with open(held, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flow = _flow("luna16_nodule_fpr", root)
        flow.initialize()
        flow.finalize()
    assert not stray.exists() and kept.exists() and held.exists()


def _saver(path: Path, preprocessing):
    from dira3d.evaluation import BestModelSaver

    return BestModelSaver(torch.nn.Linear(2, 1), path, "auc", preprocessing=preprocessing)


def _engine(value: float):
    return type("Engine", (), {"state": type("State", (), {"metrics": {"auc": value}})()})()


@pytest.mark.parametrize("new", [{"modality": "ct", "window": [-1000, 1000]}, {}])
def test_the_first_save_makes_preprocessing_json_describe_the_new_model(tmp_path, new):
    # train.json run again with --overwrite True on a CT datalist (or one that records nothing) kept the earlier
    # MRI model's preprocessing.json beside its new model.pt: inference.json then scaled raw CTs as MRI
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(EARLIER_MODEL)
    (models / "preprocessing.json").write_text(json.dumps(MR))
    _saver(models / "model.pt", new)(_engine(0.7))
    assert (models / "model.pt").read_bytes() != EARLIER_MODEL
    assert (json.loads((models / "preprocessing.json").read_text()) if new else (models / "preprocessing.json").exists()) == \
        (new or False)


def test_a_failed_save_keeps_the_earlier_model_with_its_preprocessing_json(tmp_path, monkeypatch):
    import dira3d.utils

    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(EARLIER_MODEL)
    (models / "preprocessing.json").write_text(json.dumps(MR))

    def full_disk(obj, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(dira3d.utils, "atomic_save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _saver(models / "model.pt", {"modality": "ct"})(_engine(0.7))
    assert (models / "model.pt").read_bytes() == EARLIER_MODEL
    assert json.loads((models / "preprocessing.json").read_text()) == MR


def test_saver_without_preprocessing_leaves_the_file_alone(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "preprocessing.json").write_text(json.dumps(MR))
    _saver(models / "model.pt", None)(_engine(0.7))
    assert json.loads((models / "preprocessing.json").read_text()) == MR


@pytest.mark.parametrize("bundle", BUNDLES + BUNDLES_2D)
def test_every_task_bundle_keeps_preprocessing_json_with_its_model(bundle):
    config = json.loads((bundle_path(bundle) / "configs" / "train.json").read_text(encoding="utf-8"))
    saver = [h for h in config["validate"]["handlers"] if isinstance(h, dict) and h.get("_target_", "").endswith("BestModelSaver")]
    # what dira3d finetune writes before training (training_preprocessing): BraTS adds the run's sequences
    expected = ("$dira3d.evaluation.training_preprocessing(@datalist, modalities=@modalities, image_channels=@image_channels)"
                if "modalities" in config else "$dira3d.evaluation.datalist_preprocessing(@datalist)")
    assert saver[0]["preprocessing"] == expected
    assert config["overwrite"] is False and config["finalize"] == ["$dira3d.evaluation.end_stop_before_training()",
                                                                   "$dira3d.evaluation.release_run_folders(@ckpt_dir)",
                                                                   "$dira3d.evaluation.exit_if_training_stopped()"]


def test_finetune_calls_a_folder_with_only_tensorboard_files_an_unfinished_run(tmp_path, capsys):
    # a run stopped before its first validation left only its event files; the next run drew its curves over them
    from dira3d.evaluation.finetune import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "events.out.tfevents.1.host.1.0").write_bytes(b"curves")
    assert main(["--bundle", "luna16_nodule_fpr", "--tiny", "--output-dir", str(out), "--datalist", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds an unfinished fine-tuning run (the TensorBoard files events.out.tfevents.1.host.1.0" in err
    assert "--overwrite" in err and (out / "events.out.tfevents.1.host.1.0").read_bytes() == b"curves"


def test_finetune_releases_the_ckpt_dir_when_the_run_fails(tmp_path):
    # the lock train.json's initialize takes on models/ stayed with the process after a failed run: in
    # `dira3d experiment` (one process, many runs) every failed run's folder stayed locked until the grid ended
    from dira3d.evaluation.finetune import run_finetune

    out = tmp_path / "out"
    out.mkdir()  # the user's folder: kept (a new one, holding only the locks, is removed after a failed start)
    # a datalist that is there (a missing one is refused before the lock) but not JSON: refused in train.json's initialize
    (tmp_path / "x.json").write_text("not JSON")
    with pytest.raises(Exception, match="x.json"):
        run_finetune("luna16_nodule_fpr", {"datalist": str(tmp_path / "x.json")}, output_dir=out, tiny=True)
    assert (out / "models" / ".dira3d.lock").is_file()  # taken by train.json's initialize
    assert try_in_another_process(out / "models").returncode == 0
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match="x.json"):
        run_finetune("luna16_nodule_fpr", {"datalist": str(tmp_path / "x.json")}, output_dir=fresh, tiny=True)
    assert not fresh.exists()


def _classification_data(tmp_path: Path, meta: dict) -> Path:
    from test_bundles_finetune import make_classification

    datalist = make_classification(tmp_path / f"data{len(meta)}", "ncc_datalist.json", (16, 16, 8), folds=False)
    content = json.loads(datalist.read_text())
    content["meta"] = meta
    datalist.write_text(json.dumps(content))
    return datalist


def test_bundle_run_again_keeps_the_model_then_replaces_it_with_overwrite(tmp_path):
    """End to end, as a user runs it: `python -m monai.bundle run --config_file train.json` a second time."""
    root = tmp_path / "run"
    mr = _classification_data(tmp_path, {"modality": "mr", "percentiles": [0.5, 99.5]})
    ct = _classification_data(tmp_path, {})

    def train(datalist, **overrides):
        flow = _flow("luna16_nodule_fpr", root, ("train.json", "tiny.json"), datalist=str(datalist), max_epochs=1, **overrides)
        flow.initialize()
        flow.run()
        flow.finalize()

    train(mr)
    first = (root / "models" / "model.pt").read_bytes()
    assert json.loads((root / "models" / "preprocessing.json").read_text()) == {"modality": "mr", "percentiles": [0.5, 99.5]}
    curves = sorted(p.name for p in (root / "eval").iterdir())
    with pytest.raises(Exception) as err:
        train(ct, seed=3)
    assert "already holds a model.pt" in str(err.value.__cause__)
    assert (root / "models" / "model.pt").read_bytes() == first
    train(ct, seed=3, overwrite=True)
    assert (root / "models" / "model.pt").read_bytes() != first
    assert not (root / "models" / "preprocessing.json").exists()  # the CT datalist records no scaling: none
    assert not set(curves) & {p.name for p in (root / "eval").iterdir()}  # the earlier curves went


def test_finetune_set_overwrite_is_the_overwrite_option(tmp_path, capsys):
    # `--set overwrite=true` (train.json's own setting) was checked as a known id but the earlier run was still refused
    from dira3d.evaluation.finetune import main

    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(EARLIER_MODEL)
    args = ["--bundle", "luna16_nodule_fpr", "--tiny", "--output-dir", str(out), "--datalist", str(tmp_path / "x.json")]
    assert main(args) == 2 and "unfinished fine-tuning run" in capsys.readouterr().err
    assert main(args + ["--set", "overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "x.json" in err and "unfinished" not in err  # went on to the missing datalist
    assert (out / "models" / "model.pt").read_bytes() == EARLIER_MODEL  # kept: the run failed to set up


def _evaluation_reports(folder: Path, metrics: dict[str, float]) -> set[str]:
    """What MONAI's MetricsSaver writes (metrics "*", metric_details "*", summary_ops "*"): metrics.csv and per metric
    with details <name>_raw.csv and <name>_summary.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.csv").write_text("".join(f"{k},{v}\n" for k, v in metrics.items()))
    for name in metrics:
        (folder / f"{name}_raw.csv").write_text("filename,class0,mean\na.png,0.5,0.5\n")
        (folder / f"{name}_summary.csv").write_text("class,mean\nclass0,0.5\n")
    return {"metrics.csv"} | {f"{n}{s}" for n in metrics for s in ("_raw.csv", "_summary.csv")}


def test_overwrite_removes_the_per_case_csvs_of_the_earlier_evaluation_and_nothing_else(tmp_path):
    # --overwrite removed metrics.csv but left dice_raw.csv, dice_summary.csv, iou_raw.csv and iou_summary.csv: a
    # rerun's folder (or one that failed mid-way) held the earlier run's per-case results beside its own
    from dira3d.evaluation.run_folders import claim_run_folders, earlier_run_files, release_run_folders

    root = tmp_path / "run"
    _earlier_run(root)
    earlier = _evaluation_reports(root / "eval", {"dice": 0.8, "iou": 0.7})
    (root / "eval" / "test_cases.csv").write_text("case,dice,iou,empty_reference\na.png,0.5,0.3,0\n")  # its per-case rows
    earlier.add("test_cases.csv")
    # and the rows of an evaluation of the holdout (eval_split=holdout), named after it
    (root / "eval" / "holdout_cases.csv").write_text("case,dice,iou,empty_reference\nb.png,0.5,0.3,0\n")
    earlier.add("holdout_cases.csv")
    users = {"notes.csv": "mine", "other_raw.csv": "not a metric of that run", "dice.csv": "mine too",
             "my_cases.csv": "not a split's"}
    for name, text in users.items():
        (root / "eval" / name).write_text(text)
    listed = {p.name for p in earlier_run_files(root / "models", root / "eval")}
    assert earlier <= listed and not listed & set(users)
    claim_run_folders(root / "models", root / "eval", overwrite=True)
    try:
        assert {p.name for p in (root / "eval").iterdir()} == set(users)
        assert all((root / "eval" / n).read_text() == t for n, t in users.items())
    finally:
        release_run_folders(root / "models")
    # metrics.csv gone (damaged) but metrics.json names the metrics: dira3d finetune still finds their CSVs
    from dira3d.evaluation.finetune_checks import earlier_outputs

    out = tmp_path / "out"
    _evaluation_reports(out, {"dice": 0.8})
    (out / "metrics.csv").write_bytes(b"\xff\xfe")
    (out / "metrics.json").write_text(json.dumps({"metrics": {"dice": 0.8}}))
    assert {p.name for p in earlier_outputs(out)} == {"metrics.json", "metrics.csv", "dice_raw.csv", "dice_summary.csv"}
    # the earlier run's splits.json goes with its metrics.json: a run that fails after it must not leave it behind
    (out / "splits.json").write_text("{}")
    assert "splits.json" in {p.name for p in earlier_outputs(out)}


def test_finetune_overwrite_leaves_no_per_case_csv_of_the_earlier_run(tmp_path):
    """End to end: a segmentation run, then a classification run into the same --output-dir with --overwrite."""
    from dira3d.evaluation.finetune import main
    from test_bundles_2d import write_cxr

    out = tmp_path / "out"
    seg = write_cxr(tmp_path / "seg", "seg.json", None, train=4, test=2)
    assert main(["--bundle", "montgomery_lung_seg", "--tiny", "--datalist", str(seg), "--output-dir", str(out)]) == 0
    assert {"dice_raw.csv", "dice_summary.csv", "iou_raw.csv", "iou_summary.csv", "test_cases.csv"} <= \
        {p.name for p in out.iterdir()}
    (out / "notes_raw.csv").write_text("the user's")
    cls = write_cxr(tmp_path / "cls", "cls.json", 14, train=8, test=4)
    assert main(["--bundle", "chestxray14_cls", "--tiny", "--datalist", str(cls), "--output-dir", str(out), "--overwrite"]) == 0
    csvs = sorted(p.name for p in out.glob("*.csv"))
    assert csvs == ["metrics.csv", "notes_raw.csv", "test_cases.csv"], csvs  # test_cases.csv: this run's predictions
    assert (out / "test_cases.csv").read_text().startswith("case,label_Atelectasis,")
    assert (out / "metrics.csv").read_text().startswith("auc,")


def test_an_overwrite_rerun_removes_the_half_written_files_a_killed_run_left(tmp_path):
    # `dira3d finetune` killed outright (SIGKILL, the OOM killer) while it scored the test split left the hidden
    # temporary file of the write it was in (.test_cases.csv.<8 characters>.tmp, or metrics.json's, ...) in the run
    # folder, and the rerun with --overwrite kept it; it now removes those of the files it writes. A temporary file a
    # live writer holds, and any other file, is kept; a rerun without --overwrite is refused and changes nothing.
    import os

    from dira3d.evaluation.finetune import run_finetune
    from dira3d.utils.folder_lock import LOCK_NAME

    fcntl = pytest.importorskip("fcntl", reason="a live writer holds its temporary file with POSIX flock")
    from test_bundles_finetune import make_classification

    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(EARLIER_MODEL)  # the killed run had trained: no metrics.json yet
    left = [out / ".test_cases.csv.k1ll3d0a.tmp", out / ".metrics.json.k1ll3d0b.tmp", out / ".splits.json.k1ll3d0c.tmp",
            out / ".holdout_cases.csv.k1ll3d0d.tmp", out / "models" / ".preprocessing.json.k1ll3d0e.tmp"]
    others = [out / ".notes.txt.k1ll3d0f.tmp", out / ".test_cases.csv.notes.tmp", out / "models" / ".other.pt.k1ll3d0g.tmp"]
    held = out / ".metrics.json.h0ld1ng0.tmp"  # a live writer's (it holds the flock atomic_path takes)
    for path in left + others + [held]:
        path.write_bytes(b"half a file")

    def files():
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    before = files()
    settings = {"datalist": str(datalist), "max_epochs": 1}
    with pytest.raises(FileExistsError, match="unfinished fine-tuning run"):
        run_finetune("luna16_nodule_fpr", settings, output_dir=out, tiny=True)
    assert files() == before  # refused: nothing removed
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_finetune("luna16_nodule_fpr", settings, output_dir=out, tiny=True, overwrite=True)
    finally:
        os.close(fd)
    assert result["test_cases"] == "test_cases.csv" and (out / "test_cases.csv").is_file()
    assert [p.name for p in left if p.exists()] == []
    assert all(p.read_bytes() == b"half a file" for p in others + [held])
