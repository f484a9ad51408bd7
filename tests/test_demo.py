"""The README's main command (`make demo` → `python -m dira3d.demo`), end to end at a small size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dira3d.utils import load_checkpoint


@pytest.mark.slow
def test_demo_runs_end_to_end_and_prints_what_a_user_needs(tmp_path, repo_root):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dira3d.demo", "--out", str(out), "--count", "10", "--classes", "2",
           "--epochs-per-stage", "1", "--seeds", "1"]
    proc = subprocess.run(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    # the per-stage table has one row per stage with the terms that stage trains
    assert "| dis | dis | 1–1 |" in text and "| dis_res | dis+res | 2–2 |" in text
    assert "| dira | dis+res+adv | 3–3 |" in text
    assert "| random |" in text and "| dira |" in text  # the fine-tuning comparison
    assert "random init vs DiRA, 1 seed\n" in text  # not "1 seeds"
    assert f"checkpoint:  {out / 'pretrain' / 'models' / 'best.pt'}" in text
    assert f"tensorboard --logdir {out / 'pretrain' / 'eval'}" in text
    ckpt = load_checkpoint(out / "pretrain" / "models" / "last.pt")
    assert ckpt["meta"]["dis_mode"] == "visual_words" and ckpt["trainer"]["epoch"] == 3
    # a second run reuses everything it wrote: no new phantoms, no new visual words
    raw_mtime = (out / "luna16_raw" / "annotations.csv").stat().st_mtime_ns
    proc = subprocess.run(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "luna16_raw" / "annotations.csv").stat().st_mtime_ns == raw_mtime
    assert "phantoms already in" in proc.stdout
    # the pretraining step says it is reused under its one line, not under a second "4/5" line, in the demo's options
    assert proc.stdout.count("=== 4/5 pretraining") == 1, proc.stdout
    assert "    already finished (" in proc.stdout and "max_epochs" not in proc.stdout, proc.stdout


def test_demo_rerun_names_the_finished_pretraining_step_once(tmp_path, capsys, caplog, monkeypatch):
    """A rerun printed the step's line twice: "=== 4/5 pretraining ... into DIR" and "=== 4/5 pretraining already
    finished in DIR/models", the finished run's own log line between them; now the step's line once. That log line
    told a demo user to "rerun with a larger max_epochs", which the demo has no option for: now the demo's own line
    names its options (--epochs-per-stage, in another --out: the stages of the finished run cannot be lengthened)."""
    import logging

    import dira3d.demo as demo
    import dira3d.utils.overrides as overrides
    from dira3d.engines.finished import RunAlreadyFinished

    def finished(**kwargs):  # as the bundle's exit_if_finished: its line logged, then the exit
        assert kwargs["bundle_root"] == str(tmp_path / "pretrain")
        note = ("pretraining: last.pt is at epoch 3, max_epochs=3: this run has already finished; nothing was loaded, "
                "trained or written; to train more, rerun with a larger max_epochs (it continues from last.pt)")
        logging.getLogger("dira3d.finished").info(note)
        raise RunAlreadyFinished(note)

    monkeypatch.setattr(overrides, "run_bundle", finished)
    with caplog.at_level(logging.INFO):
        run_dir, stages = demo._pretrain(tmp_path / "visual_words", tmp_path, (32, 32, 16), 1, 0)
    assert run_dir == tmp_path / "pretrain" and [s["name"] for s in stages] == ["dis", "dis_res", "dira"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == f"=== 4/5 pretraining 3D DiRA (tiny preset, stages dis → dis+res → dis+res+adv) into {run_dir}"
    assert len(lines) == 2 and lines[1].startswith(f"    already finished ({run_dir / 'models' / 'last.pt'}"), lines
    assert "--epochs-per-stage 1" in lines[1] and "a larger --epochs-per-stage and another --out" in lines[1]
    assert "max_epochs" not in caplog.text  # the bundle's advice is left out, for the demo's run only
    assert not logging.getLogger("dira3d.finished").filters


def test_demo_rerun_with_other_epochs_per_stage_is_one_error_line_before_any_step(tmp_path, capsys, monkeypatch):
    """A rerun with another --epochs-per-stage in the same --out went on from last.pt with other stage ends (a larger
    one: epochs of one stage counted in another's in the table) or said it had finished (a smaller one); now one
    error line naming both, before any step. Without last.pt (a demo stopped before pretraining) the new one is kept."""
    import dira3d.demo as demo
    import dira3d.utils.overrides as overrides

    def pretraining(**kwargs):
        raise RuntimeError("pretraining reached")

    monkeypatch.setattr(demo, "_phantoms_and_prepare", lambda out, *args: out / "luna16_prepared")
    monkeypatch.setattr(demo, "_visual_words", lambda prepared, out, *args: out / "visual_words")
    monkeypatch.setattr(overrides, "run_bundle", pretraining)
    out, common = tmp_path / "demo", ["--count", "10", "--classes", "2", "--skip-finetune"]
    with pytest.raises(RuntimeError, match="pretraining reached"):  # a first run records its --epochs-per-stage
        demo.main(["--out", str(out), *common, "--epochs-per-stage", "2"])
    record = out / "pretrain" / demo.STAGES_RECORD
    assert json.loads(record.read_text(encoding="utf-8")) == {"epochs_per_stage": 2}
    with pytest.raises(RuntimeError, match="pretraining reached"):  # no last.pt yet: another one is taken
        demo.main(["--out", str(out), *common, "--epochs-per-stage", "1"])
    (out / "pretrain" / "models").mkdir(parents=True)
    (out / "pretrain" / "models" / "last.pt").write_bytes(b"the earlier pretraining")
    capsys.readouterr()
    assert demo.main(["--out", str(out), *common, "--epochs-per-stage", "3"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("dira3d demo: error:")]
    assert len(lines) == 1 and "with --epochs-per-stage 1, not 3" in lines[0], captured.err
    assert "rerun with --epochs-per-stage 1 to go on with it, or choose another --out" in lines[0]
    assert "===" not in captured.out and (out / "pretrain" / "models" / "last.pt").read_bytes() == b"the earlier pretraining"
    with pytest.raises(RuntimeError, match="pretraining reached"):  # the same one goes on, its record kept
        demo.main(["--out", str(out), *common, "--epochs-per-stage", "1"])
    assert json.loads(record.read_text(encoding="utf-8")) == {"epochs_per_stage": 1}


@pytest.mark.parametrize("args, expected", [
    (["--epochs-per-stage", "0"], "--epochs-per-stage 0: pass 1 or more"),
    (["--epochs-per-stage", "-2"], "--epochs-per-stage -2: pass 1 or more"),
    (["--size", "0", "0", "0"], "--size 0 0 0: a phantom needs at least 24 voxels per axis"),
    (["--size", "-8", "64", "64"], "--size -8 64 64: a phantom needs at least 24 voxels per axis"),
    (["--seeds", "0"], "--seeds 0: pass 1 or more fine-tuning seeds"),
    (["--seeds", "-1"], "--seeds -1: pass 1 or more fine-tuning seeds"),
    (["--seed", "-1"], "--seed -1: pass 0 or more"),
    (["--classes", "-1"], "--classes -1 is not possible with --count 10"),
    (["--classes", "0"], "--classes 0 is not possible with --count 10"),
])
def test_demo_odd_numbers_are_one_error_line_before_writing(tmp_path, capsys, monkeypatch, args, expected):
    """--epochs-per-stage 0 ended in a traceback of the pretraining bundle's check, --size 0 0 0 in a ZeroDivisionError,
    --classes -1 in a StopIteration, --seed -1 in "error: expected non-negative integer" (naming no option) after the
    first step's line, --seeds 0 in an empty results table; now a usage error naming the option, before anything."""
    import dira3d.demo as demo

    def step_one(*args):
        raise RuntimeError("step 1 reached")

    monkeypatch.setattr(demo, "_phantoms_and_prepare", step_one)
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(out), "--count", "10", "--classes", "2", *args])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d demo: error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()


