"""Staged DiRA training ("gradual evolutionary" schedule of the patent).

DiRA does not switch all three losses on at once: it first trains the discriminative branch
alone, then warms up encoder and decoder with discrimination + restoration, and only then adds
the adversary. A :class:`StageSchedule` is that plan, written in the bundle config as a list::

    [{"name": "dis",     "until_epoch": 2, "losses": ["dis"]},
     {"name": "dis_res", "until_epoch": 4, "losses": ["dis", "res"]},
     {"name": "dira",                      "losses": ["dis", "res", "adv"]}]

A stage lasts while the current (1-based) epoch is ``<= until_epoch`` (or the current 1-based
iteration is ``<= until_iteration``); the last stage has no bound and runs to the end. The stage
is a pure function of (epoch, iteration), so it survives a resume without being stored; ``last.pt`` records the
schedule and the loss weights it was trained with (``trainer`` keys ``stages`` and ``loss_weights``, since
dira_pretrain 0.1.59) and a resume with stage ends moved over the epochs already trained is refused
(:func:`check_resume_stages`).
Any non-empty subset of ``{"dis", "res", "adv"}`` is allowed (ablations: ``["res"]`` alone is
Models Genesis-style restoration, ``["dis", "res"]`` is the official 2D ``dir`` stage).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dira3d.data.errors import DataError

__all__ = ["LOSS_TERMS", "Stage", "StageSchedule", "DEFAULT_STAGES", "check_resume_stages", "resume_stage_problem"]

LOSS_TERMS = ("dis", "res", "adv")

DEFAULT_STAGES: list[dict] = [{"name": "dira", "losses": ["dis", "res", "adv"]}]

_KEYS = {"name", "losses", "until_epoch", "until_iteration"}


def _losses_example(losses: object) -> list[str]:
    """The list a mistyped ``losses`` meant: its terms ("dis+res" -> ["dis", "res"]), else all three."""
    words = re.findall(r"[A-Za-z]+", losses if isinstance(losses, str) else
                       " ".join(map(str, losses)) if isinstance(losses, Mapping) else "")
    return [w for w in words if w in LOSS_TERMS] or list(LOSS_TERMS)


def _whole_number(value: object) -> bool:
    """A number >= 1 with no fractional part (2 and 2.0); not a bool, text, NaN or infinity."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 1 and int(value) == value)


@dataclass(frozen=True)
class Stage:
    """One training stage: a name, its active loss terms and an optional upper bound."""

    name: str
    losses: tuple[str, ...]
    until_epoch: int | None = None
    until_iteration: int | None = None

    @property
    def adversarial(self) -> bool:
        """True when the adversary is trained in this stage (its optimiser only steps then)."""
        return "adv" in self.losses

    def bound(self) -> str:
        """``epoch 20``, ``iteration 500`` or ``the end``: where the stage ends."""
        return (f"epoch {self.until_epoch}" if self.until_epoch is not None else
                f"iteration {self.until_iteration}" if self.until_iteration is not None else "the end")

    def describe(self) -> str:
        """``dis_res (dis+res) to epoch 60``."""
        return f"{self.name} ({'+'.join(self.losses)}) to {self.bound()}"


