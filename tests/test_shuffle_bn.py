"""Shuffle BN for MoCo's key encoder (dira3d.engines.shuffle_bn): the helpers in one process, the
setting's checks, and that with one process it changes nothing (the two-rank run under torchrun is
in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ignite.engine import Events

from dira3d.engines.shuffle_bn import (
    check_shuffle_bn,
    encode_keys,
    rank_rows,
    shuffle_permutation,
    shuffled_share,
    unshuffled,
)

from tests.test_engine import make_trainer


def batch_norm_encode(x: torch.Tensor) -> torch.Tensor:
    """A stand-in key encoder whose output depends on the batch it sees, like BatchNorm."""
    flat = x.flatten(1)
    return flat - flat.mean(dim=0, keepdim=True)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_encodes_a_share_of_the_permuted_batch_and_keys_come_back_in_order(world):
    per_rank = 4
    global_batch = torch.arange(world * per_rank, dtype=torch.float32)[:, None] * torch.ones(1, 5)
    generator = torch.Generator().manual_seed(7)
    permutation = shuffle_permutation(world * per_rank, generator)
    # every rank draws alike from a generator seeded alike: no broadcast needed
    assert torch.equal(permutation, shuffle_permutation(world * per_rank, torch.Generator().manual_seed(7)))
    assert sorted(permutation.tolist()) == list(range(world * per_rank))

    shares = [shuffled_share(global_batch, permutation, rank, world) for rank in range(world)]
    # the shares are the permuted batch, cut in rank order: every sample is encoded once, by some rank
    assert torch.equal(torch.cat(shares), global_batch[permutation])
    own = [set(rank_rows(global_batch, r, world)[:, 0].tolist()) for r in range(world)]
    assert any(set(s[:, 0].tolist()) != own[r] for r, s in enumerate(shares))  # a mixed batch

    # each rank encodes its share; the gathered keys go back to sample order
    keys = unshuffled(torch.cat([batch_norm_encode(s) for s in shares]), permutation)
    for rank in range(world):
        mine = rank_rows(keys, rank, world)
        share_of = {int(i): r for r in range(world) for i in rank_rows(permutation, r, world)}
        for row, sample in zip(mine, range(rank * per_rank, (rank + 1) * per_rank)):
            # sample's key: its own row, normalised with the statistics of the share it was encoded in
            encoded_with = shares[share_of[sample]]
            torch.testing.assert_close(row, global_batch[sample] - encoded_with.mean(dim=0), rtol=0, atol=0)
    # an identity encoder gives back exactly the global batch
    assert torch.equal(unshuffled(torch.cat(shares), permutation), global_batch)


@pytest.mark.parametrize("rank", [0, 1])
def test_encode_keys_gathers_views_then_keys_and_makes_no_host_sync(monkeypatch, rank):
    """encode_keys on one rank of two, the gather faked: the rank encodes its share of the permuted
    batch (in the encoder's memory format), and gets its keys and everyone's back in sample order,
    without a Tensor -> Python conversion."""
    import dira3d.engines.shuffle_bn as module

    world, per_rank = 2, 3
    views = torch.rand(world * per_rank, 2, 4, 4, 2)  # 2 channels: channels-last differs from contiguous
    permutation = shuffle_permutation(world * per_rank, torch.Generator().manual_seed(5))
    keys_of_shares = [batch_norm_encode(shuffled_share(views, permutation, r, world)) for r in range(world)]
    gathered, layouts = [], []

    def fake_gather(tensor):  # checked afterwards: a check here would convert tensors to Python
        gathered.append(tensor)
        return views if len(gathered) == 1 else torch.cat(keys_of_shares)  # every rank's, rank 0's first

    def encode(x):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last_3d))
        return batch_norm_encode(x)

    monkeypatch.setattr(module, "is_distributed", lambda: True)
    monkeypatch.setattr(module, "concat_all_gather", fake_gather)
    monkeypatch.setattr(module, "get_rank", lambda: rank)
    monkeypatch.setattr(module, "get_world_size", lambda: world)
    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _name=name, **k: pytest.fail(f"host sync: {_name}"))
    local, everyone = encode_keys(encode, rank_rows(views, rank, world), torch.Generator().manual_seed(5),
                                  memory_format=torch.channels_last_3d)
    monkeypatch.undo()
    assert len(gathered) == 2 and layouts == [True]
    assert torch.equal(gathered[0], rank_rows(views, rank, world))  # first its own views,
    assert torch.equal(gathered[1], keys_of_shares[rank])  # then the keys of its share of the permuted batch
    expected = unshuffled(torch.cat(keys_of_shares), permutation)
    assert torch.equal(everyone, expected) and torch.equal(local, rank_rows(expected, rank, world))
    assert not torch.allclose(local, batch_norm_encode(rank_rows(views, rank, world)))  # not its own batch's keys


def test_rank_rows_refuses_unequal_shares():
    with pytest.raises(ValueError, match="7 cannot be split into 2 equal shares"):
        rank_rows(torch.zeros(7, 2), 0, 2)


def test_one_process_encodes_its_own_batch_without_communicating(monkeypatch):
    def no_collectives(*args, **kwargs):
        raise AssertionError("no collective may run with one process")

    monkeypatch.setattr(dist, "all_gather", no_collectives)
    views = torch.rand(4, 1, 6, 6, 4)
    local, everyone = encode_keys(batch_norm_encode, views, torch.Generator().manual_seed(0))
    assert torch.equal(local, batch_norm_encode(views)) and everyone is local


def test_the_setting_defaults_to_moco_and_is_refused_elsewhere():
    assert check_shuffle_bn(None, "moco") is True
    assert check_shuffle_bn(None, "barlow") is False and check_shuffle_bn(None, "visual_words") is False
    assert check_shuffle_bn(False, "moco") is False and check_shuffle_bn(False, "simsiam") is False
    assert check_shuffle_bn("False", "moco") is False and check_shuffle_bn("null", "moco") is True
    with pytest.raises(ValueError, match=r"shuffle_bn=True applies to dis_mode='moco' only.*'barlow'.*false or null"):
        check_shuffle_bn(True, "barlow")
    with pytest.raises(ValueError, match=r"shuffle_bn='yes' must be true, false or null"):
        check_shuffle_bn("yes", "moco")
    with pytest.raises(ValueError, match=r"shuffle_bn=True applies to dis_mode='moco' only"):
        make_trainer("simsiam", 3, shuffle_bn=True)
    assert make_trainer("moco", 3).shuffle_bn and not make_trainer("barlow", 3).shuffle_bn


def test_one_process_losses_are_bit_identical_with_and_without_shuffle_bn(monkeypatch):
    """One process: no shuffle and no collective; the batch-norm U-Net's keys are its own batch's."""
    def no_collectives(*args, **kwargs):
        raise AssertionError("no collective may run with one process")

    monkeypatch.setattr(dist, "all_gather", no_collectives)
    runs = {}
    for shuffle_bn in (True, False):
        trainer = make_trainer("moco", 3, stages=[{"name": "dir", "losses": ["dis", "res"]}], max_epochs=2,
                               shuffle_bn=shuffle_bn)
        assert any(isinstance(m, torch.nn.BatchNorm3d) for m in trainer.momentum_encoder.modules())
        losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].clone()))
        trainer.run()
        runs[shuffle_bn] = (torch.stack(losses), trainer.queue.queue.clone())
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])


def test_bundle_settings_wire_shuffle_bn(repo_root):
    from monai.bundle import ConfigParser

    configs = repo_root / "bundles" / "dira_pretrain" / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    assert parser["shuffle_bn"] is None and parser["train#trainer#shuffle_bn"] == "@shuffle_bn"
    moco = ConfigParser()
    moco.read_config([str(configs / n) for n in ("train.json", "2d.json", "2d_moco.json")])
    assert moco["shuffle_bn"] is True and moco["dis_mode"] == "moco"


def test_key_encoder_gets_per_rank_batchnorm_back_under_sync_bn():
    """With sync_bn (GPUs) the copied key encoder had SyncBatchNorm: statistics of the whole global
    batch whatever its order, so the shuffle changed no key. It now keeps per-rank BatchNorm."""
    from dira3d.engines.distributed import PerRankBatchNorm, per_rank_batchnorm

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)))
    for bn in (net[1], net[3][1]):
        bn.running_mean.uniform_(-1, 1)
        bn.weight.data.uniform_(0.5, 1.5)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # built on CPU; only its forward needs a GPU
    before = {k: v.clone() for k, v in synced.state_dict().items()}
    plain = per_rank_batchnorm(synced)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())
    assert sum(isinstance(m, PerRankBatchNorm) for m in plain.modules()) == 2
    after = plain.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.rand(3, 1, 5, 5, 5)
    reference = torch.nn.functional.batch_norm(torch.nn.functional.conv3d(x, plain[0].weight, plain[0].bias), None,
                                               None, plain[1].weight, plain[1].bias, training=True)
    assert torch.allclose(plain[1](plain[0](x)), reference, atol=1e-6)  # batch statistics of its own batch


def test_trainer_gives_the_key_encoder_per_rank_batchnorm_only_when_shuffling(monkeypatch):
    import tests.test_engine as engine_tests
    from dira3d.networks import UNet

    monkeypatch.setattr(engine_tests, "UNet", lambda **kw: torch.nn.SyncBatchNorm.convert_sync_batchnorm(UNet(**kw)))
    for shuffle_bn, synced_keys in ((True, False), (False, True)):
        trainer = make_trainer("moco", 3, shuffle_bn=shuffle_bn)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.network.encoder.modules())  # queries: as built
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.momentum_encoder.modules()) == synced_keys
