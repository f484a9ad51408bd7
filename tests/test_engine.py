"""DiRATrainer in-process: stages, the four discrimination modes, 2D/3D, the adversary's steps,
checkpoint format and exact resume. Tiny networks (width 1/8) on 16×16×8 patches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from dira3d.engines import (
    DIS_MODES,
    DiRACheckpoint,
    DiRAEvaluator,
    DiRATrainer,
    RandPatchPair,
    RandPatchPaird,
    StageSchedule,
    build_dis_head,
    build_predictor,
    checkpoint_dict,
    side_by_side,
    unique_parameters,
    with_image_labels,
)
from dira3d.engines.optim import ema_update
from dira3d.networks import Adversary, Classifier, Segmenter, UNet, load_pretrained
from dira3d.transforms.compositions import build_distortion
from dira3d.utils import load_checkpoint
from dira3d.utils.seeding import stream_seed

PATCH3 = (16, 16, 8)
PATCH2 = (16, 16)


def smooth_volumes(count: int, shape=(24, 24, 12), seed: int = 0) -> list[dict]:
    """Smooth random volumes in [0, 1] (restorable structure, unlike white noise)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        v = gaussian_filter(rng.random(shape), 2.0)
        v = (v - v.min()) / (v.max() - v.min())
        items.append({"image": v[None].astype(np.float32), "case_id": f"c{i}"})
    return with_image_labels(items)


def make_trainer(mode="visual_words", dims=3, stages=None, max_epochs=1, seed=0, batch=4, volumes=4, lr=1e-3,
                 handlers=None, distortion="models_genesis", device="cpu", **options):
    torch.manual_seed(seed)
    patch = PATCH3 if dims == 3 else PATCH2
    transform = RandPatchPaird("image", patch, spatial_dims=dims, pair="instances")
    loader = DataLoader(Dataset(smooth_volumes(volumes), transform), batch_size=batch, shuffle=True,
                        num_workers=0, generator=torch.Generator())
    net = UNet(spatial_dims=dims, width=1 / 8)
    head = build_dis_head(mode, dims, net.bottleneck_channels, num_classes=volumes, hidden=16, proj_dim=8)
    predictor = build_predictor(mode, 8)
    adversary = Adversary(dims, 1, channels=4, num_layers=3)
    trainer = DiRATrainer(
        device, max_epochs, loader, net,
        torch.optim.Adam(unique_parameters([net, head, predictor]), lr), head, adversary,
        torch.optim.Adam(adversary.parameters(), lr), dis_mode=mode, predictor=predictor, stages=stages,
        distortion=build_distortion(distortion if dims == 3 else "dira2d"), seed=seed, queue_size=16,
        train_handlers=handlers, **options,
    )
    return trainer


def record(trainer):
    """Per iteration: stage name, numeric output keys, and a copy of the adversary's weights."""
    log = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine):
        log.append((engine.state.output["stage"], set(k for k, v in engine.state.output.items() if isinstance(v, torch.Tensor)),
                    [p.detach().clone() for p in engine.adversary.parameters()],
                    {k: float(v) for k, v in engine.state.output.items() if isinstance(v, torch.Tensor)}))
    return log


STAGES = [
    {"name": "dis", "until_iteration": 1, "losses": ["dis"]},
    {"name": "dis_res", "until_iteration": 2, "losses": ["dis", "res"]},
    {"name": "dira", "losses": ["dis", "res", "adv"]},
]


