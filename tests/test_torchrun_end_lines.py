"""Lines printed once per run, not once per process or twice in one (session 28).

- ``torchrun --nproc_per_node=2 -m dira3d.cli pretrain ... --config multi_gpu_train.json`` (also ``-m dira3d``, or the
  ``dira3d`` script) printed the end-of-run lines (where the checkpoints are, the TensorBoard and fine-tuning commands;
  the line of a rerun of a finished run) on every rank; without ``--config multi_gpu_train.json`` every rank trained a
  run of its own into the same ``--output``, all but one refused with a traceback as the folder was in use.
- The report of the ``--pretrained`` weights was printed and logged in one process: with the bundles' ``logging.conf``
  (the root logger on the console) it was on the console twice.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
from conftest import run_torchrun_command
from test_bundle_pretrain import write_volumes
from test_bundles_finetune import tiny_checkpoint
from test_distributed import free_port

from dira3d.cli import main as cli_main
from dira3d.engines.command import BUNDLE_DIR
from dira3d.evaluation import build_task_network

CONFIGS = BUNDLE_DIR / "configs"


def test_torchrun_of_dira3d_pretrain_prints_the_end_of_run_lines_once(tmp_path, repo_root):
    (tmp_path / "data").mkdir()
    datalist = write_volumes(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "dira3d.cli", "pretrain", "--datalist", str(datalist), "--output", str(out), "--tiny",
           "--config", "multi_gpu_train.json", "--override", "patch_size=[16,16,8]", "--override", "max_epochs=1",
           "--override", "queue_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_torchrun_command(cmd, cwd=repo_root, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert (out / "models" / "last.pt").is_file()
    for line in (f"checkpoints: {out / 'models' / 'best.pt'}", "TensorBoard: tensorboard --logdir", "fine-tune:   "):
        assert proc.stdout.count(line) == 1, (line, log[-3000:])
    # a rerun of the finished run: its one line, once
    proc = run_torchrun_command(cmd, cwd=repo_root, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("dira3d pretrain: ") == 1, proc.stdout[-3000:]
    assert "this run has already finished" in proc.stdout


def test_dira3d_pretrain_under_torchrun_without_multi_gpu_train_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from dira3d.engines.command import single_process_under_torchrun

    one = [str(CONFIGS / "train.json"), str(CONFIGS / "tiny.json")]
    assert single_process_under_torchrun(one, {}) == ""  # one process: nothing to say
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert single_process_under_torchrun(one + [str(CONFIGS / "multi_gpu_train.json")], {}) == ""
    (tmp_path / "data").mkdir()
    datalist = write_volumes(tmp_path / "data")
    with pytest.raises(SystemExit) as stop:
        cli_main(["pretrain", "--datalist", str(datalist), "--output", str(tmp_path / "run"), "--tiny"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dira3d pretrain: error: torchrun started 2 processes (WORLD_SIZE=2), but the configs "
                              "train in one process"), err
    assert "add --config multi_gpu_train.json" in err[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("handler", ["console", "file", "none"])
def test_the_pretrained_weights_report_is_on_the_console_once(tmp_path, capsys, handler):
    checkpoint = tiny_checkpoint(tmp_path / "dira.pt")
    root = logging.getLogger()
    saved_level = root.level
    added = {"console": lambda: logging.StreamHandler(sys.stdout),  # as the bundles' logging.conf sets it up
             "file": lambda: logging.FileHandler(tmp_path / "run.log"), "none": lambda: None}[handler]()
    if added is not None:
        root.addHandler(added)
    root.setLevel(logging.INFO)
    try:
        build_task_network("classification", width=0.125, pretrained=str(checkpoint))
    finally:
        root.setLevel(saved_level)
        if added is not None:
            root.removeHandler(added)
            added.close()
    out = capsys.readouterr().out
    assert out.count(f"pretrained: {checkpoint} (parts encoder)") == 1, out
    assert out.count("tensors loaded") == 1, out
    if handler == "file":  # logged to the file as well, once
        assert (tmp_path / "run.log").read_text().count("tensors loaded") == 1
