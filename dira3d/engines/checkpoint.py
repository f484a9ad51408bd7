"""DiRA pretraining checkpoints: plain state_dicts (``weights_only``-loadable), resume and best.

Format (docs/architecture.md, "Checkpoint format")::

    {"encoder", "decoder", "dis_head", "predictor", "adversary",          # state_dicts ({} if absent)
     "momentum_encoder", "momentum_head", "queue",                         # MoCo only
     "optimizer_g", "optimizer_d", "scaler_g", "scaler_d",
     "trainer": {"epoch", "iteration", "epoch_iteration", "epoch_length", "stage", "best_metric", "best_epoch", "best_stage",
                 "stages", "loss_weights",   # the schedule and λs trained with (engines.stages.check_resume_stages)
                 "epoch_sums": {"count", "sums": {key: one value per rank}},  # running sums of the epoch's outputs
                 "nonfinite_skipped",                                  # steps on_nonfinite='skip' dropped so far
                 "validation",                                         # False: the run (since its last resume) ran without validation
                 "epoch_end_pending",     # True: written at an epoch's last iteration before its end (engines.epoch_end)
                 "early_stop"},       # with early_stop_patience: {"counter", "best_score", "best_epoch", "stage",
                                      #   "stopped_epoch", "patience", "metric"} (engines.stopping.FinalStageEarlyStop)
     "schedulers": {name: state_dict},                                     # learning-rate schedulers
     "rng": {"torch", "cuda", "python", "numpy"},                          # tensors / lists only
     "meta": {"spatial_dims", "in_channels", "dis_mode", "dira3d_version", ...}}  # the bundle's checkpoint_meta,
                                                                           # num_classes, data_source, data_sha256 (engines.finished)

Hand the encoder (classification) or encoder + decoder (segmentation) to a task network with
``dira3d.networks.load_pretrained(net, "models/best.pt", parts=("encoder", "decoder"))``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

import dira3d
from dira3d.engines.batches import epoch_length_note, resume_position, saved_epoch_length
from dira3d.engines.checkpoint_folder import CHECKPOINT_FOLDER, check_checkpoint_folder_free  # defined here before
from dira3d.engines.distributed import is_main_process
from dira3d.engines.epoch_end import EpochEndRecord
from dira3d.engines.faults import check_finite_weights, estimate_checkpoint_bytes
from dira3d.engines.rng import rng_state, set_rng_state  # defined here before: still importable from here
from dira3d.engines.stages import check_resume_stages
from dira3d.engines.stopping import FinalStageEarlyStop, check_early_stop_patience
from dira3d.engines.summary import purge_from
from dira3d.utils.atomic import remove_stale_temporaries_of
from dira3d.utils.checkpoint import atomic_save, check_writable, load_checkpoint
from dira3d.utils.folder_lock import FolderLock
from dira3d.utils.overrides import as_bool

__all__ = ["checkpoint_dict", "restore_checkpoint", "rng_state", "set_rng_state", "DiRACheckpoint",
           "check_checkpoint_folder_free", "pretrained_checkpoint"]

_META_CHECKED = ("spatial_dims", "in_channels", "dis_mode", "second_view")  # second_view: from dira_pretrain 0.1.39


def _state(module: Any) -> dict:
    return module.state_dict() if module is not None else {}


def _schedule(trainer: Any) -> dict:
    schedule, loss = getattr(trainer, "schedule", None), getattr(trainer, "loss_function", None)
    return {} if schedule is None else {"stages": schedule.as_list(), "loss_weights": dict(getattr(loss, "weights", {}))}


def checkpoint_dict(trainer: Any, meta: Mapping[str, Any] | None = None, best: Mapping[str, Any] | None = None,
                    epoch_sums: Mapping[str, Any] | None = None) -> dict:
    """Everything needed to resume ``trainer`` (a :class:`~dira3d.engines.DiRATrainer`) or reuse its weights.

    ``epoch_sums``: what ``trainer.epoch_sums_state()`` returned (None: called here; under DDP that is a
    collective, so a caller on rank 0 alone passes what every rank computed, as :class:`DiRACheckpoint` does).
    """
    if epoch_sums is None:
        state = getattr(trainer, "epoch_sums_state", None)
        epoch_sums = state() if callable(state) else {"count": 0, "sums": {}}
    net = trainer.network
    epoch_length = trainer.state.epoch_length or 0
    iteration = int(trainer.state.iteration)
    # completed epochs; a mid-epoch save also records the position inside the epoch, and the
    # resumed trainer skips the batches already consumed (DiRATrainer._setup_engine). Not iteration // epoch_length:
    # after a resume with another epoch length the iteration counter goes on from the checkpoint's
    position = getattr(trainer, "epoch_position", None)
    if callable(position):
        epoch, done = position()
    else:
        epoch = iteration // epoch_length if epoch_length else trainer.state.epoch
        done = iteration - epoch * epoch_length if epoch_length else 0
    guard = getattr(trainer, "nonfinite_guard", None)
    return {
        "encoder": net.encoder.state_dict(),
        "decoder": net.decoder.state_dict(),
        "dis_head": _state(trainer.dis_head),
        "predictor": _state(trainer.predictor),
        "adversary": _state(trainer.adversary),
        "momentum_encoder": _state(trainer.momentum_encoder),
        "momentum_head": _state(trainer.momentum_head),
        "queue": _state(trainer.queue),
        "optimizer_g": trainer.optimizer.state_dict(),
        "optimizer_d": _state(trainer.optimizer_d),
        "scaler_g": _state(trainer.scaler_g),
        "scaler_d": _state(trainer.scaler_d),
        "trainer": {
            "epoch": int(epoch),
            "iteration": iteration,
            "epoch_iteration": int(done),
            "epoch_length": int(epoch_length),  # to place a resume with another one (resume_position)
            "stage": str(trainer.current_stage().name),
            **_schedule(trainer),  # "stages", "loss_weights": a resume with stage ends moved is refused (engines.stages)
            "epoch_sums": {"count": int(epoch_sums["count"]), "sums": dict(epoch_sums["sums"])},
            "nonfinite_skipped": int(getattr(guard, "skipped", 0)),
            **dict(best or {}),
        },
        "schedulers": {k: v.state_dict() for k, v in (getattr(trainer, "schedulers", None) or {}).items()},
        "rng": rng_state(),
        "meta": {
            "spatial_dims": int(getattr(net, "spatial_dims", 3)),
            "in_channels": int(getattr(net, "in_channels", 1)),
            "dis_mode": trainer.dis_mode,
            "second_view": str(getattr(trainer, "second_view", "augmented")),
            "dira3d_version": dira3d.__version__,
            **dict(meta or {}),
        },
    }


def restore_checkpoint(trainer: Any, ckpt: Mapping[str, Any], source: str = "<dict>") -> str | None:
    """Load ``ckpt`` (from :func:`checkpoint_dict`) into ``trainer`` and set its epoch/iteration.

    A checkpoint written at an epoch's last iteration before that epoch's end (``trainer`` key ``epoch_end_pending``)
    sets ``trainer.state.epoch_end_pending`` and keeps the epoch's running sums: DiRATrainer runs that end first
    (:mod:`dira3d.engines.epoch_end`).

    Returns:
        None, or, for a checkpoint written mid-epoch whose running sums cannot be put back (one written
        before they were saved, or by a run with another number of processes), why the epoch's ``train_*`` means will cover only the iterations after
        the resume.

    Raises:
        ValueError: the checkpoint was written for another mode, dimensionality or channel count, or
            its weights do not fit the trainer's modules (another width, number of classes, head size), or with another
            stage schedule or loss weights over the steps it trained (:func:`~dira3d.engines.stages.check_resume_stages`).
    """
    meta = ckpt.get("meta", {})
    net = trainer.network
    current = {"spatial_dims": getattr(net, "spatial_dims", 3), "in_channels": getattr(net, "in_channels", 1),
               "dis_mode": trainer.dis_mode, "second_view": getattr(trainer, "second_view", "augmented")}
    for key in _META_CHECKED:
        if key in meta and meta[key] != current[key]:
            raise ValueError(
                f"checkpoint {source} was written with {key}={meta[key]!r} but this run uses {current[key]!r}; "
                "use another ckpt_dir, or set resume to false to start afresh"
            )
    if getattr(trainer, "schedule", None) is not None:  # other stage ends over the epochs trained: refused, nothing loaded
        check_resume_stages(ckpt["trainer"], trainer.schedule,
                            getattr(getattr(trainer, "loss_function", None), "weights", None), source)
    parts = [("encoder", net.encoder), ("decoder", net.decoder)]
    parts += [(key, getattr(trainer, key)) for key in ("dis_head", "predictor", "adversary", "momentum_encoder",
                                                       "momentum_head", "queue")]
    for key, module in parts:
        if module is None or (key not in ("encoder", "decoder") and not ckpt.get(key)):
            continue
        try:
            module.load_state_dict(ckpt[key])
        except RuntimeError as err:  # another width, number of classes, head size...: torch lists every tensor
            recorded = ", ".join(f"{k}={meta[k]!r}" for k in ("width", "patch_size", "dis_mode") if k in meta)
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err)).rstrip(".")
            raise ValueError(
                f"checkpoint {source} does not fit this run's {key} ({first}); it was written by a run with other "
                f"settings{f' ({recorded})' if recorded else ''}: use another ckpt_dir (`dira3d pretrain --output`), "
                "rerun with the settings it was written with, or set resume to false to start afresh (which "
                "replaces it)"
            ) from err
    trainer.optimizer.load_state_dict(ckpt["optimizer_g"])
    if trainer.optimizer_d is not None and ckpt.get("optimizer_d"):
        trainer.optimizer_d.load_state_dict(ckpt["optimizer_d"])
    for key in ("scaler_g", "scaler_d"):
        if getattr(trainer, key) is not None and ckpt.get(key):
            getattr(trainer, key).load_state_dict(ckpt[key])
    for key, scheduler in (getattr(trainer, "schedulers", None) or {}).items():
        if ckpt.get("schedulers", {}).get(key):
            scheduler.load_state_dict(ckpt["schedulers"][key])
    if ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    trainer.state.epoch = int(ckpt["trainer"]["epoch"])
    trainer.state.iteration = int(ckpt["trainer"]["iteration"])
    done = resume_position(ckpt["trainer"], trainer.state.epoch_length)
    resume_at = getattr(trainer, "resume_at", None)
    if callable(resume_at):  # DiRATrainer: the batches to skip, whatever the iteration counter
        resume_at(done)
    # written at an epoch's last iteration before its end (validation...): the resume runs that end first, with the
    # epoch's running sums (dira3d.engines.epoch_end)
    pending = bool(ckpt["trainer"].get("epoch_end_pending")) and not int(ckpt["trainer"].get("epoch_iteration", 0))
    trainer.state.epoch_end_pending = pending
    # state.epoch counts completed epochs: a mid-epoch checkpoint was written inside the next one, whose stage
    # is the one in force (the first epoch of a new stage was named by the stage before it)
    in_progress = 1 if done or int(ckpt["trainer"].get("epoch_iteration", 0)) else 0
    trainer.state.stage = trainer.schedule.stage_at(max(trainer.state.epoch + in_progress, 1),
                                                    max(trainer.state.iteration, 1)).name
    guard = getattr(trainer, "nonfinite_guard", None)
    if guard is not None:  # a checkpoint written before the count was saved: counted from the resume on
        guard.restore_skipped(ckpt["trainer"].get("nonfinite_skipped", 0))
    restore_sums = getattr(trainer, "restore_epoch_sums", None)
    if callable(restore_sums):
        done = saved_epoch_length(ckpt["trainer"]) if pending else int(ckpt["trainer"].get("epoch_iteration", 0))
        return restore_sums(ckpt["trainer"].get("epoch_sums"), done)
    return None


def pretrained_checkpoint(ckpt_dir: str | os.PathLike) -> Path:
    """The checkpoint of a pretraining run to fine-tune or export from: ``best.pt`` when the run wrote one (it validated),
    else ``last.pt`` (a run without validation: its latest epoch). A ``best.pt`` left by an earlier, validated run is
    not this run's when ``last.pt`` says its latest part ran without validation (trainer ``validation`` false, read
    memory-mapped): then ``last.pt``."""
    best, last = Path(ckpt_dir) / "best.pt", Path(ckpt_dir) / "last.pt"
    if not best.is_file():
        return last
    try:
        validated = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["trainer"].get("validation", True)
    except Exception:  # no last.pt (or not ours): best.pt is all there is
        return best
    return best if validated else last


class DiRACheckpoint:
    """Writes ``last.pt`` (resume) and ``best.pt`` (lowest validation loss) and resumes from ``last.pt``.
    Without a :class:`~dira3d.engines.DiRAEvaluator` (no validation) there is no ``best.pt``: ``last.pt`` is the result.

    The best checkpoint is chosen within the latest stage: adding a loss term raises the total,
    so losses of different stages are not comparable; a new stage starts a new best.
    List this handler AFTER the :class:`~dira3d.engines.DiRAEvaluator` in ``train_handlers`` so the
    validation loss of the epoch is known when it saves.

    Args:
        ckpt_dir: folder of ``last.pt`` / ``best.pt`` (created; must be writable).
        resume: continue from ``ckpt_dir/last.pt`` when it exists.
        save_every_epochs: write ``last.pt`` every N epochs (and at the end); ``best.pt`` is written after every
            validation that improves on the best, whatever N.
        save_every_iterations: also write ``last.pt`` every N iterations (0: never). A resume from a
            mid-epoch file continues at the next iteration, bit-exact on CPU (the consumed batches
            of that epoch are re-drawn and dropped, without a training step), with the epoch's
            running sums, so that its ``train_*`` means cover all its iterations. One written at an epoch's last
            iteration says that epoch's end is pending: a resume after a kill during its validation runs it first
            (:mod:`dira3d.engines.epoch_end`).
        schedulers: learning-rate schedulers to save and restore with the run, by name
            (e.g. ``{"g": sched_g, "d": sched_d}``; step them with handlers of your own).
        min_free_bytes: free space ``ckpt_dir`` must have at start (None: twice the estimated
            checkpoint size, since a save briefly holds the old and the new file).
        metric_name: key in ``engine.state.metrics`` to minimise for ``best.pt``.
        meta: extra entries for ``checkpoint["meta"]`` (width, patch_size, ...).
        early_stop_patience: stop the run after this many validations in a row in the final stage without a
            lower ``metric_name`` (:class:`~dira3d.engines.stopping.FinalStageEarlyStop`; its count is in every
            checkpoint, ``trainer`` key ``early_stop``); None (default): no early stopping, the run goes to
            ``max_epochs``. Needs a :class:`~dira3d.engines.DiRAEvaluator` attached before this handler.
        summary_writer: TensorBoard writer for the early stop's text (``early_stop``), and of the run's values: on a
            resume, what an earlier event file holds after ``last.pt``'s iteration is hidden (a killed run logged it;
            :func:`~dira3d.engines.summary.purge_from`); None: none.

    While the run lasts, the main process locks ``ckpt_dir`` (:class:`~dira3d.utils.folder_lock.FolderLock`):
    a second run into the same folder stops at its start instead of replacing the first one's
    checkpoints in turn.

    Raises:
        PermissionError: ``ckpt_dir`` is not writable.
        ValueError: a bad ``early_stop_patience``; (when attached) early stopping without an evaluator before it.
        dira3d.utils.folder_lock.FolderInUseError: (at the run's start) another process is writing there.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        resume: bool = True,
        save_every_epochs: int = 1,
        save_every_iterations: int = 0,
        metric_name: str = "val_loss",
        meta: Mapping[str, Any] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        min_free_bytes: int | None = None,
        early_stop_patience: int | None = None,
        summary_writer: Any = None,
    ) -> None:
        self.schedulers = dict(schedulers or {})
        self.ckpt_dir = Path(ckpt_dir)
        self.min_free_bytes = min_free_bytes
        self.resume, self.metric_name = as_bool(resume, "resume"), metric_name
        self.save_every_epochs, self.save_every_iterations = max(int(save_every_epochs), 1), int(save_every_iterations)
        self.meta = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in (meta or {}).items()}
        self.best: dict[str, Any] = {"best_metric": None, "best_epoch": -1, "best_stage": ""}
        self.validation = True  # whether this run validates (an evaluator attached; set on STARTED)
        self.epoch_end = EpochEndRecord()  # whether last.pt written now precedes its epoch's end (epoch_end_pending)
        patience = check_early_stop_patience(early_stop_patience)
        self.early_stop = None if patience is None else FinalStageEarlyStop(
            patience, metric_name, summary_writer=summary_writer, best_path=self.best_path)
        self.lock = FolderLock(self.ckpt_dir, what=CHECKPOINT_FOLDER)
        self.summary_writer = summary_writer

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    def attach(self, engine: Engine) -> None:
        if self.schedulers:
            engine.schedulers = self.schedulers  # read by checkpoint_dict / restore_checkpoint
        if is_main_process():
            # fail now, not after hours of training, when the folder is read-only or the disk full
            need = self.min_free_bytes
            if need is None:
                need = 2 * estimate_checkpoint_bytes(getattr(engine, "modules", dict)().values())
            check_writable(self.ckpt_dir, min_free_bytes=need)
            engine.add_event_handler(Events.STARTED, lambda _: self.lock.acquire())  # before anything is loaded
            engine.add_event_handler(Events.STARTED, lambda _: self.remove_stale_temporaries())
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.STARTED, self.note_no_validation)
        if self.early_stop is not None:  # after the resume on STARTED; counts before last.pt is written on EPOCH_COMPLETED
            self.early_stop.attach(engine)
        # every epoch: best.pt follows each validation, last.pt only every save_every_epochs (epoch_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if self.save_every_iterations > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_every_iterations), self.save_last)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.save_before_epoch_end)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        if is_main_process():  # after the last save (ignite also fires COMPLETED after terminate())
            engine.add_event_handler(Events.COMPLETED, lambda _: self.lock.release())

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the half-written ``.last.pt.*.tmp`` / ``.best.pt.*.tmp`` a killed run (SIGKILL, OOM) left (each the
        size of a checkpoint); the folder is locked, and a file a live writer holds is kept."""
        return [p for path in (self.last_path, self.best_path) for p in remove_stale_temporaries_of(path, what="run")]

    def load(self, engine: Engine) -> None:
        """Resume from ``last.pt`` when asked and present (every rank reads the same file)."""
        self.epoch_end = EpochEndRecord()
        if not (self.resume and self.last_path.is_file()):
            return
        # onto the host, whatever the run's device (load_state_dict copies each tensor where it belongs): read onto a
        # GPU, the Adam step counts of a non-fused optimiser stayed there, a host sync per parameter at every step
        ckpt = load_checkpoint(self.last_path, map_location="cpu")
        partial = restore_checkpoint(engine, ckpt, source=str(self.last_path))
        pending = bool(getattr(engine.state, "epoch_end_pending", False))
        self.epoch_end.resumed(engine, pending)
        # TensorBoard: what a killed run logged after this checkpoint is hidden, the resumed run logs it again
        purge_from(self.summary_writer, engine.state.iteration + 1)
        self.best.update({k: ckpt["trainer"].get(k, v) for k, v in self.best.items()})
        if self.early_stop is not None:
            if ckpt["trainer"].get("early_stop"):
                self.early_stop.load_state_dict(ckpt["trainer"]["early_stop"])
            else:  # written without early_stop_patience, or by dira3d before it
                engine.logger.info(f"{self.last_path} holds no early-stopping count: validations without improvement "
                                   "are counted from this resume on")
        epoch, length, saved = engine.state.epoch, engine.state.epoch_length, ckpt["trainer"]
        done, before = int(saved.get("epoch_iteration", 0)), saved_epoch_length(saved) or length
        if done:
            where = f"mid-epoch (epoch {epoch + 1}: {done}{f' of its {before}' if before else ''} iterations done)"
        else:  # pending: a kill during its validation; DiRATrainer runs that end first (engines.epoch_end)
            where = f"the end of epoch {epoch}{' (its validation and epoch end did not complete)' if pending else ''}"
        engine.logger.info(f"resumed from {self.last_path} at iteration {engine.state.iteration}, {where}, "
                           f"stage '{engine.state.stage}'")
        note = epoch_length_note(saved, length)
        if note:
            engine.logger.info(f"{self.last_path} {note}")
        if partial:  # pending: the epoch's end, which runs first, takes its means from the sums last.pt holds
            which = (f"epoch {epoch}'s train_* means will cover only the iterations whose sums it holds" if pending else
                     f"epoch {epoch + 1}'s train_* means will cover only its iterations after the resume")
            engine.logger.info(f"{which}: {self.last_path} {partial}")
        if engine.state.epoch >= engine.state.max_epochs:
            engine.logger.info(f"{self.last_path} already reached max_epochs={engine.state.max_epochs}; nothing to do")

    def note_no_validation(self, engine: Engine) -> None:
        """``STARTED``: without a :class:`~dira3d.engines.DiRAEvaluator` (the bundle's ``validation`` false) say that
        ``last.pt`` is the result, and that a ``best.pt`` already in ``ckpt_dir`` (an earlier run's) is not this run's."""
        self.validation = getattr(engine, "evaluator", None) is not None
        if self.validation:
            return
        epoch = f" (epoch {self.best['best_epoch']})" if self.best["best_epoch"] >= 0 else ""
        stale = (f"; {self.best_path}{epoch} is from an earlier run with validation and is not updated"
                 if self.best_path.is_file() else "")
        engine.logger.info(f"no validation: best.pt is not written; {self.last_path} holds the latest epoch's weights "
                           f"(fine-tune from it){stale}")

    def _ensure_finite(self, engine: Engine) -> None:
        # a NaN must never reach a checkpoint: look at the guard's record and the weights first
        guard = getattr(engine, "nonfinite_guard", None)
        if guard is not None:
            guard.check(engine)
        if hasattr(engine, "modules"):
            check_finite_weights(engine.modules(), where=f" at iteration {engine.state.iteration}")

    @staticmethod
    def _epoch_sums(engine: Engine) -> dict[str, Any]:
        # on every rank: gathers each rank's running sums for rank 0's checkpoint (a collective under DDP)
        state = getattr(engine, "epoch_sums_state", None)
        return state() if callable(state) else {"count": 0, "sums": {}}

    def _trainer_state(self, engine: Engine) -> dict[str, Any]:
        # the checkpoint's "trainer" entries this handler keeps: the best so far and the early-stopping count
        # "validation": pretrained_checkpoint takes last.pt, not an earlier run's best.pt, after a run without it
        state = {**self.best, "validation": self.validation, "epoch_end_pending": self.epoch_end.pending(engine)}
        if self.early_stop is None:
            return state
        return {**state, "early_stop": self.early_stop.state_dict()}

    def save_last(self, engine: Engine, epoch_sums: Mapping[str, Any] | None = None) -> None:
        self._ensure_finite(engine)
        epoch_sums = self._epoch_sums(engine) if epoch_sums is None else epoch_sums
        state = self._trainer_state(engine)
        if is_main_process():
            atomic_save(checkpoint_dict(engine, self.meta, state, epoch_sums), self.last_path)
        self.epoch_end.saved(state["epoch_end_pending"])  # on every rank: the epoch end's rewrite is collective

    def save_before_epoch_end(self, engine: Engine) -> None:
        """``ITERATION_COMPLETED``: a signal on an epoch's last step lets the epoch end (validation) run before the
        run stops (:class:`~dira3d.engines.stopping.SignalStop` ``finish_epoch``): ``last.pt`` is written now, so that a
        SIGKILL during that validation (SLURM's grace period) loses no training (it records the epoch's end as pending:
        the resume runs it first, :mod:`dira3d.engines.epoch_end`); the epoch's end writes it again."""
        if getattr(engine.state, "stop_deferred", False):
            engine.state.stop_deferred = False
            self.save_last(engine)

    def completed(self, engine: Engine) -> None:
        """The run's end: ``last.pt`` at its last iteration, also when SIGTERM / Ctrl-C ended it mid-epoch
        (``state.stopped_by``; :mod:`dira3d.engines.stopping`), which the trainer then reports."""
        self.save_last(engine)
        if getattr(engine.state, "stopped_by", None) and is_main_process():
            how = ("run the same command to resume" if self.resume else
                   "run the same command without the resume=false setting to resume from it")
            engine.state.stop_saved = f"{self.last_path} saved; {how}"

    def epoch_completed(self, engine: Engine) -> None:
        """``EPOCH_COMPLETED``: ``best.pt`` after every validation that improves (whatever ``save_every_epochs``:
        early stopping and the logs name that epoch), ``last.pt`` every ``save_every_epochs`` epochs."""
        validated = getattr(engine.state, "val_epoch", None) == engine.state.epoch  # alike on every rank
        # last.pt written at the epoch's last iteration says its end is pending: written again now, whatever N
        save_last = self.epoch_end.end(engine) or engine.state.epoch % self.save_every_epochs == 0
        if not (validated or save_last):
            return
        # checked on every rank before the (rank-local) best decision: the check is collective
        self._ensure_finite(engine)
        epoch_sums = self._epoch_sums(engine)  # empty: the trainer's epoch means have been taken
        value = engine.state.metrics.get(self.metric_name)
        stage = engine.current_stage().name
        if value is not None and validated:
            if self.best["best_stage"] != stage or self.best["best_metric"] is None or value < self.best["best_metric"]:
                self.best = {"best_metric": float(value), "best_epoch": int(engine.state.epoch), "best_stage": stage}
                if is_main_process():
                    atomic_save(checkpoint_dict(engine, self.meta, self._trainer_state(engine), epoch_sums), self.best_path)
                engine.logger.info(f"new best {self.metric_name}={value:.5f} (stage '{stage}') -> {self.best_path}")
        if save_last:
            self.save_last(engine, epoch_sums)
