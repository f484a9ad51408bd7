"""SIGTERM / Ctrl-C to a fine-tuning run (dira3d.evaluation.stopping): a task bundle's train.json under
`python -m monai.bundle run` and under a 2-rank gloo `torchrun` died at once without a word (exit -15; Ctrl-C
printed MONAI's traceback). It now stops after the training step in progress (a validation in progress is left
unfinished and saves nothing), logs one line naming the signal, the epoch and what model.pt holds, releases
ckpt_dir and exits 143 / 130; `dira3d finetune` writes no metrics.json for it."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import MeanSquaredError
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler, from_engine

from dira3d.evaluation import BestModelSaver
from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D
from dira3d.evaluation.stopping import exit_if_training_stopped, run_training
from dira3d.utils.folder_lock import FolderLock
from dira3d.utils.interrupts import StoppedBySignal
from test_distributed import free_port
from test_signal_stop_runs import run_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = "bundles/luna16_nodule_fpr/configs"

# Wraps `python -m monai.bundle`: prints "STEP <rank> <iteration>" as each training step starts (pausing at
# STEP_PAUSE_AT, so that the test's signal arrives inside that step) and "EXIT <rank> <code> <iteration>" at the end.
RUNNER = textwrap.dedent('''
    import os, runpy, sys, time
    from monai.engines import SupervisedTrainer

    RANK, PAUSE_AT = os.environ.get("RANK", "0"), int(os.environ.get("STEP_PAUSE_AT", "0"))

    def say(*words):  # one write: the ranks share torchrun's stdout
        os.write(1, (" ".join(str(w) for w in words) + "\\n").encode())

    step = SupervisedTrainer._iteration

    def announced_step(self, engine, batch):
        say("STEP", RANK, engine.state.iteration)
        if engine.state.iteration == PAUSE_AT:
            time.sleep(1.0)
        return step(self, engine, batch)

    SupervisedTrainer._iteration = announced_step
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    try:
        runpy.run_module("monai.bundle", run_name="__main__")
    except SystemExit as stop:
        say("EXIT", RANK, stop.code, getattr(stop, "iteration", None))
        raise
    say("EXIT", RANK, 0, None)
''')


def _datalist(tmp_path: Path) -> Path:
    from test_bundles_finetune import make_classification

    return make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)


def _bundle_args(repo_root: Path, datalist: Path, out: Path, configs: list[str]) -> list[str]:
    return ["run", "--config_file", "[" + ",".join(f"'{CONFIGS}/{c}'" for c in configs) + "]",
            "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
            "--bundle_root", f"{repo_root}/bundles/luna16_nodule_fpr", "--datalist", str(datalist),
            "--output_dir", str(out), "--ckpt_dir", str(out / "models"), "--max_epochs", "40"]


def _assert_whole_model_and_free_folder(out: Path) -> None:
    model = out / "models" / "model.pt"
    assert any(k.startswith("encoder.") for k in torch.load(model, weights_only=True))  # whole, loadable
    assert not list((out / "models").glob(".model.pt.*"))  # no temporary file of a write cut short
    FolderLock(out / "models").acquire().release()  # finalize released ckpt_dir


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_bundle_run_stopped_by_a_signal_logs_one_line_and_exits_with_its_code(tmp_path, repo_root, signum, code):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "run"
    cmd = [sys.executable, str(runner), *_bundle_args(repo_root, _datalist(tmp_path), out, ["train.json", "tiny.json"])]
    # 7 steps an epoch: step 10 is in epoch 2, after the first validation saved model.pt
    returncode, output = run_until(cmd, repo_root, {"STEP_PAUSE_AT": "10"}, [("STEP 0 10", signum)])
    assert returncode == code, output[-3000:]
    assert "STEP 0 11" not in output and f"EXIT 0 {code} 10" in output, output[-3000:]
    name = signal.Signals(signum).name
    lines = re.findall(r"WARNING - (fine-tuning stopped by .*)", output)
    expected = (f"fine-tuning stopped by {name} in epoch 2 of 40 (iteration 10); {out / 'models' / 'model.pt'} holds "
                r"the model of this run's best validation so far (val_auc VALUE at epoch 1), not that of a finished run; "
                "fine-tuning does not resume: start it again with --overwrite True (dira3d finetune: --overwrite)")
    assert len(lines) == 1 and re.fullmatch(re.escape(expected).replace("VALUE", r"[0-9.]+"), lines[0]), output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    _assert_whole_model_and_free_folder(out)


def test_torchrun_two_gloo_ranks_stopped_by_sigterm_stop_at_the_same_step_and_log_once(tmp_path, repo_root):
    """torchrun passes the SIGTERM on to both workers; they agree after the step in progress (rank 1 waits for
    rank 0 in that step's gradient all-reduce), rank 0 logs the line, both exit 143."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(runner), *_bundle_args(repo_root, _datalist(tmp_path), out,
                                      ["train.json", "tiny.json", "multi_gpu_train.json"])]
    # 4 steps an epoch on each rank: step 6 is in epoch 2
    returncode, output = run_until(cmd, repo_root, {"STEP_PAUSE_AT": "6"}, [("STEP 0 6", signal.SIGTERM)])
    assert returncode != 0, output[-3000:]  # torchrun reports its workers' exit
    exits = sorted(re.findall(r"^EXIT (\d) (\S+) (\S+)$", output, flags=re.M))
    assert exits == [("0", "143", "6"), ("1", "143", "6")], output[-3000:]
    assert "STEP 0 7" not in output and "STEP 1 7" not in output
    lines = re.findall(r"WARNING - (fine-tuning stopped by .*)", output)
    assert len(lines) == 1 and lines[0].startswith("fine-tuning stopped by SIGTERM in epoch 2 of 40 (iteration 6); "), \
        output[-3000:]
    assert "Engine run is terminating due to exception" not in output, output[-3000:]
    _assert_whole_model_and_free_folder(out)


