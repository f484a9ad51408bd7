"""DDP semantics: two gloo ranks with half the batch each == one process with the full batch
(MoCo keys gathered into the queue, Barlow Twins over the global batch), MoCo's shuffle BN under
``torchrun`` (tests/shuffle_bn_torchrun.py), and the pretraining bundle under
``torchrun --nproc_per_node=2`` (gloo, CPU) in moco and barlow modes."""

from __future__ import annotations

import os
import re
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import leaving_the_group, run_torchrun_command

from dira3d.engines import DiRATrainer, build_dis_loss
from dira3d.engines.optim import _average_gradients
from dira3d.engines.distributed import all_ranks_true, get_rank, get_world_size, maybe_sync_batchnorm
from dira3d.networks import UNet
from dira3d.networks.heads import ProjectionHead
from dira3d.transforms.compositions import build_distortion

CONFIGS = "bundles/dira_pretrain/configs"
BATCH, STEPS = 4, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def patches(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.rand(BATCH, 1, 16, 16, 8, generator=gen)
    return {"image": x, "image2": (x + 0.1 * torch.rand(x.shape, generator=gen)).clamp(0, 1)}


def run_trainer(mode: str, rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor], torch.Tensor | None]:
    """STEPS steps on this rank's slice of each global batch; returns losses, weights, MoCo queue."""
    torch.manual_seed(0)
    # no BatchNorm anywhere: per-rank batch statistics would differ by design (SyncBatchNorm is GPU-only)
    net = UNet(3, width=1 / 8, norm="instance")
    head = ProjectionHead(net.bottleneck_channels, 16, 8, num_layers=2 if mode == "moco" else 3, batch_norm=False)
    per_rank = BATCH // world
    data = [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in patches(s).items()} for s in range(STEPS)]
    trainer = DiRATrainer(
        "cpu", 1, data, net, torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.05),
        head, None, None, dis_mode=mode, dis_loss=build_dis_loss(mode, gather_distributed=True),
        stages=[{"name": "dir", "losses": ["dis", "res"]}], distortion=build_distortion("none"), views=None,
        queue_size=16, momentum=0.9,
    )
    losses: list[float] = []

    @trainer.on(__import__("ignite").engine.Events.ITERATION_COMPLETED)
    def _(engine):
        loss = engine.state.output["loss"].detach().clone()
        if world > 1:  # the global loss is the mean of the per-rank means (equal halves)
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))

    trainer.run()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    weights.update({f"head.{k}": v.clone() for k, v in head.state_dict().items()})
    return losses, weights, None if trainer.queue is None else trainer.queue.queue.clone()


def averaged_gradients(rank: int) -> list[torch.Tensor | None]:
    """Gradients of several shapes, layouts and dtypes (and one parameter without a gradient), rank-dependent,
    after ``optimizer_step``'s averaging over the ranks."""
    shapes = [(3, 2, 3, 3, 3), (5,), (4, 3), (2, 3, 2, 2, 2)]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes] + [nn.Parameter(torch.zeros(2, dtype=torch.float64)),
                                                                nn.Parameter(torch.zeros(3))]
    for i, p in enumerate(params[:-1]):
        grad = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) * (rank + 1) + 10 * i
        p.grad = grad.to(memory_format=torch.channels_last_3d) if grad.dim() == 5 and i == 3 else grad
    _average_gradients(params)
    assert params[3].grad.is_contiguous(memory_format=torch.channels_last_3d)  # the gradient object is kept
    return [None if p.grad is None else p.grad.clone() for p in params]


def foreground_counts(rank: int) -> dict:
    """ForegroundDice's count of the cases with foreground, on uneven shares of the ranks (a validation sampler with
    ``even_divisible: false``): rank 0 scores 3 cases in 2 iterations, rank 1 one, in two evaluations in a row."""
    from ignite.engine import Engine

    from dira3d.evaluation import ForegroundDice

    empty, full = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    engine = Engine(lambda engine, batch: batch)
    ForegroundDice().attach(engine, "dice")
    data = [[[full, full], [full, empty]], [[empty], [full]]] if rank == 0 else [[[empty], [empty]]]
    engine.run(data)
    first = dict(engine.state.foreground_cases["dice"], details=engine.state.metric_details["dice"].numel())
    engine.run(data)  # counted again, not added to the first evaluation's count
    return {"first": first, "second": engine.state.foreground_cases["dice"], "dice": engine.state.metrics["dice"]}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with leaving_the_group():
        assert get_rank() == rank and get_world_size() == world
        results = {mode: run_trainer(mode, rank, world) for mode in ("moco", "barlow")}
        assert all_ranks_true(True) and not all_ranks_true(rank == 0)
        results["gradients"] = averaged_gradients(rank)
        results["foreground"] = foreground_counts(rank)
        if rank == 0:
            torch.save(results, out)


