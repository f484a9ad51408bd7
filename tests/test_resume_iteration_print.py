"""The console line ``Epoch: e/E, Iter: k/N`` of the pretraining after a resume with another epoch length (another
number of torchrun processes, batch_size or data). The run goes on by epochs while the iteration counter goes on from
last.pt's, so MONAI's ``(iteration - 1) % N + 1`` gave the wrong ``k`` (``Iter: 3/3`` for an epoch's first
iteration); :class:`dira3d.engines.EpochStatsHandler`, train.json's StatsHandler, counts ``k`` in the epoch."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path

import pytest
from monai.handlers import StatsHandler

from dira3d.engines import DiRACheckpoint, EpochStatsHandler, scalar_output
from test_engine import make_trainer
from test_signal_stop import kill_self_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = [{"name": "r", "losses": ["res"]}]
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dira_pretrain" / "configs"


class _Lines(logging.Handler):
    """The messages of one logger (MONAI's get_logger does not propagate them to pytest's caplog)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "_Lines":
        self.logger.addHandler(self)
        self.level_before, _ = self.logger.level, self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)

    def printed(self) -> list[tuple[int, int, int]]:
        """(epoch, k, N) of each ``Epoch: e/E, Iter: k/N`` line."""
        found = (re.search(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+)", line) for line in self.lines)
        return [tuple(map(int, m.groups())) for m in found if m]


def _resumed_with_three_iterations_per_epoch(tmp_path, handler_class) -> list[tuple[int, int, int]]:
    # batch 2 of 8 volumes: 4 iterations per epoch, 2 epochs -> last.pt at iteration 8
    make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path)]).run()
    name = f"stats_{handler_class.__name__}"
    stats = handler_class(name=name, iteration_log=True, epoch_log=False, output_transform=scalar_output)
    # batch 3: 3 iterations per epoch; epochs 3 and 4 are iterations 9-11 and 12-14
    trainer = make_trainer(stages=RES, max_epochs=4, batch=3, volumes=8, handlers=[DiRACheckpoint(tmp_path), stats])
    with _Lines(name) as lines:
        trainer.run()
    assert trainer.state.iteration == 14
    return lines.printed()


def test_after_a_resume_with_another_epoch_length_the_line_counts_the_iteration_in_the_epoch(tmp_path):
    assert _resumed_with_three_iterations_per_epoch(tmp_path, EpochStatsHandler) == [
        (3, 1, 3), (3, 2, 3), (3, 3, 3), (4, 1, 3), (4, 2, 3), (4, 3, 3)]


def test_monais_own_line_was_off_there(tmp_path):
    # what train.json printed before (dira_pretrain 0.1.26): (iteration - 1) % 3 + 1 of iterations 9-14
    assert _resumed_with_three_iterations_per_epoch(tmp_path, StatsHandler) == [
        (3, 3, 3), (3, 1, 3), (3, 2, 3), (4, 3, 3), (4, 1, 3), (4, 2, 3)]


def test_a_mid_epoch_resume_with_another_epoch_length_goes_on_at_its_place_in_the_epoch(tmp_path):
    first = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path)])
    kill_self_at(first, 6)  # SIGTERM in iteration 6: epoch 2, 2 of its 4 iterations done
    previous = signal.getsignal(signal.SIGTERM)
    try:
        first.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    stats = EpochStatsHandler(name="stats_mid", iteration_log=True, epoch_log=False, output_transform=scalar_output)
    # batch 1: 8 iterations per epoch; half of epoch 2 was done, so it goes on at its 5th iteration
    trainer = make_trainer(stages=RES, max_epochs=2, batch=1, volumes=8, handlers=[DiRACheckpoint(tmp_path), stats])
    with _Lines("stats_mid") as lines:
        trainer.run()
    assert lines.printed() == [(2, k, 8) for k in range(5, 9)]


def test_the_pretraining_bundle_prints_with_it():
    config = json.loads((BUNDLE / "train.json").read_text())
    targets = [h["_target_"] for h in config["train"]["handlers"] if isinstance(h, dict) and "StatsHandler" in h["_target_"]]
    assert "dira3d.engines.EpochStatsHandler" in targets and "StatsHandler" not in targets
    metadata = json.loads((BUNDLE / "metadata.json").read_text())
    assert "EpochStatsHandler" in metadata["changelog"]["0.1.27"] and metadata["version"] in metadata["changelog"]