def test_stage_schedule_lookup_and_errors():
    s = StageSchedule([{"name": "a", "until_epoch": 2, "losses": ["dis"]},
                       {"name": "b", "until_epoch": 4, "losses": ["dis", "res"]},
                       {"name": "c", "losses": ["res", "adv"]}])
    assert [s.stage_at(e, 1).name for e in (1, 2, 3, 4, 5, 99)] == ["a", "a", "b", "b", "c", "c"]
    assert s.stage_at(5, 1).adversarial and not s.stage_at(1, 1).adversarial
    t = StageSchedule([{"name": "x", "until_iteration": 3, "losses": ["res"]}, {"name": "y", "losses": ["res", "adv"]}])
    assert [t.stage_at(1, i).name for i in (1, 3, 4)] == ["x", "x", "y"]
    bad = [
        [{"name": "a", "losses": ["dis", "oops"]}],
        [{"name": "a", "losses": []}],
        [{"name": "a", "until_epoch": 2, "losses": ["dis"]}],  # bounded last stage
        [{"name": "a", "until_epoch": 3, "losses": ["dis"]}, {"name": "b", "until_epoch": 2, "losses": ["res"]},
         {"name": "c", "losses": ["res"]}],
        [{"name": "a", "until_epoch": 1, "until_iteration": 5, "losses": ["dis"]}, {"name": "b", "losses": ["res"]}],
        [{"name": "a", "loses": ["dis"]}],
    ]
    for stages in bad:
        with pytest.raises(ValueError, match="stages"):
            StageSchedule(stages)


def test_ema_update_and_seed_helpers():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.fill_(1.0), b.weight.fill_(3.0)
    ema_update(a, b, momentum=0.75)
    assert torch.allclose(a.weight, torch.full((2, 2), 0.75 * 1 + 0.25 * 3))
    assert stream_seed(0, 1, 5) == stream_seed(0, 1, 5)
    assert len({stream_seed(0, 1, 5), stream_seed(0, 2, 5), stream_seed(0, 1, 6), stream_seed(1, 1, 5)}) == 4


def test_patch_pairs_and_side_by_side():
    vol = torch.arange(10 * 12 * 6, dtype=torch.float32).reshape(1, 10, 12, 6)
    cropper = RandPatchPair((8, 8, 4), spatial_dims=3, pair="instances")
    cropper.set_random_state(0)
    p1, p2 = cropper(vol)
    assert p1.shape == p2.shape == (1, 8, 8, 4)
    # a crop is a contiguous block: consecutive z voxels differ by exactly 1 in this arange volume
    assert torch.all(p1[..., 1:] - p1[..., :-1] == 1)
    two_d = RandPatchPair((16, 16), spatial_dims=2, pair="views")  # pads 10x12 → 16x16, one slice
    with pytest.warns(UserWarning, match=r"shape \[10, 12, 6\] is smaller than the patch \[16, 16, 1\] \(axis x 10 < 16, "
                                         r"axis y 12 < 16\): its patches are padded with zeros.*--spacing"):
        (p,) = two_d(vol)
    with warnings.catch_warnings():  # said once per shape, not once per patch
        warnings.simplefilter("error")
        two_d(vol)
    assert p.shape == (1, 16, 16) and float(p[0, -1, -1]) == 0.0
    d = RandPatchPaird("image", (8, 8, 4))(dict(image=vol, label=3))
    assert d["image"].shape == d["image2"].shape == (1, 8, 8, 4) and d["label"] == 3
    with pytest.raises(ValueError, match="patch_size"):
        RandPatchPair((8, 8), spatial_dims=3)
    img = side_by_side({"original": torch.zeros(1, 1, 8, 6, 4), "distorted": torch.ones(1, 1, 8, 6, 4), "restored": None})
    assert img.shape == (1, 6, 16) and float(img[0, :, :8].max()) == 0.0 and float(img[0, :, 8:].min()) == 1.0