# in-process: a MONAI trainer and validator of a linear network, as the bundles build them


def linear_fine_tuning(tmp_path: Path, max_epochs: int = 4, val_handlers: tuple = ()):
    torch.manual_seed(0)
    network = torch.nn.Linear(4, 1)
    data = [{"image": torch.rand(4), "label": torch.rand(1)} for _ in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    saver = BestModelSaver(network, tmp_path / "models" / "model.pt", "val_mse")
    validator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network,
                                    key_val_metric={"val_mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
                                    val_handlers=[saver, *val_handlers])
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader,
                                network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
                                loss_function=torch.nn.MSELoss(),
                                train_handlers=[ValidationHandler(validator=validator, interval=1, epoch_level=True)])
    validations = []
    validator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: validations.append(trainer.state.epoch))
    return trainer, validator, validations


def test_a_signal_during_a_validation_leaves_it_unfinished_and_saves_nothing(tmp_path, caplog):
    trainer, validator, validations = linear_fine_tuning(tmp_path)
    model = tmp_path / "models" / "model.pt"
    saved = {}

    def signal_in_validation(engine):
        if trainer.state.epoch == 2 and engine.state.iteration == 1:  # the first of the 3 validation steps
            saved["before"] = model.stat().st_mtime_ns
            os.kill(os.getpid(), signal.SIGTERM)

    validator.add_event_handler(Events.ITERATION_STARTED, signal_in_validation)
    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert trainer.state.stopped_by == "SIGTERM" and trainer.state.epoch == 2 and trainer.state.iteration == 6
    assert validator.state.iteration == 1  # the validation stopped after its step in progress
    assert validations == [1]  # epoch 2's validation computed no metric: nothing saved, nothing counted
    assert model.stat().st_mtime_ns == saved["before"]
    assert signal.getsignal(signal.SIGTERM) is previous
    message = [r.getMessage() for r in caplog.records if "fine-tuning stopped" in r.getMessage()]
    assert message == [f"fine-tuning stopped by SIGTERM in the validation after epoch 2 of 4, which was left unfinished; "
                       f"{model} holds the model of this run's best validation so far (val_mse "
                       f"{validator.state.best_metric:.4g} at epoch 1), not that of a finished run; fine-tuning does not "
                       "resume: start it again with --overwrite True (dira3d finetune: --overwrite)"]
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_training_stopped()
    assert stop.value.code == 143 and stop.value.iteration == 6
    exit_if_training_stopped()  # raised once: a later workflow's finalize in this process goes on


