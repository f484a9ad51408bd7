"""Fault handling for long DiRA runs: non-finite losses, adversary collapse, disk space.

- :class:`NonFiniteGuard` watches every ``loss*`` term WITHOUT a per-step host sync: each step
  folds ``isfinite`` into a device tensor that remembers the first bad iteration per term; the
  host looks at it every ``check_every`` iterations and — always — right before a checkpoint is
  written (:meth:`NonFiniteGuard.check`), so a NaN never reaches ``last.pt`` / ``best.pt``.
  ``on_nonfinite="stop"`` raises :class:`NonFiniteLossError` naming the term and the iteration;
  ``"skip"`` makes the trainer drop such steps (one joint decision per step, see
  :func:`step_is_finite`) and the guard only counts them. Under DDP the periodic check is also where
  the ranks agree to stop on SIGTERM / Ctrl-C (:mod:`dira3d.engines.stopping`), in the same all-reduce.
- :class:`CollapseMonitor` warns once when D's real/fake probability gap stays above a
  threshold for many consecutive iterations (the adversary "wins outright": G gets no signal).
- :func:`estimate_checkpoint_bytes` sizes a checkpoint so that a nearly full disk is reported
  before training starts (``check_writable(ckpt_dir, min_free_bytes=...)``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
import torch
from ignite.engine import Engine, Events
from torch import nn

from dira3d.engines.distributed import all_ranks_min, all_ranks_true

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteLossError",
    "NonFiniteGuard",
    "CollapseMonitor",
    "step_is_finite",
    "check_finite_weights",
    "estimate_checkpoint_bytes",
]

NONFINITE_POLICIES = ("stop", "skip")
logger = logging.getLogger("DiRATrainer")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or weight; the message names the term and the iteration."""


