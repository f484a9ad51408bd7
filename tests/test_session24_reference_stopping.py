"""Reference checks of the stop-signal modules (session 24 mutation audit): cases of
dira3d.evaluation.stopping (fine-tuning), dira3d.engines.stopping (SignalStop, stop_before_training) and
dira3d.utils.threads that the earlier tests left open. Each drives a tiny ignite / MONAI engine in this process and
sends the signal with ``os.kill(os.getpid(), ...)`` from one of its handlers; DDP is stood in for by a world size of 2
and an ``all_ranks_min`` that folds in the other rank's record."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from ignite.engine import Engine, Events

import dira3d.engines.stopping as engine_stopping
import dira3d.evaluation.stopping as evaluation_stopping
from dira3d.engines.stopping import SignalStop, end_stop_before_training, exit_if_stopped, stop_before_training
from dira3d.evaluation.stopping import exit_if_training_stopped, run_training
from dira3d.utils.interrupts import StoppedBySignal
from test_finetune_signal_stop import linear_fine_tuning

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEFAULTS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


def fine_tuning(tmp_path, max_epochs: int = 4):
    """A MONAI trainer and validator of a linear network as the task bundles build them: 3 steps an epoch, a
    3-step validation after each epoch that saves models/model.pt when it improves."""
    trainer, validator, _ = linear_fine_tuning(tmp_path, max_epochs)
    return trainer, validator


def stop_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning stopped")]


def two_ranks(monkeypatch) -> dict:
    """This process as rank 0 of 2; the returned record is the other rank's signal (0: none), which the joint
    decision (the largest signal number over the ranks, as one all-reduce of minus the numbers) folds in."""
    other = {"signal": 0}

    def all_ranks_min(values, device="cpu"):
        return [min(values[0], -other["signal"])]

    monkeypatch.setattr(engine_stopping, "get_world_size", lambda: 2)
    for module in (engine_stopping, evaluation_stopping):
        monkeypatch.setattr(module, "all_ranks_min", all_ranks_min)
    return other


# ---------------------------------------------------------------- evaluation/stopping.py: fine-tuning


def test_under_ddp_another_ranks_signal_in_a_training_step_stops_this_rank_after_that_step(tmp_path, monkeypatch):
    """The ranks agree after every training step: a SIGTERM that reached only the other rank during step 4 stops this
    rank (which had none) after step 4 too, as stopped by SIGTERM (the earlier tests had the other rank's signal come
    in a validation only, which the epoch-end agreement of dira3d.engines.stopping decides)."""
    other = two_ranks(monkeypatch)
    trainer, validator = fine_tuning(tmp_path)
    trainer.add_event_handler(Events.ITERATION_STARTED(once=4), lambda engine: other.update(signal=int(signal.SIGTERM)))
    run_training(trainer, validator, tmp_path / "models")
    assert (trainer.state.stopped_by, trainer.state.epoch, trainer.state.iteration) == ("SIGTERM", 2, 4)
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_training_stopped()
    assert (stop.value.code, stop.value.iteration) == (143, 4)


def test_under_ddp_the_ranks_agree_on_the_largest_signal_number(tmp_path, monkeypatch):
    """This rank's Ctrl-C (SIGINT, 2) and the other rank's SIGTERM (15) in the same step: every rank takes SIGTERM, so
    all exit with the same code."""
    other = two_ranks(monkeypatch)
    trainer, validator = fine_tuning(tmp_path)

    def both(engine):
        other["signal"] = int(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)

    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), both)
    run_training(trainer, validator, tmp_path / "models")
    assert (trainer.state.stopped_by, trainer.state.iteration) == ("SIGTERM", 2)
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_training_stopped()
    assert stop.value.code == 143


def test_a_signal_in_the_last_epochs_validation_says_that_validation_was_left_unfinished(tmp_path, caplog):
    """Cut short in the last epoch, the validation still counts as cut (it saved nothing), not as a signal that came
    after the training had ended."""
    trainer, validator = fine_tuning(tmp_path, max_epochs=2)
    validator.add_event_handler(Events.ITERATION_STARTED, lambda engine: (
        trainer.state.epoch == 2 and engine.state.iteration == 1 and os.kill(os.getpid(), signal.SIGTERM)))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert validator.state.iteration == 1
    lines = stop_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith(
        "fine-tuning stopped by SIGTERM in the validation after epoch 2 of 2, which was left unfinished; "), lines
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()


def test_a_ctrl_c_after_the_last_epochs_end_ends_the_run_as_stopped_by_sigint(tmp_path, caplog):
    """A Ctrl-C after the trainer's last EPOCH_COMPLETED handler (here in COMPLETED) is caught by the agreement after the
    run: stopped by SIGINT, exit code 130 (not SIGTERM's 143)."""
    trainer, validator = fine_tuning(tmp_path, max_epochs=2)
    trainer.add_event_handler(Events.COMPLETED, lambda engine: os.kill(os.getpid(), signal.SIGINT))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert trainer.state.stopped_by == "SIGINT"
    lines = stop_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith(
        "fine-tuning stopped by SIGINT after its last epoch (2 of 2): the training had ended; "), lines
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_training_stopped()
    assert stop.value.code == 130


def test_an_earlier_runs_model_replaced_by_this_runs_validation_is_named_as_this_runs(tmp_path, caplog):
    """The line tells this run's model.pt from an earlier run's by its modification time: an earlier model of the same
    network (the same size, an --overwrite rerun) that this run's first validation replaced is this run's."""
    trainer, validator = fine_tuning(tmp_path, max_epochs=1)
    run_training(trainer, validator, tmp_path / "models")
    model = tmp_path / "models" / "model.pt"
    hour_ago = time.time() - 3600
    os.utime(model, (hour_ago, hour_ago))  # an earlier run's, whatever the file system's time granularity
    trainer, validator = fine_tuning(tmp_path)
    trainer.add_event_handler(Events.ITERATION_STARTED(once=5), lambda engine: os.kill(os.getpid(), signal.SIGTERM))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert model.stat().st_mtime > hour_ago + 60  # replaced by this run's epoch 1
    lines = stop_lines(caplog)
    assert len(lines) == 1 and (f"; {model} holds the model of this run's best validation so far (val_mse "
                                f"{validator.state.best_metric:.4g} at epoch 1), not that of a finished run; ") in lines[0]
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()


def test_under_ddp_this_ranks_signal_during_a_validation_lets_that_validation_finish(tmp_path, monkeypatch, caplog):
    """Under DDP a validation is never cut short (the ranks' shares have no common step): a SIGTERM to this rank in
    epoch 2's validation lets it run whole (and save), and every rank stops right after epoch 2's end."""
    two_ranks(monkeypatch)
    trainer, validator = fine_tuning(tmp_path)
    validator.add_event_handler(Events.ITERATION_STARTED, lambda engine: (
        trainer.state.epoch == 2 and engine.state.iteration == 1 and os.kill(os.getpid(), signal.SIGTERM)))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert (trainer.state.stopped_by, trainer.state.epoch, trainer.state.iteration) == ("SIGTERM", 2, 6)
    assert validator.state.iteration == 3
    lines = stop_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("fine-tuning stopped by SIGTERM at the end of epoch 2 of 4 "), lines
    with pytest.raises(StoppedBySignal):
        exit_if_training_stopped()


def test_a_second_ctrl_c_after_a_validation_was_cut_short_is_ignored(tmp_path, caplog):
    """Cutting the validation short decides the stop: a second Ctrl-C in the epoch's later handlers (a scheduler, a
    logger) is ignored like any signal after a decided stop, instead of raising KeyboardInterrupt past the line."""
    trainer, validator = fine_tuning(tmp_path)
    validator.add_event_handler(Events.ITERATION_STARTED, lambda engine: (
        trainer.state.epoch == 2 and engine.state.iteration == 1 and os.kill(os.getpid(), signal.SIGINT)))
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: os.kill(os.getpid(), signal.SIGINT))
    with caplog.at_level(logging.WARNING):
        run_training(trainer, validator, tmp_path / "models")
    assert (trainer.state.stopped_by, trainer.state.epoch, validator.state.iteration) == ("SIGINT", 2, 1)
    lines = stop_lines(caplog)
    assert len(lines) == 1 and "in the validation after epoch 2 of 4, which was left unfinished" in lines[0], lines
    with pytest.raises(StoppedBySignal) as stop:
        exit_if_training_stopped()
    assert stop.value.code == 130