def test_the_progress_bar_of_a_validation_cut_short_is_closed(tmp_path):
    """The validation's bar (the bundles' ClosingProgressBar) stayed open when a signal cut the validation short (ignite
    closes it at EPOCH_COMPLETED, which a terminated run does not fire): the stop line was written after it."""
    import io

    from dira3d.evaluation import ClosingProgressBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = ClosingProgressBar(desc="validation", persist=False, file=terminal)
    trainer, validator, validations = linear_fine_tuning(tmp_path, val_handlers=(bar,))

    def signal_in_validation(engine):
        if trainer.state.epoch == 2 and engine.state.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    validator.add_event_handler(Events.ITERATION_STARTED, signal_in_validation)
    run_training(trainer, validator, tmp_path / "models")
    assert trainer.state.stopped_by == "SIGTERM" and validator.state.iteration == 1
    assert bar.pbar is None and terminal.getvalue().endswith("\r")  # closed: the line cleared (persist False)
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()


def test_a_signal_after_the_last_validation_still_ends_the_run_as_stopped(tmp_path, caplog):
    """A signal after the last check (here in the last epoch's end, after its validation) must not be lost:
    `dira3d finetune` would go on to the test evaluation and write metrics.json."""
    trainer, validator, _ = linear_fine_tuning(tmp_path, max_epochs=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: os.kill(os.getpid(), signal.SIGTERM))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert trainer.state.stopped_by == "SIGTERM"
    assert "fine-tuning stopped by SIGTERM after its last epoch (2 of 2): the training had ended; " in caplog.text
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()


def test_a_signal_after_a_validations_last_step_stops_right_after_that_epochs_end(tmp_path, caplog):
    """A signal in epoch 2's end after its validation's steps (here as model.pt is saved) stopped the run only after
    epoch 3's first step (iteration 7): it now stops right after epoch 2's end, its validation whole."""
    trainer, validator, validations = linear_fine_tuning(tmp_path)
    validator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: trainer.state.epoch == 2 and os.kill(
        os.getpid(), signal.SIGTERM))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert (trainer.state.stopped_by, trainer.state.epoch, trainer.state.iteration) == ("SIGTERM", 2, 6)
    assert validations == [1, 2] and validator.state.iteration == 3
    assert "fine-tuning stopped by SIGTERM at the end of epoch 2 of 4 (iteration 6); " in caplog.text
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()


def test_under_ddp_a_signal_during_a_validation_stops_all_ranks_right_after_that_epochs_end(tmp_path, monkeypatch):
    """Two ranks (their agreement stood in for: this process is rank 0, the other rank's SIGTERM comes in epoch 2's
    validation): the validation runs whole on every rank and the ranks agree at the epoch's end, which the run stops
    right after (one all-reduce per epoch); it stopped after epoch 3's first step."""
    import dira3d.engines.stopping as engine_stopping
    import dira3d.evaluation.stopping as evaluation_stopping

    other = {"signal": 0}  # the other rank's record

    def all_ranks_min(values, device):  # the joint decision of the two ranks: the largest signal number
        return [min(values[0], -other["signal"])]

    monkeypatch.setattr(engine_stopping, "get_world_size", lambda: 2)
    for module in (engine_stopping, evaluation_stopping):
        monkeypatch.setattr(module, "all_ranks_min", all_ranks_min)
    trainer, validator, validations = linear_fine_tuning(tmp_path)
    validator.add_event_handler(Events.ITERATION_STARTED, lambda engine: trainer.state.epoch == 2 and other.update(
        signal=int(signal.SIGTERM)))
    run_training(trainer, validator, tmp_path / "models")
    assert (trainer.state.stopped_by, trainer.state.epoch, trainer.state.iteration) == ("SIGTERM", 2, 6)
    assert validations == [1, 2] and validator.state.iteration == 3  # whole: the ranks' validations have no common step
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()