@pytest.mark.parametrize("mode,dims", [(m, 3) for m in DIS_MODES] + [("moco", 2), ("visual_words", 2)])
def test_modes_stages_and_adversary_steps(mode, dims):
    trainer = make_trainer(mode, dims, stages=STAGES, max_epochs=1, volumes=8, batch=2)  # 4 iterations
    log = record(trainer)
    initial = [p.detach().clone() for p in trainer.adversary.parameters()]
    trainer.run()
    stages = [entry[0] for entry in log]
    assert stages == ["dis", "dis_res", "dira", "dira"]
    assert {"loss_dis"} <= log[0][1] and "loss_res" not in log[0][1] and "loss_adv" not in log[0][1]
    assert {"loss_dis", "loss_res"} <= log[1][1] and "loss_adv" not in log[1][1]
    assert {"loss_dis", "loss_res", "loss_adv", "loss_d", "d_real", "d_fake"} <= log[2][1]
    # D is untouched until the adversarial stage, then every step moves it
    for entry in log[:2]:
        assert all(torch.equal(a, b) for a, b in zip(initial, entry[2]))
    assert not all(torch.equal(a, b) for a, b in zip(log[1][2], log[2][2]))
    assert not all(torch.equal(a, b) for a, b in zip(log[2][2], log[3][2]))
    for entry in log:
        assert all(np.isfinite(v) for v in entry[3].values())
    # the weighted total equals λ_dis·dis + λ_res·res + λ_adv·adv (1, 100, 1)
    last = log[-1][3]
    assert last["loss"] == pytest.approx(last["loss_dis"] + 100 * last["loss_res"] + last["loss_adv"], rel=1e-5)
    if mode == "moco":  # keys entered the queue: it is no longer its random initialisation
        assert int(trainer.queue.ptr) == (4 * 2) % 16


@pytest.mark.parametrize("mode", ["moco", "barlow", "simsiam"])
def test_instance_modes_restore_the_crop_not_the_jittered_view(mode):
    """METHOD.md section 3 / patent L_res = dist(x1, g(f(T(x1)))): the restoration target and D's
    real patch are the crop before jitter, noise and blur, not the augmented view."""
    from dira3d.transforms import ViewAugment

    views = ViewAugment(3, scale=(1.0, 1.0), flip_prob=0.0, jitter_prob=1.0, noise_prob=1.0, blur_prob=1.0)
    trainer = make_trainer(mode, 3, stages=[{"name": "dir", "losses": ["dis", "res"]}], distortion="none",
                           views=views)
    batch = trainer._prepare(next(iter(trainer.data_loader)))
    inputs = trainer.step_inputs(batch, trainer.step_generator(1), trainer.current_stage())
    assert torch.allclose(inputs.target, batch["image"], atol=1e-5)
    assert (inputs.view1 - batch["image"]).abs().mean() > 0.01
    assert torch.equal(inputs.distorted, inputs.view1)  # distortion "none": the network sees the view


def test_projector_layers_follow_each_base_method():
    """MoCo-v2's projector is Linear-ReLU-Linear (it had a BatchNorm, MoCo-v3 style); Barlow Twins
    and SimSiam keep one after each hidden layer, SimSiam one more at the end."""
    def layers(mode):
        return [type(m).__name__ for m in build_dis_head(mode, 3, 64, hidden=32, proj_dim=16).modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU))]

    assert layers("moco") == ["Linear", "ReLU", "Linear"]
    assert build_dis_head("moco", 3, 64, hidden=32, proj_dim=16)(torch.rand(4, 64, 2, 2, 2)).shape == (4, 16)
    assert layers("barlow").count("BatchNorm1d") == 2 and layers("simsiam").count("BatchNorm1d") == 3


def test_restoration_loss_falls():
    trainer = make_trainer("visual_words", 3, stages=[{"name": "res", "losses": ["res"]}], max_epochs=6,
                           volumes=2, batch=2, lr=3e-3, distortion="none")
    log = record(trainer)
    trainer.run()
    res = [entry[3]["loss_res"] for entry in log]
    assert len(res) == 6
    assert np.mean(res[-2:]) < 0.7 * np.mean(res[:2]), res