def test_two_ranks_with_half_batches_match_one_rank_with_the_full_batch(tmp_path):
    """One spawn of two gloo ranks runs both modes (process start-up dominates the cost)."""
    torch.set_num_threads(1)
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=True)
    initial = UNet(3, width=1 / 8, norm="instance").state_dict()
    for mode in ("moco", "barlow"):
        single_losses, single_weights, single_queue = run_trainer(mode, 0, 1)
        losses, weights, queue = results[mode]
        assert len(losses) == STEPS
        # float sums in another order: equal to ~1e-5 relative (the loss includes 100 x MSE)
        assert losses == pytest.approx(single_losses, rel=1e-4, abs=1e-6), mode
        # gradients averaged over ranks == the full-batch gradient: the same weights after the steps,
        # up to float rounding (sums in another order), i.e. far below the size of the update itself
        update = diff = 0.0
        for key, value in single_weights.items():
            if key in initial and value.is_floating_point():
                update += float((value - initial[key]).square().sum())
                diff += float((weights[key] - value).square().sum())
        assert diff ** 0.5 < 1e-3 * update ** 0.5, (mode, diff ** 0.5, update ** 0.5)
        if mode == "moco":  # keys of both ranks entered the queue, rank 0's first: as in one process
            torch.testing.assert_close(queue, single_queue, rtol=1e-5, atol=1e-6)
    # every gradient is the mean of the two ranks' (rank r's is (r + 1) * arange + 10 i): 1.5 * arange + 10 i
    grads = results["gradients"]
    for i, grad in enumerate(grads[:-1]):
        expected = torch.arange(grad.numel(), dtype=grad.dtype).reshape(grad.shape) * 1.5 + 10 * i
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert grads[-1] is None
    # the count of cases with foreground is gathered over the ranks once, over the cases the Dice itself scored
    # (rank 0: full, empty, full; rank 1: empty): 4 cases, 2 with foreground; Dice 1, 0, 0, 1
    counted = results["foreground"]
    assert counted["first"] == {"cases": 4, "positive": 2, "details": 4}
    assert counted["second"] == {"cases": 4, "positive": 2} and counted["dice"] == pytest.approx(0.5)


def test_single_process_helpers_are_identities():
    bn = torch.nn.Sequential(torch.nn.BatchNorm3d(2))
    assert maybe_sync_batchnorm(bn) is bn  # no process group / no GPU: unchanged
    assert get_rank() == 0 and get_world_size() == 1
    assert all_ranks_true(True) and not all_ranks_true(False)


def test_torchrun_shuffle_bn_mixes_the_key_encoders_batch_and_resumes_exactly(tmp_path, repo_root):
    """Two gloo ranks, a batch-norm U-Net: the keys are those of an explicit one-process encoding of the
    permuted global batch (not the rank's own batch), the losses finite with bf16, channels-last and
    prefetch, and a resumed run equal to the uninterrupted one (the checks run in the ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "tests/shuffle_bn_torchrun.py", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    proc = run_torchrun_command(cmd, cwd=repo_root, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert len(result["losses"]) == 4 and len(result["options"]) == 4


def run_torchrun(repo_root, data_dir, out, *extra):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "monai.bundle", "run",
        "--config_file", f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json','{CONFIGS}/multi_gpu_train.json']",
        "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
        "--dataset_dir", str(data_dir), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
        "--patch_size", "[16,16,8]", "--max_epochs", "2", "--queue_size", "16",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_torchrun_command(cmd, cwd=repo_root, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("mode", ["moco", "barlow"])
def test_torchrun_two_gloo_ranks_run_the_pretraining_bundle(tmp_path, repo_root, mode):
    from test_bundle_pretrain import write_volumes

    data = tmp_path / "data"
    data.mkdir()
    write_volumes(data, count=6)  # 4 training volumes: one step of 2 + 2 per epoch
    out = tmp_path / "run"
    run_torchrun(repo_root, data, out, "--dis_mode", mode)
    ckpt = torch.load(out / "models" / "last.pt", weights_only=True)
    assert ckpt["trainer"]["epoch"] == 2 and ckpt["trainer"]["iteration"] == 2  # 4 volumes / (2 ranks x 2)
    if mode == "moco":  # 2 steps x (2 ranks x 2 keys) gathered into the queue (one process: 4)
        assert int(ckpt["queue"]["ptr"]) == 8
    # only rank 0 writes: one TensorBoard event file, no per-rank folders
    events = [p for p in (out / "eval").rglob("events.out.tfevents*")]
    assert len(events) == 1 and events[0].parent == out / "eval"
    assert sorted(p.name for p in (out / "models").iterdir()) == [".dira3d.lock", "best.pt", "last.pt"]  # rank 0 locks


def test_torchrun_two_gloo_ranks_fine_tune_a_task_bundle(tmp_path, repo_root):
    """The LUNA16 nodule FP-reduction bundle under torchrun (gloo): trains, rank 0 writes the model."""
    from test_bundles_finetune import make_classification

    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    configs = "bundles/luna16_nodule_fpr/configs"
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "monai.bundle", "run",
        "--config_file", f"['{configs}/train.json','{configs}/tiny.json','{configs}/multi_gpu_train.json']",
        "--meta_file", f"{configs}/metadata.json", "--logging_file", f"{configs}/logging.conf",
        "--bundle_root", f"{repo_root}/bundles/luna16_nodule_fpr", "--datalist", str(datalist),
        "--output_dir", str(out), "--ckpt_dir", str(out / "models"), "--max_epochs", "2",
    ]
    proc = run_torchrun_command(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    weights = torch.load(out / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in weights)  # a plain state_dict, DDP's "module." prefix removed
    # rank 0 alone reports: its training and validation event files (events.out.tfevents.<time>.<host>.<pid>.<n>),
    # none from rank 1, and each epoch's metrics printed once
    events = list(out.rglob("events.out.tfevents*"))
    assert len(events) == 2 and len({e.name.split(".")[-2] for e in events}) == 1, events
    assert len(re.findall(r"Epoch\[1\] Metrics -- ", proc.stdout + proc.stderr)) == 1, proc.stdout[-3000:]
    # ignite's and MONAI's progress lines too (rank 1 repeated them: "Engine run starting", "Got new best metric")
    assert len(re.findall(r"SupervisedTrainer - INFO - Engine run (?:starting|resuming)", proc.stdout + proc.stderr)) == 1
