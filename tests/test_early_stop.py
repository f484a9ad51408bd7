"""Opt-in early stopping of pretraining (``early_stop_patience``): stops after that many validations in a row without a
lower ``val_selection_loss`` in the final stage, the count afresh at that stage's start, in every checkpoint (exact
resume), rank 0's decision on every rank; refused settings; off by default.

The runs are real: a tiny U-Net (instance norm: no running statistics) trains for two epochs and then gets learning
rate 0, so that its validation loss falls and then stays exactly the same from epoch 2 on (the validation draws are
fixed), in the ``warm`` stage (epochs 1-4) and in the ``final`` one: the final stage's first validation (epoch 5) sets
its best and each later one counts. Counting in the warm stage would stop there (after epoch 4 with patience 2),
counting on from it would stop at the final stage's first validation.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from conftest import leaving_the_group, run_torchrun_command

from dira3d.engines import DiRACheckpoint, DiRAEvaluator, DiRATrainer, RandPatchPaird, check_early_stop_patience
from dira3d.networks import UNet
from dira3d.transforms.compositions import build_distortion
from dira3d.utils import load_checkpoint
from test_engine import PATCH3, smooth_volumes

ROOT = Path(__file__).resolve().parents[1]
STAGES = [{"name": "warm", "until_epoch": 4, "losses": ["res"]}, {"name": "final", "losses": ["res"]}]
FIRST_FINAL_EPOCH = 5


def freeze_after_epoch_2(engine):
    """EPOCH_STARTED: learning rate 0 from epoch 3 on (in the optimiser's state: a resumed run keeps it)."""
    if engine.state.epoch >= 3:
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0


class FallingLossEvaluator(DiRAEvaluator):
    """Its validation loss falls at every epoch (rank 1's in the two-rank test)."""

    def _validate(self, trainer):
        super()._validate(trainer)
        trainer.state.metrics["val_selection_loss"] = 1.0 / trainer.state.epoch


def make_run(ckpt_dir, max_epochs, patience=None, stages=STAGES, evaluator=True, evaluator_first=True, data=None,
             writer=None, evaluator_class=DiRAEvaluator, **checkpoint_options):
    """A tiny restoration-only DiRATrainer (one step per epoch) validating every epoch, with DiRACheckpoint."""
    torch.manual_seed(0)
    train = data if data is not None else DataLoader(
        Dataset(smooth_volumes(2), RandPatchPaird("image", PATCH3)), batch_size=2, shuffle=True, generator=torch.Generator())
    val = DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    checkpoint = DiRACheckpoint(ckpt_dir, early_stop_patience=patience, metric_name=checkpoint_options.pop(
        "metric_name", "val_selection_loss"), summary_writer=writer, **checkpoint_options)
    handlers = [checkpoint]
    if evaluator:
        validation = evaluator_class("cpu", val, seed=7)
        handlers = [validation, checkpoint] if evaluator_first else [checkpoint, validation]
    net = UNet(3, width=1 / 8, norm="instance")
    trainer = DiRATrainer("cpu", max_epochs, train, net, torch.optim.Adam(net.parameters(), 1e-3), None, None, None,
                          stages=stages, distortion=build_distortion("none"), seed=0, train_handlers=handlers)
    trainer.add_event_handler(Events.EPOCH_STARTED, freeze_after_epoch_2)
    trainer.validated = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: trainer.validated.append(
        (e.state.epoch, e.state.metrics.get("val_selection_loss"), e.state.metrics.get("early_stop_wait"))))
    return trainer


def weights(trainer):
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


