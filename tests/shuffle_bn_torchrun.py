"""Two gloo ranks under torchrun: MoCo with shuffle BN (run by tests/test_distributed.py, not collected).

``python -m torch.distributed.run --nproc_per_node=2 tests/shuffle_bn_torchrun.py OUT``

Each rank trains a batch-norm U-Net on its half of fixed global batches and checks that

1. its keys differ from the keys without shuffle BN and equal an explicit one-process computation:
   the global key views permuted by the (seed, iteration) permutation, each half encoded as a batch
   of its own by the key encoder, the keys put back in sample order;
2. the losses are finite with bf16 autocast and channels-last, and the same with and without
   prefetch;
3. a run resumed from the checkpoint of its first epoch gives the same losses, weights and queue
   as the uninterrupted run.

Rank 0 writes ``OUT/result.pt`` (what it checked) when every check passed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Events

from conftest import leaving_the_group  # tests/, this script's folder, is first on sys.path
from dira3d.engines import DiRACheckpoint, DiRATrainer, build_dis_loss, init_distributed
from dira3d.engines.distributed import get_rank, get_world_size
from dira3d.engines.shuffle_bn import shuffle_permutation
from dira3d.utils.seeding import stream_seed
from dira3d.engines.trainer import STREAM_SHUFFLE
from dira3d.networks import UNet
from dira3d.networks.heads import ProjectionHead
from dira3d.transforms.compositions import build_distortion

PER_RANK, STEPS, SEED = 4, 2, 0


def global_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.rand(PER_RANK * get_world_size(), 1, 16, 16, 8, generator=gen)
    return {"image": x, "image2": (x + 0.1 * torch.rand(x.shape, generator=gen)).clamp(0, 1)}


def networks() -> tuple[UNet, ProjectionHead]:
    torch.manual_seed(0)
    net = UNet(3, width=1 / 8)  # BatchNorm: the key encoder's statistics are those of the batch it sees
    return net, ProjectionHead(net.bottleneck_channels, 16, 8, num_layers=2, batch_norm=False)


def make_trainer(max_epochs: int, handlers=(), momentum: float = 0.9, **options) -> tuple[DiRATrainer, list, list]:
    """A MoCo trainer on this rank's rows of the global batches; records losses and the loss's keys."""
    rank = get_rank()
    data = [{k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in global_batch(s).items()} for s in range(STEPS)]
    net, head = networks()
    trainer = DiRATrainer(
        "cpu", max_epochs, data, net, torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.05),
        head, None, None, dis_mode="moco", dis_loss=build_dis_loss("moco", gather_distributed=True),
        stages=[{"name": "dir", "losses": ["dis", "res"]}], distortion=build_distortion("none"), views=None,
        queue_size=32, momentum=momentum, seed=SEED, train_handlers=list(handlers), **options,
    )
    losses, keys = [], []
    loss_fn = trainer.dis_loss
    trainer.dis_loss = lambda q, k, queue: (keys.append(k.detach().clone()), loss_fn(q, k, queue))[1]
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].detach().clone()))
    return trainer, losses, keys


def explicit_shuffled_keys(iteration: int) -> torch.Tensor:
    """This rank's keys at ``iteration`` computed in this one process from the global key views,
    for a key encoder still at its initial weights (momentum 1)."""
    net, head = networks()
    views = global_batch(iteration - 1)["image2"]
    world, rank = get_world_size(), get_rank()
    perm = shuffle_permutation(views.shape[0], torch.Generator().manual_seed(stream_seed(SEED, STREAM_SHUFFLE, iteration)))
    shares = perm.view(world, PER_RANK)
    assert any(set(s.tolist()) != set(range(r * PER_RANK, (r + 1) * PER_RANK)) for r, s in enumerate(shares)), perm
    keys = torch.empty(views.shape[0], 8)
    with torch.no_grad():
        for share in shares:  # each share normalised with its own batch statistics
            keys[share] = F.normalize(head(net.encoder(views[share])[0]), dim=1)
    return keys[rank * PER_RANK:(rank + 1) * PER_RANK]


def check_keys() -> None:
    """Momentum 1 keeps the key encoder at its initial weights: its keys can be computed here."""
    shuffled, _, keys = make_trainer(1, momentum=1.0)
    shuffled.run()
    plain, _, plain_keys = make_trainer(1, momentum=1.0, shuffle_bn=False)
    plain.run()
    expected = explicit_shuffled_keys(1)
    torch.testing.assert_close(keys[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(keys[0], plain_keys[0], rtol=1e-3, atol=1e-4), "shuffle BN changed no key"
    net, head = networks()  # without shuffle BN: this rank's own batch
    with torch.no_grad():
        own = F.normalize(head(net.encoder(global_batch(0)["image2"][get_rank() * PER_RANK:][:PER_RANK])[0]), dim=1)
    torch.testing.assert_close(plain_keys[0], own, rtol=1e-5, atol=1e-6)


def check_options() -> list[float]:
    """Prefetch, bf16 autocast and channels-last: finite losses, and prefetching shuffles the same."""
    runs = []
    for prefetch in (True, False):
        trainer, losses, _ = make_trainer(2, prefetch=prefetch, amp="bf16", channels_last=True)
        trainer.run()
        runs.append([float(x) for x in losses])
    assert len(runs[0]) == 2 * STEPS and all(torch.isfinite(torch.tensor(runs[0]))), runs
    assert runs[0] == runs[1], runs
    return runs[0]


def check_resume(out: Path) -> list[float]:
    """Two epochs at once == one epoch, then a resumed second (bit-identical on CPU)."""
    whole, whole_losses, _ = make_trainer(2)
    whole.run()
    first, first_losses, _ = make_trainer(1, handlers=[DiRACheckpoint(out / "models", resume=False)])
    first.run()
    dist.barrier()  # rank 0 has written last.pt before any rank reads it
    resumed, resumed_losses, _ = make_trainer(2, handlers=[DiRACheckpoint(out / "models", resume=True)])
    resumed.run()
    assert all(torch.isfinite(x) for x in whole_losses), whole_losses
    assert [float(x) for x in first_losses + resumed_losses] == [float(x) for x in whole_losses], (
        first_losses, resumed_losses, whole_losses)
    for name, module in whole.modules().items():
        # every rank resumes rank 0's BatchNorm running statistics (buffers are per rank): compare them on rank 0
        state = module.state_dict() if get_rank() == 0 or name == "queue" else dict(module.named_parameters())
        for key, value in state.items():
            assert torch.equal(value, resumed.modules()[name].state_dict()[key]), (name, key)
    return [float(x) for x in whole_losses]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    assert init_distributed("gloo") and get_world_size() == 2
    with leaving_the_group():
        check_keys()
        options = check_options()
        losses = check_resume(out)
        if get_rank() == 0:
            torch.save({"losses": losses, "options": options}, out / "result.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