def test_checkpoint_resume_is_exact_and_loads_into_task_networks(tmp_path):
    stages = [{"name": "dis_res", "until_epoch": 1, "losses": ["dis", "res"]}, {"name": "dira", "losses": ["dis", "res", "adv"]}]

    def run(ckpt_dir, max_epochs):
        trainer = make_trainer("moco", 3, stages=stages, max_epochs=max_epochs, volumes=4, batch=2, seed=3,
                               handlers=[DiRACheckpoint(ckpt_dir, resume=True, meta={"width": 0.125, "patch_size": PATCH3})])
        trainer.run()
        return trainer

    full = run(tmp_path / "full", 2)
    part1 = run(tmp_path / "split", 1)
    ckpt1 = load_checkpoint(tmp_path / "split" / "last.pt")
    assert ckpt1["trainer"]["epoch"] == 1 and ckpt1["trainer"]["stage"] == "dis_res"
    resumed = run(tmp_path / "split", 2)  # same command: continues from last.pt
    assert resumed.state.epoch == 2 and resumed.state.iteration == 4
    a, b = checkpoint_dict(full), checkpoint_dict(resumed)
    for part in ("encoder", "decoder", "dis_head", "adversary", "momentum_encoder", "momentum_head", "queue"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert b["trainer"]["stage"] == "dira"
    # the adversary only trained in the second (adversarial) epoch
    assert all(torch.equal(ckpt1["adversary"][k], part1.adversary.state_dict()[k]) for k in ckpt1["adversary"])
    assert not all(torch.equal(ckpt1["adversary"][k], a["adversary"][k]) for k in ckpt1["adversary"])

    ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert ckpt["meta"]["dis_mode"] == "moco" and ckpt["meta"]["patch_size"] == list(PATCH3)
    seg = Segmenter(spatial_dims=3, in_channels=1, out_channels=1, width=1 / 8)
    load_pretrained(seg, tmp_path / "full" / "last.pt", parts=("encoder", "decoder"))
    assert all(torch.equal(v, ckpt["encoder"][k]) for k, v in seg.encoder.state_dict().items())
    clf = Classifier(spatial_dims=3, in_channels=1, num_classes=2, width=1 / 8)
    load_pretrained(clf, ckpt, parts=("encoder",))
    assert all(torch.equal(v, ckpt["encoder"][k]) for k, v in clf.encoder.state_dict().items())


def test_validation_best_checkpoint_and_mismatched_resume(tmp_path):
    val_loader = DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    evaluator = DiRAEvaluator("cpu", val_loader, seed=7)
    ckpt = DiRACheckpoint(tmp_path)
    trainer = make_trainer("visual_words", 3, stages=[{"name": "dis_res", "losses": ["dis", "res"]}], max_epochs=2,
                           volumes=2, batch=2, handlers=[evaluator, ckpt])
    values = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: values.append(e.state.metrics["val_loss"]))
    trainer.run()
    assert len(values) == 2 and all(np.isfinite(values))
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["trainer"]["best_metric"] == pytest.approx(min(values))
    assert best["trainer"]["best_epoch"] == 1 + int(np.argmin(values))
    # validation is deterministic: re-validating the same weights gives the same number
    evaluator._validate(trainer)
    again = trainer.state.metrics["val_loss"]
    evaluator._validate(trainer)
    assert trainer.state.metrics["val_loss"] == again
    other = make_trainer("barlow", 3, stages=[{"name": "dis_res", "losses": ["dis", "res"]}], max_epochs=3,
                         volumes=2, batch=2, handlers=[DiRACheckpoint(tmp_path)])
    with pytest.raises(ValueError, match="dis_mode"):
        other.run()


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="dis_mode"):
        make_trainer("simclr")
    with pytest.raises(ValueError, match="amp"):
        net = UNet(3, width=1 / 8)
        DiRATrainer("cpu", 1, [], net, torch.optim.Adam(net.parameters()), None, None, None,
                    stages=[{"name": "r", "losses": ["res"]}], amp="fp8")
    with pytest.raises(ValueError, match="adv"):
        net = UNet(3, width=1 / 8)
        DiRATrainer("cpu", 1, [], net, torch.optim.Adam(net.parameters()), None, None, None,
                    stages=[{"name": "r", "losses": ["res", "adv"]}])