def test_stops_in_the_final_stage_after_patience_validations_without_improvement(tmp_path, caplog):
    from dira3d.engines.summary import LazySummaryWriter

    writer = LazySummaryWriter(log_dir=str(tmp_path / "eval"))
    trainer = make_run(tmp_path / "models", max_epochs=14, patience=2, writer=writer)
    with caplog.at_level(logging.INFO):
        trainer.run()
    writer.close()
    values = {epoch: value for epoch, value, _ in trainer.validated}
    # the constructed plateau: the loss falls, then every validation from epoch 2 on gives the same (a tie is no
    # improvement)
    assert values[1] > values[2] and len({values[e] for e in range(2, 8)}) == 1, values
    # the final stage's first validation (epoch 5) sets its best; 6 and 7 do not improve on it: stop after 7.
    # Counting in the warm stage would stop after 4, counting on from it after 5; no early stop: 14
    assert trainer.state.epoch == FIRST_FINAL_EPOCH + 2 == 7 and len(trainer.validated) == 7
    assert [wait for _, _, wait in trainer.validated] == [None] * 4 + [0.0, 1.0, 2.0]
    last = load_checkpoint(tmp_path / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 7
    assert last["trainer"]["early_stop"] == {"counter": 2, "best_score": pytest.approx(values[5]), "best_epoch": 5,
                                             "stage": "final", "stopped_epoch": 7, "patience": 2,
                                             "metric": "val_selection_loss"}
    assert load_checkpoint(tmp_path / "models" / "best.pt")["trainer"]["best_epoch"] == 5  # the same best as best.pt's
    expected = ("early stop after epoch 7 of max_epochs 14: val_selection_loss has not improved for 2 validation(s) in "
                "the final stage 'final' (early_stop_patience=2); its best")
    assert trainer.state.early_stopped.startswith(expected) and "was at epoch 5" in trainer.state.early_stopped
    assert str(tmp_path / "models" / "best.pt") in trainer.state.early_stopped
    assert f"training ended by early stopping: {expected}" in caplog.text  # the run's last line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "eval"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("early_stop/text_summary")
    assert text.step == 7 and expected in text.tensor_proto.string_val[0].decode()


def test_off_by_default_the_run_goes_to_max_epochs(tmp_path):
    train = json.loads((ROOT / "bundles" / "dira_pretrain" / "configs" / "train.json").read_text(encoding="utf-8"))
    assert train["early_stop_patience"] is None
    assert train["train"]["handlers"][1]["early_stop_patience"] == "@early_stop_patience"
    assert DiRACheckpoint(tmp_path / "off").early_stop is None
    trainer = make_run(tmp_path / "models", max_epochs=9)  # the same plateau: 5 final-stage validations, no stop
    trainer.run()
    assert trainer.state.epoch == 9 and trainer.state.early_stopped is None
    assert all(wait is None for _, _, wait in trainer.validated)  # no early_stop_wait metric either
    assert "early_stop" not in load_checkpoint(tmp_path / "models" / "last.pt")["trainer"]


def test_a_resumed_run_stops_at_the_epoch_of_an_uninterrupted_one(tmp_path, caplog):
    full = make_run(tmp_path / "full", max_epochs=14, patience=3)
    full.run()
    assert full.state.epoch == FIRST_FINAL_EPOCH + 3
    first = make_run(tmp_path / "split", max_epochs=6, patience=3)  # interrupted in the final stage, one count in
    first.run()
    assert load_checkpoint(tmp_path / "split" / "last.pt")["trainer"]["early_stop"]["counter"] == 1
    resumed = make_run(tmp_path / "split", max_epochs=14, patience=3)
    resumed.run()
    # without the count in last.pt the resumed run would count afresh from epoch 7 and stop after 10
    assert resumed.state.epoch == full.state.epoch and resumed.state.iteration == full.state.iteration
    assert resumed.state.early_stopped == full.state.early_stopped.replace(str(tmp_path / "full"), str(tmp_path / "split"))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (load_checkpoint(tmp_path / "split" / "last.pt")["trainer"]["early_stop"]
            == load_checkpoint(tmp_path / "full" / "last.pt")["trainer"]["early_stop"])
    # the same command again: it had stopped there, nothing to do (no epoch trained)
    again = make_run(tmp_path / "split", max_epochs=14, patience=3)
    with caplog.at_level(logging.INFO):
        again.run()
    assert again.state.epoch == full.state.epoch and len(again.validated) == 0
    assert "resumed from there: nothing to do" in again.state.early_stopped
    # a larger patience trains on from the count it had
    longer = make_run(tmp_path / "split", max_epochs=14, patience=4)
    longer.run()
    assert longer.state.epoch == FIRST_FINAL_EPOCH + 4


def test_a_checkpoint_without_the_count_resumes_and_counts_from_the_resume(tmp_path, caplog):
    """A last.pt of a run without early stopping (or of dira3d before it) resumes as it did, counting afresh."""
    make_run(tmp_path, max_epochs=6).run()
    assert "early_stop" not in load_checkpoint(tmp_path / "last.pt")["trainer"]
    resumed = make_run(tmp_path, max_epochs=14, patience=2)
    with caplog.at_level(logging.INFO):
        resumed.run()
    assert "holds no early-stopping count: validations without improvement are counted from this resume on" in caplog.text
    assert resumed.state.epoch == 6 + 1 + 2  # epoch 7 sets the best, 8 and 9 do not improve on it


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True, "5", [3]])
def test_bad_patience_is_refused_naming_the_setting(tmp_path, bad):
    with pytest.raises(ValueError, match=r"early_stop_patience=.* must be a whole number >= 1.*null: no early stopping"):
        DiRACheckpoint(tmp_path, early_stop_patience=bad)
    with pytest.raises(ValueError, match="early_stop_patience"):
        check_early_stop_patience(bad)


