"""The TensorBoard writers of a run are closed when its engine's run ends (finished, stopped by a signal, or raising).

MONAI's ``TensorBoardStatsHandler`` given no ``summary_writer`` (the fine-tuning bundles' train and validation
handlers) opens a ``SummaryWriter`` of its own and never closes it, and the pretraining bundle closed its shared
``train#writer`` in ``finalize`` only, which a run that raises never reaches: each left a writer thread
(``_AsyncWriterThread``) and an open event file behind. The fine-tuning bundles' ``run``
(:func:`dira3d.evaluation.run_training`) now closes the writers of both engines' handlers, and the pretraining bundle's
``train#handlers`` end with :class:`dira3d.engines.summary.WriterCloser`. A closed writer opens a new event file at its
next value, so an engine run again in the same process (a notebook) still logs.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import StatsHandler, TensorBoardStatsHandler, from_engine

from dira3d.engines import RestorationImageHandler
from dira3d.engines.summary import LazySummaryWriter, WriterCloser
from dira3d.evaluation.stopping import exit_if_training_stopped, run_training
from dira3d.utils.interrupts import StoppedBySignal
from test_finetune_signal_stop import linear_fine_tuning


def scalars(log_dir):
    """``({tag: [(step, value), ...] in step order}, [image tags])`` of every event file in ``log_dir``, each opened
    with tensorboard's EventAccumulator. Read one by one: a folder read as one run orders its files by name, whose
    writer counter is not zero-padded (file 10 before file 9 within one second), and a later step read first makes
    TensorBoard drop the earlier ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values, images = {}, set()
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        images.update(acc.Tags()["images"])
    return {tag: sorted(v) for tag, v in values.items()}, sorted(images)


def writer_threads() -> list[threading.Thread]:
    """The live writer threads of torch's event file writers."""
    return [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread" and t.is_alive()]


def fine_tuning_with_tensorboard(tmp_path, max_epochs=3):
    """The linear trainer and validator with the bundles' two TensorBoard handlers (no summary_writer: each opens
    its own writer in ``tmp_path / "eval"``)."""
    log_dir = str(tmp_path / "eval")
    trainer, validator, _ = linear_fine_tuning(
        tmp_path, max_epochs=max_epochs, val_handlers=(TensorBoardStatsHandler(log_dir=log_dir, iteration_log=False),))
    TensorBoardStatsHandler(log_dir=log_dir, tag_name="train_loss",
                            output_transform=from_engine(["loss"], first=True)).attach(trainer)
    return trainer, validator


def test_fine_tuning_closes_both_writers_and_a_second_run_logs_too(tmp_path):
    before = set(writer_threads())
    trainer, validator = fine_tuning_with_tensorboard(tmp_path)
    run_training(trainer, validator, tmp_path / "models")
    assert set(writer_threads()) - before == set()  # the trainer's and the validator's writer threads ended
    values, _ = scalars(tmp_path / "eval")
    assert [s for s, _ in values["train_loss"]] == list(range(1, 10))  # 3 epochs x 3 iterations
    assert [s for s, _ in values["val_mse"]] == [1, 2, 3]

    trainer.state.max_epochs = 5  # a notebook runs the same engines on: two more epochs
    run_training(trainer, validator, tmp_path / "models")
    assert set(writer_threads()) - before == set()
    values, _ = scalars(tmp_path / "eval")
    assert [s for s, _ in values["train_loss"]] == list(range(1, 16))
    assert [s for s, _ in values["val_mse"]] == [1, 2, 3, 4, 5]


def test_fine_tuning_stopped_by_a_signal_or_raising_closes_the_writers(tmp_path):
    before = set(writer_threads())
    trainer, validator = fine_tuning_with_tensorboard(tmp_path / "signal", max_epochs=4)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda _: os.kill(os.getpid(), signal.SIGTERM))
    run_training(trainer, validator, tmp_path / "signal" / "models")
    assert trainer.state.stopped_by == "SIGTERM"
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()
    assert set(writer_threads()) - before == set()
    values, _ = scalars(tmp_path / "signal" / "eval")
    assert [s for s, _ in values["train_loss"]] == [1, 2, 3, 4]

    trainer, validator = fine_tuning_with_tensorboard(tmp_path / "error")

    def fail(engine):
        raise RuntimeError("a fault in the fifth step")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), fail)
    StatsHandler(iteration_log=False).attach(trainer)  # re-raises the error, as in the bundles
    with pytest.raises(RuntimeError, match="fifth step"):
        run_training(trainer, validator, tmp_path / "error" / "models")
    assert set(writer_threads()) - before == set()
    values, _ = scalars(tmp_path / "error" / "eval")
    assert [s for s, _ in values["train_loss"]] == [1, 2, 3, 4, 5]