def test_a_whole_run_is_not_stopped_and_leaves_no_handler_behind(tmp_path, caplog):
    trainer, validator, validations = linear_fine_tuning(tmp_path, max_epochs=2)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    handlers = (len(trainer._event_handlers[Events.ITERATION_COMPLETED]),
                len(trainer._event_handlers[Events.EPOCH_COMPLETED]),
                len(validator._event_handlers[Events.ITERATION_COMPLETED]))
    run_training(trainer, validator, tmp_path / "models")
    assert trainer.state.stopped_by is None and validations == [1, 2] and "fine-tuning stopped" not in caplog.text
    exit_if_training_stopped()  # no-op
    assert {s: signal.getsignal(s) for s in previous} == previous
    assert (len(trainer._event_handlers[Events.ITERATION_COMPLETED]),
            len(trainer._event_handlers[Events.EPOCH_COMPLETED]),
            len(validator._event_handlers[Events.ITERATION_COMPLETED])) == handlers


def test_no_validation_yet_says_so_and_an_earlier_model_is_named_as_such(tmp_path, caplog):
    trainer, validator, _ = linear_fine_tuning(tmp_path)
    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda engine: os.kill(os.getpid(), signal.SIGTERM))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert "in epoch 1 of 4 (iteration 2); no validation finished, so no model.pt was written;" in caplog.text
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"an earlier run's model")
    caplog.clear()
    trainer, validator, _ = linear_fine_tuning(tmp_path)
    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda engine: os.kill(os.getpid(), signal.SIGTERM))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert f"no validation of this run finished: {model} is an earlier run's;" in caplog.text


def test_dira3d_finetune_stopped_by_sigterm_writes_no_metrics_and_says_so(tmp_path, monkeypatch, capsys, caplog):
    import dira3d.evaluation as evaluation
    from dira3d.evaluation.finetune import main

    def run_and_signal(trainer, validator=None, ckpt_dir=None):
        trainer.add_event_handler(Events.ITERATION_STARTED(once=3), lambda engine: os.kill(os.getpid(), signal.SIGTERM))
        return run_training(trainer, validator, ckpt_dir)

    monkeypatch.setattr(evaluation, "run_training", run_and_signal)  # what train.json's run calls
    out = tmp_path / "ft"
    with caplog.at_level(logging.WARNING):
        code = main(["--bundle", "luna16_nodule_fpr", "--datalist", str(_datalist(tmp_path)), "--tiny",
                     "--output-dir", str(out)])
    assert code == 143
    assert "fine-tuning stopped by SIGTERM in epoch 1 of 3 (iteration 3); no validation finished" in caplog.text
    err = capsys.readouterr().err
    assert (f"dira3d finetune: stopped by SIGTERM; {out} holds an unfinished run (no test metrics); rerun with "
            "--overwrite to start it again") in err
    assert not (out / "metrics.json").exists()
    FolderLock(out / "models").acquire().release()


@pytest.mark.parametrize("bundle", BUNDLES + BUNDLES_2D)
def test_every_task_bundle_runs_its_trainer_stoppably(bundle, repo_root):
    configs = repo_root / "bundles" / bundle / "configs"
    run = "$dira3d.evaluation.run_training(@train#trainer, @validate#evaluator, @ckpt_dir)"
    for name in ("train.json", "multi_gpu_train.json"):
        config = json.loads((configs / name).read_text(encoding="ascii"))
        assert config["run"][-1] == run and config["finalize"][-1] == "$dira3d.evaluation.exit_if_training_stopped()"
        assert not any("trainer.run()" in step for step in config["run"]), name
        # finalize names no engine: it would build the trainer (and cache the training data) in a workflow that never
        # ran it (initialize then finalize; train.json + evaluate.json, which keeps train.json's finalize)
        assert not any("@train#" in step or "@validate#" in step for step in config["finalize"]), name
