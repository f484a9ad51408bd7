"""``second_view``: what the instance modes (moco, barlow, simsiam) do with their second view.

``"augmented"`` (the default, the patent's equation 2): the second view is T(x2) alone; ``"distorted"`` (the
official 2D DiRA code): it is also distorted, with its own draw, and not restored; ``"restored"`` (the patent's
claims 1, 13, 17): both views are distorted and restored, L_res is the mean of the two and the adversary scores
both restorations. Each form is checked against a hand-written reference: the draws of a generator seeded as the
step's (the views, then the first view's distortion, then the second view's), fed to copies of the networks as
docs/method.md describes. The ``"augmented"`` case pins the default step's draws and losses.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from test_engine import PATCH3, make_trainer, smooth_volumes
from test_engine_prefetch import per_iteration_losses

from dira3d.engines import DiRAEvaluator, RandPatchPaird
from dira3d.engines.batches import STREAM_STEP
from dira3d.engines.evaluator import STREAM_VALIDATION
from dira3d.engines.optim import ema_update
from dira3d.transforms.compositions import build_distortion
from dira3d.transforms.views import ViewAugment, random_views
from dira3d.utils.seeding import stream_seed

FORMS = ("augmented", "distorted", "restored")
INSTANCE_MODES = ("moco", "barlow", "simsiam")
DIRA = [{"name": "dira", "losses": ["dis", "res", "adv"]}]


def reference_draws(trainer, batch, seed: int, form: str) -> dict[str, torch.Tensor]:
    """The step's draws, written out: both views (each with its crop before the intensity steps), the first
    view's distortion, then (not in the default form) the second view's, from one generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    settings = trainer.views.settings
    x1, x2 = batch["image"], batch.get("image2")
    b = x1.shape[0]
    pool = x1 if x2 is None else torch.cat([x1, x2])
    first, clean1 = random_views(pool, gen, settings, return_clean=True)
    second, clean2 = random_views(pool, gen, settings, return_clean=True)
    if x2 is not None:  # two instances: the first view of x1, the second of x2
        first, clean1, second, clean2 = first[:b], clean1[:b], second[b:], clean2[b:]
    distortion = build_distortion("models_genesis" if x1.ndim == 5 else "dira2d")  # make_trainer's
    d1, t1 = distortion(first, gen, target=clean1)
    out = {"view2": second, "distorted": d1, "target": t1}
    if form != "augmented":
        out["distorted2"], out["target2"] = distortion(second, gen, target=clean2)
    return out


def reference_terms(trainer, batch, draws, form: str, train: bool, eval_mode: bool = False) -> dict[str, torch.Tensor]:
    """L_dis, L_res and L_adv of ``form`` from copies of the trainer's networks (taken before its own step)."""
    net, head = copy.deepcopy(trainer.network), copy.deepcopy(trainer.dis_head)
    predictor, adversary = copy.deepcopy(trainer.predictor), copy.deepcopy(trainer.adversary)
    for module in (net, head, predictor, adversary):
        if module is not None:
            module.train(not eval_mode)
    d1, t1 = draws["distorted"], draws["target"]
    other = draws["view2"] if form == "augmented" else draws["distorted2"]  # what the second branch sees
    enc1 = net.encode(d1)
    z1 = head(enc1[0])
    enc2 = None
    if trainer.dis_mode == "moco":
        key_encoder, key_head = copy.deepcopy(trainer.moco.encoder), copy.deepcopy(trainer.moco.head)
        key_encoder.train(not eval_mode), key_head.train(not eval_mode)
        with torch.no_grad():
            if train:  # MoCo-v2: the EMA step comes before the keys
                ema_update(key_encoder, net.encoder, trainer.moco.momentum)
                ema_update(key_head, head, trainer.moco.momentum)
            keys = F.normalize(key_head(key_encoder(other)[0]).float(), dim=1)
        dis = trainer.dis_loss(z1.float(), keys, trainer.queue.queue.clone())
        if form == "restored":  # the query encoder's own pass on the distorted second view
            enc2 = net.encode(draws["distorted2"])
    else:
        enc2 = net.encode(other)
        z2 = head(enc2[0])
        if trainer.dis_mode == "barlow":
            dis = trainer.dis_loss(z1.float(), z2.float())
        else:
            dis = trainer.dis_loss(predictor(z1).float(), predictor(z2).float(), z1.float(), z2.float())
    r1 = net.decode(*enc1)
    res = F.mse_loss(r1.float(), t1.float())
    restored = r1
    if form == "restored":
        r2 = net.decode(*enc2)
        res = 0.5 * (res + F.mse_loss(r2.float(), draws["target2"].float()))
        restored = torch.cat([r1, r2])
    adv = trainer.adversarial_loss.generator(adversary(restored))
    return {"dis": dis, "res": res, "adv": adv, "restored": restored}