def test_a_whole_run_after_a_stopped_one_whose_stop_was_not_raised_exits_normally(tmp_path):
    """A notebook: a stopped run whose finalize never reached exit_if_training_stopped, then a whole run; that run's
    finalize must not raise the earlier stop (exit 143 after a finished training)."""
    trainer, validator = fine_tuning(tmp_path)
    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), lambda engine: os.kill(os.getpid(), signal.SIGTERM))
    run_training(trainer, validator, tmp_path / "models")
    assert trainer.state.stopped_by == "SIGTERM"
    trainer, validator = fine_tuning(tmp_path, max_epochs=1)
    run_training(trainer, validator, tmp_path / "models")
    assert trainer.state.stopped_by is None
    exit_if_training_stopped()  # nothing to raise


def test_the_line_of_a_run_without_a_validator_names_no_best_metric(tmp_path):
    """stop_message without a validator (run_training's validator is optional) whose model.pt changed: no metric to
    name, and no error (a validator's best epoch is -1 until a validation finished)."""
    from dira3d.evaluation.stopping import stop_message

    trainer = Engine(lambda engine, batch: None)
    trainer.state.stopped_by, trainer.state.epoch, trainer.state.max_epochs, trainer.state.iteration = "SIGTERM", 2, 4, 5
    model = tmp_path / "model.pt"
    assert stop_message(trainer, None, model, True) == (
        f"fine-tuning stopped by SIGTERM in epoch 2 of 4 (iteration 5); {model} holds the model of this run's best "
        "validation so far, not that of a finished run; fine-tuning does not resume: start it again with --overwrite "
        "True (dira3d finetune: --overwrite)")


