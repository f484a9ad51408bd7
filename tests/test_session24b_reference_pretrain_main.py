"""Session 24b mutation audit of ``dira3d pretrain``'s ``main()`` (dira3d.engines.command): its argument checks, the
paths and configs it hands to the bundle run and its exits, pinned with the bundle run replaced (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

import dira3d.utils.overrides as overrides
from dira3d.engines.command import BUNDLE_DIR, main


@pytest.fixture
def bundle_run(monkeypatch):
    """The bundle run replaced: records its configs and keyword arguments."""
    seen: dict = {}

    def run(configs, **kwargs):
        seen.update(kwargs, configs=list(configs))

    monkeypatch.setattr(overrides, "run_bundle", run)
    return seen


@pytest.fixture
def datalist(tmp_path) -> Path:
    path = tmp_path / "pretrain_datalist.json"
    path.write_text('{"training": []}')
    return path


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_pretrain_hands_the_bundle_its_folders_and_the_default_output(tmp_path, monkeypatch, datalist, bundle_run):
    monkeypatch.chdir(tmp_path)
    assert main(["--datalist", datalist.name]) == 0
    out = tmp_path / "runs" / "dira_pretrain"
    assert (bundle_run["ckpt_dir"], bundle_run["output_dir"]) == (str(out / "models"), str(out / "eval"))
    assert (bundle_run["datalist"], bundle_run["dataset_dir"]) == (str(datalist), str(tmp_path))
    assert bundle_run["configs"] == [str(BUNDLE_DIR / "configs" / "train.json")]


def test_pretrain_adds_tiny_json_and_the_configs_named_or_given_by_path(tmp_path, monkeypatch, datalist, bundle_run):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.json").write_text('{"max_epochs": 3}')  # a path relative to the current folder
    argv = ["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--tiny"]
    assert main(argv + ["--config", "mine.json"]) == 0
    own = BUNDLE_DIR / "configs"
    assert bundle_run["configs"] == [str(own / "train.json"), str(own / "tiny.json"), "mine.json"]
    # with 2d.json, --tiny adds 2d_tiny.json after the bundle's 2D configs and before the user's own (session 25: the
    # 3D tiny.json before 2d.json left 2d.json's batch of 32)
    assert main(argv + ["--config", "2d.json", "--config", "mine.json"]) == 0
    assert bundle_run["configs"] == [str(own / "train.json"), str(own / "2d.json"), str(own / "2d_tiny.json"),
                                     "mine.json"]


def test_pretrain_refuses_a_missing_datalist_or_config_before_anything_runs(tmp_path, datalist, bundle_run, capsys):
    out = tmp_path / "run"
    line = _refused(["--datalist", str(tmp_path / "nope.json"), "--output", str(out)], capsys)
    assert f"datalist {tmp_path / 'nope.json'} does not exist; make one with `dira3d prepare luna16" in line, line
    line = _refused(["--datalist", str(datalist), "--output", str(out), "--config", "nosuch.json"], capsys)
    assert "--config nosuch.json: no such file; give a path or one of the bundle's configs: " in line, line
    assert "tiny.json" in line and "train.json" in line
    assert bundle_run == {} and not out.exists()


@pytest.mark.parametrize("key", ["ckpt_dir", "output_dir", "datalist", "dataset_dir", "bundle_root"])
def test_pretrain_refuses_an_override_of_what_its_options_set(key, tmp_path, datalist, bundle_run, capsys):
    line = _refused(["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--override", f"{key}=x"], capsys)
    assert f"--override {key}=...: dira3d pretrain sets {key} " in line and "use that option instead" in line, line
    assert bundle_run == {}


def test_pretrain_refuses_an_override_the_bundle_does_not_take(tmp_path, datalist, bundle_run, capsys):
    line = _refused(["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--override", "max_epochs=two"],
                    capsys)
    assert "max_epochs='two' is text, but the setting is a number" in line, line
    assert bundle_run == {}


def test_pretrain_refuses_an_output_that_is_a_file_before_the_run(tmp_path, datalist, bundle_run, capsys):
    output = tmp_path / "taken"
    output.write_text("mine")
    line = _refused(["--datalist", str(datalist), "--output", str(output)], capsys)
    assert f"output folder (--output) {output} is not writable" in line, line
    assert bundle_run == {} and output.read_text() == "mine"


def test_a_run_stopped_before_it_wrote_anything_leaves_no_output_folder(tmp_path, datalist, monkeypatch, capsys):
    def interrupted(configs, **kwargs):
        assert Path(kwargs["ckpt_dir"]).parent.is_dir()  # created (and checked writable) before the run
        raise KeyboardInterrupt

    monkeypatch.setattr(overrides, "run_bundle", interrupted)
    output = tmp_path / "run"
    assert main(["--datalist", str(datalist), "--output", str(output)]) == 130
    assert "interrupted before the first checkpoint" in capsys.readouterr().err
    assert not output.exists()


def test_an_error_that_is_not_a_setting_error_reaches_the_caller(tmp_path, datalist, monkeypatch):
    def broken(configs, **kwargs):
        raise RuntimeError("a bug, with its traceback")

    monkeypatch.setattr(overrides, "run_bundle", broken)
    with pytest.raises(RuntimeError, match="a bug, with its traceback"):
        main(["--datalist", str(datalist), "--output", str(tmp_path / "run")])


@pytest.mark.parametrize("stage", ["loading", "caching"])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_the_line_after_ctrl_c_before_training_is_rank_0s_alone(tmp_path, datalist, monkeypatch, capsys,
                                                                              stage, rank):
    """``torchrun`` (and a terminal's Ctrl-C, Slurm's SIGTERM) stops every rank: while torch and MONAI load
    (``loading``) or the data are cached (``caching``), each rank printed the same line on the same --output; rank 0
    prints it, the others exit 130 without a word, as after a stop in training."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(overrides, "check_overrides" if stage == "loading" else "run_bundle", interrupt)
    argv = ["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--config", "multi_gpu_train.json"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    if rank == "1":
        assert err == ""
    else:
        assert err.startswith("dira3d pretrain: interrupted") and len(err.splitlines()) == 1, err
