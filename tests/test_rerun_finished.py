"""Rerunning a finished pretraining (found 2026-11-27): the bundle built the trainer, and with it the datasets
(MONAI's CacheDataset loaded every volume: minutes to tens of minutes on LUNA16), before the resume found nothing left
to train, and wrote last.pt again. initialize's dira3d.engines.exit_if_finished now ends such a rerun with one line and
exit 0 before any data is loaded, writing nothing; a larger max_epochs, resume false, a pending epoch end or a
checkpoint of other settings go the usual way. A rerun on other data (another datalist or visual-word folder, another
number of classes) was said to be finished too, and nothing trained: last.pt records its data (data_source,
num_classes) and such a rerun is refused there, in one line, before any volume is loaded (session 23)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset

from dira3d.engines import RunAlreadyFinished
from dira3d.engines.finished import exit_if_finished, finished_note
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


def _rerun_args(data, out) -> list[str]:
    """``dira3d pretrain`` of the finished run's settings on ``data``'s datalist into ``out``."""
    return ["--datalist", str(data / "pretrain_datalist.json"), "--output", str(out), "--tiny",
            "--override", "patch_size=[16,16,8]", "--override", "max_epochs=1"]


def test_dira3d_pretrain_says_the_run_has_finished_and_exits_0(finished_run, monkeypatch, capsys):
    from dira3d.engines.command import main

    data, out = finished_run
    before = _files(out)
    monkeypatch.setattr(CacheDataset, "_load_cache_item", lambda *a, **k: pytest.fail("the rerun loaded data"))
    code = main(_rerun_args(data, out))
    printed = capsys.readouterr().out
    assert code == 0
    last = out / "models" / "last.pt"
    assert f"dira3d pretrain: {last} is at epoch 1, max_epochs=1: this run has already finished" in printed
    assert f"checkpoints: {out / 'models' / 'best.pt'}" in printed  # then the usual closing lines
    assert _files(out) == before


def _same_data(data):
    return {"data_source": os.path.realpath(data / "pretrain_datalist.json"), "num_classes": 4}


class _Count:
    """num_classes as the bundle's count_classes gives it: a callable, counted."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_a_finished_run_records_its_data_and_a_rerun_on_other_data_is_refused(finished_run, tmp_path):
    data, out = finished_run
    models, last = out / "models", out / "models" / "last.pt"
    same = _same_data(data)
    meta = load_checkpoint(last)["meta"]
    assert {key: meta[key] for key in same} == same  # the real path of the datalist, its 4 training volumes
    assert finished_note(models, 1, data=same)
    other_list = str(tmp_path / "pretrain_datalist.json")
    for change, named in (({"num_classes": 5}, "num_classes 4, this run's 5"),
                          ({"num_classes": _Count(5)}, "num_classes 4, this run's 5"),
                          ({"data_source": other_list}, f"data_source {same['data_source']!r}, this run's {other_list!r}")):
        with pytest.raises(ValueError) as refused:
            exit_if_finished(models, 1, data={**same, **change})
        message = str(refused.value)
        assert message.startswith(f"{last} is a finished run on other data ({named}): it is not resumed"), message
        assert "use another ckpt_dir" in message and "set resume to false" in message and "\n" not in message
        # not finished, or starting afresh: the usual path, as before
        assert finished_note(models, 2, data={**same, **change}) == ""
        assert finished_note(models, 1, resume=False, data={**same, **change}) == ""


def test_the_classes_are_counted_only_for_a_finished_run_on_the_same_data_source(finished_run, tmp_path):
    data, out = finished_run
    models = out / "models"
    same = _same_data(data)
    count = _Count(4)
    assert finished_note(models, 1, data={**same, "num_classes": count}) and count.calls == 1
    for kwargs in ({"max_epochs": 2}, {"max_epochs": 1, "resume": False}, {"max_epochs": 1, "settings": {"width": 9}}):
        assert finished_note(models, data={**same, "num_classes": count}, **kwargs) == ""
    with pytest.raises(ValueError, match="data_source"):  # named without reading the other datalist
        finished_note(models, 1, data={"data_source": str(tmp_path / "other.json"), "num_classes": count})
    assert count.calls == 1


def test_a_last_pt_that_does_not_record_its_data_goes_the_usual_way(finished_run, tmp_path):
    data, out = finished_run
    ckpt = load_checkpoint(out / "models" / "last.pt")
    same = _same_data(data)
    count = _Count(5)
    for version, left_out in (("0.1.32", {"data_source"}), ("0.1.31", set(same))):  # num_classes, no data_source; neither
        folder = tmp_path / version
        atomic_save({**ckpt, "meta": {k: v for k, v in ckpt["meta"].items() if k not in left_out}}, folder / "last.pt")
        assert finished_note(folder, 1, data=same) == ""  # its data cannot be told: the resume decides, as before
        assert finished_note(folder, 1, data={**same, "num_classes": count}) == ""
    assert count.calls == 0


