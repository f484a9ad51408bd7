"""Faults in long runs: a NaN loss stops training naming the term and the iteration and keeps the
last good checkpoint (or the step is skipped); adversary collapse warns once; an unwritable or
full output folder fails before training starts."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine

from dira3d.engines import CollapseMonitor, DiRACheckpoint, NonFiniteGuard, NonFiniteLossError
from dira3d.engines.faults import check_finite_weights, estimate_checkpoint_bytes
from dira3d.losses import RestorationLoss
from dira3d.utils import load_checkpoint

STAGES = [{"name": "dir", "losses": ["dis", "res"]}]


class NaNAt(RestorationLoss):
    """MSE that returns NaN on its ``bad``-th call (the trainer calls it once per iteration)."""

    def __init__(self, bad: int) -> None:
        super().__init__("mse")
        self.calls, self.bad = 0, bad

    def forward(self, restored, target):
        self.calls += 1
        loss = super().forward(restored, target)
        return loss * float("nan") if self.calls == self.bad else loss


def trainer_with_nan(tmp_path, policy: str, bad: int = 3):
    from test_engine import make_trainer

    ckpt = DiRACheckpoint(tmp_path / "models", save_every_iterations=1)
    trainer = make_trainer(stages=STAGES, max_epochs=3, batch=2, volumes=4, handlers=[ckpt])
    trainer.restoration_loss = NaNAt(bad)
    trainer.nonfinite_guard.on_nonfinite = policy
    return trainer, ckpt


def test_nan_loss_stops_naming_term_and_iteration_and_keeps_last_good_checkpoint(tmp_path):
    trainer, ckpt = trainer_with_nan(tmp_path, "stop", bad=3)
    with pytest.raises(NonFiniteLossError, match=r"loss_res .*iteration 3\b"):
        trainer.run()
    last = load_checkpoint(ckpt.last_path)
    assert last["trainer"]["iteration"] == 2  # written after iteration 2, never after the NaN step
    assert all(torch.isfinite(v).all() for v in last["encoder"].values() if v.is_floating_point())


def test_nan_step_is_skipped_when_configured(tmp_path):
    trainer, ckpt = trainer_with_nan(tmp_path, "skip", bad=3)
    trainer.run()
    assert trainer.nonfinite_guard.skipped == 1 and trainer.state.iteration == 6
    last = load_checkpoint(ckpt.last_path)
    assert last["trainer"]["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in last["decoder"].values() if v.is_floating_point())


def test_skipped_steps_count_on_after_a_resume(tmp_path, caplog):
    """last.pt did not carry the guard's count: after a resume the "skipped so far" warning restarted at 1."""
    from test_engine import make_trainer

    trainer, ckpt = trainer_with_nan(tmp_path, "skip", bad=3)
    trainer.run()
    assert load_checkpoint(ckpt.last_path)["trainer"]["nonfinite_skipped"] == 1  # weights_only=True loading
    ckpt = DiRACheckpoint(tmp_path / "models", save_every_iterations=1)
    resumed = make_trainer(stages=STAGES, max_epochs=4, batch=2, volumes=4, handlers=[ckpt], on_nonfinite="skip")
    resumed.restoration_loss = NaNAt(1)  # the first step after the resume
    with caplog.at_level(logging.WARNING, logger="DiRATrainer"):
        resumed.run()
    assert resumed.state.iteration == 8 and resumed.nonfinite_guard.skipped == 2
    assert "2 step(s) with a NaN/Inf loss were skipped so far" in caplog.text
    assert load_checkpoint(ckpt.last_path)["trainer"]["nonfinite_skipped"] == 2
    # a resume without a new NaN step keeps the count and does not report those 2 again (they were reported)
    caplog.clear()
    calm = make_trainer(stages=STAGES, max_epochs=5, batch=2, volumes=4,
                        handlers=[DiRACheckpoint(tmp_path / "models")], on_nonfinite="skip")
    with caplog.at_level(logging.WARNING, logger="DiRATrainer"):
        calm.run()
    assert calm.state.iteration == 10 and calm.nonfinite_guard.skipped == 2
    assert "skipped so far" not in caplog.text, caplog.text
    # a checkpoint written before the count was saved still resumes, counting from the resume
    old = load_checkpoint(ckpt.last_path)
    del old["trainer"]["nonfinite_skipped"]
    torch.save(old, ckpt.last_path)
    again = make_trainer(stages=STAGES, max_epochs=6, batch=2, volumes=4,
                         handlers=[DiRACheckpoint(tmp_path / "models")], on_nonfinite="skip")
    again.run()
    assert again.state.iteration == 12 and again.nonfinite_guard.skipped == 0


def test_guard_and_weight_check_without_a_trainer():
    engine = Engine(lambda e, b: {"loss": torch.tensor(1.0), "loss_dis": torch.tensor(float("inf") if b == 2 else 1.0)})
    guard = NonFiniteGuard("stop", check_every=100)  # only the explicit check below looks
    guard.attach(engine)
    for batch in (1, 2, 3):
        engine.state.iteration = batch
        engine.state.output = engine._process_function(engine, batch)
        guard.record(engine)
    with pytest.raises(NonFiniteLossError, match=r"loss_dis .*iteration 2\b"):
        guard.check(engine)
    with pytest.raises(ValueError, match="on_nonfinite"):
        NonFiniteGuard("ignore")
    net = torch.nn.Linear(3, 2)
    check_finite_weights({"net": net})  # finite: no error
    with torch.no_grad():
        net.bias[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="net has NaN/Inf weights"):
        check_finite_weights({"net": net})


def test_collapse_warning_once_after_patience(caplog):
    gaps = iter([0.5] * 3 + [0.99] * 6 + [0.2] * 3)

    def step(engine, batch):
        g = next(gaps)
        return {"d_real": torch.tensor(0.5 + g / 2), "d_fake": torch.tensor(0.5 - g / 2)}

    engine = Engine(step)
    CollapseMonitor(gap=0.95, patience=5, check_every=4).attach(engine)
    with caplog.at_level(logging.WARNING, logger="DiRATrainer"):
        engine.run(range(12), max_epochs=1)
    warnings = [r for r in caplog.records if "adversary collapse" in r.message]
    # D wins from iteration 4; checks at 4, 8, 12: at 8 the streak is 5 = patience
    assert len(warnings) == 1 and "5 consecutive iterations (up to iteration 8)" in warnings[0].message

    calm = Engine(lambda e, b: {"d_real": torch.tensor(0.9), "d_fake": torch.tensor(0.2)})
    CollapseMonitor(gap=0.95, patience=2, check_every=1).attach(calm)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="DiRATrainer"):
        calm.run(range(5), max_epochs=1)
    assert not [r for r in caplog.records if "adversary collapse" in r.message]


def test_unwritable_or_full_output_folder_fails_before_training(tmp_path):
    from test_engine import make_trainer

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    trainer = make_trainer(stages=STAGES)
    with pytest.raises(PermissionError, match="a_file/models is not writable"):
        DiRACheckpoint(blocker / "models").attach(trainer)
    with pytest.raises(OSError, match="MiB free"):
        DiRACheckpoint(tmp_path / "models", min_free_bytes=2**62).attach(trainer)
    # the default estimate: weights + two Adam moments, ×2 for the old and the new file
    linear = torch.nn.Linear(3, 2)  # 8 float32 parameters
    assert estimate_checkpoint_bytes([linear]) == int(8 * 4 * 3 * 1.05) + 65536
