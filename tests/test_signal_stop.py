"""SIGTERM / Ctrl-C during DiRATrainer.run in-process: the run ends after the step in progress with
last.pt at that iteration, the previous signal handlers come back, a second signal is handled as
documented, and two gloo ranks that got the signal at different iterations stop at the same one
(dira3d.engines.stopping). The end-to-end runs (dira3d pretrain, torchrun) are in test_signal_stop_runs.py."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dira3d.engines import DiRACheckpoint, StoppedBySignal, exit_if_stopped
from dira3d.utils.folder_lock import FolderLock
from test_engine import make_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = [{"name": "r", "losses": ["res"]}]


def kill_self_at(trainer, iteration: int, signum=signal.SIGTERM, times: int = 1, seen=None):
    """Send ``signum`` to this process ``times`` times inside the step of ``iteration`` (the step's
    forward is wrapped: the signal arrives while the step runs, as a real one would)."""
    step = trainer._process_function

    def signalled_step(engine, batch):
        if engine.state.iteration == iteration:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        if seen is not None:
            seen.append((engine.state.iteration, signal.getsignal(signal.SIGTERM)))
        return step(engine, batch)

    trainer._process_function = signalled_step


def test_sigterm_stops_after_the_step_writes_last_pt_and_restores_the_previous_handler(tmp_path):
    calls = []

    def users_handler(signum, frame):  # a library user's own handler: it must survive the run
        calls.append(signum)

    previous_term = signal.signal(signal.SIGTERM, users_handler)
    try:
        # 8 volumes, batch 2: 4 iterations per epoch; check_every 3 (the DDP agreement; one process stops at once)
        trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, check_every=3,
                               handlers=[DiRACheckpoint(tmp_path)])
        seen = []
        kill_self_at(trainer, 2, seen=seen)
        trainer.run()
        # the user's handler was replaced while the engine ran, and is back after it
        assert seen and all(h is not users_handler for _, h in seen)
        assert signal.getsignal(signal.SIGTERM) is users_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert calls == []  # the run's handler took the signal
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    # stopped right after the step in progress, mid-epoch, with last.pt at that iteration
    assert trainer.state.iteration == 2 and trainer.state.stopped_by == "SIGTERM"
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["epoch_iteration"] == 2
    assert not (tmp_path / "best.pt").exists()  # no epoch ended: no validation, no best
    FolderLock(tmp_path).check_free()  # the lock was released (it raises while another handle holds it)
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_stopped(trainer)
    assert stop.value.code == 143 and str(stop.value) == "stopped by SIGTERM at iteration 2"
    assert isinstance(stop.value, SystemExit)


def test_a_full_run_is_not_stopped_and_exit_if_stopped_does_nothing(tmp_path):
    trainer = make_trainer(stages=RES, max_epochs=1, batch=2, volumes=4)
    trainer.run()
    assert trainer.state.iteration == 2 and trainer.state.stopped_by is None
    exit_if_stopped(trainer)  # no exception


def test_ctrl_c_stops_like_sigterm_with_exit_130_and_twice_interrupts_at_once(tmp_path):
    trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path / "a")])
    kill_self_at(trainer, 3, signal.SIGINT)
    trainer.run()
    assert trainer.state.iteration == 3 and trainer.state.stopped_by == "SIGINT"
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["trainer"]["iteration"] == 3
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_stopped(trainer)
    assert stop.value.code == 130

    # Ctrl-C twice before the step ends: stop now, as Ctrl-C did before (last.pt is not written)
    trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path / "b")])
    kill_self_at(trainer, 3, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.state.iteration == 3 and not (tmp_path / "b" / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # SIGTERM twice: the second one is ignored, the run still stops after the step and saves
    trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path / "c")])
    kill_self_at(trainer, 3, signal.SIGTERM, times=2)
    trainer.run()
    assert trainer.state.stopped_by == "SIGTERM"
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["trainer"]["iteration"] == 3


def test_a_signal_while_last_pt_is_written_does_not_interrupt_the_write(tmp_path, monkeypatch):
    """The stop's save: a second Ctrl-C (or SIGTERM) arriving in the middle of it is ignored."""
    import dira3d.utils.checkpoint as checkpoint_utils

    real_save, signals = torch.save, []

    def save_with_a_signal(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signals.append(signum)
            os.kill(os.getpid(), signum)  # the handler runs here, between two bytecodes of the save

    monkeypatch.setattr(checkpoint_utils.torch, "save", save_with_a_signal)
    trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, handlers=[DiRACheckpoint(tmp_path)])
    kill_self_at(trainer, 3)
    trainer.run()
    assert signals and trainer.state.stopped_by == "SIGTERM"
    assert torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]["iteration"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_ignored_signals_stay_ignored_and_other_threads_install_nothing(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. a job that asked to ignore SIGTERM
    try:
        trainer = make_trainer(stages=RES, max_epochs=1, batch=2, volumes=4)
        seen = []
        kill_self_at(trainer, 1, seen=seen)
        trainer.run()
        assert [h for _, h in seen] == [signal.SIG_IGN, signal.SIG_IGN]
        assert trainer.state.stopped_by is None and trainer.state.iteration == 2
    finally:
        signal.signal(signal.SIGTERM, previous)

    # signal.signal works in the main thread only: a run in another thread leaves the handlers alone
    trainer = make_trainer(stages=RES, max_epochs=1, batch=2, volumes=4)
    seen, errors = [], []
    step = trainer._process_function
    trainer._process_function = lambda engine, batch: (seen.append(signal.getsignal(signal.SIGTERM)), step(engine, batch))[1]

    def run():
        try:
            trainer.run()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == [] and seen == [signal.SIG_DFL, signal.SIG_DFL] and trainer.state.stopped_by is None


def _rank(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # 8 volumes, batch 2 on each rank (4 iterations per epoch); the ranks agree every 3 iterations
        trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, check_every=3)
        if rank == 1:  # only rank 1 gets the signal, at iteration 1: both ranks stop at iteration 3
            kill_self_at(trainer, 1)
        trainer.run()
        torch.save({"iteration": trainer.state.iteration, "stopped_by": trainer.state.stopped_by}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_stop_at_the_same_iteration_when_one_got_the_signal(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in (0, 1)]
    assert results == [{"iteration": 3, "stopped_by": "SIGTERM"}] * 2, results


def test_the_commands_print_one_line_and_exit_with_the_signals_code(tmp_path, monkeypatch, capsys):
    """dira3d pretrain and dira3d experiment (which pretrains in-process) catch StoppedBySignal, which
    the bundle's finalize raises after a stop, as they catch Ctrl-C: one line, no traceback, 143 / 130."""
    from dira3d.engines.command import main as pretrain
    from dira3d.evaluation import experiment
    from dira3d.utils import overrides

    def stopped(*args, **kwargs):
        raise StoppedBySignal("SIGTERM", 6)

    monkeypatch.setattr(overrides, "run_bundle", stopped)
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text('{"training": []}')
    (tmp_path / "run" / "models").mkdir(parents=True)
    last = tmp_path / "run" / "models" / "last.pt"
    last.write_bytes(b"")
    assert pretrain(["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--tiny"]) == 143
    assert capsys.readouterr().err.strip() == (
        f"dira3d pretrain: stopped by SIGTERM at iteration 6; {last} saved; rerun the same command to resume from it")

    monkeypatch.setattr(experiment, "load_config", lambda path: {"output_dir": str(tmp_path / "grid")})
    monkeypatch.setattr(experiment, "run_experiment", lambda config: (_ for _ in ()).throw(StoppedBySignal("SIGINT", 2)))
    assert experiment.main(["--config", "grid.yaml"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("dira3d experiment: interrupted; the finished runs are in") and "\n" not in err, err