def test_the_bundle_configs_name_their_data_and_count_their_classes(tmp_path):
    from monai.bundle import ConfigParser

    from dira3d.visual_words.writer import new_manifest

    (tmp_path / "vw").mkdir()
    np.save(tmp_path / "vw" / "t0.npy", np.zeros((2, 1, 4, 4, 4), np.float16))
    manifest = {**new_manifest(0, {}, "d.json", {}, {}), "status": "complete",
                "classes": [{"index": i, "shards": {"training": "t0.npy"}} for i in range(3)]}
    (tmp_path / "vw" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "link").symlink_to(tmp_path / "vw")
    parser = ConfigParser()
    parser.read_config([str(REPO / CONFIGS / name) for name in ("train.json", "visual_words.json")])
    parser["dataset_dir"] = str(tmp_path / "link")
    assert parser.get_parsed_content("data_source") == os.path.realpath(tmp_path / "vw")
    assert parser.get_parsed_content("count_classes")() == parser.get_parsed_content("num_classes") == 3
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    write_volumes(volumes, count=3)
    parser = ConfigParser()
    parser.read_config(str(REPO / CONFIGS / "train.json"))
    parser["dataset_dir"] = str(volumes)
    assert parser.get_parsed_content("count_classes")() == parser.get_parsed_content("num_classes") == 3


