"""Rank 0 alone reports under DDP, whatever the order of ``train#handlers``.

``multi_gpu_train.json`` of the pretraining bundle switched the console summary, TensorBoard and image handlers off on
ranks > 0 by their index in ``train#handlers`` (``train#handlers#2#_disabled_``). A config file or an override that
replaced the list dropped those switches (every rank wrote TensorBoard, MONAI's handler opening a writer of its own in
the working folder) or, read before ``multi_gpu_train.json``, put them on other handlers: the checkpoint handler, whose
collectives every rank must join. ``DiRATrainer`` now leaves the reporting handlers out on ranks > 0 by their class
(:func:`dira3d.engines.rank_zero_handlers`)."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import sys
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from conftest import leaving_the_group, run_torchrun_command, run_two_gloo_ranks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "dira_pretrain" / "configs"


def test_multi_gpu_train_json_switches_no_handler_by_its_place_in_the_list():
    """A switch keyed on a list index follows the index, not the handler: none is left in the pretraining bundle."""
    config = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    assert [key for key in config if re.search(r"handlers#\d+", key)] == []
    assert "train#writer#_disabled_" not in config  # ranks > 0 hold the lazy writer (no file until written to)


def _handlers_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from monai.handlers import StatsHandler, TensorBoardImageHandler, TensorBoardStatsHandler

    from dira3d.engines import CollapseMonitor, RestorationImageHandler, rank_zero_handlers
    from dira3d.engines.summary import LazySummaryWriter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        writer = LazySummaryWriter(log_dir=f"{out}.events")
        handlers = [CollapseMonitor(), StatsHandler(), TensorBoardStatsHandler(summary_writer=writer),
                    TensorBoardImageHandler(summary_writer=writer), RestorationImageHandler(summary_writer=writer)]
        kept = []
        for seed in range(4):  # any order of the list
            order = list(handlers)
            random.Random(seed).shuffle(order)
            kept.append(sorted(type(h).__name__ for h in rank_zero_handlers(order)))
        engine = Engine(lambda e, b: None)
        RestorationImageHandler(log_dir=f"{out}.own_writer", interval=1).attach(engine)  # a writer of its own
        engine.run([0, 1], max_epochs=1)
        result = {"kept": kept, "image_handlers": len(engine._event_handlers[Events.ITERATION_COMPLETED]),
                  "own_writer_files": len(list(Path(f"{out}.own_writer").rglob("*")))}
    torch.save(result, f"{out}.{rank}")


def test_on_two_gloo_ranks_the_reporting_handlers_are_left_out_on_rank_1_by_their_class(tmp_path):
    main, other = run_two_gloo_ranks(_handlers_worker, tmp_path)
    everything = sorted(["CollapseMonitor", "StatsHandler", "TensorBoardStatsHandler", "TensorBoardImageHandler",
                         "RestorationImageHandler"])
    assert main["kept"] == [everything] * 4
    assert other["kept"] == [["CollapseMonitor"]] * 4  # the collapse monitor acts (stops the run) on every rank
    # the image handler attached by itself: on rank 0 it writes each iteration; on rank 1 it attaches nothing
    assert main["image_handlers"] == 1 and other["image_handlers"] == 0
    assert main["own_writer_files"] == 0  # no image in the state: nothing written yet (the writer is lazy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_a_reordered_handler_list_leaves_rank_0_alone_reporting(tmp_path):
    """``python -m monai.bundle run`` under torchrun with a config file after multi_gpu_train.json that lists the
    handlers in another order (written without any ``_disabled_``): the run finishes (no rank waits on a collective
    another skipped), one TensorBoard event file, none in the working folder, and each console line once."""
    from test_bundle_pretrain import write_volumes

    data = tmp_path / "data"
    data.mkdir()
    write_volumes(data, count=6)  # 4 training volumes: one step of 2 + 2 per epoch
    handlers = json.loads((CONFIGS / "train.json").read_text())["train"]["handlers"]
    named = {h if isinstance(h, str) else h["_target_"]: {k: v for k, v in h.items() if k != "_disabled_"}
             if isinstance(h, dict) else h for h in handlers}
    order = ["dira3d.engines.CollapseMonitor", "dira3d.engines.RestorationImageHandler", "TensorBoardStatsHandler",
             "dira3d.engines.EpochStatsHandler", "@validate#evaluator", "dira3d.engines.DiRACheckpoint",
             "dira3d.engines.summary.WriterCloser"]
    assert sorted(order) == sorted(named)  # every handler of train.json, in another order
    mine = tmp_path / "my_handlers.json"
    mine.write_text(json.dumps({"train#handlers": [named[name] for name in order]}))
    out = tmp_path / "run"
    work = tmp_path / "work"  # the working folder: MONAI's TensorBoard handler without a writer opens ./runs here
    work.mkdir()
    configs = [str(CONFIGS / name) for name in ("train.json", "tiny.json", "multi_gpu_train.json")] + [str(mine)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--dataset_dir", str(data), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
           "--patch_size", "[16,16,8]", "--max_epochs", "2", "--queue_size", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = run_torchrun_command(cmd, cwd=work, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    events = sorted(tmp_path.rglob("events.out.tfevents*"))
    assert [e.parent for e in events] == [out / "eval"], events  # rank 0's alone, none in ./runs of the working folder
    assert not (work / "runs").exists()
    # StatsHandler's line of iteration 1 and its epoch summary, once (not once per rank)
    assert len(re.findall(r"Epoch: 1/2, Iter: 1/1 --", log)) == 1, log[-3000:]
    assert sorted(p.name for p in (out / "models").iterdir()) == [".dira3d.lock", "best.pt", "last.pt"]
    assert torch.load(out / "models" / "last.pt", weights_only=True)["trainer"]["epoch"] == 2
