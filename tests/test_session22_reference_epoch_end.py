"""Reference checks of dira3d.engines.epoch_end (session 22 mutation audit): ``at_epoch_end`` on a plain ignite
``Engine`` (the iteration count) and on one with ``epoch_position``, and :class:`EpochEndRecord`'s bookkeeping, each
against hand-worked values of the documented behaviour."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from ignite.engine import Engine, Events

from dira3d.engines.epoch_end import EpochEndRecord, at_epoch_end, run_pending_epoch_end


def _plain(iteration: int, epoch_length) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.iteration, engine.state.epoch_length = iteration, epoch_length
    return engine


@pytest.mark.parametrize("iteration, length, expected", [
    (0, 4, False), (1, 4, False), (3, 4, False), (4, 4, True), (5, 4, False), (8, 4, True),
    (3, None, False), (3, 0, False), (1, 1, True)])
def test_at_epoch_end_of_a_plain_engine_counts_iterations(iteration, length, expected):
    assert at_epoch_end(_plain(iteration, length)) is expected


class _Positioned:
    """An engine with ``epoch_position`` (DiRATrainer's): (completed epochs, iterations done in the epoch)."""

    def __init__(self, iteration: int, done: int) -> None:
        self.state = SimpleNamespace(iteration=iteration, epoch_length=4)
        self.done = done

    def epoch_position(self):
        return (1, self.done)


@pytest.mark.parametrize("iteration, done, expected", [(4, 0, True), (3, 3, False), (0, 0, False), (6, 2, False)])
def test_at_epoch_end_asks_epoch_position_first(iteration, done, expected):
    # (6, 2): a count of 4 per epoch alone would not say; epoch_position does (and 8 % 4 == 0 with done 1 is not an end)
    assert at_epoch_end(_Positioned(iteration, done)) is expected
    assert at_epoch_end(_Positioned(8, 1)) is False


def test_the_record_of_a_periodic_save_then_the_epoch_end():
    record, engine = EpochEndRecord(), _plain(4, 4)
    assert record.pending(engine) is True  # last.pt written at iteration 4, before epoch 1's end
    record.saved(True)
    assert record.on_disk is True
    assert record.end(engine) is True  # the end must write last.pt again
    assert record.pending(engine) is False  # that rewrite (same iteration) has no record
    record.saved(False)
    assert record.end(engine) is False  # nothing on disk to clear: save_every_epochs decides
    engine.state.iteration = 5
    assert record.pending(engine) is False  # mid-epoch
    engine.state.iteration = 8
    assert record.pending(engine) is True  # the next epoch's last iteration


def test_the_record_after_a_resume():
    engine = _plain(4, 4)
    record = EpochEndRecord()
    record.resumed(engine, pending=False)  # an ordinary end-of-epoch last.pt: that epoch has ended
    assert (record.pending(engine), record.on_disk, record.end(engine)) == (False, False, False)
    record = EpochEndRecord()
    record.resumed(engine, pending=True)  # the end runs first and must rewrite last.pt
    assert record.pending(engine) is True and record.on_disk is True
    assert record.end(engine) is True and record.pending(engine) is False


def test_run_pending_epoch_end_fires_the_epoch_end_once():
    engine = Engine(lambda e, b: None)
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.epoch))
    engine.state.epoch = 3
    run_pending_epoch_end(engine)  # no record: nothing
    engine.state.epoch_end_pending = False
    run_pending_epoch_end(engine)
    assert seen == []
    engine.state.epoch_end_pending = True
    run_pending_epoch_end(engine)
    run_pending_epoch_end(engine)  # the record is cleared: a second STARTED does not run it again
    assert seen == [3] and engine.state.epoch_end_pending is False


def test_a_resumed_pending_epoch_end_writes_last_pt_again_whatever_save_every_epochs(tmp_path, monkeypatch, caplog):
    """DiRACheckpoint's resume tells its record that last.pt holds the pending end: that end (epoch 1, which
    save_every_epochs=2 skips) writes last.pt again without the record, so a second resume does not run it again.
    The resumed run logs ignite's ``Epoch[N] Complete`` line for that end too, as an uninterrupted run does."""
    from dira3d.engines import evaluator as evaluator_module
    from test_resume_kill_epoch_end import build, completed_lines, saved

    validate, snapshots, folder = evaluator_module.DiRAEvaluator._validate, {}, tmp_path / "run" / "models"

    def snapshot(self, trainer):  # last.pt as a SIGKILL inside this validation would leave it
        snapshots.setdefault(trainer.state.epoch, (folder / "last.pt").read_bytes())
        return validate(self, trainer)

    with monkeypatch.context() as patch:
        patch.setattr(evaluator_module.DiRAEvaluator, "_validate", snapshot)
        build(tmp_path / "run", [], save_every=1, save_every_epochs=2).run()
    killed = tmp_path / "killed" / "models"
    killed.mkdir(parents=True)
    (killed / "last.pt").write_bytes(snapshots[1])
    assert saved(killed / "last.pt")[0]["epoch_end_pending"] is True  # the premise
    resumed, after = build(tmp_path / "killed", [], save_every_epochs=2), []
    resumed.add_event_handler(Events.EPOCH_COMPLETED, lambda e: after.append(
        (e.state.epoch, saved(killed / "last.pt")[0]["epoch_end_pending"], saved(killed / "last.pt")[0]["iteration"])))
    caplog.set_level(logging.INFO)
    caplog.clear()
    resumed.run()
    assert after[0] == (1, False, 2)  # epoch 1's end ran first and wrote last.pt again, without the record
    assert completed_lines(caplog) == [1, 2, 3]  # as the uninterrupted run's (it was missing for epoch 1)