def test_a_stop_before_training_raised_as_stoppedbysignal_is_marked_and_its_event_files_removed(tmp_path):
    """run_finetune called from Python with the default handlers: the bundle's stop_before_training turns a SIGTERM
    while the data are cached into StoppedBySignal (not the KeyboardInterrupt of `dira3d finetune`); it is marked as
    before training and this run's empty event files go as well, so that the same call runs again."""
    from dira3d.evaluation.stopping import stopped_before_training, stopped_before_training_of

    earlier = tmp_path / "events.out.tfevents.1.host"
    earlier.write_bytes(b"curves")
    with pytest.raises(StoppedBySignal) as info:
        with stopped_before_training(tmp_path):
            (tmp_path / "events.out.tfevents.2.host").write_bytes(b"")
            raise StoppedBySignal("SIGTERM", 0)
    assert stopped_before_training_of(info.value) and info.value.code == 143
    assert [p.name for p in tmp_path.iterdir()] == [earlier.name]


# ---------------------------------------------------------------- engines/stopping.py: SignalStop


def stoppable(stop: SignalStop, signals: dict | None = None) -> Engine:
    """An ignite engine whose step ``i`` sends ``signals[i]`` (a list of signal numbers) to this process, with ``stop``
    polled after each step and its epoch-end check as the last EPOCH_COMPLETED handler (as DiRATrainer attaches it)."""
    signals = signals or {}

    def step(engine, batch):
        for signum in signals.get(engine.state.iteration, ()):
            os.kill(os.getpid(), signum)

    engine = Engine(step)
    engine.add_event_handler(Events.ITERATION_COMPLETED, stop.poll)
    return engine


def run_stoppable(engine: Engine, stop: SignalStop, epochs: int = 2) -> None:
    engine.add_event_handler(Events.EPOCH_COMPLETED, stop.after_epoch_end)
    with stop.installed(engine):
        engine.run(range(3), max_epochs=epochs)