def test_demo_skip_finetune_takes_no_seeds(tmp_path, monkeypatch):
    import dira3d.demo as demo

    def step_one(*args):
        raise RuntimeError("step 1 reached")

    monkeypatch.setattr(demo, "_phantoms_and_prepare", step_one)
    with pytest.raises(RuntimeError, match="step 1 reached"):
        demo.main(["--out", str(tmp_path / "demo"), "--count", "10", "--classes", "2", "--seeds", "0", "--skip-finetune"])


def test_demo_stopped_while_writing_its_phantoms_goes_on_when_rerun(tmp_path):
    # Ctrl-C says "rerun the same command to go on", but a rerun after a stop in step 1 (phantoms written, not yet
    # annotations.csv) failed: write_luna16_phantoms refused the tree it had begun, without --overwrite
    from dira3d.demo import _phantoms_and_prepare

    left = tmp_path / "luna16_raw" / "subset0" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.000000000000.mhd"
    left.parent.mkdir(parents=True)
    left.write_text("the first phantom of the stopped run")
    prepared = _phantoms_and_prepare(tmp_path, count=1, size=(48, 48, 24), seed=0)
    assert (tmp_path / "luna16_raw" / "annotations.csv").is_file() and (prepared / "pretrain_datalist.json").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--count", "6"], "--count 6 is too few phantoms: the demo needs 10 or more"),
    (["--count", "10"], "--classes 8 is not possible with --count 10: its 5 training phantoms (subsets 0-4) give 2 to 5 "
                        "visual words; pass --count 13 or more, or --classes 5 or fewer"),
])
def test_demo_refuses_too_few_phantoms_in_one_line_before_writing(tmp_path, capsys, args, expected):
    """`--count 6` used to write and prepare the phantoms, then end in a ValueError traceback of the visual-word
    step (5 training and 1 validation volumes); now a usage error before anything is written."""
    from dira3d.demo import main

    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--epochs-per-stage", "1", "--seeds", "1", *args])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d demo: error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()
    from dira3d.demo import count_problem

    assert count_problem(20, 8) is None and count_problem(10, 5) is None and count_problem(13, 8) is None
    assert count_problem(12, 8) is not None  # 12 phantoms: subsets 0-4 hold 7


