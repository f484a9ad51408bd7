"""SIGTERM / Ctrl-C during DiRATrainer.run in-process: the run ends after the step in progress with
last.pt at that iteration, the previous signal handlers come back, a second signal is handled as
documented, and two gloo ranks that got the signal at different iterations stop at the same one
(dira3d.engines.stopping). The end-to-end runs (dira3d pretrain, torchrun) are in test_signal_stop_runs.py."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Events

from conftest import leaving_the_group
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
    real_save, signals = torch.save, []

    def save_with_a_signal(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signals.append(signum)
            os.kill(os.getpid(), signum)  # the handler runs here, between two bytecodes of the save

    monkeypatch.setattr(torch, "save", save_with_a_signal)  # the torch that dira3d.utils.checkpoint.atomic_save imports
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
    with leaving_the_group():
        # 8 volumes, batch 2 on each rank (4 iterations per epoch); the ranks agree every 3 iterations
        trainer = make_trainer(stages=RES, max_epochs=2, batch=2, volumes=8, check_every=3)
        if rank == 1:  # only rank 1 gets the signal, at iteration 1: both ranks stop at iteration 3
            kill_self_at(trainer, 1)
        trainer.run()
        torch.save({"iteration": trainer.state.iteration, "stopped_by": trainer.state.stopped_by}, f"{out}.{rank}")


def test_two_ranks_stop_at_the_same_iteration_when_one_got_the_signal(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in (0, 1)]
    assert results == [{"iteration": 3, "stopped_by": "SIGTERM"}] * 2, results


ADV = [{"name": "d", "losses": ["dis", "res", "adv"]}]  # every output: loss, the three terms, loss_d, d_real, d_fake


def epoch_means(trainer, into: dict) -> None:
    """Record the trainer's ``train_*`` epoch means (what TensorBoard and the log get) by epoch."""
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: into.setdefault(e.state.epoch, {
        k: v for k, v in e.state.metrics.items() if k.startswith("train_")}))


def test_a_run_stopped_mid_epoch_and_resumed_has_the_epoch_means_of_an_uninterrupted_run(tmp_path, caplog):
    """The running sums travel in last.pt: stopped at iteration 1 and 4 (first step of each 3-step epoch) and
    resumed, both epochs' means are those of the uninterrupted run, bit for bit (same sums in the same order;
    they covered only the iterations after the resume). An
    old-format last.pt (no sums) still resumes, with a note that the epoch's means cover the rest only."""
    def trainer(ckpt_dir=None, into=None, **kw):
        handlers = [DiRACheckpoint(ckpt_dir)] if ckpt_dir else None
        t = make_trainer(stages=ADV, max_epochs=2, batch=2, volumes=6, handlers=handlers, **kw)  # 3 iterations/epoch
        epoch_means(t, into)
        return t

    full, steps = {}, []
    whole = trainer(into=full)
    whole.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(
        {k: v.detach().clone() for k, v in e.state.output.items() if isinstance(v, torch.Tensor)}))
    whole.run()
    assert len(full[1]) == 7 and len(steps) == 6

    caplog.set_level(logging.INFO)
    resumed, saved = {}, []
    for stop_at in (1, 4, None):
        run = trainer(tmp_path / "a", resumed)
        if stop_at:
            kill_self_at(run, stop_at, signal.SIGINT)
        run.run()
        assert run.state.stopped_by == ("SIGINT" if stop_at else None)
        saved.append(torch.load(tmp_path / "a" / "last.pt", weights_only=True)["trainer"])  # tensors, plain containers
    assert resumed == full  # exactly: the same float32 sums, added in the same order
    assert [(t["iteration"], t["epoch_sums"]["count"]) for t in saved] == [(1, 1), (4, 1), (6, 0)]
    assert set(saved[0]["epoch_sums"]["sums"]) == {k[len("train_"):] for k in full[1]}
    log = caplog.text
    assert f"resumed from {tmp_path / 'a' / 'last.pt'} at iteration 1, mid-epoch (epoch 1: 1 of its 3 iterations done)" in log
    assert "at iteration 4, mid-epoch (epoch 2: 1 of its 3 iterations done), stage 'd'" in log
    assert "train_* means will cover only" not in log

    # an old last.pt, without the sums: it resumes as before, with one line saying what the means cover
    run = trainer(tmp_path / "b", {})
    kill_self_at(run, 1, signal.SIGINT)
    run.run()
    old = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    del old["trainer"]["epoch_sums"]
    torch.save(old, tmp_path / "b" / "last.pt")
    caplog.clear()
    partial = {}
    run = trainer(tmp_path / "b", partial)
    run.run()
    assert run.state.iteration == 6 and partial[2] == full[2]
    after = {k: float(steps[1][k] + steps[2][k]) / 2 for k in steps[1]}  # iterations 2 and 3 only
    assert partial[1] == {f"train_{k}": v for k, v in after.items()} != full[1]
    notes = [r.getMessage() for r in caplog.records if "train_* means" in r.getMessage()]
    assert notes == [f"epoch 1's train_* means will cover only its iterations after the resume: "
                     f"{tmp_path / 'b' / 'last.pt'} holds no running loss sums (written by an older dira3d)"], notes
    # sums of another number of processes are not put back; sums of part of the iterations are, with a note
    assert run.restore_epoch_sums({"count": 1, "sums": {"loss": torch.ones(2)}}, 1) == (
        "was written by a run of 2 processes and this one has 1")
    assert run._epoch_sums == {} and run._epoch_count == 0
    assert run.restore_epoch_sums({"count": 1, "sums": {"loss": torch.ones(1)}}, 2) == (
        "holds sums of only the last 1 of the 2 iterations before it")
    assert run._epoch_count == 1 and float(run._epoch_sums["loss"]) == 1.0