def test_one_visual_word_class_warns_that_the_discrimination_trains_nothing():
    from dira3d.engines import build_dis_head

    with pytest.warns(UserWarning, match=r"num_classes is 1 .*always 0.*single training volume.*dis_mode moco"):
        build_dis_head("visual_words", 3, 64, num_classes=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dis_head("visual_words", 3, 64, num_classes=2)


def test_a_missing_adversary_names_the_stages_and_how_to_drop_adv():
    from dira3d.engines import build_dis_head

    net = UNet(3, width=1 / 8)
    head = build_dis_head("visual_words", 3, net.bottleneck_channels, num_classes=2)
    with pytest.raises(ValueError) as default:  # the default stages, which the user did not write
        DiRATrainer("cpu", 1, [], net, torch.optim.Adam(net.parameters()), head, None, None)
    message = str(default.value)
    assert "the default stages" in message and '"losses": ["dis", "res", "adv"]' in message
    assert "adversary and optimizer_d are missing" in message
    assert 'stages=[{"name": "dir", "losses": ["dis", "res"]}]' in message
    adversary = Adversary(3, channels=4)
    with pytest.raises(ValueError, match=r"stage\(s\) 'warm', 'dira' use the 'adv' loss but optimizer_d is missing"):
        DiRATrainer("cpu", 1, [], net, torch.optim.Adam(net.parameters()), head, adversary, None,
                    stages=[{"name": "r", "losses": ["res"], "until_epoch": 1}, {"name": "warm", "losses": ["res", "adv"],
                            "until_epoch": 2}, {"name": "dira", "losses": ["dis", "res", "adv"]}])
    with pytest.raises(ValueError, match=r"'dis' loss but no dis_head was given.*stages=\[\{\"name\": \"ra\""):
        DiRATrainer("cpu", 1, [], net, torch.optim.Adam(net.parameters()), None, None, None,
                    stages=[{"name": "d", "losses": ["dis", "res"]}])


def test_a_loader_without_batches_is_an_error_not_a_silent_exit():
    """One training volume with batch 2 and drop_last: MONAI would skip the run, exit 0, write nothing."""
    net = UNet(3, width=1 / 8)
    loader = DataLoader(Dataset(smooth_volumes(1), RandPatchPaird("image", PATCH3)), batch_size=2, drop_last=True)
    with pytest.raises(ValueError, match=r"yields no batch: 1 training item\(s\) per epoch with batch_size 2 and drop_last"):
        DiRATrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters()), None, None, None,
                    stages=[{"name": "r", "losses": ["res"]}])
    loader = DataLoader(Dataset(smooth_volumes(1), RandPatchPaird("image", PATCH3)), batch_size=2)  # a short batch is fine
    DiRATrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters()), None, None, None, stages=[{"name": "r", "losses": ["res"]}])
    # under torchrun each process gets its share: 3 volumes on 2 processes (drop_last) is 1 each, not 3 (as it said)
    from torch.utils.data.distributed import DistributedSampler

    dataset = Dataset(smooth_volumes(3), RandPatchPaird("image", PATCH3))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=2, drop_last=True, sampler=sampler)
    with pytest.raises(ValueError, match=r"3 training item\(s\) per epoch, 1 on each of the 2 processes, with batch_size 2 "
                                         r"and drop_last; lower batch_size \(e\.g\. --override batch_size=1 with dira3d pretrain, "
                                         r"--batch_size 1 with python -m monai\.bundle run\), use fewer processes"):
        DiRATrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters()), None, None, None,
                    stages=[{"name": "r", "losses": ["res"]}])