class StageSchedule:
    """An ordered list of :class:`Stage` with lookup by epoch and iteration.

    Args:
        stages: list of dicts with ``name``, ``losses`` and at most one of ``until_epoch`` /
            ``until_iteration`` (None: a single stage with all three losses).

    Raises:
        DataError: (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle run``) on an unknown key or
            term, an empty or duplicated name, an empty loss list, both bounds in one stage, bounds that do not
            increase, or a bounded last stage.
    """

    def __init__(self, stages: Sequence[Mapping] | None = None) -> None:
        raw = list(DEFAULT_STAGES if stages is None else stages)
        if not raw:
            raise DataError(None, "stages: the list is empty; give at least one stage, e.g. "
                            "[{'name': 'dira', 'losses': ['dis', 'res', 'adv']}]")
        self.stages: list[Stage] = [self._parse(i, item) for i, item in enumerate(raw)]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise DataError(None, f"stages: names must be unique, got {names}")
        last = self.stages[-1]
        if last.until_epoch is not None or last.until_iteration is not None:
            raise DataError(
                None,
                f"stages: the last stage {last.name!r} must have no 'until_epoch'/'until_iteration' (it runs to the end)"
            )
        for key in ("until_epoch", "until_iteration"):
            bounds = [getattr(s, key) for s in self.stages if getattr(s, key) is not None]
            if bounds != sorted(set(bounds)):
                raise DataError(None, f"stages: {key} values must strictly increase from stage to stage, got "
                                f"{bounds}")

    @staticmethod
    def _parse(index: int, item: Mapping) -> Stage:
        if not isinstance(item, Mapping):
            raise DataError(None, f"stages[{index}]: expected a dict with 'name' and 'losses', got {item!r}")
        unknown = set(item) - _KEYS
        if unknown:
            raise DataError(None, f"stages[{index}]: unknown key(s) {sorted(unknown)}; allowed keys are "
                            f"{sorted(_KEYS)}")
        name = str(item.get("name", "")).strip()
        if not name:
            raise DataError(None, f"stages[{index}]: every stage needs a non-empty 'name'")
        losses = item.get("losses")
        if not isinstance(losses, (list, tuple)) or not losses:
            # a string ("dis") was refused without showing the list form; a mapping ({"dis": true}) was taken as its
            # keys and a number failed with Python's bare "'int' object is not iterable"
            raise DataError(None, f"stages[{index}] ({name}): 'losses' must be a non-empty list drawn from "
                            f"{list(LOSS_TERMS)}, got {losses!r}; write it as a list, e.g. "
                            f"\"losses\": {json.dumps(_losses_example(losses))}")
        bad = [t for t in losses if t not in LOSS_TERMS]
        if bad:
            raise DataError(None, f"stages[{index}] ({name}): unknown loss term(s) {bad}; the terms are "
                            f"{list(LOSS_TERMS)}")
        epoch, iteration = item.get("until_epoch"), item.get("until_iteration")
        if epoch is not None and iteration is not None:
            raise DataError(None, f"stages[{index}] ({name}): give 'until_epoch' or 'until_iteration', not both")
        for key, value in (("until_epoch", epoch), ("until_iteration", iteration)):
            if value is not None and not _whole_number(value):  # int() took True as 1 and failed bare on text
                unit = key.split("_")[1]
                raise DataError(None, f"stages[{index}] ({name}): {key} must be a whole number >= 1 (the last {unit} "
                                f"of this stage), got {value!r}; fix the stages setting")
        return Stage(
            name=name,
            losses=tuple(dict.fromkeys(losses)),
            until_epoch=None if epoch is None else int(epoch),
            until_iteration=None if iteration is None else int(iteration),
        )

    def stage_at(self, epoch: int, iteration: int) -> Stage:
        """The stage in force during 1-based ``epoch`` and 1-based ``iteration``."""
        for stage in self.stages:
            if stage.until_epoch is not None and epoch <= stage.until_epoch:
                return stage
            if stage.until_iteration is not None and iteration <= stage.until_iteration:
                return stage
        return self.stages[-1]

    def index(self, stage: Stage) -> int:
        """Position of ``stage`` in the schedule (0-based; logged as a scalar)."""
        return self.stages.index(stage)

    def unreached(self, max_epochs: int, epoch_length: int | None = None) -> list[Stage]:
        """The stages a run of ``max_epochs`` epochs (of ``epoch_length`` iterations, when known) never enters: those
        after a stage whose ``until_epoch`` (or, with ``epoch_length``, ``until_iteration``) is the run's end or later.
        ``[{dis, until_epoch 20}, {dis_res, until_epoch 60}, {dira}]`` with ``max_epochs`` 10 trains ``dis`` only."""
        last_iteration = None if epoch_length is None else max_epochs * epoch_length
        for i, stage in enumerate(self.stages[:-1]):
            if (stage.until_epoch is not None and stage.until_epoch >= max_epochs) or (
                    stage.until_iteration is not None and last_iteration is not None
                    and stage.until_iteration >= last_iteration):
                return self.stages[i + 1:]
        return []

    def unreached_text(self, unreached: list[Stage], max_epochs: int) -> str:
        """``stage(s) 'dis_res', 'dira' never run: stage 'dis' lasts until epoch 20 and max_epochs is 10``."""
        before = self.stages[self.stages.index(unreached[0]) - 1]
        bound = (f"epoch {before.until_epoch}" if before.until_epoch is not None
                 else f"iteration {before.until_iteration}")
        names = ", ".join(repr(s.name) for s in unreached)
        return (f"stage{'s' if len(unreached) > 1 else ''} {names} (losses "
                f"{', '.join('+'.join(s.losses) for s in unreached)}) never run{'s' if len(unreached) == 1 else ''}: "
                f"stage {before.name!r} lasts until {bound} and max_epochs is {max_epochs}")

    def as_list(self) -> list[dict]:
        """The schedule as a config writes it (what ``last.pt`` records, ``trainer`` key ``stages``)."""
        return [{"name": s.name, "losses": list(s.losses),
                 **({"until_epoch": s.until_epoch} if s.until_epoch is not None else {}),
                 **({"until_iteration": s.until_iteration} if s.until_iteration is not None else {})} for s in self.stages]

    def describe(self) -> str:
        """``dis (dis) to epoch 20, dis_res (dis+res) to epoch 60, dira (dis+res+adv) to the end``."""
        return ", ".join(s.describe() for s in self.stages)

    @property
    def uses(self) -> set[str]:
        """Every loss term that is active in at least one stage."""
        return {t for s in self.stages for t in s.losses}

    def __repr__(self) -> str:
        parts = []
        for s in self.stages:
            bound = f"<=epoch {s.until_epoch}" if s.until_epoch else f"<=iter {s.until_iteration}" if s.until_iteration else "to the end"
            parts.append(f"{s.name}[{'+'.join(s.losses)}, {bound}]")
        return f"StageSchedule({', '.join(parts)})"