def test_demo_out_a_file_or_phantoms_of_another_count_is_one_error_line(tmp_path, capsys):
    """--out FILE was a NotADirectoryError traceback; a rerun with another --count in the same --out reused the
    earlier phantoms silently and ended in a ValueError traceback of the visual-word step."""
    from dira3d.demo import main

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(target), "--count", "10", "--classes", "2"])
    assert exit_info.value.code == 2 and target.read_text() == "mine"
    assert f"--out {target} is a file, not a folder" in capsys.readouterr().err
    raw = tmp_path / "demo" / "luna16_raw"  # an earlier demo's phantoms: one of them, annotations.csv written last
    (raw / "subset0").mkdir(parents=True)
    (raw / "subset0" / "1.mhd").write_text("an earlier phantom")
    (raw / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    assert main(["--out", str(tmp_path / "demo"), "--count", "10", "--classes", "2", "--skip-finetune"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d demo: error:")]
    assert len(lines) == 1 and f"{raw} holds 1 phantoms from an earlier demo, not --count 10" in lines[0], lines
    assert (raw / "subset0" / "1.mhd").read_text() == "an earlier phantom"


def test_demo_out_not_writable_is_one_error_line_before_any_step(tmp_path, capsys):
    """--out in a folder that cannot be made (under a file here; /proc/x alike) ended in a FileNotFoundError /
    NotADirectoryError traceback of the phantom writer; now a usage error naming the folder, before step 1."""
    from dira3d.demo import main

    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--count", "10", "--classes", "2", "--skip-finetune"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("dira3d demo: error:")]
    assert len(lines) == 1 and f"output folder (--out) {out} is not writable" in lines[0], lines
    assert "choose another --out" in lines[0] and "1/5" not in captured.out
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_stages_record_is_written_only_for_a_pretraining_that_starts(tmp_path):
    """The --epochs-per-stage record describes the last.pt it was trained with: a folder holding a last.pt of a demo
    before the record (its epochs per stage unknown) gets none, so a rerun is not told it was trained with them."""
    from dira3d import demo

    run_dir = tmp_path / "pretrain"
    demo._record_stages(run_dir, 2)  # a pretraining about to start
    assert json.loads((run_dir / demo.STAGES_RECORD).read_text(encoding="utf-8")) == {"epochs_per_stage": 2}
    (run_dir / "models").mkdir()
    (run_dir / "models" / "last.pt").write_bytes(b"trained")
    demo._record_stages(run_dir, 3)  # the run it continues keeps its record
    assert json.loads((run_dir / demo.STAGES_RECORD).read_text(encoding="utf-8")) == {"epochs_per_stage": 2}
    (run_dir / demo.STAGES_RECORD).unlink()
    demo._record_stages(run_dir, 3)  # a last.pt of an earlier demo without the record: not claimed
    assert not (run_dir / demo.STAGES_RECORD).exists()
