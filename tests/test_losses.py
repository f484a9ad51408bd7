"""Tests for dira3d.losses: every expected value is computed by hand in the test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import leaving_the_group
from dira3d.engines.distributed import cleanup_distributed
from dira3d.losses import (
    AdversarialLoss,
    BarlowTwinsLoss,
    DiRALoss,
    InfoNCELoss,
    MoCoQueue,
    RestorationLoss,
    SimSiamLoss,
    VisualWordLoss,
    concat_all_gather,
    gather_with_grad,
    parse_weights,
)
from dira3d.utils import atomic_save, load_checkpoint

# Two standardised (mean 0, biased variance 1), mutually orthogonal features over a batch of 4.
A = torch.tensor([1.0, -1.0, 1.0, -1.0])
B = torch.tensor([1.0, 1.0, -1.0, -1.0])


# ---------------------------------------------------------------- visual words
def test_visual_word_loss_is_negative_log_softmax_of_target():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    target = torch.tensor([2, 0])
    by_hand = [
        -math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3))),
        -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-1) + math.exp(2))),
    ]
    loss = VisualWordLoss()(logits, target)
    assert loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)


def test_visual_word_loss_rejects_probabilities_shape():
    with pytest.raises(ValueError, match="logits"):
        VisualWordLoss()(torch.zeros(4), torch.zeros(4, dtype=torch.long))


def test_visual_word_loss_refuses_non_integer_targets():
    logits = torch.zeros(2, 4)
    for target in (torch.tensor([0.9, 3.0]), torch.tensor([0.0, 1.0], dtype=torch.float16), torch.tensor([True, False])):
        with pytest.raises(ValueError, match=f"integer class indices.*{target.dtype}"):
            VisualWordLoss()(logits, target)  # 0.9 would have become class 0
    for dtype in (torch.int64, torch.int32, torch.uint8):
        assert VisualWordLoss()(logits, torch.tensor([0, 3], dtype=dtype)).item() == pytest.approx(math.log(4))


# ---------------------------------------------------------------- InfoNCE + queue
def test_infonce_matches_hand_computation_with_tiny_queue():
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    k = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # not normalised: the loss normalises it
    queue = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    tau = 0.5
    # row 0: logits [1, 0, 0]/τ, positive index 0; row 1: logits [0, 1, 0]/τ
    row0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    row1 = -math.log(1 / (1 + math.exp(2) + 1))
    q = q.requires_grad_()
    k = k.requires_grad_()
    loss = InfoNCELoss(temperature=tau)(2 * q, k, queue)  # scaling q changes nothing either
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    loss.backward()
    assert q.grad is not None and k.grad is None  # keys are stop-gradient


def test_infonce_positive_is_column_zero_for_each_row_alone():
    """One row at a time, with positive, negatives and their order all different: the test above is
    symmetric (its two rows swap values if the positive is put after the negatives), this one is not."""
    tau = 0.5
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[2.0, 0.0]])  # cos 1 with q
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # cos 0 and -1
    z = math.exp(1 / tau) + 1 + math.exp(-1 / tau)
    loss = InfoNCELoss(temperature=tau)(q, k, queue)
    assert loss.item() == pytest.approx(-math.log(math.exp(1 / tau) / z), rel=1e-6)
    # a key that matches the query better lowers the loss; a queue key that matches it raises it
    assert InfoNCELoss(tau)(q, -k, queue).item() > loss.item()
    assert InfoNCELoss(tau)(q, k, torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() > loss.item()


def test_infonce_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="queue"):
        InfoNCELoss()(torch.randn(2, 4), torch.randn(2, 4), torch.randn(8, 3))
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0)


def test_infonce_takes_the_moco_queue_itself_or_refuses_other_objects():
    queue = MoCoQueue(dim=8, size=16, generator=torch.Generator().manual_seed(0))
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    loss = InfoNCELoss(temperature=0.2)
    torch.testing.assert_close(loss(q, k, queue), loss(q, k, queue.queue))
    with pytest.raises(TypeError, match="tensor of negative keys or a MoCoQueue, got list"):
        loss(q, k, queue.queue.tolist())


def test_moco_queue_init_enqueue_wraparound_and_pointer():
    queue = MoCoQueue(dim=2, size=5, generator=torch.Generator().manual_seed(0))
    assert queue.queue.shape == (5, 2)
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(5))
    assert int(queue.ptr) == 0

    first = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]], requires_grad=True)
    queue.enqueue(first)
    assert int(queue.ptr) == 3
    torch.testing.assert_close(queue.queue[:3], torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]))
    assert not queue.queue.requires_grad

    second = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 5.0]])
    queue.enqueue(second)  # 3 keys do not divide 5: rows 3, 4 then wrap to 0
    assert int(queue.ptr) == 1
    torch.testing.assert_close(
        queue.queue,
        torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0]]),
    )
    with pytest.raises(ValueError, match="queue size"):
        queue.enqueue(torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        queue.enqueue(torch.randn(2, 3))


def test_moco_queue_state_dict_round_trip(tmp_path):
    queue = MoCoQueue(dim=4, size=6, generator=torch.Generator().manual_seed(1))
    queue.enqueue(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))
    assert set(queue.state_dict()) == {"queue", "ptr"}
    atomic_save({"queue": queue.state_dict()}, tmp_path / "q.pt")

    restored = MoCoQueue(dim=4, size=6, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(restored.queue, queue.queue)
    restored.load_state_dict(load_checkpoint(tmp_path / "q.pt")["queue"])
    torch.testing.assert_close(restored.queue, queue.queue)
    assert int(restored.ptr) == 4


# ---------------------------------------------------------------- Barlow Twins
def test_barlow_twins_zero_for_identical_whitened_features():
    z = torch.stack([A, B, A * B], dim=1)  # 3 orthogonal standardised features
    assert BarlowTwinsLoss()(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_barlow_twins_two_feature_hand_value_and_standardisation():
    z1 = torch.stack([A, B], dim=1)
    z2 = torch.stack([A, (A + B) / math.sqrt(2)], dim=1)
    # C = [[1, 1/√2], [0, 1/√2]]: on-diagonal (1 − 1/√2)², off-diagonal λ·(½ + 0)
    lam = 5e-3
    expected = (1 - 1 / math.sqrt(2)) ** 2 + lam * 0.5
    loss = BarlowTwinsLoss(lambda_offdiag=lam)
    assert loss(z1, z2).item() == pytest.approx(expected, rel=1e-4)
    # per-feature affine changes (positive scale) are removed by the standardisation
    assert loss(3 * z1 + 2, 0.5 * z2 - 7).item() == pytest.approx(expected, rel=1e-4)


def test_barlow_twins_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="equal shape"):
        BarlowTwinsLoss()(torch.randn(4, 3), torch.randn(4, 2))


# ---------------------------------------------------------------- SimSiam
def test_simsiam_values_and_stop_gradient():
    v = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert SimSiamLoss()(v, v, v, v).item() == pytest.approx(-1.0, abs=1e-6)
    assert SimSiamLoss()(v, v, -v, -v).item() == pytest.approx(1.0, abs=1e-6)

    p1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p2 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    z1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = SimSiamLoss()(p1, p2, z1, z2)  # ½(−1/√2) + ½(−0)
    assert loss.item() == pytest.approx(-0.5 / math.sqrt(2), rel=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0


# ---------------------------------------------------------------- restoration
def test_restoration_mse_and_l1_by_hand():
    restored = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 2, 2, 1)
    target = torch.zeros_like(restored)
    assert RestorationLoss("mse")(restored, target).item() == pytest.approx((0 + 1 + 4 + 9) / 4)
    assert RestorationLoss("l1")(restored, target).item() == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert RestorationLoss()(restored, target).item() == pytest.approx(3.5)  # default is MSE
    with pytest.raises(ValueError, match="mse, l1"):
        RestorationLoss("ssim")
    with pytest.raises(ValueError, match="shape"):
        RestorationLoss()(restored, torch.zeros(1, 1, 2, 2, 2))


# ---------------------------------------------------------------- adversarial
def test_adversarial_vanilla_by_hand():
    loss = AdversarialLoss("vanilla")
    zeros = torch.zeros(2, 1, 3, 3, 2)
    assert loss.generator(zeros).item() == pytest.approx(math.log(2), rel=1e-6)
    assert loss.discriminator(zeros, zeros).item() == pytest.approx(math.log(2), rel=1e-6)
    real, fake = torch.tensor([2.0]), torch.tensor([-1.0])
    # −log σ(2) = log(1+e^−2); −log(1−σ(−1)) = log(1+e^−1); generator −log σ(−1) = log(1+e)
    assert loss.discriminator(real, fake).item() == pytest.approx(
        0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))), rel=1e-6
    )
    assert loss.generator(fake).item() == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_adversarial_lsgan_by_hand_and_gradient():
    loss = AdversarialLoss("lsgan")
    real = torch.tensor([2.0, 0.0])
    fake = torch.tensor([0.5, -1.0], requires_grad=True)
    # D: ½[((2−1)² + (0−1)²)/2 + (0.25 + 1)/2] = ½[1 + 0.625]
    assert loss.discriminator(real, fake).item() == pytest.approx(0.8125)
    # G: ((0.5−1)² + (−1−1)²)/2 = (0.25 + 4)/2
    g = loss.generator(fake)
    assert g.item() == pytest.approx(2.125)
    g.backward()
    torch.testing.assert_close(fake.grad, torch.tensor([-0.5, -2.0]))  # d/df mean (f−1)² = (f−1)
    with pytest.raises(ValueError, match="vanilla, lsgan"):
        AdversarialLoss("wgan")


def test_adversarial_discriminator_refuses_score_maps_of_different_shapes():
    loss = AdversarialLoss("vanilla")
    with pytest.raises(ValueError, match=r"one shape, got \(2, 1, 2, 2, 2\) and \(2, 1, 4, 4, 4\)"):
        loss.discriminator(torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="one shape"):
        AdversarialLoss("lsgan").discriminator(torch.zeros(4, 1, 2, 2), torch.zeros(2, 1, 2, 2))


# ---------------------------------------------------------------- DiRA sum
def test_dira_loss_sums_only_active_terms_with_lambdas():
    dis = torch.tensor(2.0, requires_grad=True)
    terms = {"dis": dis, "res": torch.tensor(0.03), "adv": torch.tensor(0.7)}
    loss = DiRALoss()  # dis=1, res=100, adv=1
    total, weighted = loss(terms, active={"dis", "res"})
    assert total.item() == pytest.approx(2.0 + 3.0)
    assert set(weighted) == {"dis", "res"}
    assert weighted["res"].item() == pytest.approx(3.0)
    total.backward()
    assert dis.grad.item() == pytest.approx(1.0)

    total, _ = loss(terms, active=["dis", "res", "adv"])
    assert total.item() == pytest.approx(5.7)
    total, _ = DiRALoss("res=10,adv=0.001")(terms, active=["dis", "res", "adv"])
    assert total.item() == pytest.approx(2.0 + 0.3 + 0.0007)


def test_dira_loss_errors_and_parse_weights():
    assert parse_weights("dis=1, res=100,adv=0.5") == {"dis": 1.0, "res": 100.0, "adv": 0.5}
    assert parse_weights({"res": 10}) == {"res": 10.0}
    assert DiRALoss({"res": 10}).weights == {"dis": 1.0, "res": 10.0, "adv": 1.0}
    with pytest.raises(ValueError, match="unknown term 'gen'"):
        DiRALoss({"gen": 1.0})
    with pytest.raises(ValueError, match="name=value"):
        parse_weights("dis:1")
    with pytest.raises(ValueError, match=">= 0"):
        parse_weights("res=-1")
    with pytest.raises(ValueError, match="'adv' is active but was not computed"):
        DiRALoss()({"dis": torch.tensor(1.0)}, active=["dis", "adv"])
    with pytest.raises(ValueError, match="no active terms"):
        DiRALoss()({"dis": torch.tensor(1.0)}, active=[])


# ---------------------------------------------------------------- distributed
def test_gather_helpers_are_identity_without_process_group():
    assert not dist.is_initialized()
    t = torch.randn(3, 2, requires_grad=True)
    assert concat_all_gather(t) is t
    assert gather_with_grad(t) is t


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str, z1: torch.Tensor, z2: torch.Tensor) -> None:
    """One rank: Barlow Twins on its half of the batch with gathering, plus a key gather."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    with leaving_the_group():
        n = z1.shape[0] // world_size
        z1_local = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
        z2_local = z2[rank * n : (rank + 1) * n].clone()
        loss = BarlowTwinsLoss(gather_distributed=True)(z1_local, z2_local)
        loss.backward()
        keys = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = concat_all_gather(keys)
        torch.save(
            {"loss": loss.detach(), "grad": z1_local.grad, "gathered": gathered, "keys_grad": gathered.requires_grad},
            f"{out_dir}/rank{rank}.pt",
        )


