"""Rank 0 alone reports in a fine-tuning run under DDP, whatever the order of the bundle's handler lists.

The task bundles' ``multi_gpu_train.json`` switched rank 1's console summary and TensorBoard handlers off by their index
(``train#handlers#1#_disabled_``, ``validate#handlers#0#_disabled_``, ...). A config file or an override read after it
that replaced ``train#handlers`` / ``validate#handlers`` dropped the switches (every rank logged and wrote event files);
read before it, the switches landed on other handlers: rank 1 left out the ``ValidationHandler`` (rank 0 waited in the
validation's metric gather for ever) or the learning-rate scheduler. ``train.json`` now passes both lists through
:func:`dira3d.engines.rank_zero_handlers`, which leaves the reporting handlers out on ranks > 0 by their class."""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import leaving_the_group, run_torchrun_command, run_two_gloo_ranks
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D
from test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TASKS = BUNDLES + BUNDLES_2D


def test_every_task_bundle_filters_its_handler_lists_by_class_not_by_index():
    assert len(TASKS) == 9
    for bundle in TASKS:
        configs = ROOT / "bundles" / bundle / "configs"
        multi = json.loads((configs / "multi_gpu_train.json").read_text(encoding="ascii"))
        assert [key for key in multi if re.search(r"handlers#\d+", key)] == [], bundle
        train = json.loads((configs / "train.json").read_text(encoding="ascii"))
        assert train["train"]["trainer"]["train_handlers"] == "$dira3d.engines.rank_zero_handlers(@train#handlers)"
        assert train["validate"]["evaluator"]["val_handlers"] == \
            "$dira3d.engines.rank_zero_handlers(@validate#handlers)"
        assert "$import dira3d.engines" in train["imports"], bundle


def _handlers_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from monai.handlers import (CheckpointSaver, EarlyStopHandler, LrScheduleHandler, StatsHandler,
                                TensorBoardStatsHandler, ValidationHandler)

    from dira3d.engines import rank_zero_handlers
    from dira3d.evaluation import BestModelSaver, ClosingProgressBar

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        network = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        handlers = [TensorBoardStatsHandler(log_dir=f"{out}.tb{rank}"),  # a writer of its own: a file as it is built
                    StatsHandler(), ValidationHandler(interval=1, validator=None),
                    LrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, 1)),
                    EarlyStopHandler(patience=1, score_function=lambda engine: 0.0),
                    BestModelSaver(network, f"{out}.model.pt", "val"),
                    CheckpointSaver(f"{out}.ckpt", {"net": network}), ClosingProgressBar(disable=True)]
        kept = [type(h).__name__ for h in rank_zero_handlers(reversed(handlers))]
        result = {"kept": kept, "event_files": len(list(Path(f"{out}.tb{rank}").rglob("events.out.tfevents*")))}
    torch.save(result, f"{out}.{rank}")


def test_on_rank_1_the_fine_tuning_handlers_that_act_stay_and_those_that_report_leave_no_file(tmp_path):
    main, other = run_two_gloo_ranks(_handlers_worker, tmp_path)
    everything = ["ClosingProgressBar", "CheckpointSaver", "BestModelSaver", "EarlyStopHandler", "LrScheduleHandler",
                  "ValidationHandler", "StatsHandler", "TensorBoardStatsHandler"]
    assert main == {"kept": everything, "event_files": 1}
    # the validation gathers its metrics over the ranks, every rank steps its learning rate and stops together
    assert other == {"kept": everything[:-2], "event_files": 0}


