"""The method's step against METHOD.md section 1: what each loss term compares, where the
adversarial term's gradient goes, and the stage bounds. Tiny networks, as in test_engine.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import make_trainer

from dira3d.engines import StageSchedule

DIRA = [{"name": "dira", "losses": ["dis", "res", "adv"]}]


def one_forward(trainer):
    batch = trainer._prepare(next(iter(trainer.data_loader)))
    return trainer.forward_terms(batch, trainer.step_generator(1), trainer.current_stage())


def test_stage_bounds_must_be_positive_and_strictly_increasing():
    """A bound of 0, or a bound equal to the previous stage's, would leave a stage that never runs."""
    with pytest.raises(ValueError, match="strictly increase"):
        StageSchedule([{"name": "a", "until_epoch": 2, "losses": ["dis"]},
                       {"name": "b", "until_epoch": 2, "losses": ["dis", "res"]},
                       {"name": "c", "losses": ["dis", "res", "adv"]}])
    for key in ("until_epoch", "until_iteration"):
        with pytest.raises(ValueError, match=f"{key} must be a whole number >= 1"):
            StageSchedule([{"name": "a", key: 0, "losses": ["dis"]}, {"name": "b", "losses": ["res"]}])


@pytest.mark.parametrize("key", ["until_epoch", "until_iteration"])
@pytest.mark.parametrize("bad", [True, False, 2.5, -3, "3", "two", [2], float("nan"), float("inf")])
def test_a_stage_bound_that_is_not_a_whole_number_is_refused_naming_the_setting_and_the_stage(key, bad):
    """True passed as 1 (int(True) == True) and a text bound failed with int()'s bare 'invalid literal for int()';
    NaN and infinity with int()'s ValueError / OverflowError."""
    with pytest.raises(ValueError) as refused:
        StageSchedule([{"name": "warm", key: bad, "losses": ["dis"]}, {"name": "b", "losses": ["res"]}])
    message = str(refused.value)
    assert message.startswith(f"stages[0] (warm): {key} must be a whole number >= 1 (the last") , message
    assert repr(bad) in message and "stages" in message


def test_whole_number_stage_bounds_are_taken():
    s = StageSchedule([{"name": "a", "until_epoch": 2.0, "losses": ["dis"]}, {"name": "b", "losses": ["res"]}])
    assert s.stages[0].until_epoch == 2 and type(s.stages[0].until_epoch) is int


def test_restoration_term_compares_the_restoration_with_the_clean_target():
    """L_res = dist(x1, g(f(T(x1)))): against the (flipped) original patch, not the distorted input."""
    torch.manual_seed(0)
    trainer = make_trainer("visual_words", 3, stages=DIRA)
    fwd = one_forward(trainer)
    assert not torch.equal(fwd.distorted, fwd.target)  # the distortion changed something
    torch.testing.assert_close(fwd.terms["res"], F.mse_loss(fwd.restored.float(), fwd.target.float()))


def test_adversarial_term_trains_the_generator_not_the_discriminator():
    """G's term L_adv = BCE(D(x'), real) back-propagates through D into the decoder; D's own
    parameters get no gradient from it (D is trained by its own step only)."""
    torch.manual_seed(0)
    trainer = make_trainer("visual_words", 3, stages=DIRA)
    fwd = one_forward(trainer)
    fwd.terms["adv"].backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainer.network.parameters())
    assert all(p.grad is None for p in trainer.adversary.parameters())
    assert all(p.requires_grad for p in trainer.adversary.parameters())  # switched back on for D's step


def test_visual_word_mode_distorts_and_restores_the_first_instance():
    """Visual words: T(x1) is the first instance ("image"), its restoration target x1; the second
    instance (kept when both are classified) stays the other input."""
    torch.manual_seed(0)
    trainer = make_trainer("visual_words", 3, stages=DIRA, distortion="none", classify_both=True)
    batch = trainer._prepare(next(iter(trainer.data_loader)))
    assert not torch.equal(batch["image"], batch["image2"])
    inputs = trainer.step_inputs(batch, trainer.step_generator(1), trainer.current_stage())
    assert torch.equal(inputs.distorted, batch["image"]) and torch.equal(inputs.target, batch["image"])
    assert torch.equal(inputs.view2, batch["image2"])


def test_adversarial_stage_without_restoration_still_restores():
    """A stage may name any subset of the terms: with ``adv`` but not ``res`` the decoder still runs."""
    torch.manual_seed(0)
    trainer = make_trainer("visual_words", 3, stages=[{"name": "da", "losses": ["dis", "adv"]}])
    fwd = one_forward(trainer)
    assert fwd.restored is not None and fwd.terms["adv"].ndim == 0