def test_barlow_twins_global_batch_over_two_gloo_ranks(tmp_path):
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), z1, z2),
        nprocs=2,
        join=True,
    )
    full_z1 = z1.clone().requires_grad_()
    full_loss = BarlowTwinsLoss()(full_z1, z2)
    full_loss.backward()
    # a half batch alone gives a different loss: the test really measures the gathering
    assert BarlowTwinsLoss()(z1[:4], z2[:4]).item() != pytest.approx(full_loss.item(), rel=1e-3)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["loss"].item() == pytest.approx(full_loss.item(), rel=1e-5)
        # all_gather's backward sums over ranks: world_size × the slice of the full gradient,
        # which DDP's averaging turns back into the full-batch gradient
        torch.testing.assert_close(out["grad"] / 2, full_z1.grad[rank * 4 : (rank + 1) * 4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        assert out["keys_grad"] is False


# ---------------------------------------------------------------- defaults (METHOD.md) and edge cases
def test_defaults_follow_method_md():
    """The patent's forms and the published constants are the defaults: vanilla GAN (patent eq. 3),
    MoCo-v2 τ = 0.2, Barlow Twins λ = 5e-3, MSE restoration, λ_dis/res/adv = 1/100/1 (3D)."""
    assert AdversarialLoss().kind == "vanilla"
    assert AdversarialLoss().generator(torch.zeros(3)).item() == pytest.approx(math.log(2), rel=1e-6)
    assert InfoNCELoss().temperature == 0.2
    assert BarlowTwinsLoss().lambda_offdiag == 5e-3
    assert RestorationLoss().kind == "mse"
    assert DiRALoss().weights == {"dis": 1.0, "res": 100.0, "adv": 1.0}


def test_visual_word_label_smoothing_is_applied_and_one_is_refused():
    logits, target = torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.tensor([0])
    log_p = torch.log_softmax(logits, dim=1)[0]
    eps = 0.2  # target distribution: (1 − ε) on the class plus ε/C everywhere
    by_hand = -((1 - eps) * log_p[0] + eps / 4 * log_p.sum())
    assert VisualWordLoss(label_smoothing=eps)(logits, target).item() == pytest.approx(by_hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VisualWordLoss(label_smoothing=1.0)  # a uniform target: the loss would not depend on the label


def test_moco_queue_takes_a_batch_of_exactly_its_size():
    queue = MoCoQueue(dim=2, size=3, generator=torch.Generator().manual_seed(0))
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queue.enqueue(keys)
    torch.testing.assert_close(queue.queue, keys)
    assert int(queue.ptr) == 0


def test_a_zero_weight_is_allowed():
    """λ = 0 switches a term off without changing the stages (an ablation), so it is accepted."""
    total, weighted = DiRALoss("adv=0")({"dis": torch.tensor(2.0), "adv": torch.tensor(5.0)}, active=["dis", "adv"])
    assert float(total) == 2.0 and float(weighted["adv"]) == 0.0


def test_a_world_of_one_process_is_not_distributed(tmp_path):
    """With a process group of one rank the helpers stay the identity (no copy, no gather)."""
    from dira3d.losses import is_distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert not is_distributed()
        t = torch.randn(3, 2, requires_grad=True)
        assert concat_all_gather(t) is t and gather_with_grad(t) is t
    finally:
        cleanup_distributed()
