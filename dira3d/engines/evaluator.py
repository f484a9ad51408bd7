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

import json
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

__all__ = ["DiRAEvaluator", "STREAM_VALIDATION", "check_validation_size"]

STREAM_VALIDATION = 3
SAME_OUTPUT_SPREAD = 1e-6  # below it, the discrimination head's outputs of a validation batch count as the same


def _too_small_message(datalist: Any, spatial_dims: int) -> str:
    items = "images" if spatial_dims == 2 else "volumes"
    split = ("the datalist's validation split" if datalist is None else
             f"the validation split of {os.fspath(datalist)}")
    return ("every validation batch was too small for the discrimination loss, so there is no "
            f"validation loss; put at least 2 {items} in {split} (and keep batch_size >= 2): for a datalist "
            f"written by `dira3d prepare`, run it again with more validation {items} "
            f"({split_option(datalist, 'validation')}; the prepared files are kept), or pretrain with MoCo "
            "(2d_moco.json in 2D), whose loss takes a batch of one")


def check_validation_size(dis_loss: Any, validation: Any, batch_size: Any, stages: Any = None, datalist: Any = None,
                          spatial_dims: int = 3, split: str = "validation") -> None:
    """Refuse, in the bundle's ``initialize`` (before any data is cached), a validation list whose every batch is too
    small for the discrimination loss (Barlow Twins standardises over the batch: one image or volume, or
    ``batch_size`` 1). :class:`DiRAEvaluator` refuses it again when training starts (a loader of its own); until
    2026-11-28 that was the only check, after the training and validation data were cached, with ignite's traceback.

    Args:
        dis_loss: the trainer's discrimination loss (its ``min_batch``, 1 when absent).
        validation: the validation entries; None: ``split`` of ``datalist``, read here (a datalist that cannot be
            read is left to the steps that load it, which name the problem); empty (validation off): no check.
        batch_size: the validation loader's batch size.
        stages: the trainer's ``stages`` (no stage with ``dis``: no check; None: the default schedule, which has it).
        datalist: the datalist file, named in the message.
        spatial_dims: 2 names images, 3 volumes.
        split: the datalist's validation list (``validate#split``).

    Raises:
        ValueError: every validation batch is smaller than ``min_batch``.
    """
    min_batch = getattr(dis_loss, "min_batch", 1)
    if min_batch < 2:
        return
    if validation is None and datalist is not None:
        try:
            with open(datalist, encoding="utf-8") as handle:
                validation = json.load(handle).get(split)
        except (OSError, ValueError, AttributeError):
            return
    if not isinstance(validation, (list, tuple)) or not validation:
        return
    if stages is not None:
        try:
            if not any("dis" in stage["losses"] for stage in stages):
                return
        except (TypeError, KeyError):  # malformed stages: the trainer names the problem
            return
    try:
        size = min(len(validation), int(batch_size))
    except (TypeError, ValueError):
        return
    if size < min_batch:
        raise ValueError(_too_small_message(datalist, spatial_dims))


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
        self._spreads: list[float] = []  # per validation batch: how much the discrimination head's outputs differ
        self._warned_same = False
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
        return _too_small_message(self.datalist, getattr(network, "spatial_dims", 3))

    def _validate(self, trainer: DiRATrainer) -> None:
        modules = list(trainer.modules().values())
        modules = [m for m in modules if any(True for _ in m.parameters()) or any(True for _ in m.buffers())]
        loader = self.data_loader
        if getattr(loader, "num_workers", 0) == 0 and hasattr(loader, "dataset"):
            # the same random crops at every validation: a fixed held-out set of patches
            set_rnd(loader.dataset, stream_seed(self.seed, STREAM_VALIDATION, 0) % (2**32))
        head = getattr(trainer, "dis_head", None)
        hook = head.register_forward_hook(self._record_spread) if isinstance(head, torch.nn.Module) else None
        self._spreads = []
        try:
            with eval_mode(*modules):
                self.run(trainer.state.epoch)
        finally:
            if hook is not None:
                hook.remove()
        self._warn_if_same(trainer)
        trainer.state.metrics.update(self.state.metrics)
        trainer.state.val_epoch = trainer.state.epoch  # tells the checkpoint handler the value is fresh

    def _record_spread(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the discrimination head in validation: the variance of its outputs over the batch,
        relative to their mean square (0: every sample of the batch gives the same output)."""
        if isinstance(output, torch.Tensor) and output.ndim == 2 and output.shape[0] >= 2:
            out = output.detach().float()
            spread = out.var(dim=0, unbiased=False).sum() / (out.pow(2).mean(dim=0).sum() + 1e-12)
            self._spreads.append(float(spread))

    def _warn_if_same(self, trainer: DiRATrainer) -> None:
        """Warn once when the head gave the same output for every sample of every validation batch: in eval mode
        BatchNorm normalises with its running statistics, which after a few training iterations (``--tiny``: 2 per
        epoch) are still near their starting values (mean 0, variance 1), and the encoder then maps every patch to
        nearly the same features. The validation loss of the discrimination is then a constant (Barlow Twins:
        about ``proj_dim``; visual words: about ln(num_classes)) that picks ``best.pt`` by chance."""
        if self._warned_same or not self._spreads or max(self._spreads) >= SAME_OUTPUT_SPREAD:
            return
        self._warned_same = True
        network = getattr(trainer, "network", None)
        items = "image" if getattr(network, "spatial_dims", 3) == 2 else "volume"
        constant = {"barlow": "about proj_dim (the size of the projection)", "visual_words": "about ln(num_classes)"}
        value = constant.get(getattr(trainer, "dis_mode", None))
        self.logger.warning(
            f"validation after {trainer.state.iteration} training iteration(s): the discrimination head gives the same "
            f"output for every {items} of a validation batch, so val_loss_dis{' is ' + value + ' and' if value else ''} "
            "does not measure the discrimination, and best.pt is chosen by the other terms or by chance: in "
            "evaluation mode BatchNorm uses its running statistics, still near their starting values after few "
            "training iterations (e.g. --tiny); train more iterations (more data or max_epochs) before reading it; "
            "said once")

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