def test_selection_loss_leaves_out_only_the_adversarial_term(tmp_path):
    """best.pt is chosen on val_selection_loss: the weighted loss without λ_adv·L_adv, whose value
    moves with the adversary's strength of the epoch rather than with the encoder's quality."""
    val_loader = DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    evaluator = DiRAEvaluator("cpu", val_loader, seed=7)
    stages = [{"name": "dis_res", "until_epoch": 1, "losses": ["dis", "res"]},
              {"name": "dira", "losses": ["dis", "res", "adv"]}]
    ckpt = DiRACheckpoint(tmp_path, metric_name="val_selection_loss")
    trainer = make_trainer("visual_words", 3, stages=stages, max_epochs=2, volumes=2, batch=2, handlers=[evaluator, ckpt])
    seen = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(dict(e.state.metrics)))
    trainer.run()
    weights = trainer.loss_function.weights
    first, second = seen
    assert first["val_selection_loss"] == pytest.approx(first["val_loss"], rel=1e-6)  # no adversary yet
    assert second["val_loss_adv"] > 0
    assert second["val_selection_loss"] == pytest.approx(
        weights["dis"] * second["val_loss_dis"] + weights["res"] * second["val_loss_res"], rel=1e-5)
    assert second["val_loss"] == pytest.approx(second["val_selection_loss"] + weights["adv"] * second["val_loss_adv"], rel=1e-5)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["trainer"]["best_stage"] == "dira"
    assert best["trainer"]["best_metric"] == pytest.approx(second["val_selection_loss"])


def test_resume_from_a_checkpoint_of_other_settings_names_the_file(tmp_path):
    # the same ckpt_dir reused with another number of classes (or width): one clear error naming last.pt,
    # not torch's list of every mismatched tensor
    make_trainer("visual_words", 3, stages=[{"name": "dis", "losses": ["dis"]}], volumes=2, batch=2,
                 handlers=[DiRACheckpoint(tmp_path, meta={"width": 0.125})]).run()
    other = make_trainer("visual_words", 3, stages=[{"name": "dis", "losses": ["dis"]}], max_epochs=2, volumes=3,
                         batch=2, handlers=[DiRACheckpoint(tmp_path)])
    with pytest.raises(ValueError, match=r"last\.pt does not fit this run's dis_head .*width=0\.125.*resume to false"):
        other.run()


def test_discriminator_steps_on_the_target_and_detached_restorations_d_steps_times():
    """Step 5 of the method: D sees the restoration target as real (not the distorted input) and the
    restoration detached, ``d_steps`` times per generator step; each of those steps moves D."""
    trainer = make_trainer("visual_words", 3, stages=[{"name": "ra", "losses": ["res", "adv"]}], volumes=4, batch=2,
                           d_steps=2)  # 2 iterations
    calls, distortions = [], []
    scores, distortion = trainer.adversary_scores, trainer.distortion

    def recording_scores(real, fake):
        calls.append((trainer.state.iteration, real, fake))
        return scores(real, fake)

    def recording_distortion(x, generator, **kwargs):
        out = distortion(x, generator, **kwargs)
        distortions.append(out)
        return out

    trainer.adversary_scores, trainer.distortion = recording_scores, recording_distortion
    trainer.run()
    assert [c[0] for c in calls] == [1, 1, 2, 2] and len(distortions) == 2
    for (_, real, fake), (distorted, target) in zip(calls, [d for d in distortions for _ in range(2)]):
        assert torch.equal(real, target) and not torch.equal(real, distorted)
        assert not fake.requires_grad and fake.shape == real.shape
    # Adam counts its steps: 2 iterations x d_steps 2 for D, one per iteration for G
    d_steps = {int(trainer.optimizer_d.state[p]["step"]) for p in trainer.adversary.parameters()}
    g_steps = {int(trainer.optimizer.state[p]["step"]) for p in trainer.network.parameters()}
    assert d_steps == {4} and g_steps == {2}