def test_dira3d_pretrain_refuses_a_finished_run_rerun_on_other_data(finished_run, tmp_path, monkeypatch, capsys):
    from dira3d.engines.command import main

    _, out = finished_run
    before = _files(out)
    other = tmp_path / "other"
    other.mkdir()
    write_volumes(other, count=4)  # the same number of training volumes (4), in another folder
    monkeypatch.setattr(CacheDataset, "_load_cache_item", lambda *a, **k: pytest.fail("the rerun loaded data"))
    code = main(_rerun_args(other, out))
    err = capsys.readouterr().err
    assert code == 2
    last = out / "models" / "last.pt"
    lines = [line for line in err.splitlines() if line.startswith("dira3d pretrain: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"dira3d pretrain: error: {last} is a finished run on other data "
                                                   "(data_source "), err
    assert f"this run's {str(other.resolve() / 'pretrain_datalist.json')!r}" in lines[0]
    assert _files(out) == before


def _copied_run(finished_run, tmp_path):
    """The finished run and its data copied to ``tmp_path``, ``last.pt``'s data_source the copy's datalist."""
    import shutil

    data, out = finished_run
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(out, tmp_path / "run")
    last = tmp_path / "run" / "models" / "last.pt"
    ckpt = load_checkpoint(last)
    datalist = tmp_path / "data" / "pretrain_datalist.json"
    atomic_save({**ckpt, "meta": {**ckpt["meta"], "data_source": os.path.realpath(datalist)}}, last)
    return tmp_path / "data", tmp_path / "run", datalist


def test_a_finished_run_rerun_on_data_prepared_again_at_the_same_place_is_refused(finished_run, tmp_path, monkeypatch,
                                                                                   capsys):
    """``dira3d prepare ... --dst`` rerun on other data into the same folder: the same datalist path, the same number of
    training volumes, so last.pt's data_source and num_classes said it was the same data, finished; its data_sha256
    (dira_pretrain 0.1.55) tells."""
    import hashlib

    from dira3d.engines.command import main

    data, out = finished_run
    meta = load_checkpoint(out / "models" / "last.pt")["meta"]
    assert meta["data_sha256"] == hashlib.sha256((data / "pretrain_datalist.json").read_bytes()).hexdigest()
    data, out, datalist = _copied_run(finished_run, tmp_path)
    monkeypatch.setattr(CacheDataset, "_load_cache_item", lambda *a, **k: pytest.fail("the rerun loaded data"))
    assert main(_rerun_args(data, out)) == 0 and "has already finished" in capsys.readouterr().out
    lists = json.loads(datalist.read_text())
    lists["training"] = [{**entry, "case_id": f"other{i}"} for i, entry in enumerate(lists["training"])]  # still 4
    datalist.write_text(json.dumps(lists))  # prepared again
    before = _files(out)
    assert main(_rerun_args(data, out)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dira3d pretrain: error:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"dira3d pretrain: error: {out / 'models' / 'last.pt'} is a finished run on other data (data_source "
        f"{os.path.realpath(datalist)!r} is where its data were, but they are not those it was trained on: their sha256 "
        "is not last.pt's data_sha256; prepared again there?): it is not resumed"), err
    assert _files(out) == before


def test_a_last_pt_without_a_data_checksum_is_compared_as_before(finished_run, tmp_path):
    """A last.pt of dira_pretrain 0.1.54 or earlier (no data_sha256) on a datalist prepared again: finished, as before;
    and where both record it, data at another place whose sha256 differs are not said to be maybe the same data."""
    data, out = finished_run
    ckpt = load_checkpoint(out / "models" / "last.pt")
    same = _same_data(data)
    other = {**same, "data_sha256": lambda: "0" * 64}
    atomic_save({**ckpt, "meta": {k: v for k, v in ckpt["meta"].items() if k != "data_sha256"}}, tmp_path / "last.pt")
    assert finished_note(tmp_path, 1, data=other).endswith("this run has already finished; nothing was loaded, trained "
                                                          "or written; to train more, rerun with a larger max_epochs "
                                                          "(it continues from last.pt)")
    with pytest.raises(ValueError, match="prepared again there"):
        finished_note(out / "models", 1, data=other)
    elsewhere = str(tmp_path / "fast" / "pretrain_datalist.json")
    with pytest.raises(ValueError) as err:
        finished_note(out / "models", 1, data={**other, "data_source": elsewhere})
    assert "whose sha256 is not last.pt's data_sha256 either" in str(err.value)
    assert "same data moved" not in str(err.value)
    with pytest.raises(ValueError, match="records its place and the sha256 of the datalist, the same here, not of the "
                                         "volumes it lists, so cannot tell"):  # the same content elsewhere
        finished_note(out / "models", 1, data={**same, "data_source": elsewhere, "data_sha256": ckpt["meta"]["data_sha256"]})


def test_the_data_checksum_of_a_visual_word_folder_is_of_its_manifest(tmp_path):
    from monai.bundle import ConfigParser

    from dira3d.engines import data_checksum

    (tmp_path / "vw").mkdir()
    (tmp_path / "vw" / "manifest.json").write_text('{"classes": []}')
    parser = ConfigParser()
    parser.read_config([str(REPO / CONFIGS / name) for name in ("train.json", "visual_words.json")])
    parser["dataset_dir"] = str(tmp_path / "vw")
    checksum = parser.get_parsed_content("data_sha256")
    first = checksum()
    assert first == data_checksum(tmp_path / "vw") and len(first) == 64
    np.save(tmp_path / "vw" / "t0.npy", np.zeros(2))  # shards are not read
    (tmp_path / "vw" / "visual_words.json").write_text('{"training": []}')  # written again from the manifest
    assert checksum() == first
    (tmp_path / "vw" / "manifest.json").write_text('{"classes": [1]}')  # rebuilt
    assert checksum() != first
    assert data_checksum(tmp_path / "missing.json") == ""
    (tmp_path / "lists").mkdir()  # a folder without a manifest: its JSON files
    (tmp_path / "lists" / "a.json").write_text("{}")
    before = data_checksum(tmp_path / "lists")
    (tmp_path / "lists" / "a.json").write_text("[]")
    assert len(before) == 64 and data_checksum(tmp_path / "lists") != before


def test_a_rerun_of_a_finished_run_removes_the_half_written_checkpoints_a_killed_save_left(finished_run, repo_root,
                                                                                           tmp_path, capsys):
    # a kill in the middle of a checkpoint write (SIGKILL, the OOM killer) leaves its hidden temporary file (a
    # checkpoint's size); the checkpoint handler removes it as a resumed run starts, which a rerun of a finished run never
    # reaches (it ends in initialize): initialize's remove_killed_checkpoint_writes removes it there, under ckpt_dir's lock
    fcntl = pytest.importorskip("fcntl", reason="a live writer holds its temporary file with POSIX flock")
    import shutil

    data, run = finished_run
    out = tmp_path / "run"
    shutil.copytree(run, out)  # the module's run stays as it is for the other tests
    models = out / "models"
    left = [models / ".best.pt.k1ll3d0a.tmp", models / ".last.pt.k1ll3d0b.tmp"]
    other = models / ".notes.txt.k1ll3d0c.tmp"  # not a checkpoint's: not this run's to remove
    held = models / ".best.pt.h0ld1ng0.tmp"  # a live writer's (it holds the flock atomic_path takes): kept
    for path in left + [other, held]:
        path.write_bytes(b"half a checkpoint")
    checkpoints = {name: (models / name).read_bytes() for name in ("last.pt", "best.pt")}
    with open(held, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunAlreadyFinished):
            _run(data, out, repo_root, max_epochs=1)
    assert [p.name for p in left if p.exists()] == []
    assert other.read_bytes() == held.read_bytes() == b"half a checkpoint"
    assert {name: (models / name).read_bytes() for name in checkpoints} == checkpoints
    assert ".last.pt.k1ll3d0b.tmp" in capsys.readouterr().err  # said so
    for name in ("train.json", "multi_gpu_train.json"):  # before the finished check, in both
        steps = json.loads((repo_root / CONFIGS / name).read_text(encoding="utf-8"))["initialize"]
        at = [i for i, step in enumerate(steps) if "remove_killed_checkpoint_writes(@ckpt_dir)" in step]
        assert at and at[0] < next(i for i, step in enumerate(steps) if "exit_if_finished" in step), name