def test_a_resume_in_the_first_epoch_of_a_stage_names_that_stage(tmp_path, caplog):
    """Stopped at the first step of epoch 2, where stage 'b' begins, the resume said "stage 'a'" (the stage of
    the completed epochs) and then announced "stage 'b' from iteration 5", as if the stage began there."""
    stages = [{"name": "a", "until_epoch": 1, "losses": ["dis"]}, {"name": "b", "losses": ["dis", "res"]}]
    caplog.set_level(logging.INFO)
    for stop_at in (4, None):  # 6 volumes, batch 2: 3 iterations per epoch; iteration 4 is epoch 2's first
        run = make_trainer(stages=stages, max_epochs=2, batch=2, volumes=6, handlers=[DiRACheckpoint(tmp_path)])
        if stop_at:
            kill_self_at(run, stop_at, signal.SIGINT)
        run.run()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]["iteration"] == 6
    log = caplog.text
    assert "resumed from" in log and "at iteration 4, mid-epoch (epoch 2: 1 of its 3 iterations done), stage 'b'" in log
    assert "stage 'b' from iteration 4" in log and "stage 'b' from iteration 5" not in log


def _validation(snapshot_of=None, into=None, signal_in=False):
    """A DiRAEvaluator on 2 volumes; ``snapshot_of``: a last.pt whose bytes go to ``into`` as each validation starts
    (what a SIGKILL during that validation would leave); ``signal_in``: a SIGTERM to this process inside each one."""
    from monai.data import DataLoader, Dataset

    from dira3d.engines import DiRAEvaluator, RandPatchPaird
    from test_engine import PATCH3, smooth_volumes

    evaluator = DiRAEvaluator("cpu", DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3)),
                                                batch_size=2), seed=7)
    if snapshot_of is not None or signal_in:
        validate = evaluator._validate

        def snapshot(trainer):
            if snapshot_of is not None:
                into.append(open(snapshot_of, "rb").read())
            if signal_in:
                os.kill(os.getpid(), signal.SIGTERM)
            return validate(trainer)

        evaluator._validate = snapshot  # before it attaches
    return evaluator


def epoch_values(trainer, into: dict) -> None:
    """Record the trainer's ``train_*`` and ``val_*`` epoch values by epoch."""
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: into.setdefault(e.state.epoch, {
        k: v for k, v in e.state.metrics.items() if k.startswith(("train_", "val_"))}))