# Wraps `python -m monai.bundle`: prints "SAVE <rank> <path>" for each checkpoint write (dira3d.utils.atomic_save).
RUNNER = textwrap.dedent('''
    import os, runpy, sys
    import dira3d.utils

    save = dira3d.utils.atomic_save

    def announced_save(obj, path, *args, **kwargs):
        os.write(1, f"SAVE {os.environ.get('RANK', '0')} {path}\\n".encode())
        return save(obj, path, *args, **kwargs)

    dira3d.utils.atomic_save = announced_save
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    runpy.run_module("monai.bundle", run_name="__main__")
''')


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a hung run is killed through /proc (Linux)")
@pytest.mark.parametrize("place", ["after", "before"])
def test_torchrun_with_reordered_handler_lists_leaves_rank_0_alone_reporting_and_finishes(tmp_path, place):
    """luna16_nodule_fpr under a 2-rank gloo torchrun with a config file that lists the handlers in another order,
    read after multi_gpu_train.json (index switches lost: both ranks logged and wrote events) or before it (they hit
    the ValidationHandler and the LR scheduler: the run hung in the validation). The train TensorBoard handler is
    listed without a writer or log_dir (MONAI's default ./runs): rank 1 must not leave its event file there."""
    from test_bundles_finetune import make_classification

    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    configs = ROOT / "bundles" / "luna16_nodule_fpr" / "configs"
    train = json.loads((configs / "train.json").read_text())
    named = {part: {h if isinstance(h, str) else h["_target_"]: h for h in train[part]["handlers"]}
             for part in ("train", "validate")}
    train_tb = {k: v for k, v in named["train"]["TensorBoardStatsHandler"].items() if k != "log_dir"}
    mine = tmp_path / "my_handlers.json"
    mine.write_text(json.dumps({
        "train#handlers": [named["train"]["StatsHandler"], named["train"]["ValidationHandler"], train_tb],
        "validate#handlers": [named["validate"][k] for k in (
            "LrScheduleHandler", "StatsHandler", "TensorBoardStatsHandler", "@validate#early_stop",
            "dira3d.evaluation.BestModelSaver", "dira3d.evaluation.ClosingProgressBar")]}))
    assert sorted(map(str, json.loads(mine.read_text())["validate#handlers"])) == \
        sorted(map(str, train["validate"]["handlers"]))  # every handler of train.json, in another order
    files = [str(configs / name) for name in ("train.json", "tiny.json", "multi_gpu_train.json")]
    files.insert(3 if place == "after" else 2, str(mine))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out, work = tmp_path / "run", tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(runner), "run", "--config_file", json.dumps(files), "--meta_file", str(configs / "metadata.json"),
           "--logging_file", str(configs / "logging.conf"), "--bundle_root", str(configs.parent),
           "--datalist", str(datalist), "--output_dir", str(out), "--ckpt_dir", str(out / "models"), "--max_epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = run_torchrun_command(cmd, cwd=work, env=env, timeout=150)  # about 15 s; a hung run waits for ever
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    events = sorted(tmp_path.rglob("events.out.tfevents*"))
    # rank 0's alone: the train writer's in ./runs, the validation's in output_dir (a process's id in each name)
    assert sorted(e.parent for e in events) == [out, work / "runs"], events
    assert len({re.fullmatch(r"events\.out\.tfevents\.\d+\.(.+)\.\d+", e.name).group(1) for e in events}) == 1, events
    assert len(re.findall(r"Epoch: 1/2, Iter: 1/\d+ -- train_loss", log)) == 1, log[-3000:]  # not once per rank
    assert log.count("--- input summary of monai.bundle.scripts.run ---") == 1, log[-3000:]  # was once per rank
    assert len(re.findall(r"Key metric: val_auc best value", log)) == 2, log[-3000:]  # one per validation
    saves = re.findall(r"^SAVE (\d) (\S+)$", log, flags=re.M)
    assert saves and {rank for rank, _ in saves} == {"0"}, log[-3000:]  # one checkpoint writer
    assert any(k.startswith("encoder.") for k in torch.load(out / "models" / "model.pt", weights_only=True))


def test_every_task_bundle_runs_on_cpu_under_torchrun_and_reports_other_ranks_errors_in_one_line():
    """The 2D bundles' ``backend`` was ``nccl`` always (torchrun without CUDA failed in ``init_process_group``), and the
    task bundles let every rank print the same tracebacks; as ``dira_pretrain``'s, they now take gloo without CUDA and
    call ``brief_errors_on_other_ranks`` after the process group is formed."""
    from monai.bundle import ConfigParser

    for bundle in TASKS:
        path = ROOT / "bundles" / bundle / "configs" / "multi_gpu_train.json"
        multi = json.loads(path.read_text(encoding="ascii"))
        expected = "nccl" if torch.cuda.is_available() else "gloo"
        assert ConfigParser({"backend": multi["backend"]}).get_parsed_content("backend") == expected, bundle
        initialize = multi["initialize"]
        formed = next(i for i, step in enumerate(initialize) if "init_process_group" in step)
        brief = initialize.index("$dira3d.engines.distributed.brief_errors_on_other_ranks()")
        assert brief > formed, bundle
        # inference.json: first, on torchrun's RANK (InferenceBatch joins the process group later, when it is built)
        inference = json.loads((path.parent / "inference.json").read_text(encoding="ascii"))
        assert inference["initialize"][0] == "$dira3d.engines.distributed.brief_errors_on_other_ranks()", bundle
        assert "$import dira3d.engines.distributed" in inference["imports"], bundle


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a hung run is killed through /proc (Linux)")
def test_a_2d_task_bundle_fine_tunes_under_a_cpu_torchrun(tmp_path):
    """montgomery_lung_seg under a 2-rank gloo torchrun without CUDA: it failed in init_process_group (nccl)."""
    from test_bundles_2d import write_cxr

    datalist = write_cxr(tmp_path / "data", "montgomery_datalist.json", None, train=8, test=4)
    configs = ROOT / "bundles" / "montgomery_lung_seg" / "configs"
    files = [str(configs / name) for name in ("train.json", "tiny.json", "multi_gpu_train.json")]
    out, work = tmp_path / "run", tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(files), "--meta_file", str(configs / "metadata.json"),
           "--logging_file", str(configs / "logging.conf"), "--bundle_root", str(configs.parent),
           "--datalist", str(datalist), "--output_dir", str(out), "--ckpt_dir", str(out / "models"), "--max_epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = run_torchrun_command(cmd, cwd=work, env=env, timeout=150)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert len(re.findall(r"Key metric: val_dice best value", log)) == 2, log[-3000:]  # rank 0's, once per validation
    events = sorted(tmp_path.rglob("events.out.tfevents*"))
    assert events and {e.parent for e in events} == {out}, events
    assert len({re.fullmatch(r"events\.out\.tfevents\.\d+\.(.+)\.\d+", e.name).group(1) for e in events}) == 1, events
    assert any(k.startswith("encoder.") for k in torch.load(out / "models" / "model.pt", weights_only=True))