def resume_stage_problem(saved: Mapping, schedule: StageSchedule, loss_weights: Mapping[str, float] | None = None) -> str:
    """Why ``schedule`` (and ``loss_weights``, when given) cannot go on from a checkpoint whose ``trainer`` entries are
    ``saved``, or '' when it can: every stage up to the one of the last step trained must keep its name and losses, the
    ends of the stages before it must stay where they are, that stage's end may move only where the step stays in it
    (it runs longer, or ends at that step), and the loss weights of its terms must stay the same. Later stages, a stage
    end still ahead and the last stage's length (a larger ``max_epochs``) may change. '' for a checkpoint that records no schedule (dira_pretrain 0.1.58 or
    earlier), as before."""
    try:
        recorded = StageSchedule(saved["stages"])
        epoch, iteration = int(saved["epoch"]), int(saved["iteration"])
    except (KeyError, TypeError, ValueError):  # not recorded (or not readable): nothing can be told, as before
        return ""
    mid = int(saved.get("epoch_iteration", 0) or 0) > 0  # written inside epoch + 1

    def reached(stage: Stage) -> bool:
        return ((stage.until_epoch is not None and stage.until_epoch <= epoch)
                or (stage.until_iteration is not None and stage.until_iteration <= iteration))

    step = (max(epoch + mid, 1), max(iteration, 1))  # the epoch and iteration of the last step trained
    last = recorded.stage_at(*step)  # the stage of the last step trained
    where = (f"to iteration {iteration} (in epoch {epoch + 1})" if mid else f"to epoch {epoch}") + f", in stage {last.name!r}"
    for i, before in enumerate(recorded.stages[:recorded.index(last) + 1]):
        now = schedule.stages[i] if i < len(schedule.stages) else None
        if now is None or now.name != before.name or set(now.losses) != set(before.losses):
            what = f"stage {i + 1} is {before.name} ({'+'.join(before.losses)}) there and " + (
                f"{now.name} ({'+'.join(now.losses)}) here" if now else "missing here")
        elif (now.until_epoch, now.until_iteration) == (before.until_epoch, before.until_iteration):
            continue
        elif before is last and schedule.index(schedule.stage_at(*step)) == i:
            continue  # the stage trained last ends elsewhere but still holds its last step: longer, or ending there
        elif before is last or reached(before) or reached(now):
            what = f"stage {before.name!r} ends at {before.bound()} there and at {now.bound()} here"
        else:
            continue
        return (f"trained {where}, with stages {recorded.describe()}; this run's stages are {schedule.describe()}: "
                f"{what}; the stages up to the one trained last and their ends up to its last step are fixed (its steps, "
                "optimiser state and per-stage best.pt are counted by them)")
    old = saved.get("loss_weights")
    if loss_weights is None or not isinstance(old, Mapping):
        return ""
    changed = [f"lambda_{t}={float(old[t]):g} there and {float(loss_weights[t]):g} here" for t in last.losses
               if t in old and t in loss_weights and float(old[t]) != float(loss_weights[t])]
    if changed:
        return (f"trained {where}, whose losses ({'+'.join(last.losses)}) it weighted otherwise: {', '.join(changed)}; "
                "the stage's losses (and its best.pt) would not be comparable")
    return ""


def check_resume_stages(saved: Mapping, schedule: StageSchedule, loss_weights: Mapping[str, float] | None = None,
                        source: str = "last.pt") -> None:
    """Refuse, in one line naming ``source`` (the checkpoint), what differs and what to do, a resume from a checkpoint
    trained with another stage schedule or loss weights (:func:`resume_stage_problem`): the run went on with the epochs
    of one stage counted in another (train values, TensorBoard's stage, the per-stage best.pt) and another stage's
    optimiser state.

    Raises:
        DataError: (a ``ValueError``) the schedule or the weights do not fit the checkpoint."""
    problem = resume_stage_problem(saved, schedule, loss_weights)
    if problem:
        folder = os.path.dirname(str(source)) or "."
        raise DataError(None, f"{source} was {problem}; to go on from it, rerun with the stages and loss weights it was "
                        "trained with (the last stage may run longer: a larger max_epochs); to train with these, use "
                        "another ckpt_dir (`dira3d pretrain --output`), or set resume to false to start afresh (it "
                        f"replaces last.pt and best.pt in {folder})")