def test_a_second_sigterm_is_ignored_even_where_sigterm_had_a_python_handler():
    """The handler from before the run (here a library user's) is put back after it, and a second SIGTERM during the
    run does not call it: only a second Ctrl-C does what Ctrl-C did before."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        stop = SignalStop()
        engine = stoppable(stop, {2: [signal.SIGTERM, signal.SIGTERM]})
        run_stoppable(engine, stop)
        assert calls == [] and (engine.state.stopped_by, engine.state.iteration) == ("SIGTERM", 2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]  # the user's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_one_signalstop_runs_again_from_a_clean_record():
    """DiRATrainer keeps one SignalStop for all its runs: a run after a stopped one starts with no signal recorded
    and stopped_by None (the same engine resumed here), and exit_if_stopped then raises nothing."""
    stop = SignalStop()
    engine = stoppable(stop, {2: [signal.SIGINT]})
    run_stoppable(engine, stop)
    assert (engine.state.stopped_by, engine.state.iteration) == ("SIGINT", 2)
    with pytest.raises(StoppedBySignal) as stopped:
        exit_if_stopped(engine)
    assert (stopped.value.code, stopped.value.iteration) == (130, 2)
    with stop.installed(engine):
        engine.run(range(3), max_epochs=2)  # resumes after step 2
    assert engine.state.stopped_by is None and engine.state.epoch == 2 and engine.state.iteration > 3
    exit_if_stopped(engine)
    engine = stoppable(stop, {1: [signal.SIGTERM]})  # and a signal in a later run stops that run
    run_stoppable(engine, stop)
    assert (engine.state.stopped_by, engine.state.iteration) == ("SIGTERM", 1)


def test_a_run_after_one_with_a_stop_deferred_to_its_epoch_end_starts_with_no_deferred_stop():
    stop = SignalStop(finish_epoch=True)
    engine = stoppable(stop, {3: [signal.SIGTERM]})  # the first epoch's last step: its end runs first
    seen = []
    engine.add_event_handler(Events.STARTED, lambda e: seen.append(e.state.stop_deferred))
    run_stoppable(engine, stop)
    assert (engine.state.stopped_by, engine.state.iteration, engine.state.stop_deferred) == ("SIGTERM", 3, True)
    engine2 = stoppable(stop)
    engine2.state = engine.state  # the same trainer's state, as a resume in the same process has it
    engine2.add_event_handler(Events.STARTED, lambda e: seen.append(e.state.stop_deferred))
    with stop.installed(engine2):
        engine2.run(range(3), max_epochs=2)
    assert seen == [False, False] and engine2.state.stopped_by is None and engine2.state.iteration == 6


def test_a_signal_ignored_before_a_run_stays_ignored_after_a_run_of_the_same_signalstop():
    """A run puts back exactly the handlers it replaced: those of an earlier run of the same SignalStop are not put
    back over a SIGTERM set to be ignored since."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        stop = SignalStop()
        run_stoppable(stoppable(stop), stop, epochs=1)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_stoppable(stoppable(stop), stop, epochs=1)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_ctrl_c_during_an_epochs_end_stops_after_it_and_a_second_one_is_then_ignored():
    """SIGINT in the epoch's end (after its last step): the run stops right after that end, as stopped by SIGINT (exit
    130), and a second Ctrl-C while COMPLETED writes last.pt is ignored like any signal after a decided stop."""
    stop = SignalStop()
    engine = stoppable(stop)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: os.kill(os.getpid(), signal.SIGINT))
    done = []
    engine.add_event_handler(Events.COMPLETED, lambda e: (os.kill(os.getpid(), signal.SIGINT), done.append(True)))
    run_stoppable(engine, stop)
    assert (engine.state.stopped_by, engine.state.epoch, engine.state.iteration) == ("SIGINT", 1, 3) and done
    with pytest.raises(StoppedBySignal) as stopped:
        exit_if_stopped(engine)
    assert stopped.value.code == 130


def test_stop_without_a_signal_number_takes_this_ranks_own_record_and_a_decided_stop_stays():
    """stop(engine) without a number (an agreement that did not say which): this rank's own signal, else SIGTERM; a
    later stop() changes nothing (the first decision is the one logged and exited with)."""
    stop = SignalStop()
    stop.single_process, stop.requested = False, signal.SIGINT
    engine = Engine(lambda e, b: None)
    stop.stop(engine)
    assert engine.state.stopped_by == "SIGINT" and stop.stopping
    stop.stop(engine, signal.SIGTERM)
    assert engine.state.stopped_by == "SIGINT"


def test_under_ddp_a_second_ctrl_c_is_recorded_once_and_ignored(monkeypatch):
    """torchrun forwards the Ctrl-C it gets to workers that had it from the terminal already: under DDP a second SIGINT
    must not interrupt the rank (KeyboardInterrupt on one rank leaves the others waiting in an all-reduce)."""
    monkeypatch.setattr(engine_stopping, "get_world_size", lambda: 2)
    stop, engine, before = SignalStop(), Engine(lambda e, b: None), signal.getsignal(signal.SIGINT)
    with stop.installed(engine):
        os.kill(os.getpid(), signal.SIGINT)
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("a second SIGINT under DDP interrupted the rank")
        assert stop.requested == signal.SIGINT and not stop.single_process
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------- engines/stopping.py: stop_before_training


@pytest.fixture
def default_handlers():
    """SIGTERM and SIGINT as a fresh ``python`` has them (the conftest fixture puts the runner's back after)."""
    for signum, handler in DEFAULTS.items():
        signal.signal(signum, handler)
    yield
    end_stop_before_training()


