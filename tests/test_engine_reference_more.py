"""More reference checks of the pretraining engine's infrastructure (continuing tests/test_engine_reference.py):
optimiser mechanics (build_adam, EMA, clipping under a grad scaler, gradient averaging over two gloo ranks),
fault handling (weight checks, checkpoint size, skipped-step reports), distributed helpers and input checks,
each compared with a value worked out by hand on tiny tensors."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from conftest import leaving_the_group, run_two_gloo_ranks

# ---------------------------------------------------------------- optim.py / build_adam


def test_build_adam_takes_lr_betas_weight_decay_and_every_module_once():
    from dira3d.engines.performance import build_adam

    a, b = nn.Linear(2, 1), nn.Linear(1, 1)
    opt = build_adam([a, None, b, a], lr=0.0, device="cpu", betas=(0.5, 0.6), weight_decay=0.25)
    group = opt.param_groups[0]
    assert group["lr"] == 0.0 and tuple(group["betas"]) == (0.5, 0.6) and group["weight_decay"] == 0.25
    assert [id(p) for p in group["params"]] == [id(p) for p in (*a.parameters(), *b.parameters())]


def test_one_adam_step_with_weight_decay_moves_by_lr_against_the_decayed_gradient():
    """Adam's first step is lr * sign(g + wd * p) (m_hat / sqrt(v_hat) = g / |g|)."""
    from dira3d.engines.performance import build_adam

    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    module = nn.Module()
    module.p = p
    opt = build_adam([module], lr=0.1, device="cpu", betas=(0.9, 0.999), weight_decay=1.0)
    p.grad = torch.tensor([-0.5, 0.5])  # + wd * p = [0.5, -1.5]
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]))


def test_ema_update_is_momentum_times_target_plus_the_rest_of_source():
    from dira3d.engines.optim import ema_update

    target, source = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        target.weight.fill_(2.0)
        source.weight.fill_(10.0)
    ema_update(target, source, 0.75)
    assert float(target.weight.detach()) == pytest.approx(0.75 * 2.0 + 0.25 * 10.0)
    assert float(source.weight.detach()) == 10.0


def test_frozen_puts_back_each_parameters_own_flag():
    from dira3d.engines.optim import frozen

    module = nn.Linear(1, 1)
    module.bias.requires_grad_(False)
    with frozen(module):
        assert not any(p.requires_grad for p in module.parameters())
    assert module.weight.requires_grad and not module.bias.requires_grad


def test_amp_modes_pick_their_dtype_and_only_fp16_gets_a_scaler():
    from dira3d.engines.optim import autocast_context, make_grad_scaler

    cpu = torch.device("cpu")
    assert make_grad_scaler("bf16", cpu) is None and make_grad_scaler("none", cpu) is None
    assert make_grad_scaler("fp16", cpu) is not None
    with autocast_context("bf16", cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_clipping_under_a_grad_scaler_clips_the_unscaled_gradient():
    """g = (3, 4) (norm 5) clipped to norm 1 is (0.6, 0.8); SGD lr 1 moves p by exactly that, whatever the scale."""
    from dira3d.engines.optim import optimizer_step

    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=1.0)
        loss = (p * torch.tensor([3.0, 4.0])).sum()
        optimizer_step(loss, opt, [p], scaler=scaler, clip_grad_norm=1.0)
        torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]))


# ---------------------------------------------------------------- faults.py


def test_a_module_with_one_nan_weight_among_finite_ones_is_refused():
    from dira3d.engines.faults import NonFiniteLossError, check_finite_weights

    module = nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="net has NaN/Inf"):
        check_finite_weights({"net": module})
    check_finite_weights({"net": nn.Linear(2, 2)})


def test_checkpoint_size_counts_weights_two_adam_moments_and_buffers():
    from dira3d.engines.faults import estimate_checkpoint_bytes

    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))  # 8 + 4 parameters, 2 + 2 + 1 buffers
    params = 12 * 4 * 3
    buffers = 4 * 4 + 8  # running mean/var float32, num_batches_tracked int64
    assert estimate_checkpoint_bytes([net, None]) == int((params + buffers) * 1.05) + (1 << 16)


def test_skipped_steps_restored_from_a_checkpoint_are_not_reported_again(caplog):
    from dira3d.engines.faults import NonFiniteGuard

    engine = SimpleNamespace(state=SimpleNamespace(device="cpu", iteration=9))
    guard = NonFiniteGuard("skip")
    guard.restore_skipped(3)
    with caplog.at_level(logging.WARNING, logger="DiRATrainer"):
        guard.check(engine)
        assert "skipped" not in caplog.text
        guard.skipped += 1
        guard.check(engine)
    assert "4 step(s)" in caplog.text


def test_the_guard_records_the_iteration_a_term_went_bad():
    from dira3d.engines.faults import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard("stop")
    engine = SimpleNamespace(state=SimpleNamespace(device="cpu", iteration=4, stage="dir", output=None))
    engine.state.output = {"loss": torch.tensor(float("inf")), "loss_res": torch.tensor(1.0)}
    guard.record(engine)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(NaN/Inf\) at iteration 4 "):
        guard.check(engine)