def first_batch(trainer):
    return trainer._prepare(next(iter(trainer.data_loader)))


def assert_terms(fwd_terms, expected):
    for term in ("dis", "res", "adv"):
        torch.testing.assert_close(fwd_terms[term], expected[term], rtol=1e-5, atol=1e-6, msg=term)


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", INSTANCE_MODES)
def test_each_form_gives_the_loss_terms_of_its_hand_written_reference(mode, form, dims):
    trainer = make_trainer(mode, dims, stages=DIRA, batch=2, volumes=2, second_view=form)
    batch = first_batch(trainer)
    assert "image2" in batch  # two instances: the first view from x1, the second from x2
    draws = reference_draws(trainer, batch, stream_seed(0, STREAM_STEP, 1), form)
    expected = reference_terms(trainer, batch, draws, form, train=True)
    inputs = trainer.step_inputs(batch, trainer.step_generator(1), trainer.current_stage())
    assert torch.equal(inputs.distorted, draws["distorted"]) and torch.equal(inputs.target, draws["target"])
    assert torch.equal(inputs.view2, draws["view2"])
    if form == "augmented":
        assert inputs.distorted2 is None and inputs.target2 is None
    else:
        assert torch.equal(inputs.distorted2, draws["distorted2"]) and torch.equal(inputs.target2, draws["target2"])
        assert not torch.equal(inputs.distorted2, inputs.view2)  # the distortion changed the second view
    fwd = trainer.forward_terms(batch, trainer.step_generator(1), trainer.current_stage())
    assert_terms(fwd.terms, expected)
    b = batch["image"].shape[0]
    assert fwd.restored.shape[0] == fwd.target.shape[0] == (2 * b if form == "restored" else b)
    torch.testing.assert_close(fwd.restored, expected["restored"], rtol=1e-5, atol=1e-6)
    targets = [draws["target"]] + ([draws["target2"]] if form == "restored" else [])
    assert torch.equal(fwd.target, torch.cat(targets))  # D's real patches: each restoration's own target


@pytest.mark.parametrize("form", FORMS)
def test_moco_validation_keys_come_from_the_same_second_view_without_the_ema_step(form):
    """train=False (DiRAEvaluator): the key encoder is not moved, the queue not touched, the forms alike."""
    trainer = make_trainer("moco", 3, stages=DIRA, batch=2, volumes=2, second_view=form)
    batch = first_batch(trainer)
    draws = reference_draws(trainer, batch, stream_seed(0, STREAM_STEP, 1), form)
    expected = reference_terms(trainer, batch, draws, form, train=False)
    before = [p.clone() for p in trainer.moco.encoder.parameters()]
    fwd = trainer.forward_terms(batch, trainer.step_generator(1), trainer.current_stage(), train=False)
    assert_terms(fwd.terms, expected)
    assert fwd.keys is None and all(torch.equal(a, p) for a, p in zip(before, trainer.moco.encoder.parameters()))