def test_moco_key_encoder_follows_the_online_encoder_by_ema():
    """theta_k <- m theta_k + (1 - m) theta_q before the keys are computed: at iteration 2 the key encoder
    is m x (its copy of the initial encoder) + (1 - m) x (the online encoder after step 1)."""
    m = 0.75
    trainer = make_trainer("moco", 3, stages=[{"name": "dis", "losses": ["dis"]}], volumes=4, batch=2, momentum=m)
    initial = {k: v.detach().clone() for k, v in trainer.momentum_encoder.named_parameters()}
    assert all(torch.equal(v, dict(trainer.network.encoder.named_parameters())[k]) for k, v in initial.items())
    after_first = {}

    @trainer.on(Events.ITERATION_COMPLETED(once=1))
    def _(engine):
        after_first.update({k: v.detach().clone() for k, v in engine.network.encoder.named_parameters()})

    trainer.run()  # 2 iterations
    online = dict(trainer.network.encoder.named_parameters())
    changed = False
    for name, key in trainer.momentum_encoder.named_parameters():
        torch.testing.assert_close(key, m * initial[name] + (1 - m) * after_first[name])
        assert not key.requires_grad
        changed |= not torch.equal(key, online[name]) and not torch.equal(key, initial[name])
    assert changed  # neither frozen nor a copy of the online encoder


def test_restore_checkpoint_puts_back_every_part_of_a_run_in_the_adversarial_stage():
    """A checkpoint written after adversarial steps, loaded into a fresh trainer, gives back the same
    checkpoint: weights, both optimisers' moments (D's too), queue, counters and stage."""
    from dira3d.engines import restore_checkpoint

    stages = [{"name": "dis", "until_iteration": 1, "losses": ["dis"]}, {"name": "dira", "losses": ["dis", "res", "adv"]}]
    trainer = make_trainer("moco", 3, stages=stages, volumes=6, batch=2)  # 3 iterations, 2 adversarial
    trainer.run()
    saved = checkpoint_dict(trainer)
    assert saved["optimizer_d"]["state"], "D has stepped: its Adam moments must be in the checkpoint"
    fresh = make_trainer("moco", 3, stages=stages, volumes=6, batch=2, seed=5)
    restore_checkpoint(fresh, saved)
    again = checkpoint_dict(fresh)

    def same(a, b, where):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), where
        elif isinstance(a, dict):
            assert set(a) == set(b), where
            for key in a:
                same(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b, where

    for part in saved:
        if part != "rng":
            same(saved[part], again[part], part)
    assert fresh.state.iteration == 3 and again["trainer"]["stage"] == "dira"


def test_optimizer_step_clips_the_gradient_norm():
    from dira3d.engines.optim import optimizer_step

    def step(clip):
        layer = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            layer.weight.zero_()
        opt = torch.optim.SGD(layer.parameters(), lr=1.0)
        loss = (layer(torch.tensor([[3.0, 4.0, 0.0]])) * 10).sum()  # gradient (30, 40, 0): norm 50
        optimizer_step(loss, opt, list(layer.parameters()), clip_grad_norm=clip)
        return -layer.weight.detach().flatten()  # SGD with lr 1: the step is minus the (clipped) gradient

    torch.testing.assert_close(step(None), torch.tensor([30.0, 40.0, 0.0]))
    torch.testing.assert_close(step(5.0), torch.tensor([3.0, 4.0, 0.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step(100.0), torch.tensor([30.0, 40.0, 0.0]))  # under the bound: untouched


def test_the_padding_warning_names_the_volume_file():
    """A thick-slice volume padded to the patch was named by its shape alone: with hundreds of scans the user could
    not tell which one to resample."""
    from monai.data import MetaTensor

    vol = MetaTensor(torch.zeros(1, 20, 18, 5), meta={"filename_or_obj": "/data/prepared/volumes/thick_mr.nii.gz"})
    with pytest.warns(UserWarning, match=r"shape \[20, 18, 5\] \(/data/prepared/volumes/thick_mr.nii.gz; others of this "
                                         r"shape are not named\) is smaller than the patch \[8, 8, 8\]"):
        RandPatchPair((8, 8, 8), spatial_dims=3)(vol)
