"""A pretraining killed (SIGKILL: SLURM's grace period, an OOM kill) during an epoch's end-of-epoch validation, after
``last.pt`` was written at that epoch's last iteration (found 2026-11-27, after the epoch-end stop of session 21).

That ``last.pt`` said "the end of epoch N": the resume started epoch N + 1 and never ran epoch N's end, so its val_*
and train_* epoch values were missing (in the logs and TensorBoard) and its best.pt decision and early-stopping count
were never made. Such a ``last.pt`` now records the epoch's end as pending (``trainer["epoch_end_pending"]``, with the
epoch's running sums) and the resume runs it first (dira3d.engines.epoch_end). Each run here is a child process
killed for real inside the validation; the resumed run must equal an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TESTS = Path(__file__).resolve().parent

# A tiny pretraining with validation (3 epochs of 2 iterations) into argv[1]: per epoch end, its val_* / train_*
# values go to argv[1]/epochs.jsonl and the TensorBoard writer is flushed. argv[2:]: "SIGTERM@i" (a SIGTERM inside
# step i), "KILL@e" (SIGKILL inside epoch e's validation, after flushing TensorBoard).
CHILD = textwrap.dedent('''
    import json, os, signal, sys
    sys.path.insert(0, os.environ["DIRA3D_TESTS"])

    def main(out, options):
        import logging
        import torch
        logging.basicConfig(level=logging.INFO)
        from ignite.engine import Events
        from monai.handlers import TensorBoardStatsHandler
        from dira3d.engines import evaluator as evaluator_module, scalar_output
        from dira3d.engines.summary import LazySummaryWriter
        from test_resume_kill_epoch_end import build
        from test_signal_stop import kill_self_at

        torch.set_num_threads(1)
        writer = LazySummaryWriter(log_dir=os.path.join(out, "eval"))
        tensorboard = TensorBoardStatsHandler(summary_writer=writer, iteration_log=1, output_transform=scalar_output)
        kill_in = {int(o[5:]) for o in options if o.startswith("KILL@")}
        validate = evaluator_module.DiRAEvaluator._validate

        def killed_validation(self, engine):
            if engine.state.epoch in kill_in:
                writer.flush()  # all that was logged reaches the event file: a duplicate would show
                os.kill(os.getpid(), signal.SIGKILL)
            return validate(self, engine)

        evaluator_module.DiRAEvaluator._validate = killed_validation  # before the evaluator attaches (build)
        trainer = build(out, [tensorboard], writer)
        for option in options:
            if option.startswith("SIGTERM@"):
                kill_self_at(trainer, int(option[8:]))

        @trainer.on(Events.EPOCH_COMPLETED)
        def _(engine):
            with open(os.path.join(out, "epochs.jsonl"), "a") as f:
                f.write(json.dumps([engine.state.epoch, {k: v for k, v in engine.state.metrics.items()
                                                         if k.startswith(("val_", "train_"))}]) + "\\n")
            writer.flush()

        trainer.run()
        writer.close()
        print("STOPPED_BY", trainer.state.stopped_by, flush=True)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2:])
''')


def build(out, handlers, writer=None, save_every=0, save_every_epochs=1, max_epochs=3, early_stop_patience=None):
    """The trainer of every run here (the child's and the uninterrupted one): evaluator, checkpoint, ``handlers``."""
    from monai.data import DataLoader, Dataset

    from dira3d.engines import DiRACheckpoint, DiRAEvaluator, RandPatchPaird
    from test_engine import PATCH3, make_trainer, smooth_volumes

    val_loader = DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    checkpoint = DiRACheckpoint(Path(out) / "models", save_every_iterations=save_every, save_every_epochs=save_every_epochs,
                                summary_writer=writer, early_stop_patience=early_stop_patience)
    return make_trainer("visual_words", 3, stages=[{"name": "dis", "until_epoch": 1, "losses": ["dis"]},
                                                   {"name": "dis_res", "losses": ["dis", "res"]}],
                        max_epochs=max_epochs, volumes=4, batch=2,
                        handlers=[DiRAEvaluator("cpu", val_loader, seed=7), checkpoint, *handlers])


def run_child(tmp_path, out, *options, killed: bool) -> str:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIRA3D_TESTS": str(TESTS)}
    proc = subprocess.run([sys.executable, str(child), str(out), *options], env=env, capture_output=True, text=True,
                          timeout=300)
    expected = -signal.SIGKILL if killed else 0
    assert proc.returncode == expected, (options, proc.returncode, proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def epochs(out) -> list:
    return [json.loads(line) for line in (Path(out) / "epochs.jsonl").read_text().splitlines()]


def tensorboard_epochs(out, tag="val_loss") -> list:
    acc = EventAccumulator(str(Path(out) / "eval"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def completed_lines(caplog) -> list[int]:
    """The epochs of the trainer's ``Epoch[N] Complete`` lines (ignite's, after each epoch's end; the evaluator logs
    its own, always ``Epoch[1]``)."""
    return [int(m.group(1)) for r in caplog.records if r.name.endswith(".DiRATrainer")
            for m in [re.match(r"Epoch\[(\d+)\] Complete\. Time taken: \d\d:\d\d:\d\d\.\d{3}$", r.getMessage())] if m]


def saved(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["trainer"], ckpt["encoder"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run, in this process (the same values as a child's on CPU)."""
    from dira3d.engines.summary import LazySummaryWriter
    from monai.handlers import TensorBoardStatsHandler

    from dira3d.engines import scalar_output

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("uninterrupted")
    writer = LazySummaryWriter(log_dir=str(out / "eval"))
    trainer = build(out, [TensorBoardStatsHandler(summary_writer=writer, iteration_log=1,
                                                  output_transform=scalar_output)], writer)
    per_epoch = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append([e.state.epoch, {
        k: v for k, v in e.state.metrics.items() if k.startswith(("val_", "train_"))}]))
    trainer.run()
    writer.close()
    torch.set_num_threads(before)
    return out, per_epoch


def assert_like_uninterrupted(out, uninterrupted):
    reference, per_epoch = uninterrupted
    assert epochs(out) == per_epoch  # every epoch's val_* and train_* once, with the uninterrupted run's values
    assert tensorboard_epochs(out) == tensorboard_epochs(reference)  # each epoch's val_loss once
    assert tensorboard_epochs(out, "train_loss") == tensorboard_epochs(reference, "train_loss")
    for name in ("best.pt", "last.pt"):
        (a, wa), (b, wb) = saved(reference / "models" / name), saved(out / "models" / name)
        keys = ("best_metric", "best_epoch", "best_stage", "iteration", "epoch", "epoch_end_pending")
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, name
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.slow
def test_sigkill_in_the_validation_of_a_stop_on_an_epochs_last_step_then_resumed(tmp_path, uninterrupted):
    """SIGTERM on epoch 2's last step defers the stop to the epoch's end; a SIGKILL inside that validation (SLURM's
    grace period ran out) leaves last.pt at iteration 4 with the epoch end pending. The rerun runs epoch 2's end
    first, then trains epoch 3. (A second kill, in the rerun's run of that end: the next test.)"""
    out = tmp_path / "run"
    killed = run_child(tmp_path, out, "SIGTERM@4", "KILL@2", killed=True)
    state, _ = saved(out / "models" / "last.pt")
    assert (state["iteration"], state["epoch"], state["epoch_iteration"], state["epoch_end_pending"]) == (4, 2, 0, True)
    assert state["epoch_sums"]["count"] == 2  # the epoch's running sums: its train_* means come from them
    assert [e for e, _ in epochs(out)] == [1]
    assert re.findall(r"DiRATrainer:Epoch\[(\d+)\] Complete", killed) == ["1"]

    output = run_child(tmp_path, out, killed=False)
    assert "the end of epoch 2 (its validation and epoch end did not complete)" in output
    assert "epoch 2's end (validation, best.pt, epoch means) did not complete before the run was killed" in output
    assert_like_uninterrupted(out, uninterrupted)
    # ignite's line after each epoch's end: an uninterrupted run logs it for epochs 1, 2, 3; the killed one for 1
    assert re.findall(r"DiRATrainer:Epoch\[(\d+)\] Complete", output) == ["2", "3"], output[-3000:]


def test_a_periodic_last_pt_at_an_epochs_last_iteration_resumes_with_that_epochs_end(tmp_path, uninterrupted,
                                                                                      monkeypatch, caplog):
    """save_every_iterations writes last.pt at an epoch's last iteration too, before its validation: a kill during that
    validation (here: last.pt copied as it was then) resumes with the epoch's end, not at the next epoch. The epoch's
    end writes last.pt again without the record, also when save_every_epochs would skip that epoch. A second kill,
    during the resumed run's validation of that epoch, finds the same last.pt: it resumes the same way.

    Signals during that resumed epoch end: Ctrl-C twice stops at once, last.pt as it was (still pending); Ctrl-C once
    lets the end finish and stops right after it, as a stop deferred to an epoch's end does: last.pt at that end, no
    step of epoch 2 trained, exit 130 (it stopped after epoch 2's first step). The next resume trains epochs 2 and 3:
    together, the uninterrupted run's values and weights."""
    from dira3d.engines import StoppedBySignal, evaluator as evaluator_module, exit_if_stopped

    validate, snapshots, folder = evaluator_module.DiRAEvaluator._validate, {}, [tmp_path / "run" / "models"]
    ctrl_c = [0]  # Ctrl-Cs to send inside the next validation

    def snapshot(self, trainer):
        snapshots[folder[0].parent.name, trainer.state.epoch] = (folder[0] / "last.pt").read_bytes()
        for _ in range(ctrl_c[0]):
            os.kill(os.getpid(), signal.SIGINT)
        ctrl_c[0] = 0
        return validate(self, trainer)

    monkeypatch.setattr(evaluator_module.DiRAEvaluator, "_validate", snapshot)
    trainer = build(tmp_path / "run", [], save_every=1, save_every_epochs=2)
    after_end = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: after_end.append(
        saved(tmp_path / "run" / "models" / "last.pt")[0]["epoch_end_pending"]))
    trainer.run()
    assert after_end == [False, False, False]  # epoch 1's end wrote last.pt again (save_every_epochs 2 did not)

    killed = tmp_path / "killed" / "models"
    killed.mkdir(parents=True)
    (killed / "last.pt").write_bytes(snapshots["run", 1])  # what a SIGKILL in epoch 1's validation leaves
    folder[0] = killed
    state, _ = saved(killed / "last.pt")
    assert (state["iteration"], state["epoch"], state["epoch_end_pending"], state["epoch_sums"]["count"]) == (2, 1, True, 2)
    per_epoch = []

    def resume():
        resumed = build(tmp_path / "killed", [])
        resumed.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append([e.state.epoch, {
            k: v for k, v in e.state.metrics.items() if k.startswith(("val_", "train_"))}]))
        resumed.run()
        return resumed

    ctrl_c[0] = 2  # twice: abandoned at once, last.pt untouched (its end still pending)
    with pytest.raises(KeyboardInterrupt):
        resume()
    assert (killed / "last.pt").read_bytes() == snapshots["run", 1] and per_epoch == []
    caplog.set_level(logging.INFO)
    caplog.clear()  # the runs above logged their lines too when an earlier test of this worker set INFO
    ctrl_c[0] = 1
    stopped = resume()
    assert (stopped.state.stopped_by, stopped.state.iteration) == ("SIGINT", 2)  # no step of epoch 2
    state, _ = saved(killed / "last.pt")
    assert (state["iteration"], state["epoch"], state["epoch_iteration"], state["epoch_end_pending"]) == (2, 1, 0, False)
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_stopped(stopped)
    assert (stop.value.code, str(stop.value)) == (130, "stopped by SIGINT at iteration 2")
    assert f"stopped by SIGINT at iteration 2; {killed / 'last.pt'} saved; run the same command to resume" in caplog.text
    assert completed_lines(caplog) == []  # as after a stop deferred to an epoch's end: that end ended the run
    assert snapshots["killed", 1] == snapshots["run", 1]  # a kill in that validation again: the same last.pt
    caplog.clear()
    resume()
    reference, expected = uninterrupted
    assert per_epoch == expected  # epoch 1's end first, with its train_* means from the saved sums, then epochs 2, 3
    assert completed_lines(caplog) == [2, 3]  # epoch 1's end ran in the resume the Ctrl-C ended (no line there)
    for name in ("best.pt", "last.pt"):
        (a, wa), (b, wb) = saved(reference / "models" / name), saved(killed / name)
        assert (a["best_metric"], a["best_epoch"], a["iteration"]) == (b["best_metric"], b["best_epoch"], b["iteration"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_a_last_pt_without_the_record_resumes_at_the_next_epoch_as_before(tmp_path):
    """A last.pt written by dira3d before the record (no trainer key epoch_end_pending) resumes as it did."""
    trainer = build(tmp_path / "run", [], save_every=1)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda _: (tmp_path / "epoch1.pt").write_bytes(
        (tmp_path / "run" / "models" / "last.pt").read_bytes()))
    trainer.run()
    ckpt = torch.load(tmp_path / "epoch1.pt", weights_only=True)
    assert ckpt["trainer"].pop("epoch_end_pending") is True
    (tmp_path / "old" / "models").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "old" / "models" / "last.pt")
    resumed, seen = build(tmp_path / "old", []), []
    resumed.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.epoch))
    resumed.run()
    assert seen == [2, 3] and resumed.state.iteration == 6


def test_early_stopping_in_a_resumed_pending_epoch_end_ends_the_run_as_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                                            caplog):
    """early_stop_patience=1: the uninterrupted run's val_loss rises in epoch 4 (its best: epoch 3), so it stops after
    epoch 4 of 5. A kill during epoch 4's validation (last.pt as it was then, save_every_iterations) resumes with that
    end first, whose early stop must end the run there too: epoch 5 not trained, the same last.pt and best.pt, the
    same last lines (no ``Epoch[4] Complete``: ignite leaves it out after a stop there), no signal stop (exit 0)."""
    from dira3d.engines import evaluator as evaluator_module

    validate, snapshots = evaluator_module.DiRAEvaluator._validate, {}

    def snapshot(self, trainer):  # ckpt_dir as a SIGKILL inside this validation would leave it
        snapshots[trainer.state.epoch] = {p.name: p.read_bytes() for p in (tmp_path / "run" / "models").glob("*.pt")}
        return validate(self, trainer)

    def run(name, **options):
        trainer, per_epoch = build(tmp_path / name, [], max_epochs=5, early_stop_patience=1, **options), []
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append([e.state.epoch, {
            k: v for k, v in e.state.metrics.items() if k.startswith(("val_", "train_", "early_stop"))}]))
        caplog.clear()
        trainer.run()
        said = [r.getMessage() for r in caplog.records if r.name.endswith(".DiRATrainer")]
        return trainer, per_epoch, said, completed_lines(caplog)

    caplog.set_level(logging.INFO)
    with monkeypatch.context() as patch:
        patch.setattr(evaluator_module.DiRAEvaluator, "_validate", snapshot)
        reference, expected, said, lines = run("run", save_every=1)
    assert [e for e, _ in expected] == [1, 2, 3, 4] and reference.state.iteration == 8  # the premise: a stop at 4
    assert lines == [1, 2, 3] and reference.state.early_stopped and said[-1].startswith("training ended by early stop")

    (tmp_path / "killed" / "models").mkdir(parents=True)
    for name, data in snapshots[4].items():  # last.pt at epoch 4's last iteration, best.pt of epoch 3
        (tmp_path / "killed" / "models" / name).write_bytes(data)
    assert saved(tmp_path / "killed" / "models" / "last.pt")[0]["epoch_end_pending"] is True
    resumed, per_epoch, resumed_said, resumed_lines = run("killed")
    assert per_epoch == expected[-1:]  # epoch 4's end with the uninterrupted values, early_stop_wait 1; no epoch 5
    assert (resumed.state.iteration, resumed.state.stopped_by, resumed_lines) == (8, None, [])
    assert resumed.state.early_stopped == reference.state.early_stopped.replace(
        str(tmp_path / "run"), str(tmp_path / "killed"))
    assert resumed_said[-1] == said[-1].replace(str(tmp_path / "run"), str(tmp_path / "killed"))
    for name in ("best.pt", "last.pt"):
        (a, wa), (b, wb) = saved(tmp_path / "run" / "models" / name), saved(tmp_path / "killed" / "models" / name)
        keys = ("best_metric", "best_epoch", "best_stage", "iteration", "epoch", "epoch_iteration", "epoch_end_pending",
                "early_stop")
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, name
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