@pytest.mark.parametrize("mode", INSTANCE_MODES)
def test_distorting_the_second_view_changes_the_discrimination_but_not_the_restoration(mode):
    """"distorted" (official 2D code): the key / z2 come from the distorted second view, L_res and the first
    view's distortion stay those of the default; "restored" keeps the first view's distortion too."""
    fwd, inputs = {}, {}
    for form in FORMS:
        trainer = make_trainer(mode, 3, stages=[{"name": "dir", "losses": ["dis", "res"]}], batch=2, volumes=2,
                               second_view=form)
        batch = first_batch(trainer)
        inputs[form] = trainer.step_inputs(batch, trainer.step_generator(1), trainer.current_stage())
        fwd[form] = trainer.forward_terms(batch, trainer.step_generator(1), trainer.current_stage(), train=False)
    for form in ("distorted", "restored"):
        assert torch.equal(inputs[form].distorted, inputs["augmented"].distorted)
        assert torch.equal(inputs[form].view2, inputs["augmented"].view2)
    assert torch.equal(fwd["distorted"].terms["res"], fwd["augmented"].terms["res"])
    assert not torch.allclose(fwd["distorted"].terms["dis"], fwd["augmented"].terms["dis"])
    assert not torch.allclose(fwd["restored"].terms["res"], fwd["augmented"].terms["res"])


@pytest.mark.parametrize("form", FORMS)
def test_the_adversary_sees_both_restorations_and_both_targets_when_both_views_are_restored(form):
    """One training step of the dira stage: G's adversarial term scores 2B restorations and D's step compares
    2B real patches (the two targets) with 2B restorations in "restored"; B of each otherwise."""
    trainer = make_trainer("barlow", 3, stages=DIRA, batch=2, volumes=2, second_view=form)
    prepared, prepare = [], trainer._prepare
    trainer._prepare = lambda raw: prepared.append(prepare(raw)) or prepared[-1]
    seen, scored = [], []
    trainer.adversary.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    inner = trainer.adversary_scores
    trainer.adversary_scores = lambda real, fake: scored.append((real.detach(), fake.detach())) or inner(real, fake)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run()
    b = 2 * 2 if form == "restored" else 2
    assert trainer.joint_adversary and seen == [b, 2 * b]  # G's term, then D's step on real and fake in one pass
    (real, fake), = scored
    draws = reference_draws(trainer, prepared[0], stream_seed(0, STREAM_STEP, 1), form)  # the run's batch
    targets = [draws["target"]] + ([draws["target2"]] if form == "restored" else [])
    assert torch.equal(real, torch.cat(targets)) and fake.shape == real.shape
    assert "loss_d" in outputs[0]


@pytest.mark.parametrize("form", ["distorted", "restored"])
def test_validation_follows_the_second_view_form(form):
    """DiRAEvaluator's loss terms are those of the form, from its fixed validation draws (eval mode; a batch of
    single crops: both views from the first patch)."""
    val_loader = DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3, pair="views")),
                            batch_size=2)
    evaluator = DiRAEvaluator("cpu", val_loader, seed=7)
    trainer = make_trainer("barlow", 3, stages=DIRA, batch=2, volumes=2, second_view=form)
    evaluator.trainer = trainer
    prepared, prepare = [], trainer._prepare
    trainer._prepare = lambda raw: prepared.append(prepare(raw)) or prepared[-1]
    for module in trainer.modules().values():
        module.eval()
    evaluator.run()
    batch, = prepared
    assert "image2" not in batch
    draws = reference_draws(trainer, batch, stream_seed(7, STREAM_VALIDATION, 1), form)
    with torch.no_grad():
        expected = reference_terms(trainer, batch, draws, form, train=False, eval_mode=True)
    for term in ("dis", "res", "adv"):
        assert evaluator.state.metrics[f"val_loss_{term}"] == pytest.approx(float(expected[term]), rel=1e-5, abs=1e-6)


def test_prefetch_trains_the_restored_form_exactly_like_the_plain_loop():
    """The prepared batch carries the second view's distortion and target (Prepared / StepInputs)."""
    stages = [{"name": "dir", "until_iteration": 2, "losses": ["dis", "res"]}, DIRA[0]]
    runs = {}
    for prefetch in (False, True):
        trainer = make_trainer("simsiam", 3, stages=stages, max_epochs=2, batch=2, volumes=4, prefetch=prefetch,
                               second_view="restored")
        log = per_iteration_losses(trainer)
        trainer.run()
        runs[prefetch] = log
    assert len(runs[False]) == 4 and runs[True] == runs[False]


