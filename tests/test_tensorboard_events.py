"""A run that fails while it sets up leaves no empty TensorBoard run: the pretraining bundle's writer
(``dira3d.engines.summary.LazySummaryWriter``) creates its event file with the first value logged.

torch's ``SummaryWriter`` wrote an 88-byte ``events.out.tfevents.*`` (the file-version header alone) as the
bundle was set up, so a second run into a folder another run holds, under ``dira3d pretrain`` or ``torchrun``,
left one behind in ``eval/``, listed by TensorBoard as an empty run."""

from __future__ import annotations

import os
import sys

from conftest import run_torchrun_command
from test_bundle_pretrain import write_volumes
from test_distributed import CONFIGS, free_port
from test_folder_lock import hold_in_another_process

from dira3d.engines.summary import LazySummaryWriter


def _events(folder):
    return sorted(folder.rglob("events.out.tfevents.*")) if folder.exists() else []


def test_the_event_file_appears_with_the_first_value(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = LazySummaryWriter(log_dir=str(tmp_path / "eval"))
    writer.flush()
    assert _events(tmp_path) == [] and writer.get_logdir() == str(tmp_path / "eval")
    writer.add_scalar("loss", 0.5, 1)
    writer.add_scalar("loss", 0.25, 2)
    writer.close()
    writer.close()  # a second close, as MONAI's finalize and a handler may both do
    assert len(_events(tmp_path)) == 1
    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    LazySummaryWriter(log_dir=str(tmp_path / "unused")).close()
    assert not (tmp_path / "unused").exists() or _events(tmp_path / "unused") == []


def test_dira3d_pretrain_refused_at_its_start_leaves_no_event_file(tmp_path, capsys):
    # and it is refused before any dataset is cached, with no traceback: the lock was taken only as the
    # engine started, after every volume was cached (hours on a real dataset), and ignite logged a traceback
    from dira3d.cli import main as cli_main

    (tmp_path / "data").mkdir()
    datalist = write_volumes(tmp_path / "data")
    out = tmp_path / "run"
    holder = hold_in_another_process(out / "models")
    try:
        code = cli_main(["pretrain", "--datalist", str(datalist), "--output", str(out), "--tiny",
                         "--override", "patch_size=[16,16,8]", "--override", "max_epochs=1"])
    finally:
        holder.kill()
        holder.wait()
    captured = capsys.readouterr()
    assert code == 2 and f"is in use by process {holder.pid}" in captured.err, captured.err
    assert "Loading dataset" not in captured.out + captured.err, captured.err
    assert "Traceback" not in captured.out + captured.err, captured.out
    assert _events(out) == []


def test_torchrun_refused_at_its_start_leaves_no_event_file(tmp_path, repo_root):
    (tmp_path / "data").mkdir()
    write_volumes(tmp_path / "data")
    out = tmp_path / "run"
    holder = hold_in_another_process(out / "models")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "monai.bundle", "run",
           "--config_file", f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json','{CONFIGS}/multi_gpu_train.json']",
           "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
           "--dataset_dir", str(tmp_path / "data"), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
           "--patch_size", "[16,16,8]", "--max_epochs", "1", "--queue_size", "16"]
    try:
        proc = run_torchrun_command(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0 and "is in use by process" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert _events(out) == []