def test_whole_number_patience_and_null_are_taken():
    assert check_early_stop_patience(None) is None
    assert check_early_stop_patience(5) == 5 and check_early_stop_patience(5.0) == 5


@pytest.mark.parametrize("evaluator_first", [None, False])
def test_early_stopping_without_a_validation_before_it_is_refused(tmp_path, evaluator_first):
    """No DiRAEvaluator (validation off), or one listed after the checkpoint handler (its loss would come too late)."""
    with pytest.raises(ValueError, match=r"early_stop_patience=2 stops on the validation loss, but no DiRAEvaluator is "
                                         r"attached before the checkpoint handler: list a DiRAEvaluator before "
                                         r"DiRACheckpoint in train_handlers \(in the dira_pretrain bundle: keep '@validate#evaluator' first in "
                                         r"train#handlers\), or set early_stop_patience to null"):
        make_run(tmp_path, max_epochs=3, patience=2, evaluator=evaluator_first is not None,
                 evaluator_first=bool(evaluator_first))
    make_run(tmp_path, max_epochs=3, evaluator=False)  # without early stopping: as before, no validation needed


def test_a_criterion_the_validation_does_not_give_is_refused(tmp_path):
    trainer = make_run(tmp_path, max_epochs=6, patience=1, metric_name="val_nope")  # asked for in the final stage
    with pytest.raises(ValueError, match=r"the validation gave no 'val_nope' \(it gave \[.*'val_selection_loss'"):
        trainer.run()


def test_the_pretrain_command_refuses_a_bad_patience_before_loading_data(tmp_path, capsys):
    """Refused in the bundle's initialize: the datalist's volumes (missing here) are not even looked at."""
    from dira3d.engines.command import main as pretrain_main

    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "missing.nii.gz"}] * 2, "meta": {}}))
    code = pretrain_main(["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--tiny",
                          "--override", "early_stop_patience=-2"])
    assert code == 2
    assert "error: early_stop_patience=-2 must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing left behind



ONE_STAGE = [{"name": "final", "losses": ["res"]}]


def test_best_pt_holds_the_best_validated_epoch_whatever_save_every_epochs(tmp_path):
    """save_every_epochs=2: best.pt was decided on the save epochs only (2, 4, ...), so a best validation of an odd
    epoch never reached it. The loss falls at every epoch here: best.pt must be the last epoch, 3; last.pt is
    written every 2 epochs and at the end."""
    trainer = make_run(tmp_path, max_epochs=3, stages=ONE_STAGE, evaluator_class=FallingLossEvaluator,
                       save_every_epochs=2)
    written = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: written.append(
        (e.state.epoch, (tmp_path / "last.pt").is_file() and load_checkpoint(tmp_path / "last.pt")["trainer"]["epoch"])))
    trainer.run()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["trainer"]["best_epoch"] == 3 and best["trainer"]["epoch"] == 3
    assert best["trainer"]["best_metric"] == pytest.approx(1 / 3)
    assert written == [(1, False), (2, 2), (3, 2)]  # last.pt only every save_every_epochs (the end: COMPLETED)
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["best_epoch"] == 3


def test_early_stopping_with_save_every_epochs_keeps_the_best_epoch_it_names_in_best_pt(tmp_path):
    """The plateau run stops after epoch 7 naming epoch 5 (an odd one) as the final stage's best and best.pt as
    holding it; with save_every_epochs=2 best.pt held epoch 6."""
    trainer = make_run(tmp_path, max_epochs=14, patience=2, save_every_epochs=2)
    trainer.run()
    assert trainer.state.epoch == 7 and "was at epoch 5" in trainer.state.early_stopped
    best = load_checkpoint(tmp_path / "best.pt")
    assert (best["trainer"]["best_epoch"], best["trainer"]["best_stage"], best["trainer"]["epoch"]) == (5, "final", 5)
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["epoch"] == 7

