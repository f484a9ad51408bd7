"""The task bundles' ``multi_gpu_train.json`` under ``torchrun`` (2 gloo ranks) on a datalist ``dira3d prepare`` writes
(a walk of 2026-11-28): BraTS prepared from 8 patients keeps 6 for training, whose holdout (0.1) is one case, fewer
than the ranks; MONAI's ``DistributedSampler`` refused that validation split after the caches were filled (``the
dataset length is less than the number of participating ranks``), so the run failed on every rank. The
pretrained-weights report was printed once per rank."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_torchrun_command
from test_bundles_finetune import tiny_checkpoint
from test_data_brats import make_patient
from test_distributed import free_port

import dira3d.engines.distributed as distributed
from dira3d.cli import main as cli_main

CONFIGS = "bundles/brats_tumor_seg/configs"
REPO_ROOT = Path(__file__).resolve().parents[1]


def torchrun(repo_root: Path, configs: list[str], *args: str):
    files = ",".join(f"'{CONFIGS}/{name}'" for name in configs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "monai.bundle", "run", "--config_file", f"[{files}]", "--meta_file", f"{CONFIGS}/metadata.json",
           "--logging_file", f"{CONFIGS}/logging.conf", *args]
    proc = run_torchrun_command(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """BraTS prepared from 8 patients (6 for training: a holdout of one case, for 2 ranks) and fine-tuned on 2 ranks."""
    tmp = tmp_path_factory.mktemp("brats_ddp")
    rng = np.random.default_rng(0)
    src = tmp / "MICCAI_BraTS_2018_Data_Training"
    for i in range(8):
        make_patient(src, "HGG" if i % 2 else "LGG", f"Brats18_TCIA0{i}_1{i}1_1", rng)
    dst = tmp / "brats"
    assert cli_main(["prepare", "brats", "--src", str(src), "--dst", str(dst), "--split", "6", "2"]) == 0
    datalist = dst / "brats_datalist.json"
    assert len(json.loads(datalist.read_text())["training"]) == 6  # holdout 0.1 of 6: one case for 2 ranks
    pretrained = tiny_checkpoint(tmp / "pretrained.pt", in_channels=4)
    out = tmp / "run"
    rc, log = torchrun(REPO_ROOT, ["train.json", "tiny.json", "multi_gpu_train.json"], "--bundle_root", str(out),
                       "--datalist", str(datalist), "--pretrained", str(pretrained), "--max_epochs", "1")
    return datalist, out, rc, log


def test_torchrun_fine_tunes_on_a_prepared_brats_datalist_whose_holdout_is_smaller_than_the_ranks(fine_tuned):
    _, out, rc, log = fine_tuned
    assert rc == 0, log[-3000:]
    assert "less than the number of participating ranks" not in log
    assert (out / "models" / "model.pt").is_file()
    assert len(re.findall(r"Epoch\[1\] Metrics -- val_dice", log)) == 1, log[-3000:]
    # the report of the pretrained weights: by rank 0 alone, not once per rank; logged (logging.conf shows it on the
    # console), not printed as well
    assert len(re.findall(r"^(.* - INFO - )?pretrained: .* \(parts encoder, decoder\)$", log, flags=re.M)) == 1, log[-3000:]


def test_torchrun_batch_inference_on_the_prepared_datalist(fine_tuned, tmp_path):
    datalist, out, rc, log = fine_tuned
    assert rc == 0, log[-3000:]
    rc, log = torchrun(REPO_ROOT, ["inference.json", "tiny.json"], "--bundle_root", str(out),
                       "--datalist", str(datalist), "--output_dir", str(tmp_path))
    assert rc == 0, log[-3000:]
    report = json.loads((tmp_path / "inference_report.json").read_text())
    assert report["summary"]["written"] == 2 and report["exit_status"] == 0  # the datalist's test split
    assert len(list(tmp_path.glob("*_seg.nii.gz"))) == 2
    # what the model was trained with (preprocessing.json): said once, by rank 0 (every rank logged each line)
    said = re.findall(r"inference (\w+) .*: as the model was trained", log)
    assert said and len(said) == len(set(said)), log[-3000:]


def test_torchrun_evaluation_scores_each_test_case_once_as_one_process_does(fine_tuned, tmp_path):
    """evaluate.json under torchrun: each rank scores its share of the test split (validation_sampler) and the metrics
    gather over the ranks; rank 0 alone logs and writes metrics.csv and test_cases.csv. Before, every rank scored the
    whole split, logged every line and wrote the same files at the same time."""
    datalist, out, rc, log = fine_tuned
    assert rc == 0, log[-3000:]
    configs = ["train.json", "tiny.json", "evaluate.json"]
    rc, log = torchrun(REPO_ROOT, configs, "--bundle_root", str(out), "--datalist", str(datalist),
                       "--output_dir", str(tmp_path / "ddp"))
    assert rc == 0, log[-3000:]
    files = ",".join(f"'{CONFIGS}/{name}'" for name in configs)
    one = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", f"[{files}]",
                          "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
                          "--bundle_root", str(out), "--datalist", str(datalist), "--output_dir", str(tmp_path / "one")],
                         cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    assert len(re.findall(r"Epoch\[1\] Metrics -- dice", log)) == 1, log[-3000:]  # rank 0's line alone
    assert log.count("Restored all variables") == 1, log[-3000:]

    def rows(folder):
        lines = (folder / "test_cases.csv").read_text().splitlines()
        return lines[0], sorted(lines[1:])

    header, cases = rows(tmp_path / "ddp")
    assert len(cases) == 2 and len({row.split(",")[0] for row in cases}) == 2  # the test split, each case once
    assert (header, cases) == rows(tmp_path / "one")
    ddp = dict(line.split(",") for line in (tmp_path / "ddp" / "metrics.csv").read_text().split())
    single = dict(line.split(",") for line in (tmp_path / "one" / "metrics.csv").read_text().split())
    assert set(ddp) == set(single) == {"dice", "iou"}
    assert all(float(ddp[k]) == pytest.approx(float(single[k]), abs=1e-6) for k in ddp), (ddp, single)


@pytest.mark.parametrize("cases, world, shares", [
    (5, 2, [[0, 2, 4], [1, 3]]),  # each rank its share, no case twice
    (1, 2, [[0], [0]]),  # fewer cases than ranks: every rank scores the whole split
    (3, 8, [[0, 1, 2]] * 8),
])
def test_validation_sampler_shares(monkeypatch, cases, world, shares):
    dataset = list(range(cases))
    got = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "get_world_size", lambda: world)
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        got.append(list(distributed.validation_sampler(dataset)))
    assert got == shares
