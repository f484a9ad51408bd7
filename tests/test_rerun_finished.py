"""Rerunning a finished pretraining (found 2026-11-27): the bundle built the trainer, and with it the datasets
(MONAI's CacheDataset loaded every volume: minutes to tens of minutes on LUNA16), before the resume found nothing left
to train, and wrote last.pt again. initialize's dira3d.engines.exit_if_finished now ends such a rerun with one line and
exit 0 before any data is loaded, writing nothing; a larger max_epochs, resume false, a pending epoch end or a
checkpoint of other settings go the usual way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import CacheDataset

from dira3d.engines import RunAlreadyFinished
from dira3d.engines.finished import finished_note
from dira3d.utils import load_checkpoint
from dira3d.utils.checkpoint import atomic_save
from test_bundle_pretrain import write_volumes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "bundles/dira_pretrain/configs"


def _run(data, out, repo_root, **overrides):
    from dira3d.utils.overrides import run_bundle

    configs = repo_root / CONFIGS
    run_bundle([str(configs / "train.json"), str(configs / "tiny.json")], meta_file=str(configs / "metadata.json"),
               logging_file=str(configs / "logging.conf"), dataset_dir=str(data), ckpt_dir=str(out / "models"),
               output_dir=str(out / "eval"), patch_size=[16, 16, 8], **overrides)


def _files(out):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    data = root / "volumes"
    data.mkdir()
    write_volumes(data, count=6)
    _run(data, root / "run", REPO, max_epochs=1)
    return data, root / "run"


def test_a_rerun_of_a_finished_run_says_so_and_loads_and_writes_nothing(finished_run, repo_root, monkeypatch, capsys):
    data, out = finished_run
    assert load_checkpoint(out / "models" / "last.pt")["trainer"]["epoch"] == 1
    before = _files(out)
    assert (out / "models" / "best.pt") in before and any("tfevents" in p.name for p in before)

    def no_loading(self, *args, **kwargs):
        raise AssertionError("the rerun of a finished run loaded data")

    monkeypatch.setattr(CacheDataset, "_load_cache_item", no_loading)
    with pytest.raises(RunAlreadyFinished) as done:
        _run(data, out, repo_root, max_epochs=1)
    assert done.value.code == 0
    last = out / "models" / "last.pt"
    line = (f"{last} is at epoch 1, max_epochs=1: this run has already finished; nothing was loaded, trained or "
            "written; to train more, rerun with a larger max_epochs (it continues from last.pt)")
    assert str(done.value) == line
    logged = [text for text in capsys.readouterr().out.splitlines() if "dira3d.finished" in text]
    assert len(logged) == 1 and logged[0].endswith(f"dira3d.finished - INFO - pretraining: {line}"), logged
    assert _files(out) == before  # best.pt, last.pt, TensorBoard: same bytes, same mtimes, nothing new


def test_a_larger_max_epochs_or_resume_false_is_not_finished(finished_run):
    _, out = finished_run
    models = out / "models"
    assert finished_note(models, 1)
    assert finished_note(models, 2) == ""  # the user trains on: the usual resume
    assert finished_note(models, 1, resume="false") == ""  # starts afresh, as before
    assert finished_note(out / "nothing", 1) == ""


def test_a_pending_epoch_end_a_mid_epoch_or_other_settings_are_not_finished(finished_run, tmp_path):
    _, out = finished_run
    ckpt = load_checkpoint(out / "models" / "last.pt")
    meta = ckpt["meta"]
    assert {"dis_hidden", "proj_dim", "num_classes", "adversary_channels", "width"} <= set(meta)
    same = {k: meta[k] for k in ("width", "dis_hidden", "dis_mode")}
    assert finished_note(out / "models", 1, settings=same)
    assert finished_note(out / "models", 1, settings={**same, "dis_hidden": meta["dis_hidden"] * 2}) == ""
    assert finished_note(out / "models", 1, settings={**same, "not_recorded": 1}) == ""
    for change in ({"epoch_end_pending": True}, {"epoch_iteration": 1}):
        folder = tmp_path / str(sorted(change)[0])
        atomic_save({**ckpt, "trainer": {**ckpt["trainer"], **change}}, folder / "last.pt")
        assert finished_note(folder, 1) == ""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    assert finished_note(tmp_path / "bad", 1) == ""
    with pytest.raises(ValueError, match="stages"):
        finished_note(out / "models", 1, stages=[])


def test_a_rerun_with_a_larger_max_epochs_still_trains_on(finished_run, repo_root, tmp_path):
    import shutil

    data, out = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    _run(data, copy, repo_root, max_epochs=2)
    assert load_checkpoint(copy / "models" / "last.pt")["trainer"]["epoch"] == 2
    assert isinstance(torch.load(copy / "models" / "last.pt", weights_only=True), dict)


def test_dira3d_pretrain_says_the_run_has_finished_and_exits_0(finished_run, monkeypatch, capsys):
    from dira3d.engines.command import main

    data, out = finished_run
    before = _files(out)
    monkeypatch.setattr(CacheDataset, "_load_cache_item", lambda *a, **k: pytest.fail("the rerun loaded data"))
    code = main(["--datalist", str(data / "pretrain_datalist.json"), "--output", str(out), "--tiny",
                 "--override", "patch_size=[16,16,8]", "--override", "max_epochs=1"])
    printed = capsys.readouterr().out
    assert code == 0
    last = out / "models" / "last.pt"
    assert f"dira3d pretrain: {last} is at epoch 1, max_epochs=1: this run has already finished" in printed
    assert f"checkpoints: {out / 'models' / 'best.pt'}" in printed  # then the usual closing lines
    assert _files(out) == before