def test_simsiam_pairs_each_prediction_with_the_other_views_projection():
    """L = ½D(p1, sg(z2)) + ½D(p2, sg(z1)), with p_i = predictor(z_i)."""
    torch.manual_seed(0)
    trainer = make_trainer("simsiam", 3, stages=[{"name": "dis", "losses": ["dis"]}])
    seen, calls = [], []
    trainer.predictor.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    loss = trainer.dis_loss
    trainer.dis_loss = lambda *args: calls.append([a.detach() for a in args]) or loss(*args)
    one_forward(trainer)
    (p1, p2, z1, z2), = calls
    assert torch.equal(z1, seen[0].float()) and torch.equal(z2, seen[1].float())


def test_classifying_both_instances_averages_the_two_cross_entropies():
    torch.manual_seed(0)
    trainer = make_trainer("visual_words", 3, stages=[{"name": "dis", "losses": ["dis"]}], classify_both=True)
    values, loss = [], trainer.dis_loss
    trainer.dis_loss = lambda *args: values.append(loss(*args)) or values[-1]
    fwd = one_forward(trainer)
    assert len(values) == 2
    torch.testing.assert_close(fwd.terms["dis"], 0.5 * (values[0] + values[1]))


def test_discriminator_scores_are_probabilities_for_the_vanilla_gan():
    """d_real / d_fake are the mean of sigmoid(D(·)) for the vanilla loss (the raw score for lsgan)."""
    torch.manual_seed(0)
    trainer = make_trainer("visual_words", 3, stages=DIRA)
    real, fake = torch.rand(2, 1, 16, 16, 8), torch.rand(2, 1, 16, 16, 8)
    with torch.no_grad():
        _, d_real, d_fake = trainer.adversary_scores(real, fake)
        expected_real = torch.sigmoid(trainer.adversary(real).float()).mean()
        expected_fake = torch.sigmoid(trainer.adversary(fake).float()).mean()
    torch.testing.assert_close(d_real, expected_real)
    torch.testing.assert_close(d_fake, expected_fake)


def test_barlow_twins_correlates_the_two_views():
    """L_dis = BarlowTwins(h(f(T(x1))), h(f(T(x2)))): the projections of the two views, in order."""
    torch.manual_seed(0)
    trainer = make_trainer("barlow", 3, stages=[{"name": "dis", "losses": ["dis"]}])
    seen, calls = [], []
    trainer.dis_head.register_forward_hook(lambda module, args, out: seen.append(out.detach().float()))
    loss = trainer.dis_loss
    trainer.dis_loss = lambda *args: calls.append([a.detach() for a in args]) or loss(*args)
    one_forward(trainer)
    (z1, z2), = calls
    assert len(seen) == 2 and torch.equal(z1, seen[0]) and torch.equal(z2, seen[1])


def test_moco_key_projector_follows_the_online_projector_by_ema():
    """The key side is an EMA copy of encoder *and* projector; its keys are unit vectors."""
    from ignite.engine import Events

    m = 0.75
    torch.manual_seed(0)
    trainer = make_trainer("moco", 3, stages=[{"name": "dis", "losses": ["dis"]}], volumes=4, batch=2, momentum=m)
    initial = {k: v.detach().clone() for k, v in trainer.momentum_head.named_parameters()}
    after_first = {}

    @trainer.on(Events.ITERATION_COMPLETED(once=1))
    def _(engine):
        after_first.update({k: v.detach().clone() for k, v in engine.dis_head.named_parameters()})

    trainer.run()  # 2 iterations
    for name, key in trainer.momentum_head.named_parameters():
        torch.testing.assert_close(key, m * initial[name] + (1 - m) * after_first[name])
    keys = trainer.moco.encode(torch.rand(2, 1, 16, 16, 8))
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(2))


def test_a_skipped_step_enqueues_no_keys():
    """on_nonfinite='skip' drops the whole step: its keys do not enter the queue either."""
    from ignite.engine import Events
    from test_faults import NaNAt

    torch.manual_seed(0)
    trainer = make_trainer("moco", 3, stages=[{"name": "dir", "losses": ["dis", "res"]}], volumes=4, batch=2)
    trainer.restoration_loss = NaNAt(2)
    trainer.nonfinite_guard.on_nonfinite = "skip"
    queues = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: queues.append((int(engine.queue.ptr), engine.queue.queue.clone())))
    trainer.run()  # 2 iterations, the second one skipped
    assert trainer.nonfinite_guard.skipped == 1
    assert [q[0] for q in queues] == [2, 2] and torch.equal(queues[0][1], queues[1][1])


def test_shuffle_bn_permutation_changes_with_the_iteration(monkeypatch):
    """Every rank draws the same permutation for one iteration (seeded by seed and iteration), and a
    new one at the next iteration: a fixed permutation would pair the same samples in every step."""
    import dira3d.engines.moco as moco

    monkeypatch.setattr(moco, "is_distributed", lambda: True)
    torch.manual_seed(0)
    trainer = make_trainer("moco", 3, stages=[{"name": "dis", "losses": ["dis"]}], shuffle_bn=True)
    cpu = torch.device("cpu")
    perm = [torch.randperm(64, generator=trainer.moco.shuffle_generator(i, cpu)) for i in (1, 1, 2)]
    assert torch.equal(perm[0], perm[1]) and not torch.equal(perm[0], perm[2])
