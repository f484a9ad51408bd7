"""A run killed between two checkpoints (SIGKILL, a power loss, a worker that torchrun restarts) had logged its
steps after the last last.pt to TensorBoard; the resumed run logs those steps again into a new event file, and
TensorBoard showed each of them twice (a zigzag back to the resume). The checkpoint handler now marks the resume in
the event file (dira3d.engines.summary.purge_from: torch's purge_step), and TensorBoard hides the earlier values."""

from __future__ import annotations

import shutil

import pytest
from ignite.engine import Events
from monai.handlers import TensorBoardStatsHandler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dira3d.engines import DiRACheckpoint, scalar_output
from dira3d.engines.summary import LazySummaryWriter, purge_from
from test_engine import make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = [{"name": "r", "losses": ["res"]}]


def run_logged(tmp_path, after_epoch_one=None):
    writer = LazySummaryWriter(log_dir=str(tmp_path / "eval"))
    handlers = [DiRACheckpoint(tmp_path / "models", summary_writer=writer),
                TensorBoardStatsHandler(summary_writer=writer, iteration_log=1, epoch_log=False,
                                        output_transform=scalar_output)]
    trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=handlers)  # 4 iterations per epoch
    if after_epoch_one is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), after_epoch_one)
    trainer.run()
    writer.close()


def logged(log_dir, tag="loss"):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_resume_after_a_kill_shows_each_step_once_in_tensorboard(tmp_path):
    reference = tmp_path / "reference"
    run_logged(reference)
    # the killed run: it got to iteration 8, but its last.pt is epoch 1's (iteration 4), as after a SIGKILL in epoch 2
    killed = tmp_path / "killed"
    run_logged(killed, lambda _: shutil.copy(killed / "models" / "last.pt", tmp_path / "epoch1.pt"))
    shutil.copy(tmp_path / "epoch1.pt", killed / "models" / "last.pt")
    run_logged(killed)  # resumes at iteration 5
    assert len(list((killed / "eval").glob("events.out.tfevents.*"))) == 2
    steps = [step for step, _ in logged(killed / "eval")]
    assert steps == list(range(1, 9)), steps  # before: 1..8, then 5..8 again
    assert logged(killed / "eval") == logged(reference / "eval")  # and the values are the resumed run's (exact)


def test_purge_from_an_open_event_file_and_without_a_writer(tmp_path):
    purge_from(None, 3)  # a rank without a writer: nothing
    writer = LazySummaryWriter(log_dir=str(tmp_path))
    for step in range(1, 6):
        writer.add_scalar("x", float(step), step)
    purge_from(writer, 3)  # the file exists already: the mark is written into it
    writer.add_scalar("x", 30.0, 3)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
