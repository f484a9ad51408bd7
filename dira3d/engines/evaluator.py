"""Validation loss of DiRA pretraining on a held-out split (the criterion for ``best.pt``).

The evaluator computes the same λ-weighted loss as the trainer, for the trainer's current stage,
without gradients, in eval mode, with distortions and views drawn from a FIXED seed per
validation batch — so two validations of the same weights give the same number and a fall in
the value means the model improved, not that the draws were easier. The EMA key encoder and the
MoCo queue are read but not updated.

Besides ``val_loss`` (the stage's full weighted loss) it publishes ``val_selection_loss``: the
weighted loss without the adversarial term, the bundle's criterion for ``best.pt``. L_adv measures
the generator against the adversary *of that epoch*, whose strength swings from epoch to epoch
(docs/results.md: val L_adv between ~1 and ~7), so with it in the criterion ``best.pt`` would be
the epoch where D happened to be weak rather than the one whose encoder discriminates and
restores best.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.engines import Evaluator
from monai.networks.utils import eval_mode

from dira3d.data.datalist import split_option
from dira3d.engines.optim import autocast_context
from dira3d.engines.trainer import DiRATrainer
from dira3d.utils.interrupts import QuietInterruptMixin
from dira3d.utils.seeding import stream_seed

__all__ = ["DiRAEvaluator", "STREAM_VALIDATION"]

STREAM_VALIDATION = 3


class DiRAEvaluator(QuietInterruptMixin, Evaluator):
    """Runs every ``interval`` trainer epochs and writes ``val_loss``, ``val_selection_loss`` (without
    λ_adv·L_adv) and ``val_loss_<term>`` metrics.

    It is attached to the trainer like a handler (list it in the trainer's ``train_handlers``,
    before :class:`~dira3d.engines.DiRACheckpoint`); the trainer reference is taken at attach time,
    so a bundle config has no circular reference between ``train#trainer`` and ``validate#evaluator``.

    Args:
        device: where to evaluate (the trainer's device).
        val_data_loader: held-out batches in the trainer's batch format.
        interval: validate every N epochs.
        seed: seed of the fixed validation draws.
        epoch_length: batches per validation (default ``len(val_data_loader)``).
        val_handlers: handlers of the evaluator itself.
        datalist: the datalist file the validation entries come from, named in its errors (None: unknown).

    Raises:
        ValueError: ``interval`` is not a whole number >= 1 (0 or a negative number ran as 1).
        RuntimeError: run before being attached to a :class:`DiRATrainer`.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        interval: int = 1,
        seed: int = 0,
        epoch_length: int | None = None,
        val_handlers: Any = None,
        datalist: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.interval, self.seed = _check_interval(interval), int(seed)
        self.datalist = datalist
        self.trainer: DiRATrainer | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._short_batches = 0  # validation batches of this run too small for the loss, left out
        self._warned_short = False  # the warning about them is given once, at the first validation that has one
        self.add_event_handler(Events.STARTED, self._start)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._publish)

    def attach(self, trainer: DiRATrainer) -> None:
        """Validate at the end of every ``interval``-th trainer epoch."""
        if not isinstance(trainer, DiRATrainer):
            raise TypeError(f"DiRAEvaluator attaches to a DiRATrainer, got {type(trainer).__name__}")
        self.trainer = trainer
        trainer.evaluator = self  # what the checkpoint handler's early stopping looks for (it needs a validation)
        trainer.add_event_handler(Events.STARTED, self._check_batches)
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self._validate)

    def _check_batches(self, trainer: DiRATrainer) -> None:
        """Refuse, before training, a validation set whose every batch is too small for the discrimination loss
        (Barlow Twins standardises over the batch: one image, or ``batch_size`` 1; the losses declare ``min_batch``):
        it failed at the end of the first epoch, a whole epoch later."""
        min_batch = getattr(trainer.dis_loss, "min_batch", 1)
        if min_batch < 2 or not any("dis" in stage.losses for stage in trainer.schedule.stages):
            return
        try:
            size = min(len(self.data_loader.dataset), self.data_loader.batch_size or min_batch)
        except (AttributeError, TypeError):  # a loader without a sized dataset: found at the first validation
            return
        if size < min_batch:
            raise ValueError(self._too_small())

    def _too_small(self) -> str:
        network = getattr(self.trainer, "network", None)
        items = "images" if getattr(network, "spatial_dims", 3) == 2 else "volumes"
        split = ("the datalist's validation split" if self.datalist is None else
                 f"the validation split of {os.fspath(self.datalist)}")
        return ("every validation batch was too small for the discrimination loss, so there is no "
                f"validation loss; put at least 2 {items} in {split} (and keep batch_size >= 2): for a datalist "
                "written by `dira3d prepare`, run it again with more validation volumes "
                f"({split_option(self.datalist, 'validation')}; the prepared files are kept), or pretrain with MoCo "
                "(2d_moco.json in 2D), whose loss takes a batch of one")

    def _validate(self, trainer: DiRATrainer) -> None:
        modules = list(trainer.modules().values())
        modules = [m for m in modules if any(True for _ in m.parameters()) or any(True for _ in m.buffers())]
        loader = self.data_loader
        if getattr(loader, "num_workers", 0) == 0 and hasattr(loader, "dataset"):
            # the same random crops at every validation: a fixed held-out set of patches
            set_rnd(loader.dataset, stream_seed(self.seed, STREAM_VALIDATION, 0) % (2**32))
        with eval_mode(*modules):
            self.run(trainer.state.epoch)
        trainer.state.metrics.update(self.state.metrics)
        trainer.state.val_epoch = trainer.state.epoch  # tells the checkpoint handler the value is fresh

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("DiRAEvaluator.run() needs a trainer: attach it to a DiRATrainer first, with "
                               "evaluator.attach(trainer) or by listing it in the trainer's train_handlers (it is its "
                               "own handler: do not wrap it in monai.handlers.ValidationHandler)")
        stage = trainer.current_stage()
        batch = trainer._prepare(batchdata)
        min_batch = getattr(trainer.dis_loss, "min_batch", 1) if "dis" in stage.losses else 1
        if batch["image"].shape[0] < min_batch:
            # e.g. Barlow Twins standardises over the batch: a last validation batch of one sample
            # (len(validation) % batch_size == 1) has no loss; leave it out instead of failing
            # after a whole training epoch
            if not self._warned_short:
                self._warned_short = True
                self.logger.warning(f"dis_mode {trainer.dis_mode}: a validation batch of {batch['image'].shape[0]} "
                                    f"sample(s) is left out (the loss needs >= {min_batch}); said once, not at every "
                                    "validation")
            self._short_batches += 1
            return {}
        # fixed per validation batch: every validation sees the same views and distortions
        generator = torch.Generator(device=trainer.state.device)
        generator.manual_seed(stream_seed(self.seed, STREAM_VALIDATION, engine.state.iteration))
        with torch.no_grad(), autocast_context(trainer.amp_mode, trainer.state.device):
            fwd = trainer.forward_terms(batch, generator, stage, train=False)
            total, weighted = trainer.loss_function(fwd.terms, stage.losses)
        selection = [v for k, v in weighted.items() if k != "adv"]
        output = {"loss": total.detach(), "selection_loss": torch.stack(selection).sum().detach() if selection
                  else torch.zeros((), device=total.device)}
        output.update({f"loss_{k}": v.detach() for k, v in fwd.terms.items()})
        return output

    def _start(self, engine: Engine) -> None:
        """``STARTED``: each validation counts its own batches (the short ones added up over the validations)."""
        self._sums, self._count, self._short_batches = {}, 0, 0

    def _accumulate(self, engine: Engine) -> None:
        if not engine.state.output:
            return
        for key, value in engine.state.output.items():
            self._sums[key] = self._sums.get(key, 0) + value.float()
        self._count += 1

    def _publish(self, engine: Engine) -> None:
        if self._count == 0 and self._short_batches:
            raise ValueError(self._too_small())
        metrics = {f"val_{k}": float(v) / max(self._count, 1) for k, v in self._sums.items()}
        engine.state.metrics.update(metrics)
        self._sums, self._count = {}, 0


def _check_interval(interval: Any) -> int:
    """``interval`` (the bundle's ``val_interval``) as an int >= 1, or a ``DataError`` (a ``ValueError``: one ``error:``
    line under ``python -m monai.bundle run``) naming the setting."""
    from dira3d.data.errors import DataError

    try:
        whole = not isinstance(interval, bool) and float(interval).is_integer() and int(interval) >= 1
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise DataError(None, f"val_interval={interval!r}: validate every N epochs needs a whole number N >= 1; "
                        "to pretrain without validation set validation to false")
    return int(interval)