def test_stop_before_training_in_another_thread_changes_nothing(default_handlers):
    """A bundle initialised or finalised in a worker thread (a server that trains in the background): signal.signal
    works in the main thread only, so both calls leave the handlers alone instead of failing with ValueError (the
    handlers the main thread's stop_before_training installed stay until the main thread puts them back)."""
    import threading

    stop_before_training("pretraining")
    installed = {s: signal.getsignal(s) for s in DEFAULTS}
    errors = []

    def initialise_and_finalise():
        try:
            stop_before_training("fine-tuning")
            end_stop_before_training()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=initialise_and_finalise)
    thread.start()
    thread.join()
    assert errors == [] and {s: signal.getsignal(s) for s in DEFAULTS} == installed
    end_stop_before_training()
    assert {s: signal.getsignal(s) for s in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_line_of_a_stop_before_training_names_the_last_workflow_initialised(default_handlers, caplog, signum,
                                                                                 code):
    """Two initialize steps before any training (a pretraining workflow, then a fine-tuning one): the signal then
    names the fine-tuning, exits with its own code, and puts the defaults back."""
    stop_before_training("pretraining")
    stop_before_training("fine-tuning")
    with caplog.at_level(logging.WARNING, logger="dira3d.stopping"), pytest.raises(StoppedBySignal) as stopped:
        os.kill(os.getpid(), signum)
    assert stopped.value.code == code
    lines = [r.getMessage() for r in caplog.records if "before training started" in r.getMessage()]
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"fine-tuning stopped by {name} before training started"), lines
    assert {s: signal.getsignal(s) for s in DEFAULTS} == DEFAULTS


# ---------------------------------------------------------------- utils/threads.py


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no pthread_sigmask on this platform (Windows)")
def test_only_a_pool_worker_blocks_the_stop_signals_and_says_so():
    """A ThreadPool worker blocks SIGTERM and SIGINT and returns True (twice: once per thread); any other thread
    keeps its mask and gets False."""
    import threading
    from multiprocessing.pool import ThreadPool

    from dira3d.utils.threads import block_stop_signals_in_pool_thread

    def in_worker():
        first, second = block_stop_signals_in_pool_thread(), block_stop_signals_in_pool_thread()
        return first, second, {signal.SIGTERM, signal.SIGINT} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])

    with ThreadPool(1) as pool:
        assert pool.apply(in_worker) == (True, True, True)
    seen = []

    def other():
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        seen.append((block_stop_signals_in_pool_thread(), signal.pthread_sigmask(signal.SIG_BLOCK, []) == before))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [(False, True)]


def test_a_platform_without_pthread_sigmask_blocks_nothing_and_says_so(monkeypatch):
    """Windows has no signal.pthread_sigmask: a pool worker there gets False instead of an AttributeError that would
    fail every item of the cache."""
    from multiprocessing.pool import ThreadPool

    from dira3d.utils.threads import block_stop_signals_in_pool_thread

    if hasattr(signal, "pthread_sigmask"):
        monkeypatch.delattr(signal, "pthread_sigmask")
    with ThreadPool(1) as pool:  # a new worker thread: nothing blocked in it yet
        assert pool.apply(block_stop_signals_in_pool_thread) is False


def test_finish_pool_threads_waits_at_most_the_timeout_in_all_not_per_worker(monkeypatch):
    """Two busy workers and a 10 s timeout: the second join gets what the first left of the 10 s (here nothing: the
    first took all of it), so the exit waits 10 s at most, not 10 s per worker (a pool of 8 would keep a preempted job
    8 times as long). A clock stands in for the waits: joins that never end, each advancing it by its timeout."""
    import threading
    from multiprocessing.dummy import DummyProcess
    from multiprocessing.pool import ThreadPool
    from types import SimpleNamespace

    import dira3d.utils.threads as threads

    release, now, joins = threading.Event(), [100.0], []
    pool = ThreadPool(2)
    try:
        ours = [t for t in threading.enumerate() if isinstance(t, DummyProcess)]
        for _ in range(2):
            pool.apply_async(release.wait)

        def join(self, timeout=None):
            if self in ours:
                joins.append(timeout)
                now[0] += timeout

        monkeypatch.setattr(threads, "time", SimpleNamespace(monotonic=lambda: now[0]))
        monkeypatch.setattr(DummyProcess, "join", join)
        other = threading.Thread(target=release.wait, daemon=True)  # not a pool's: neither waited for nor named
        other.start()
        still = threads.finish_pool_threads(timeout=10.0)
        assert sorted(joins, reverse=True) == [10.0] + [0.0] * (len(joins) - 1) and len(joins) >= 2
        assert set(t.name for t in ours) <= set(still) and other.name not in still
    finally:
        monkeypatch.undo()
        release.set()
        pool.terminate()
        pool.join()
