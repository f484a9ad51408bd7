"""Checks of :class:`~dira3d.engines.DiRATrainer`'s constructor options that involve several of them.

The trainer's constructor calls these before it moves, compiles or wraps any module:
:func:`check_modules_for_stages` (before MONAI's ``Trainer`` is set up) refuses stages whose loss terms need a
module that was not given (``dis`` without ``dis_head``, SimSiam without a predictor, ``adv`` without
``adversary`` and ``optimizer_d``), with an error that names the stages and both ways out;
:func:`check_yields_batches` (once the losses and grad scalers are built) refuses a training loader that yields
no batch (MONAI would skip the run with a warning and exit 0, writing no checkpoint), saying how many items it
has and what to change; :func:`check_second_view` refuses an unknown ``second_view`` and a non-default one in
``visual_words`` mode.
Checks of single options live next to what they check (``check_dis_mode`` in
:mod:`dira3d.engines.components`, ``check_shuffle_bn`` in :mod:`dira3d.engines.shuffle_bn`, the stages in
:mod:`dira3d.engines.stages`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from dira3d.data.errors import DataError
from dira3d.engines.stages import DEFAULT_STAGES, LOSS_TERMS, StageSchedule

__all__ = ["check_modules_for_stages", "check_yields_batches", "check_second_view", "check_clip_grad_norm",
           "SECOND_VIEWS"]

# what the instance modes do with their second view (docs/method.md): the patent's equation (2) (augmented
# only, the default), the official 2D code (also distorted, not restored), the patent's claims (both restored)
SECOND_VIEWS = ("augmented", "distorted", "restored")


def check_modules_for_stages(schedule: StageSchedule, default: bool, dis_mode: str, dis_head: nn.Module | None,
                             predictor: nn.Module | None, adversary: nn.Module | None,
                             optimizer_d: torch.optim.Optimizer | None) -> None:
    """Refuse stages whose loss terms need a module that was not given (``default``: the stages are
    the default ones).

    Raises:
        ValueError: ``dis`` without ``dis_head`` (or, for SimSiam, without ``predictor``), ``adv``
            without ``adversary`` and ``optimizer_d``.
    """
    uses = schedule.uses
    if "dis" in uses and dis_head is None:
        raise ValueError(_missing_for_term(schedule, "dis", default, "no dis_head was given",
                                           "pass one (dira3d.engines.build_dis_head)"))
    if "adv" in uses and (adversary is None or optimizer_d is None):
        missing = [n for n, v in (("adversary", adversary), ("optimizer_d", optimizer_d)) if v is None]
        raise ValueError(_missing_for_term(schedule, "adv", default,
                                           f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing",
                                           "pass both (dira3d.networks.Adversary and an optimiser of its parameters)"))
    if dis_mode == "simsiam" and "dis" in uses and predictor is None:
        raise ValueError("dis_mode='simsiam' needs a predictor (dira3d.engines.build_predictor('simsiam', proj_dim))")


def _missing_for_term(schedule: StageSchedule, term: str, default: bool, problem: str, fix: str) -> str:
    """The error of a loss ``term`` used by stages whose module is missing: the stages that use it
    (saying so when they are the default ones), what is missing, and the two ways out (the modules,
    or stages without the term, e.g. ``[{"name": "dir", "losses": ["dis", "res"]}]`` for ``adv``)."""
    names = ", ".join(repr(s.name) for s in schedule.stages if term in s.losses)
    which = f"the default stages ({json.dumps(DEFAULT_STAGES)}) use" if default else f"stage(s) {names} use"
    example = json.dumps([{"name": "dir" if term == "adv" else "ra", "losses": [t for t in LOSS_TERMS if t != term]}])
    return (f"{which} the {term!r} loss but {problem}; {fix}, or pass stages without {term!r}, "
            f"e.g. stages={example}")


def check_second_view(second_view: str, dis_mode: str) -> str:
    """Return ``second_view`` or raise a ``ValueError`` naming the setting and what to use instead.

    Raises:
        ValueError: a value not in :data:`SECOND_VIEWS`, or one other than ``"augmented"`` in
            ``visual_words`` mode (which has no second view of an instance, only ``classify_both``).
    """
    if second_view not in SECOND_VIEWS:
        raise DataError(None, f"second_view={second_view!r} is not supported; choose one of {', '.join(SECOND_VIEWS)} "
                         "(what the instance modes do with their second view; docs/method.md)")
    if dis_mode == "visual_words" and second_view != "augmented":
        raise DataError(None, f"second_view={second_view!r} applies to the instance modes (moco, barlow, simsiam); "
                         "dis_mode='visual_words' has no second view: leave second_view at 'augmented' (to also "
                         "classify the distorted second instance, set classify_both true)")
    return second_view


def check_yields_batches(loader: Any) -> None:
    """An empty training loader is an error: MONAI would skip the run with a warning and exit 0,
    writing no checkpoint (e.g. fewer training volumes than ``batch_size`` with ``drop_last``): a ``DataError`` (one
    ``error:`` line under ``python -m monai.bundle run``)."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return
    try:
        batches = len(loader)
    except TypeError:  # an iterable dataset without a length
        return
    if batches == 0:
        items = len(loader.dataset) if hasattr(loader.dataset, "__len__") else "?"
        drop = " and drop_last" if loader.drop_last else ""
        sampler = loader.sampler
        replicas = getattr(sampler, "num_replicas", 1)
        share, fewer = "", ""
        if isinstance(sampler, torch.utils.data.distributed.DistributedSampler) and replicas > 1:
            # torchrun: each process gets its share (drop_last in the sampler rounds it down), which may be < batch_size
            share = f", {len(sampler)} on each of the {replicas} processes,"
            fewer = ", use fewer processes (--nproc_per_node)"
        raise DataError(
            None,
            f"the training data loader yields no batch: {items} training item(s) per epoch{share} with batch_size "
            f"{loader.batch_size}{drop}; lower batch_size (e.g. --override batch_size=1 with dira3d pretrain, --batch_size 1 "
            f"with python -m monai.bundle run){fewer} or add training volumes"
        )


def check_clip_grad_norm(value: Any) -> float | None:
    """``clip_grad_norm`` as a float, or None (no clipping); anything else is refused naming the setting.

    Text (``--clip_grad_norm abc``) failed at the first step with ``could not convert string to float: 'abc'``,
    naming no setting; ``true`` clipped at 1.0, and a negative or NaN norm reached torch's clipping.

    Raises:
        ValueError: not null and not a finite number > 0.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DataError(None, f"clip_grad_norm={value!r} must be null (no clipping) or a number > 0, the largest "
                         "gradient norm of G and D, e.g. clip_grad_norm=1.0")
    return float(value)