def step_is_finite(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (one host sync; used by ``on_nonfinite="skip"``)."""
    return all_ranks_true(torch.isfinite(loss.detach()).all(), device=loss.device)


class NonFiniteGuard:
    """Stop (or count skipped steps) when a loss term becomes NaN/Inf.

    Args:
        on_nonfinite: ``"stop"`` (raise, the last good checkpoint stays) or ``"skip"`` (the trainer
            drops the step; the guard logs how many were dropped).
        check_every: iterations between host-side checks (checks also run before every save and
            at the end of the run).

    Raises:
        DataError: an unknown policy (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle run``).
    """

    def __init__(self, on_nonfinite: str = "stop", check_every: int = 10) -> None:
        if on_nonfinite not in NONFINITE_POLICIES:
            from dira3d.data.errors import DataError

            raise DataError(None, f"on_nonfinite={on_nonfinite!r} is not supported; choose one of "
                            f"{', '.join(NONFINITE_POLICIES)}")
        self.on_nonfinite, self.check_every = on_nonfinite, max(int(check_every), 1)
        self.first_bad: dict[str, torch.Tensor] = {}  # term -> first bad iteration (-1: none), on device
        self.skipped = 0
        self._reported_skips = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every), self.periodic_check)
        engine.add_event_handler(Events.COMPLETED, self.check)

    def periodic_check(self, engine: Engine) -> None:
        """:meth:`check`, every ``check_every`` iterations; under DDP the ranks also agree there, in the same
        all-reduce, whether a SIGTERM / Ctrl-C reached any of them (``engine.signal_stop``, a
        :class:`~dira3d.engines.stopping.SignalStop`), and then all stop after this iteration."""
        stop = getattr(engine, "signal_stop", None)
        if stop is None or stop.single_process:  # one process: the stop is looked at after every step
            self.check(engine)
            return
        signum = self.check(engine, stop_signal=stop.requested or 0)
        if signum:
            stop.stop(engine, signum)

    def record(self, engine: Engine) -> None:
        """Fold this step's terms into the device-side record (no host sync)."""
        output = engine.state.output
        if not isinstance(output, dict):
            return
        iteration = engine.state.iteration
        for key, value in output.items():
            if not (key.startswith("loss") and isinstance(value, torch.Tensor)):
                continue
            seen = self.first_bad.get(key)
            if seen is None:
                seen = torch.full((), -1, dtype=torch.long, device=value.device)
            bad = ~torch.isfinite(value.detach()).all()
            self.first_bad[key] = torch.where(bad & (seen < 0), torch.full_like(seen, iteration), seen)

    def reset(self) -> None:
        self.first_bad = {}

    def restore_skipped(self, skipped: int) -> None:
        """Continue the count of skipped steps of the run a checkpoint resumes (those were reported already)."""
        self.skipped = self._reported_skips = int(skipped)

    def check(self, engine: Engine, stop_signal: int | None = None) -> int:
        """Raise :class:`NonFiniteLossError` if a term went non-finite since the last check (``stop``).

        Args:
            stop_signal: this rank's pending stop signal (its number; 0: none), agreed over the ranks in the
                same all-reduce as the non-finite flags (None: no stop decision, no collective in ``skip`` mode).

        Returns:
            The largest ``stop_signal`` of all ranks (0: none, or not asked).

        Raises:
            NonFiniteLossError: names the term(s), the first bad iteration, the stage, and what to do.
        """
        # the training device: NCCL reduces CUDA tensors only
        device = getattr(engine.state, "device", None) or "cpu"
        if self.on_nonfinite == "skip":
            if self.skipped > self._reported_skips:
                logger.warning(f"on_nonfinite='skip': {self.skipped} step(s) with a NaN/Inf loss were skipped "
                               f"so far (latest check at iteration {engine.state.iteration})")
                self._reported_skips = self.skipped
            self.reset()
            return 0 if stop_signal is None else -all_ranks_min([-stop_signal], device)[0]
        firsts = {k: int(v) for k, v in self.first_bad.items()}  # the host sync, once per check
        bad = {k: it for k, it in firsts.items() if it >= 0}
        # decided jointly: a rank that stopped alone would leave the others waiting in an all-reduce
        agreed = all_ranks_min([int(not bad)] + ([] if stop_signal is None else [-stop_signal]), device)
        if agreed[0]:
            return 0 if stop_signal is None else -agreed[1]
        if not bad:
            raise NonFiniteLossError(
                f"a loss became NaN/Inf on another rank before iteration {engine.state.iteration}; training "
                "stopped (see that rank's message) and the last checkpoint written before it is kept"
            )
        term = min(bad, key=lambda k: (bad[k], k != "loss"))
        terms = sorted(k for k, it in bad.items() if it == bad[term] and k != "loss") or [term]
        raise NonFiniteLossError(
            f"non-finite {', '.join(terms)} (NaN/Inf) at iteration {bad[term]} "
            f"(stage '{getattr(engine.state, 'stage', '?')}'); training stopped and the last checkpoint "
            "written before it is kept. Lower the learning rate or the λ of that term, set clip_grad_norm, "
            "check the input data, or set on_nonfinite='skip' to drop such steps"
        )


def check_finite_weights(modules: dict[str, nn.Module], where: str = "") -> None:
    """Raise :class:`NonFiniteLossError` when a parameter or buffer of ``modules`` is NaN/Inf.

    One host sync; run before writing a checkpoint so that no NaN is ever saved.
    """
    for name, module in modules.items():
        tensors = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise NonFiniteLossError(
                f"{name} has NaN/Inf weights{where}; the checkpoint is NOT written and the previous one is "
                "kept. Lower the learning rate, set clip_grad_norm, or check the input data"
            )


class CollapseMonitor:
    """Warn (once) when the adversary wins outright: ``d_real − d_fake > gap`` for ``patience`` iterations.

    Reads ``d_real`` / ``d_fake`` (D's mean probability on real / restored patches) from the
    trainer output; the streak is counted on the device and read every ``check_every`` iterations.

    Args:
        gap: probability gap that counts as D winning outright.
        patience: consecutive iterations above ``gap`` before the warning.
        check_every: iterations between host-side reads.
    """

    def __init__(self, gap: float = 0.95, patience: int = 200, check_every: int = 10) -> None:
        self.gap, self.patience, self.check_every = float(gap), max(int(patience), 1), max(int(check_every), 1)
        self.streak: torch.Tensor | None = None
        self.longest: torch.Tensor | None = None
        self.warned = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every), self.check)
        engine.add_event_handler(Events.COMPLETED, self.check)

    def record(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, dict) or "d_real" not in output or "d_fake" not in output:
            return
        wins = (output["d_real"] - output["d_fake"]).detach() > self.gap
        if self.streak is None:
            self.streak = torch.zeros((), dtype=torch.long, device=wins.device)
            self.longest = torch.zeros_like(self.streak)
        self.streak = torch.where(wins, self.streak + 1, torch.zeros_like(self.streak))
        self.longest = torch.maximum(self.longest, self.streak)

    def check(self, engine: Engine) -> None:
        if self.warned or self.longest is None:
            return
        longest = int(self.longest)
        if longest >= self.patience:
            self.warned = True
            logger.warning(
                f"adversary collapse: D separated real from restored patches by more than {self.gap} for "
                f"{longest} consecutive iterations (up to iteration {engine.state.iteration}); the generator "
                "gets little adversarial signal. Lower lr_d or lambda_adv, use adversarial_kind='lsgan', or d_steps=1"
            )


def estimate_checkpoint_bytes(modules: Iterable[nn.Module], optimizer_copies: int = 2) -> int:
    """Bytes one checkpoint of ``modules`` needs, with Adam's two moments per parameter.

    ``atomic_save`` writes the new file next to the old one before replacing it, so callers
    should ask for twice this much free space.
    """
    total = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            total += p.numel() * p.element_size() * (1 + optimizer_copies)
        for b in module.buffers():
            total += b.numel() * b.element_size()
    return int(total * 1.05) + (1 << 16)  # pickle overhead, metadata