# ---------------------------------------------------------------- distributed.py (one process)


def test_per_rank_batchnorm_keeps_the_training_mode_and_frozen_parameters_of_a_sync_batchnorm():
    from dira3d.engines.distributed import PerRankBatchNorm, per_rank_batchnorm

    net = nn.Sequential(nn.SyncBatchNorm(3))
    net.eval()
    net.requires_grad_(False)
    with torch.no_grad():
        net[0].weight.fill_(2.0)
    out = per_rank_batchnorm(net)
    assert isinstance(out[0], PerRankBatchNorm) and not out[0].training
    assert not any(p.requires_grad for p in out.parameters()) and float(out[0].weight[0]) == 2.0


def test_without_master_addr_a_world_size_alone_is_no_process_group(monkeypatch):
    from dira3d.engines.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert init_distributed("gloo") is False


def _average_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from dira3d.engines.distributed import all_ranks_true
    from dira3d.engines.optim import optimizer_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=1.0)
        loss = (p * torch.tensor([1.0, 2.0]) * (1 + 2 * rank)).sum()  # gradients (1, 2) and (3, 6): mean (2, 4)
        optimizer_step(loss, opt, [p])
        flag = torch.tensor(rank, dtype=torch.int32)  # rank 1's flag is true, rank 0's false
        result = {"p": p.detach().clone(), "all": all_ranks_true(flag), "flag": int(flag)}
        torch.save(result, f"{out}.{rank}")


def test_two_gloo_ranks_step_with_the_mean_gradient_and_leave_the_callers_flag_alone(tmp_path):
    for rank, result in enumerate(run_two_gloo_ranks(_average_worker, tmp_path)):
        torch.testing.assert_close(result["p"], torch.tensor([-2.0, -4.0]))
        assert result["all"] is False and result["flag"] == rank


# ---------------------------------------------------------------- inputs.py


def test_check_volume_refuses_a_single_slice_a_nan_and_a_wrong_channel_count():
    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import check_volume

    check_volume(torch.zeros(1, 2, 2, 2), "ok.nii.gz")
    with pytest.raises(DataError, match="single slice"):
        check_volume(torch.zeros(1, 4, 4, 1), "flat.nii.gz")
    nan = torch.zeros(1, 2, 2, 2)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="1 NaN/Inf"):
        check_volume(nan, "nan.nii.gz")
    with pytest.raises(DataError, match="3 channels"):
        check_volume(torch.zeros(3, 2, 2, 2), "rgb.nii.gz", channels=1)
    check_volume(torch.zeros(3, 2, 2, 2), "rgb.nii.gz", channels=3)


def test_2d_settings_take_slices_of_a_volume_only_when_asked():
    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import check_volume

    check_volume(torch.zeros(1, 4, 4), "x.png", spatial_dims=2, slices=False)
    check_volume(torch.zeros(1, 4, 4, 1), "one_slice.nii.gz", spatial_dims=2)  # a 2D image stored as 3D
    with pytest.raises(DataError, match="single slice"):
        check_volume(torch.zeros(1, 4, 1, 3), "thin.nii.gz", spatial_dims=2)
    with pytest.raises(DataError, match="3D image"):
        check_volume(torch.zeros(1, 4, 4, 4), "vol.nii.gz", spatial_dims=2, slices=False)


@pytest.mark.parametrize("pixdim", [0.0, -1.0, float("nan")])
def test_a_header_spacing_that_is_zero_negative_or_nan_is_refused(tmp_path, pixdim):
    import nibabel as nib
    import numpy as np

    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import check_volume

    path = tmp_path / "scan.nii.gz"
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header["pixdim"][1:4] = [1.0, pixdim, 1.0]
    nib.save(img, path)
    with pytest.raises(DataError, match="spacing"):
        check_volume(torch.zeros(1, 2, 2, 2), path)


def test_an_empty_datalist_split_is_refused_naming_the_split(tmp_path):
    import json

    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import load_datalist

    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="empty 'training' list"):
        load_datalist(path)


# ---------------------------------------------------------------- stopping.py / interrupts.py


def _engine_that_records_terminate():
    engine = SimpleNamespace(state=SimpleNamespace(), terminated=False)
    engine.terminate = lambda: setattr(engine, "terminated", True)
    return engine


def test_under_ddp_a_signal_waits_for_the_agreed_stop_and_another_ranks_signal_reads_as_sigterm():
    import signal

    from dira3d.engines.stopping import SignalStop

    stop, engine = SignalStop(), _engine_that_records_terminate()
    stop.single_process, stop.requested = False, signal.SIGINT
    stop.poll(engine)  # the ranks agree in NonFiniteGuard.periodic_check, not after each rank's own step
    assert not engine.terminated
    stop.requested = None
    stop.stop(engine)  # agreed on another rank's signal: this rank had none
    assert engine.terminated and engine.state.stopped_by == "SIGTERM"
    one = SignalStop()
    one.requested = signal.SIGINT
    one.poll(engine := _engine_that_records_terminate())
    assert engine.terminated and engine.state.stopped_by == "SIGINT"