def _means_rank(rank: int, init_file: str, ckpt_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        full, resumed, stops, validated = {}, {}, [], {}
        # 8 volumes, batch 2 on each rank: 4 iterations per epoch; the ranks agree every 3 iterations
        whole = make_trainer(stages=ADV, max_epochs=2, batch=2, volumes=8, check_every=3, handlers=[_validation()])
        epoch_means(whole, full)
        epoch_values(whole, validated)
        whole.run()
        for stop in (True, False):
            run = make_trainer(stages=ADV, max_epochs=2, batch=2, volumes=8, check_every=3,
                               handlers=[DiRACheckpoint(ckpt_dir)])
            epoch_means(run, resumed)
            if stop and rank == 1:  # both ranks stop at iteration 3, mid-epoch
                kill_self_at(run, 1)
            run.run()
            stops.append((run.state.iteration, run.state.stopped_by))
            dist.barrier()  # rank 0 has written last.pt before any rank reads it
        # with a validation, agreeing every 2 iterations: a signal to rank 1 in step 3 stops both ranks on epoch 1's
        # last step, so both run its end first (SignalStop finish_epoch); last.pt as a SIGKILL during that validation
        # leaves it (its epoch end pending) then resumes on both ranks with that end first; a SIGTERM to rank 1 inside
        # that end's validation stops both ranks right after it (no step of epoch 2); the last resume trains epoch 2
        last, snapshots, ended, after_signal = os.path.join(ckpt_dir + "_end", "last.pt"), [], [{}, {}, {}], None
        for phase, values in zip(("stop", "signal", "resume"), ended):
            run = make_trainer(stages=ADV, max_epochs=2, batch=2, volumes=8, check_every=2,
                               handlers=[_validation(last if phase == "stop" and rank == 0 else None, snapshots,
                                                     signal_in=phase == "signal" and rank == 1),
                                         DiRACheckpoint(ckpt_dir + "_end")])
            epoch_values(run, values)
            if phase == "stop" and rank == 1:
                kill_self_at(run, 3)
            run.run()
            stops.append((run.state.iteration, run.state.stopped_by))
            dist.barrier()
            if phase == "stop" and rank == 0:
                with open(last, "wb") as f:  # the last.pt written before epoch 1's validation
                    f.write(snapshots[0])
            if phase == "signal":
                state = torch.load(last, weights_only=True)["trainer"]
                after_signal = (state["iteration"], state["epoch_iteration"], state["epoch_end_pending"])
            dist.barrier()
        # a SIGTERM to rank 1 in epoch 1's validation of an ordinary run (its last step done, the ranks agreeing every
        # 3 iterations): both stop right after epoch 1's end (one all-reduce there), not at the next agreement (6)
        run = make_trainer(stages=ADV, max_epochs=2, batch=2, volumes=8, check_every=3,
                           handlers=[_validation(signal_in=rank == 1), DiRACheckpoint(ckpt_dir + "_val")])
        run.run()
        stops.append((run.state.iteration, run.state.stopped_by))
        dist.barrier()
        state = torch.load(os.path.join(ckpt_dir + "_val", "last.pt"), weights_only=True)["trainer"]
        after_validation = (state["iteration"], state["epoch_iteration"], state["epoch_end_pending"],
                            state["best_epoch"])
        torch.save({"full": full, "resumed": resumed, "stops": stops, "validated": validated, "ended": ended,
                    "after_signal": after_signal, "after_validation": after_validation}, f"{out}.{rank}")


def test_two_ranks_resumed_mid_epoch_keep_each_ranks_own_epoch_means(tmp_path):
    """The means are per rank (each rank averages its own outputs; rank 0's are logged) and rank 0 alone
    writes last.pt: it holds every rank's sums, and each rank resumes its own. Then a stop that the ranks agree on
    at an epoch's last step: both run that epoch's end (validation) before stopping, and a resume from the last.pt
    written before that validation (a SIGKILL during it) runs it first on both ranks (dira3d.engines.epoch_end). A
    SIGTERM to one rank during that resumed end stops both right after it, last.pt at that end (it stopped 2 steps
    into epoch 2, at the next agreement); the next resume trains epoch 2. A SIGTERM to one rank during an ordinary
    epoch end's validation stops both right after that end too."""
    mp.spawn(_means_rank, args=(str(tmp_path / "init"), str(tmp_path / "models"), str(tmp_path / "rank")), nprocs=2,
             join=True)
    results = [torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in (0, 1)]
    for r in results:
        assert r["stops"] == [(3, "SIGTERM"), (8, None), (4, "SIGTERM"), (4, "SIGTERM"), (8, None), (4, "SIGTERM")]
        assert r["after_validation"] == (4, 0, False, 1)  # last.pt at epoch 1's end, validated (best.pt: epoch 1)
        assert sorted(r["full"]) == [1, 2] and r["resumed"] == r["full"]
        # every rank ran epoch 1's end in the stopped run and again in the resume (its last.pt said it was pending),
        # which the signal stopped right after that end: the last resume trained epoch 2 alone
        assert sorted(r["validated"]) == [1, 2] and "val_loss" in r["validated"][1]
        assert [sorted(e) for e in r["ended"]] == [[1], [1], [2]]
    assert results[0]["after_signal"] == (4, 0, False)  # last.pt at epoch 1's end, which ran: no longer pending
    # rank 0's values (logged, and best.pt's) equal; rank 1 resumes with rank 0's BatchNorm running statistics (last.pt
    # is rank 0's), so its validation values after a resume differ a little: its train_* means must not
    first, second = ({e: results[0]["validated"][e]} for e in (1, 2))
    assert results[0]["ended"] == [first, first, second]
    train = [{e: {k: v for k, v in m.items() if k.startswith("train_")} for e, m in run.items()}
             for run in (*results[1]["ended"], results[1]["validated"])]
    assert train[:3] == [{1: train[3][1]}, {1: train[3][1]}, {2: train[3][2]}]
    assert results[0]["full"][1] != results[1]["full"][1]  # the ranks' means differ: each kept its own
    ckpt = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 8 and ckpt["trainer"]["epoch_sums"]["count"] == 0
    ended = torch.load(tmp_path / "models_end" / "last.pt", weights_only=True)["trainer"]
    assert (ended["iteration"], ended["epoch_end_pending"]) == (8, False)


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

    # main reads the config (read_config), checks the lock, then the bundle (check_config_bundle)
    monkeypatch.setattr(experiment, "read_config", lambda path: {"output_dir": str(tmp_path / "grid")})
    monkeypatch.setattr(experiment, "check_config_bundle", lambda config, path: config)
    monkeypatch.setattr(experiment, "run_experiment", lambda config: (_ for _ in ()).throw(StoppedBySignal("SIGINT", 2)))
    assert experiment.main(["--config", "grid.yaml"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("dira3d experiment: interrupted; the finished runs are in") and "\n" not in err, err