def counting_engine(writer, fail_at=None):
    """An engine of 2 epochs x 2 iterations that logs its iteration to ``writer`` (``fail_at``: raises there)."""
    def step(engine, batch):
        if engine.state.iteration == fail_at:
            raise RuntimeError(f"a fault at iteration {fail_at}")
        return float(engine.state.iteration)

    engine = Engine(step)
    TensorBoardStatsHandler(summary_writer=writer, tag_name="value", output_transform=lambda x: x).attach(engine)
    return engine


@pytest.mark.parametrize("other_exception_handler", [False, True])
def test_writer_closer_closes_at_the_end_also_when_the_run_raises(tmp_path, other_exception_handler):
    """The pretraining bundle's WriterCloser (its train#writer): closed at COMPLETED and at EXCEPTION_RAISED, the error
    raised once whether or not another handler (MONAI's StatsHandler, which raises it again) handles it too."""
    before = set(writer_threads())
    writer = LazySummaryWriter(log_dir=str(tmp_path / "done"))
    engine = counting_engine(writer)
    WriterCloser([writer]).attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert set(writer_threads()) - before == set()
    engine.run([0, 1], max_epochs=3)  # a notebook runs it on: the closed writer logs into a new event file
    assert set(writer_threads()) - before == set()
    values, _ = scalars(tmp_path / "done")
    assert [s for s, _ in values["value"]] == [1, 2, 3, 4, 5, 6]

    writer = LazySummaryWriter(log_dir=str(tmp_path / "error"))
    engine = counting_engine(writer, fail_at=3)
    if other_exception_handler:
        StatsHandler(iteration_log=False).attach(engine)
    WriterCloser([writer]).attach(engine)
    with pytest.raises(RuntimeError, match="at iteration 3"):
        engine.run([0, 1], max_epochs=2)
    assert set(writer_threads()) - before == set()
    values, _ = scalars(tmp_path / "error")
    assert [s for s, _ in values["value"]] == [1, 2]


def test_restoration_image_handler_closes_its_own_writer_when_the_run_raises(tmp_path):
    before = set(writer_threads())

    def step(engine, batch):
        engine.state.images = {"original": torch.rand(1, 1, 8, 8, 4), "distorted": torch.rand(1, 1, 8, 8, 4)}
        if engine.state.iteration == 2:
            raise RuntimeError("a fault at iteration 2")
        return 0.0

    engine = Engine(step)
    RestorationImageHandler(log_dir=str(tmp_path / "images"), interval=1).attach(engine)
    with pytest.raises(RuntimeError, match="iteration 2"):
        engine.run([0, 1])
    assert set(writer_threads()) - before == set()
    _, images = scalars(tmp_path / "images")
    assert images == ["restoration"]


def test_the_pretraining_bundle_closes_its_writer_with_the_trainer(repo_root, tmp_path):
    """train.json's train#handlers end with the WriterCloser of train#writer (multi_gpu_train.json and 2d.json keep
    that list), after every handler that writes to it: its thread has ended when the run has, before finalize."""
    import json

    from monai.bundle import ConfigWorkflow

    from test_bundle_pretrain import CONFIGS, write_volumes

    before = set(writer_threads())
    data = tmp_path / "data"
    data.mkdir()
    write_volumes(data)
    configs = repo_root / CONFIGS
    flow = ConfigWorkflow(config_file=[str(configs / "train.json"), str(configs / "tiny.json")],
                          meta_file=str(configs / "metadata.json"), logging_file=False, workflow_type="train",
                          dataset_dir=str(data), bundle_root=str(tmp_path / "run"), patch_size=[16, 16, 8],
                          max_epochs=2)  # fmt: skip
    flow.initialize()
    try:
        flow.run()
        assert set(writer_threads()) - before == set()
        values, images = scalars(tmp_path / "run" / "eval")
        assert [s for s, _ in values["loss_dis"]] == [1, 2, 3, 4] and "val_loss" in values and images == ["restoration"]
    finally:
        flow.finalize()

    train = json.loads((repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json").read_text(encoding="ascii"))
    handlers = train["train"]["handlers"]
    assert handlers[-1] == {"_target_": "dira3d.engines.summary.WriterCloser", "writers": ["@train#writer"]}
    assert sum("WriterCloser" in json.dumps(h) for h in handlers) == 1