@pytest.mark.parametrize("form", ["distorted", "restored"])
def test_visual_words_refuses_another_second_view_naming_the_setting_and_what_to_use(form):
    with pytest.raises(ValueError) as refused:
        make_trainer("visual_words", 3, second_view=form)
    message = str(refused.value)
    assert message.startswith(f"second_view={form!r} applies to the instance modes (moco, barlow, simsiam)")
    assert "leave second_view at 'augmented'" in message and "classify_both" in message


@pytest.mark.parametrize("bad", ["both", "Restored", None, 1])
def test_an_unknown_second_view_is_refused_listing_the_choices(bad):
    with pytest.raises(ValueError, match=r"second_view=.* is not supported; choose one of augmented, distorted, "
                                         r"restored"):
        make_trainer("barlow", 3, second_view=bad)


def test_view_augment_returns_the_second_views_clean_crop_without_drawing_more():
    x = torch.rand(3, 1, 12, 12, 8)
    aug = ViewAugment(3)
    plain_gen, clean_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    v1, v2 = aug(x, plain_gen)
    w1, w2, clean1, clean2 = aug(x, clean_gen, return_clean=True, return_clean2=True)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert torch.equal(plain_gen.get_state(), clean_gen.get_state())  # the same draws, no more
    # clean2 is v2's crop and flips before its intensity steps: a view with every intensity step off, drawn
    # from the generator where v2 was drawn (the crop and the flips are each view's first draws)
    crops = ViewAugment(3, jitter_prob=0, gamma_prob=0, noise_prob=0, blur_prob=0).settings
    gen = torch.Generator().manual_seed(4)
    assert torch.equal(random_views(x, gen, crops), clean1)
    gen = torch.Generator().manual_seed(4)
    random_views(x, gen, aug.settings)  # v1
    assert torch.equal(random_views(x, gen, crops), clean2)
    assert not torch.equal(clean2, clean1) and not torch.equal(clean2, v2)
    only2 = aug(x, torch.Generator().manual_seed(4), return_clean2=True)
    assert len(only2) == 3 and torch.equal(only2[2], clean2)


@pytest.mark.parametrize("mode,form", [("visual_words", None), ("barlow", "restored"), ("moco", "distorted")])
def test_the_bundle_passes_second_view_to_the_trainer(repo_root, tmp_path, mode, form):
    """train.json's top-level second_view (default "augmented") reaches DiRATrainer; multi_gpu_train.json and the
    2D configs build the trainer from train.json's train#trainer."""
    from monai.bundle import ConfigParser
    from test_bundle_pretrain import CONFIGS, write_volumes

    data = tmp_path / "data"
    data.mkdir()
    write_volumes(data, count=3)
    parser = ConfigParser()
    parser.read_config([str(repo_root / CONFIGS / "train.json"), str(repo_root / CONFIGS / "tiny.json")])
    parser.update({"dataset_dir": str(data), "bundle_root": str(tmp_path / "run"), "patch_size": [16, 16, 8],
                   "device": "$torch.device('cpu')", "dis_mode": mode, "validation": False, "num_workers": 0})
    assert parser["second_view"] == "augmented" and parser["train#trainer#second_view"] == "@second_view"
    if form is not None:
        parser["second_view"] = form
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.second_view == (form or "augmented")
    for overlay in ("multi_gpu_train.json", "2d.json", "2d_moco.json"):  # they keep train.json's setting
        layered = ConfigParser()
        layered.read_config([str(repo_root / CONFIGS / name) for name in ("train.json", overlay)])
        assert layered["second_view"] == "augmented" and layered["train#trainer#second_view"] == "@second_view"


@pytest.mark.parametrize("name", ["train.json", "multi_gpu_train.json"])
def test_a_finished_run_rerun_with_another_second_view_is_not_taken_as_finished(repo_root, name):
    """exit_if_finished compares second_view with last.pt's (dira_pretrain 0.1.39): a finished run rerun with another
    form goes to the resume, which refuses the checkpoint (restore_checkpoint's meta check) instead of exiting 0."""
    import json

    config = json.loads((repo_root / "bundles" / "dira_pretrain" / "configs" / name).read_text())
    step = next(s for s in config["initialize"] if "exit_if_finished" in s)
    assert "second_view=@second_view" in step, step
