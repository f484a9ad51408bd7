"""Staged DiRA training ("gradual evolutionary" schedule of the patent).

DiRA does not switch all three losses on at once: it first trains the discriminative branch
alone, then warms up encoder and decoder with discrimination + restoration, and only then adds
the adversary. A :class:`StageSchedule` is that plan, written in the bundle config as a list::

    [{"name": "dis",     "until_epoch": 2, "losses": ["dis"]},
     {"name": "dis_res", "until_epoch": 4, "losses": ["dis", "res"]},
     {"name": "dira",                      "losses": ["dis", "res", "adv"]}]

A stage lasts while the current (1-based) epoch is ``<= until_epoch`` (or the current 1-based
iteration is ``<= until_iteration``); the last stage has no bound and runs to the end. The stage
is a pure function of (epoch, iteration), so it survives a resume without being stored.
Any non-empty subset of ``{"dis", "res", "adv"}`` is allowed (ablations: ``["res"]`` alone is
Models Genesis-style restoration, ``["dis", "res"]`` is the official 2D ``dir`` stage).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dira3d.data.errors import DataError

__all__ = ["LOSS_TERMS", "Stage", "StageSchedule", "DEFAULT_STAGES"]

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