def test_a_second_ctrl_c_interrupts_at_once_unless_the_run_is_already_stopping():
    import signal

    from dira3d.engines.stopping import SignalStop

    calls = []
    stop = SignalStop()
    stop._previous = {signal.SIGINT: lambda signum, frame: calls.append(signum)}
    stop.requested, stop.stopping = signal.SIGINT, True
    stop._handle(signal.SIGINT, None)  # last.pt may be being written: ignored
    assert calls == []
    stop.stopping = False
    stop._handle(signal.SIGINT, None)
    assert calls == [signal.SIGINT]


def test_a_run_stopped_by_a_signal_exits_with_128_plus_its_number():
    import signal

    from dira3d.utils.interrupts import StoppedBySignal

    assert StoppedBySignal("SIGTERM", 3).code == 128 + signal.SIGTERM
    assert StoppedBySignal("SIGINT", 3).code == 128 + signal.SIGINT


# ---------------------------------------------------------------- checkpoint.py: which checkpoint a pretrained run offers


def test_pretrained_checkpoint_is_best_pt_unless_last_pt_says_the_run_did_not_validate(tmp_path):
    from dira3d.engines import pretrained_checkpoint

    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    torch.save({"trainer": {"validation": False}}, last)
    assert pretrained_checkpoint(tmp_path) == last  # no best.pt
    torch.save({"v": torch.zeros(1)}, best)
    assert pretrained_checkpoint(tmp_path) == last  # a best.pt of an earlier, validated run
    torch.save({"trainer": {"validation": True}}, last)
    assert pretrained_checkpoint(tmp_path) == best
    torch.save({"trainer": {}}, last)  # written before the flag existed: those runs validated
    assert pretrained_checkpoint(tmp_path) == best


def test_restore_checkpoint_puts_back_moco_key_encoder_head_queue_and_the_adversarys_optimiser():
    from test_engine import make_trainer

    from dira3d.engines import checkpoint_dict, restore_checkpoint

    parts = ("momentum_encoder", "momentum_head", "queue", "optimizer_d")
    first = make_trainer("moco", 3, volumes=2, batch=2)
    with torch.no_grad():
        for key in parts[:3]:
            for t in getattr(first, key).state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t))
    p = next(first.adversary.parameters())
    p.grad = torch.ones_like(p)
    first.optimizer_d.step()  # Adam moments and step count in optimizer_d's state
    ckpt = checkpoint_dict(first)
    second = make_trainer("moco", 3, volumes=2, batch=2, seed=1)
    restore_checkpoint(second, ckpt)
    for key in parts:
        got, want = getattr(second, key).state_dict(), getattr(first, key).state_dict()
        if key == "optimizer_d":
            got, want = got["state"], want["state"]
            assert want
        assert got.keys() == want.keys(), key
        for name in want:
            for a, b in zip(torch.utils._pytree.tree_leaves(got[name]), torch.utils._pytree.tree_leaves(want[name])):
                assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), (key, name)


def test_the_free_space_asked_for_is_two_checkpoints_old_and_new_side_by_side(tmp_path, monkeypatch):
    from ignite.engine import Engine

    from dira3d.engines import checkpoint as ckpt_module
    from dira3d.engines.checkpoint import DiRACheckpoint
    from dira3d.engines.faults import estimate_checkpoint_bytes

    asked = []
    monkeypatch.setattr(ckpt_module, "check_writable", lambda folder, min_free_bytes=None: asked.append(min_free_bytes))
    net = nn.Linear(3, 2)
    engine = Engine(lambda e, b: None)
    engine.modules = lambda: {"network": net}
    DiRACheckpoint(tmp_path).attach(engine)
    assert asked == [2 * estimate_checkpoint_bytes([net])]


# ---------------------------------------------------------------- trainer_checks.py


def test_simsiam_stages_with_the_dis_term_need_a_predictor():
    from dira3d.engines.stages import StageSchedule
    from dira3d.engines.trainer_checks import check_modules_for_stages

    head, dis = nn.Linear(1, 1), StageSchedule([{"name": "d", "losses": ["dis"]}])
    with pytest.raises(ValueError, match="simsiam' needs a predictor"):
        check_modules_for_stages(dis, False, "simsiam", head, None, None, None)
    check_modules_for_stages(dis, False, "simsiam", head, nn.Linear(1, 1), None, None)
    check_modules_for_stages(dis, False, "moco", head, None, None, None)
    check_modules_for_stages(StageSchedule([{"name": "r", "losses": ["res"]}]), False, "simsiam", None, None, None, None)


# ---------------------------------------------------------------- data.py


def test_a_volume_exactly_the_patch_size_is_its_own_patch_without_a_padding_warning():
    import warnings

    from dira3d.engines.data import RandPatchPair

    volume = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(1, 3, 4, 5) + 7.0  # a shape no other test uses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patches = RandPatchPair((3, 4, 5), pair="instances").set_random_state(0)(volume)
    assert all(torch.equal(p, volume) for p in patches)
