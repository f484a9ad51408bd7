"""A resume whose epoch length differs from the checkpoint's: another number of torchrun processes, another
batch_size, more or fewer data. The iteration counter goes on from the checkpoint's (TensorBoard's steps keep
rising), the epochs are counted as epochs, and a mid-epoch checkpoint goes on at the same share of its epoch.

Before: ignite's count (iteration >= epoch_length × max_epochs) ended a run resumed with a larger batch at once,
without a step, and the checkpoint's epoch was iteration // epoch_length (epoch 4 after 2 epochs, or 2 after 3)."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from ignite.engine import Events

from dira3d.engines import DiRACheckpoint
from test_engine import make_trainer
from test_signal_stop import kill_self_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = [{"name": "r", "losses": ["res"]}]


def trainer_state(path):
    saved = torch.load(path, weights_only=True)["trainer"]
    return {k: saved[k] for k in ("epoch", "iteration", "epoch_iteration")}


def epoch_ends(trainer):
    ends = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ends.append((e.state.epoch, e.state.iteration)))
    return ends


def test_a_larger_batch_resumes_at_the_next_epoch_and_trains_the_remaining_epochs(tmp_path):
    # 8 volumes, batch 2: 4 iterations per epoch, 2 epochs -> iteration 8
    make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path)]).run()
    assert trainer_state(tmp_path / "last.pt") == {"epoch": 2, "iteration": 8, "epoch_iteration": 0}
    # batch 4: 2 iterations per epoch; epochs 3 and 4 are trained (before: none, ignite saw 8 >= 2 x 4)
    trainer = make_trainer(stages=RES, max_epochs=4, batch=4, volumes=8, handlers=[DiRACheckpoint(tmp_path)])
    ends = epoch_ends(trainer)
    trainer.run()
    assert ends == [(3, 10), (4, 12)]
    assert trainer_state(tmp_path / "last.pt") == {"epoch": 4, "iteration": 12, "epoch_iteration": 0}
    # the same command again: nothing left to do (before: last.pt said epoch 4 at iteration 8)
    again = make_trainer(stages=RES, max_epochs=4, batch=4, volumes=8, handlers=[DiRACheckpoint(tmp_path)])
    steps = epoch_ends(again)
    again.run()
    assert steps == [] and again.state.iteration == 12


@pytest.mark.parametrize("recorded", [True, False], ids=["epoch_length recorded", "older checkpoint"])
def test_a_smaller_batch_resumes_mid_epoch_at_the_same_share_and_counts_epochs_right(tmp_path, caplog, recorded):
    # batch 2: 4 iterations per epoch; SIGTERM in iteration 6 -> last.pt mid-epoch 2, 2 of its 4 iterations done
    first = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path)])
    kill_self_at(first, 6)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        first.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert trainer_state(tmp_path / "last.pt") == {"epoch": 1, "iteration": 6, "epoch_iteration": 2}
    if not recorded:  # a last.pt of a dira3d that did not record the epoch length: inferred (6 = 1 x 4 + 2)
        ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
        del ckpt["trainer"]["epoch_length"]
        torch.save(ckpt, tmp_path / "last.pt")
    # batch 1: 8 iterations per epoch; half of epoch 2 was done -> it goes on at iteration 4 of 8, then epoch 3
    trainer = make_trainer(stages=RES, max_epochs=3, batch=1, volumes=8, handlers=[DiRACheckpoint(tmp_path)])
    ends = epoch_ends(trainer)
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert ends == [(2, 10), (3, 18)]  # before: (2, 8), (3, 16), and last.pt said epoch 2
    assert trainer_state(tmp_path / "last.pt") == {"epoch": 3, "iteration": 18, "epoch_iteration": 0}
    assert "was written with 4 iterations per epoch and this run has 8" in caplog.text
    assert "epoch 2 goes on at iteration 4 of its 8" in caplog.text
    assert "mid-epoch (epoch 2: 2 of its 4 iterations done)" in caplog.text


def test_a_save_mid_epoch_after_such_a_resume_records_the_position_in_the_epoch(tmp_path):
    make_trainer(stages=RES, max_epochs=1, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path)]).run()  # iteration 4
    # batch 1 (8 per epoch), last.pt every 3 iterations: iterations 6 and 9 are 2 and 5 into epoch 2
    trainer = make_trainer(stages=RES, max_epochs=2, batch=1, volumes=8,
                           handlers=[DiRACheckpoint(tmp_path, save_every_iterations=3)])
    saved = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=3),
                              lambda e: saved.append(trainer_state(tmp_path / "last.pt")))
    trainer.run()
    assert saved[:2] == [{"epoch": 1, "iteration": 6, "epoch_iteration": 2},
                         {"epoch": 1, "iteration": 9, "epoch_iteration": 5}]
    assert trainer_state(tmp_path / "last.pt") == {"epoch": 2, "iteration": 12, "epoch_iteration": 0}
