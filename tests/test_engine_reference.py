"""Reference checks of the pretraining engine's infrastructure (a mutation audit of dira3d.engines: checkpoint,
distributed, faults, stopping, shuffle_bn, optim, inputs, data, evaluator, ...): each test compares with an
independent reference (a hand computation on tiny tensors, the order of file-system calls an atomic write must
make, two gloo processes whose result is worked out by hand, the documented rules of best.pt and early stopping),
so that a flipped comparison, a dropped world-size division or a missing fsync fails here rather than
silently changing a run."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import RunsCodeWhenUnpickled, leaving_the_group, run_two_gloo_ranks

from dira3d.engines import checkpoint as ckpt_module
from dira3d.engines import pretrained_checkpoint
from dira3d.engines.checkpoint import DiRACheckpoint
from dira3d.utils import atomic
from dira3d.utils.checkpoint import atomic_save

# ---------------------------------------------------------------- atomic writes: temp file, flush, fsync, replace


def test_a_checkpoint_is_flushed_and_fsynced_in_its_own_folder_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """The order an atomic save must follow: the whole new file is written to a temporary file in the target's
    folder (os.replace is atomic within one file system only), flushed out of Python's buffer and fsynced, and only
    then renamed over the old checkpoint, which stays intact until that moment."""
    target = tmp_path / "last.pt"
    atomic_save({"v": torch.zeros(2)}, target)
    old = target.read_bytes()
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size, target.read_bytes() == old))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.fspath(src), os.fspath(dst), target.read_bytes() == old))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_save({"v": torch.arange(5.0)}, target)
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"], calls
    (_, synced, size, old_kept_at_sync), (_, src, dst, old_kept_at_replace), (_, folder, _, _) = calls
    assert folder == str(tmp_path)  # after the rename, the folder that holds it is synced: the rename is on disk
    assert synced == src and dst == str(target)  # the file fsynced is the one renamed
    assert os.path.dirname(src) == str(tmp_path) and src != str(target)  # next to the target, not in /tmp
    assert size == target.stat().st_size > 0  # flushed: all bytes were on the file, not in Python's buffer
    assert old_kept_at_sync and old_kept_at_replace  # the old checkpoint untouched until the rename
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    # a writer that does not flush by itself (torch.save does): 100 bytes sit in Python's buffer until flushed
    calls.clear()
    atomic.atomic_write_bytes(tmp_path / "note.bin", b"x" * 100)
    assert [(c[0], c[2]) for c in calls if c[0] == "fsync" and c[1] != str(tmp_path)] == [("fsync", 100)]


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "best.pt"
    atomic_save({"v": torch.ones(3)}, target)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"v": Unsaveable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


# ---------------------------------------------------------------- which checkpoint is the result: weights-only reads


def test_choosing_best_or_last_reads_last_pt_weights_only(tmp_path):
    """pretrained_checkpoint opens last.pt to read one flag: a crafted last.pt must not run code there either
    (the house rule: every checkpoint read is weights_only=True); it is 'not ours', so best.pt is the result."""
    marker = tmp_path / "code_ran"
    torch.save({"v": torch.zeros(1)}, tmp_path / "best.pt")
    torch.save({"trainer": {"validation": False}, "x": RunsCodeWhenUnpickled(marker)}, tmp_path / "last.pt")
    assert pretrained_checkpoint(tmp_path) == tmp_path / "best.pt"
    assert not marker.exists()


# ---------------------------------------------------------------- best.pt and last.pt: which epochs are written


class _FakeTrainer:
    """What DiRACheckpoint.epoch_completed / load read of a DiRATrainer, nothing more."""

    def __init__(self):
        self.state = SimpleNamespace(epoch=0, iteration=0, epoch_length=2, metrics={}, val_epoch=None, max_epochs=99,
                                     stage="a", device="cpu")
        self.stage = "a"
        self.logger = SimpleNamespace(info=lambda *a, **k: None)

    def current_stage(self):
        return SimpleNamespace(name=self.stage)


@pytest.fixture
def saves(monkeypatch):
    """Record (file name, epoch, trainer entries) instead of writing checkpoints."""
    written = []
    monkeypatch.setattr(ckpt_module, "checkpoint_dict",
                        lambda engine, meta, best, sums: {"epoch": engine.state.epoch, "trainer": dict(best)})
    monkeypatch.setattr(ckpt_module, "atomic_save",
                        lambda obj, path: written.append((os.path.basename(path), obj["epoch"], obj["trainer"])))
    return written


def _epoch(handler, trainer, epoch, stage, value, validated=True):
    trainer.state.epoch, trainer.stage = epoch, stage
    trainer.state.metrics["val_loss"] = value
    trainer.state.val_epoch = epoch if validated else epoch - 1
    handler.epoch_completed(trainer)


def test_best_pt_is_the_first_lowest_validation_loss_of_the_latest_stage_and_last_pt_every_n_epochs(tmp_path, saves):
    """Stage a: 3.0, 2.0, 2.0 (a tie keeps the first); epoch 4 not validated (its stale metric 1.0 is no
    validation), 2.5; stage b: 5.0 (higher, but a new stage starts a new best: its losses have other terms), 4.9.
    Reference by hand: best.pt at epochs 1, 2, 6, 7; last.pt every save_every_epochs=2 epochs."""
    handler = DiRACheckpoint(tmp_path, save_every_epochs=2)
    trainer = _FakeTrainer()
    for epoch, stage, value, validated in [(1, "a", 3.0, True), (2, "a", 2.0, True), (3, "a", 2.0, True),
                                           (4, "a", 1.0, False), (5, "a", 2.5, True), (6, "b", 5.0, True),
                                           (7, "b", 4.9, True)]:
        _epoch(handler, trainer, epoch, stage, value, validated)
    assert [e for name, e, _ in saves if name == "best.pt"] == [1, 2, 6, 7]
    assert [e for name, e, _ in saves if name == "last.pt"] == [2, 4, 6]
    assert handler.best == {"best_metric": 4.9, "best_epoch": 7, "best_stage": "b"}
    best_entries = [t for name, _, t in saves if name == "best.pt"]
    assert [(t["best_metric"], t["best_epoch"], t["best_stage"]) for t in best_entries] == [
        (3.0, 1, "a"), (2.0, 2, "a"), (5.0, 6, "b"), (4.9, 7, "b")]  # each best.pt names its own epoch
    assert all(t["validation"] is True for _, _, t in saves)


def test_a_resumed_run_keeps_the_best_it_had_and_saves_no_worse_best(tmp_path, saves, monkeypatch):
    """last.pt records best 1.5 at epoch 3 of stage b: after the resume a validation of 1.7 in stage b is no new
    best (best.pt keeps epoch 3), 1.4 is."""
    recorded = {"trainer": {"epoch": 4, "iteration": 8, "epoch_iteration": 0, "best_metric": 1.5, "best_epoch": 3,
                            "best_stage": "b"}}
    (tmp_path / "last.pt").write_bytes(b"")  # present: the handler resumes
    monkeypatch.setattr(ckpt_module, "load_checkpoint", lambda path, map_location: recorded)

    def restore(engine, ckpt, source):
        engine.state.epoch, engine.state.iteration = ckpt["trainer"]["epoch"], ckpt["trainer"]["iteration"]

    monkeypatch.setattr(ckpt_module, "restore_checkpoint", restore)
    handler = DiRACheckpoint(tmp_path, save_every_epochs=100)
    trainer = _FakeTrainer()
    handler.load(trainer)
    assert handler.best == {"best_metric": 1.5, "best_epoch": 3, "best_stage": "b"}
    _epoch(handler, trainer, 5, "b", 1.7)
    assert saves == []
    _epoch(handler, trainer, 6, "b", 1.4)
    assert [(name, e) for name, e, _ in saves] == [("best.pt", 6)]


def test_last_pt_says_whether_the_run_validated(tmp_path, saves):
    """trainer["validation"]: True with an evaluator attached, False without (pretrained_checkpoint then takes last.pt,
    not an older run's best.pt)."""
    handler = DiRACheckpoint(tmp_path)
    trainer = _FakeTrainer()
    handler.note_no_validation(trainer)  # no evaluator
    handler.save_last(trainer)
    trainer.evaluator = object()
    handler.note_no_validation(trainer)
    handler.save_last(trainer)
    assert [(name, t["validation"]) for name, _, t in saves] == [("last.pt", False), ("last.pt", True)]


def test_resume_false_does_not_read_last_pt(tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"")
    monkeypatch.setattr(ckpt_module, "load_checkpoint", lambda *a, **k: pytest.fail("resume=False read last.pt"))
    DiRACheckpoint(tmp_path, resume="false").load(_FakeTrainer())


# ---------------------------------------------------------------- the global RNGs go into the checkpoint and come back


def _draws():
    import random

    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_state_round_trip_puts_back_torch_python_and_numpy_generators():
    """rng_state / set_rng_state: what the three global generators draw after a restore is what they drew after the
    capture (user transforms, dropout and DataLoader worker seeds read them)."""
    from dira3d.engines.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    __import__("random").seed(3)
    state = rng_state()
    first = _draws()
    set_rng_state(state)
    assert _draws() == first
    # weights-only loadable: tensors, lists and numbers only
    path = atomic_save({"rng": state}, __import__("tempfile").mkdtemp() + "/rng.pt")
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert _draws() == first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a checkpoint loaded onto it)")
def test_rng_state_loaded_onto_cuda_is_restored_on_cuda(tmp_path):
    """A resume loads last.pt with map_location the run's device: on a GPU the generator states arrived as CUDA
    tensors and every resume failed with 'RNG state must be a torch.ByteTensor' (seen on an H100, 2026-11-28)."""
    from dira3d.engines.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1)
    state = rng_state()
    first = _draws(), torch.rand(2, device="cuda").tolist()
    path = atomic_save({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(path, map_location="cuda", weights_only=True)["rng"]
    assert loaded["torch"].is_cuda  # as restore_checkpoint receives them
    set_rng_state(loaded)
    assert (_draws(), torch.rand(2, device="cuda").tolist()) == first


def test_restore_checkpoint_restores_the_global_rngs_recorded_by_checkpoint_dict():
    from dira3d.engines import checkpoint_dict, restore_checkpoint
    from test_engine import make_trainer

    trainer = make_trainer("visual_words", 3, stages=[{"name": "r", "losses": ["res"]}], volumes=2, batch=2)
    torch.manual_seed(5)
    np.random.seed(6)
    saved = checkpoint_dict(trainer)
    first = _draws()
    restore_checkpoint(trainer, saved)
    assert _draws() == first


# ---------------------------------------------------------------- two gloo ranks: the collectives, worked out by hand


def _collectives_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from dira3d.engines.distributed import all_ranks_min, all_ranks_true, main_process_value
    from dira3d.engines.faults import NonFiniteGuard, NonFiniteLossError
    from dira3d.engines.shuffle_bn import encode_keys

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        result = {
            "min": all_ranks_min([rank, 10 - rank, -3 * rank]),
            "main": main_process_value(1.5 + rank),
            "all_true": all_ranks_true(True), "one_true": all_ranks_true(rank == 0),
        }
        engine = SimpleNamespace(state=SimpleNamespace(device="cpu", iteration=7, stage="s"))
        # a stop signal on rank 1 only: both ranks learn the largest signal number, in either policy
        result["signal_stop"] = NonFiniteGuard("stop").check(engine, stop_signal=15 if rank == 1 else 0)
        result["signal_skip"] = NonFiniteGuard("skip").check(engine, stop_signal=15 if rank == 1 else 0)
        # a NaN on rank 1 only: both ranks stop (a rank that went on alone would wait forever in an all-reduce)
        guard = NonFiniteGuard("stop")
        guard.first_bad = {"loss": torch.tensor(5 if rank == 1 else -1)}
        try:
            guard.check(engine)
            result["nan"] = "went on"
        except NonFiniteLossError as err:
            result["nan"] = str(err)
        # shuffle BN with a "batch norm" encoder (each row minus its share's mean) on 2 rows per rank
        views = torch.tensor([[1.0], [2.0]]) if rank == 0 else torch.tensor([[10.0], [30.0]])
        local, everyone = encode_keys(lambda x: x - x.mean(0, keepdim=True), views,
                                      torch.Generator().manual_seed(16))
        result["keys"] = (local, everyone)
        torch.save(result, f"{out}.{rank}")


def test_two_gloo_ranks_reduce_broadcast_and_shuffle_as_worked_out_by_hand(tmp_path):
    ranks = run_two_gloo_ranks(_collectives_worker, tmp_path)
    # the permutation every rank draws alike from the (seed, iteration) generator; rank r encodes its rows 2r, 2r+1
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(16))
    # this seed's permutation mixes the ranks' samples in both shares and is not its own inverse
    assert {int(i) // 2 for i in perm[:2]} == {0, 1} and not torch.equal(perm, torch.argsort(perm))
    batch = torch.tensor([1.0, 2.0, 10.0, 30.0])
    keys = torch.empty(4)
    for share in (perm[:2], perm[2:]):
        keys[share] = batch[share] - batch[share].mean()  # each sample normalised with its share's mean
    for rank, result in enumerate(ranks):
        assert result["min"] == [0, 9, -3]  # element-wise minimum over the ranks, not the maximum
        assert result["main"] == 1.5  # rank 0's value on every rank
        assert result["all_true"] is True and result["one_true"] is False
        assert result["signal_stop"] == 15 and result["signal_skip"] == 15
        assert "NaN/Inf" in result["nan"]
        local, everyone = result["keys"]
        torch.testing.assert_close(everyone[:, 0], keys)  # sample order, rank 0's rows first
        torch.testing.assert_close(local[:, 0], keys[2 * rank:2 * rank + 2])
    assert "iteration 5" in ranks[1]["nan"] and "another rank" in ranks[0]["nan"]


def test_a_resume_puts_back_the_fp16_grad_scalers_and_the_lr_schedulers():
    """Set by hand: G's scaler at scale 1024 with 7 steps since its last growth, D's at 64; a StepLR (gamma 0.5) on G
    stepped 3 times: lr 1e-3 * 0.5**3. A fresh trainer resumed from the checkpoint has exactly these (a lost scaler
    starts again at 65536 and skips steps until it has backed off; a lost scheduler restarts the lr schedule)."""
    from dira3d.engines import checkpoint_dict, restore_checkpoint
    from test_engine import make_trainer

    def trainer_with_scheduler():
        trainer = make_trainer("visual_words", 3, stages=[{"name": "r", "losses": ["res"]}], volumes=2, batch=2,
                               amp="fp16", lr=1e-3)
        trainer.schedulers = {"g": torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)}
        return trainer

    trainer = trainer_with_scheduler()
    scaler = {"growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}
    trainer.scaler_g.load_state_dict({**scaler, "scale": 1024.0, "_growth_tracker": 7})
    trainer.scaler_d.load_state_dict({**scaler, "scale": 64.0, "_growth_tracker": 1})
    for _ in range(3):
        trainer.optimizer.step()
        trainer.schedulers["g"].step()
    saved = checkpoint_dict(trainer)
    fresh = trainer_with_scheduler()
    restore_checkpoint(fresh, saved)
    assert (fresh.scaler_g.get_scale(), fresh.scaler_g.state_dict()["_growth_tracker"]) == (1024.0, 7)
    assert (fresh.scaler_d.get_scale(), fresh.scaler_d.state_dict()["_growth_tracker"]) == (64.0, 1)
    assert fresh.schedulers["g"].last_epoch == 3
    assert fresh.schedulers["g"].get_last_lr() == [pytest.approx(1e-3 * 0.5 ** 3)]
    fresh.schedulers["g"].step()
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 4)


# ---------------------------------------------------------------- early stopping: direction, ties, patience, stage


def _early_stop_engine(patience, final="final"):
    from ignite.engine import Engine

    from dira3d.engines.stages import StageSchedule
    from dira3d.engines.stopping import FinalStageEarlyStop

    engine = Engine(lambda e, b: None)
    engine.evaluator = object()
    engine.schedule = StageSchedule([{"name": "warm", "until_epoch": 2, "losses": ["res"]},
                                     {"name": final, "losses": ["res", "dis"]}])
    engine.current_stage = lambda: engine.schedule.stage_at(engine.state.epoch, engine.state.iteration)
    engine.state.device = "cpu"
    stop = FinalStageEarlyStop(patience, "val_selection_loss")
    stop.attach(engine)
    return engine, stop


def test_early_stop_counts_validations_without_a_lower_loss_in_the_final_stage_only():
    """Worked out by hand (lower is better, a tie is no improvement, patience 2): warm stage 9, 1 (not counted: the
    final stage's losses are not comparable); final stage 5 (first best), 4 (best), 4.5 (1), 3 (best), 3 (tie: 1),
    3.5 (2: stop after epoch 8, the best at epoch 6)."""
    engine, stop = _early_stop_engine(2)
    waits, stopped_at = [], None
    for epoch, value in enumerate([9.0, 1.0, 5.0, 4.0, 4.5, 3.0, 3.0, 3.5], start=1):
        engine.state.epoch, engine.state.iteration, engine.state.val_epoch = epoch, epoch, epoch
        engine.state.metrics = {"val_selection_loss": value}
        stop(engine)
        waits.append(engine.state.metrics.get("early_stop_wait"))
        if engine.should_terminate and stopped_at is None:
            stopped_at = epoch
    assert waits == [None, None, 0.0, 0.0, 1.0, 0.0, 1.0, 2.0]
    assert stopped_at == 8 and stop.stopped_epoch == 8 and stop.best_epoch == 6
    state = stop.state_dict()
    assert (state["counter"], state["best_score"], state["stage"]) == (2, 3.0, "final")
    # the state resumes: a fresh handler loaded with it stops at once (count 2 = patience) in the same stage
    again, fresh = _early_stop_engine(2)
    fresh.load_state_dict(state)
    again.state.epoch, again.state.iteration = 8, 8
    fresh.started(again)
    assert again.should_terminate
    # ... but not when the final stage has another name now (other stages: its count is not this stage's)
    renamed, other = _early_stop_engine(2, final="final2")
    other.load_state_dict(state)
    renamed.state.epoch, renamed.state.iteration = 8, 8
    other.started(renamed)
    assert not renamed.should_terminate
    # a larger patience given on resume goes on counting from 2, and the best value came back: 2.9 is a new best
    more, larger = _early_stop_engine(3)
    larger.load_state_dict(state)
    more.state.epoch = more.state.iteration = more.state.val_epoch = 9
    more.state.metrics = {"val_selection_loss": 3.0}
    larger(more)
    assert more.state.metrics["early_stop_wait"] == 3.0 and more.should_terminate
    more.should_terminate = False
    more.state.epoch = more.state.iteration = more.state.val_epoch = 10
    more.state.metrics = {"val_selection_loss": 2.9}
    larger(more)
    assert more.state.metrics["early_stop_wait"] == 0.0 and larger.best_epoch == 10


# ---------------------------------------------------------------- patches, input checks, the validation mean


def test_random_patches_start_anywhere_a_whole_patch_fits_and_are_copies_of_the_volume():
    """A 10 x 9 x 6 volume, patch 8 x 8 x 6: the corners are (0..2, 0..1, 0): every one of the 6 is drawn (uniform:
    200 draws miss one with probability < 1e-14), and each patch is that block of the volume (brute force)."""
    from dira3d.engines.data import RandPatchPair

    volume = torch.arange(10 * 9 * 6, dtype=torch.float32).reshape(1, 10, 9, 6)
    crop = RandPatchPair((8, 8, 6), pair="instances").set_random_state(0)
    seen = set()
    for _ in range(100):
        first, second = crop(volume)
        for patch in (first, second):
            x, y = int(patch[0, 0, 0, 0]) // (9 * 6), int(patch[0, 0, 0, 0]) // 6 % 9
            assert torch.equal(patch, volume[:, x:x + 8, y:y + 8, :])
            assert patch.untyped_storage().data_ptr() != volume.untyped_storage().data_ptr()  # a copy
            seen.add((x, y))
    assert seen == {(x, y) for x in range(3) for y in range(2)}
    assert len(RandPatchPair((8, 8, 6), pair="views")(volume)) == 1


def test_2d_patches_are_one_axial_slice_of_a_3d_volume():
    from dira3d.engines.data import RandPatchPair

    volume = torch.arange(6 * 5 * 4, dtype=torch.float32).reshape(1, 6, 5, 4)
    for patch in RandPatchPair((4, 4), spatial_dims=2, pair="instances").set_random_state(1)(volume):
        assert patch.shape == (1, 4, 4)
        first = int(patch[0, 0, 0])
        x, y, z = first // 20, first // 4 % 5, first % 4
        assert torch.equal(patch, volume[:, x:x + 4, y:y + 4, z])


@pytest.mark.parametrize("high, refused", [(1.0009, False), (1.0011, True), (1.05, True)])
def test_the_value_range_allows_a_tenth_of_a_percent_of_the_range_and_no_more(high, refused):
    """check_volume's tolerance: 1e-3 of (high - low) beyond either end (rounding in a prepared [0, 1] scan)."""
    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import check_volume

    for img in (torch.tensor([0.2, high]), torch.tensor([-(high - 1.0), 0.5])):  # above the top, below the bottom
        img = img.reshape(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
        if refused:
            with pytest.raises(DataError, match="outside"):
                check_volume(img, "scan.nii.gz", value_range=(0.0, 1.0))
        else:
            check_volume(img, "scan.nii.gz", value_range=(0.0, 1.0))


def test_an_image_and_its_label_with_other_channel_counts_on_one_grid_are_taken():
    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import CheckSameShaped

    check = CheckSameShaped(["image", "label"])
    check({"image": torch.zeros(4, 5, 6, 7), "label": torch.zeros(1, 5, 6, 7)})
    with pytest.raises(DataError, match="grid"):
        check({"image": torch.zeros(1, 5, 6, 7), "label": torch.zeros(1, 5, 6, 8)})


def test_validation_metrics_are_means_over_the_batches_that_gave_a_loss_and_start_afresh():
    """Batches with losses 1 and 3 and a short batch left out: val_loss 2 (mean of two, not their sum or a mean
    over three); the next validation (loss 5) is 5, not a running mean with the last one."""
    from ignite.engine import Engine

    from dira3d.engines.evaluator import DiRAEvaluator

    evaluator = DiRAEvaluator.__new__(DiRAEvaluator)
    evaluator._sums, evaluator._count, evaluator._short_batches = {}, 0, 1
    engine = Engine(lambda e, b: None)
    for output in ({"loss": torch.tensor(1.0)}, {}, {"loss": torch.tensor(3.0)}):
        engine.state.output = output
        evaluator._accumulate(engine)
    evaluator._publish(engine)
    assert engine.state.metrics["val_loss"] == 2.0
    engine.state.output = {"loss": torch.tensor(5.0)}
    evaluator._accumulate(engine)
    evaluator._publish(engine)
    assert engine.state.metrics["val_loss"] == 5.0


@pytest.mark.parametrize("key, value", [("dis_mode", "moco"), ("spatial_dims", 2), ("in_channels", 3),
                                        ("second_view", "restored")])
def test_a_checkpoint_of_another_mode_or_geometry_is_refused_even_when_its_weights_would_fit(key, value):
    """The meta check comes before any weight is loaded: here every tensor fits, only meta[key] differs."""
    from dira3d.engines import checkpoint_dict, restore_checkpoint
    from test_engine import make_trainer

    trainer = make_trainer("visual_words", 3, stages=[{"name": "r", "losses": ["res"]}], volumes=2, batch=2)
    saved = checkpoint_dict(trainer)
    restore_checkpoint(trainer, saved)  # its own checkpoint fits
    saved["meta"][key] = value
    with pytest.raises(ValueError, match=f"written with {key}={value!r} but this run uses"):
        restore_checkpoint(trainer, saved, source="last.pt")


def test_a_checkpoint_records_second_view_and_one_that_does_not_record_it_still_resumes():
    """second_view (from dira_pretrain 0.1.39) changes what is trained, as dis_mode does; a last.pt of an earlier
    version has no such key and resumes as before."""
    from dira3d.engines import checkpoint_dict, restore_checkpoint
    from test_engine import make_trainer

    trainer = make_trainer("visual_words", 3, stages=[{"name": "r", "losses": ["res"]}], volumes=2, batch=2)
    saved = checkpoint_dict(trainer)
    assert saved["meta"]["second_view"] == "augmented"
    del saved["meta"]["second_view"]
    restore_checkpoint(trainer, saved, source="last.pt")


# ---------------------------------------------------------------- faults: the first bad step, the collapse streak


def test_the_guard_names_the_term_of_the_first_bad_iteration_not_a_later_one():
    """loss and loss_res NaN at iteration 2, loss_dis Inf at 4 and loss_res NaN again: the message names loss_res
    (the total 'loss' only when no term is named) at iteration 2."""
    from ignite.engine import Engine

    from dira3d.engines.faults import NonFiniteGuard, NonFiniteLossError

    nan, inf = float("nan"), float("inf")
    outputs = {1: (1.0, 1.0, 1.0), 2: (nan, nan, 1.0), 3: (1.0, 1.0, 1.0), 4: (inf, nan, inf), 5: (1.0, 1.0, 1.0)}
    engine = Engine(lambda e, b: None)
    guard = NonFiniteGuard("stop", check_every=100)
    for iteration, (total, res, dis) in outputs.items():
        engine.state.iteration = iteration
        engine.state.output = {"loss": torch.tensor(total), "loss_res": torch.tensor(res), "loss_dis": torch.tensor(dis)}
        guard.record(engine)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss_res \(NaN/Inf\) at iteration 2 "):
        guard.check(engine)


@pytest.mark.parametrize("patience, warns", [(3, True), (4, False)])
def test_the_collapse_streak_counts_consecutive_wins_only(caplog, patience, warns):
    """Gaps 0.9, 0.9, 0.9, 0.5 (exactly the threshold: no win, 'more than'), 0.9, 0.9, 0.9: the longest streak is 3."""
    import logging

    from ignite.engine import Engine

    from dira3d.engines.faults import CollapseMonitor

    gaps = iter([0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9])
    engine = Engine(lambda e, b: (lambda g: {"d_real": torch.tensor(0.5 + g / 2), "d_fake": torch.tensor(0.5 - g / 2)})(
        next(gaps)))
    CollapseMonitor(gap=0.5, patience=patience, check_every=100).attach(engine)
    with caplog.at_level(logging.WARNING, logger="DiRATrainer"):
        engine.run(range(7), max_epochs=1)
    messages = [r.message for r in caplog.records if "adversary collapse" in r.message]
    assert bool(messages) == warns
    if warns:
        assert "for 3 consecutive iterations" in messages[0]


# ---------------------------------------------------------------- checkpoints of a run on a device other than the CPU


def _one_epoch_checkpoint(ckpt_dir, device="cpu"):
    from test_engine import make_trainer

    stages = [{"name": "dis_res", "losses": ["dis", "res"]}]
    make_trainer("visual_words", 3, stages=stages, volumes=2, batch=2, device=device,
                 handlers=[DiRACheckpoint(ckpt_dir)]).run()
    return make_trainer("visual_words", 3, stages=stages, volumes=2, batch=2, max_epochs=2, device=device)


def test_a_resume_reads_last_pt_onto_the_host_whatever_the_training_device(tmp_path):
    """last.pt was read with map_location the run's device: on a GPU the RNG states arrived there (every resume
    failed, 2026-11-28) and so did the Adam step counts of a non-fused optimiser, which load_state_dict leaves where
    they come (a host sync per parameter at every later step). The state_dicts copy each tensor where it belongs; a
    device that is not the host (meta here, CUDA on a GPU) must not receive the file itself."""
    trainer = _one_epoch_checkpoint(tmp_path)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    trainer.state.device = torch.device("meta")  # as a GPU run's state.device: anything but the host
    DiRACheckpoint(tmp_path).load(trainer)
    assert trainer.state.epoch == 1
    assert all(torch.equal(v, saved["encoder"][k]) for k, v in trainer.network.encoder.state_dict().items())
    steps = [s["step"] for s in trainer.optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" for s in steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a run trained and resumed on it)")
def test_resume_on_cuda_keeps_adam_steps_on_the_host_and_writes_host_tensors(tmp_path):
    """On a GPU: last.pt holds CPU tensors only (a plain torch.load on a machine without the GPU reads it), and a
    resumed non-fused Adam keeps its step counts on the host, as a fresh one does (not a host sync per parameter)."""
    resumed = _one_epoch_checkpoint(tmp_path, device="cuda")
    tensors = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(torch.load(tmp_path / "last.pt", weights_only=True))  # no map_location: each tensor where it was saved
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    resumed.add_event_handler(__import__("ignite").engine.Events.STARTED, DiRACheckpoint(tmp_path).load)
    resumed.run()
    assert resumed.state.epoch == 2 and next(resumed.network.parameters()).is_cuda
    assert all(s["step"].device.type == "cpu" and int(s["step"]) == 2 for s in resumed.optimizer.state.values())