# ---------------------------------------------------------------- two gloo ranks
def _rank_run(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # as torchrun sets it (ignite's logger setup asks for it)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a rank left alone in an all-reduce fails, not hangs
    with leaving_the_group():
        gen = torch.Generator().manual_seed(rank)
        data = [{"image": torch.rand(1, 1, *PATCH3, generator=gen), "label": torch.tensor([0])}]  # this rank's share: one step per epoch
        # rank 1's validation loss keeps falling (per-rank BatchNorm statistics can make the ranks' losses differ)
        trainer = make_run(Path(out) / "models", max_epochs=14, patience=2, data=data,
                           evaluator_class=FallingLossEvaluator if rank == 1 else DiRAEvaluator)
        trainer.run()
        torch.save({"epoch": trainer.state.epoch, "validated": trainer.validated}, Path(out) / f"rank{rank}.pt")


def test_two_gloo_ranks_stop_after_the_same_epoch_on_rank_0s_validation(tmp_path):
    """Rank 1's own validation loss keeps falling, rank 0's does not: both stop where rank 0's count says.
    Each rank deciding on its own loss, rank 0 would stop after epoch 7 and leave rank 1 in its next all-reduce."""
    mp.spawn(_rank_run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["epoch"] for r in ranks] == [FIRST_FINAL_EPOCH + 2] * 2
    assert ranks[1]["validated"][-1][1] == pytest.approx(1 / 7)  # rank 1 did see its own, falling loss
    assert [v[2] for v in ranks[1]["validated"]] == [None] * 4 + [0.0, 1.0, 2.0]  # and counted on rank 0's


# ---------------------------------------------------------------- the bundle
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_the_bundle_stops_early_and_says_so(tmp_path, repo_root, ranks):
    """train.json (one process) and multi_gpu_train.json (torchrun, two gloo ranks) with early_stop_patience 2:
    learning rate 0 and instance norm make the validation loss constant, so the final stage (from epoch 2) stops
    after epoch 4 of 8, saying why on the console, in TensorBoard and at the end of `dira3d pretrain`."""
    from dira3d.engines.command import finished_message
    from test_bundle_pretrain import CONFIGS, scalars, write_volumes
    from test_distributed import free_port

    (tmp_path / "data").mkdir()
    write_volumes(tmp_path / "data")
    out = tmp_path / "run"
    configs = [f"{CONFIGS}/train.json", f"{CONFIGS}/tiny.json"] + ([f"{CONFIGS}/multi_gpu_train.json"] if ranks > 1 else [])
    launch = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
                                 if ranks > 1 else [])
    cmd = launch + [
        "-m", "monai.bundle", "run", "--config_file", str(configs), "--meta_file", f"{CONFIGS}/metadata.json",
        "--logging_file", f"{CONFIGS}/logging.conf", "--dataset_dir", str(tmp_path / "data"),
        "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), "--patch_size", "[16,16,8]",
        "--lr_g", "0", "--network_def#norm", "instance", "--max_epochs", "8", "--early_stop_patience", "2",
        "--stages", "[{'name':'warm','until_epoch':1,'losses':['res']},{'name':'final','losses':['res']}]",
    ]
    proc = run_torchrun_command(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    expected = ("early stop after epoch 4 of max_epochs 8: val_selection_loss has not improved for 2 validation(s) in "
                "the final stage 'final' (early_stop_patience=2); its best")
    assert log.count(f"training ended by early stopping: {expected}") == 1, log[-3000:]  # rank 0 alone says it
    last = torch.load(out / "models" / "last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 4 and last["trainer"]["early_stop"]["best_epoch"] == 2
    values, _ = scalars(out / "eval")
    assert values["early_stop_wait"] == [(2, 0.0), (3, 1.0), (4, 2.0)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "eval"), size_guidance={"tensors": 0})
    events.Reload()
    assert [t.step for t in events.Tensors("early_stop/text_summary")] == [4]
    assert finished_message(out, configs, {}).splitlines()[0] == (
        "stopped early after epoch 4: val_selection_loss had not improved for 2 validation(s) in the final stage 'final' "
        "(early_stop_patience=2); best.pt holds its best epoch, 2; rerun with a larger --override "
        "early_stop_patience=N (or null) to train on")
