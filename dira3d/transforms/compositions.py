"""Restorative distortion compositions: Models Genesis, TransVW, 2D DiRA and none.

A composition is called as ``distorted, target = comp(x, generator)``: ``target`` is ``x`` with the
same flips as the input (the restoration target); ``distorted`` has the flips and the distortions.
``comp.sample(x, generator)`` also returns which distortions each sample received (for tests and
image logging).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from ._common import apply_to_subset, bernoulli, check_batch, uniform
from .distortions2d import cutout, outer_cutout, patch_swap
from .intensity import nonlinear_intensity
from .painting import inpaint, outpaint
from .shuffle import local_pixel_shuffle
from .spatial import elastic_inplane, random_flip

__all__ = [
    "Distortion",
    "ModelsGenesisDistortion",
    "TransVWDistortion",
    "DiRA2DDistortion",
    "NoDistortion",
    "DISTORTIONS",
    "build_distortion",
    "default_distortion_args",
    "choose_one",
]

Applied = dict[str, torch.Tensor]
_GENESIS_STAGES = ("shuffle", "nonlinear", "inpaint", "outpaint")  # the Models Genesis distortions, in applied order


def _check_prob(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def choose_one(batch: int, probs: Sequence[float], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Per sample, the index of one option drawn with ``probs``; ``len(probs)`` means none (the remainder)."""
    thresholds = torch.cumsum(torch.tensor(list(probs), dtype=torch.float64), 0).to(device)
    u = uniform((batch,), generator, device, dtype=torch.float64)
    return torch.searchsorted(thresholds, u, right=True)


class Distortion(ABC):
    """Base class: subclasses implement ``sample``; ``__call__`` drops the record of what was applied."""

    @abstractmethod
    def sample(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        """Return ``(distorted, target, applied)``: per-sample booleans of what was applied."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        distorted, target, _ = self.sample(x, generator)
        return distorted, target


def _apply(x: torch.Tensor, selected: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    # ``x`` is always the composition's own working copy, so writing into it is safe and saves a
    # full-batch copy per stage.
    return apply_to_subset(x, selected, fn, inplace=True) if bool(selected.any()) else x


def _apply_stages(x: torch.Tensor, applied: Applied, stages: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                  names: Sequence[str]) -> torch.Tensor:
    # stages run in ``names`` order: the order fixes how the generator is consumed
    for name in names:
        x = _apply(x, applied[name], stages[name])
    return x


def _flipped_pair(x: torch.Tensor, generator: torch.Generator, flip_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target, working copy)``: input and target get the same flips, so flip once and copy."""
    check_batch(x)
    target, _ = random_flip(x, None, generator, prob=flip_prob)
    return target, target.clone()


def _genesis_stages(generator: torch.Generator, num_blocks: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    # the four _GENESIS_STAGES distortions, shared by Models Genesis and TransVW
    return {
        "shuffle": lambda s: local_pixel_shuffle(s, generator, num_blocks=num_blocks),
        "nonlinear": lambda s: nonlinear_intensity(s, generator),
        "inpaint": lambda s: inpaint(s, generator),
        "outpaint": lambda s: outpaint(s, generator),
    }


class NoDistortion(Distortion):
    """Identity: the input is returned as distorted and as target (for ablations without L_res)."""

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        check_batch(x)
        return x.clone(), x, {}


class ModelsGenesisDistortion(Distortion):
    """Models Genesis: flip, then independently shuffle, non-linear intensity, and painting.

    Args:
        flip_prob: probability of each successive flip (input and target alike).
        shuffle_prob: probability of local pixel shuffling.
        nonlinear_prob: probability of the Bézier intensity curve.
        paint_prob: probability of painting; then in-painting with ``inpaint_share`` else out-painting.
        inpaint_share: share of in-painting among painted samples.
        num_blocks: shuffle blocks per sample.

    Raises:
        ValueError: on a probability outside [0, 1].
    """

    def __init__(self, flip_prob: float = 0.4, shuffle_prob: float = 0.5, nonlinear_prob: float = 0.9,
                 paint_prob: float = 0.9, inpaint_share: float = 0.2, num_blocks: int = 10000) -> None:
        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.shuffle_prob = _check_prob("shuffle_prob", shuffle_prob)
        self.nonlinear_prob = _check_prob("nonlinear_prob", nonlinear_prob)
        self.paint_prob = _check_prob("paint_prob", paint_prob)
        self.inpaint_share = _check_prob("inpaint_share", inpaint_share)
        self.num_blocks = int(num_blocks)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        target, distorted = _flipped_pair(x, generator, self.flip_prob)
        b, dev = x.shape[0], x.device
        shuffle = bernoulli(b, self.shuffle_prob, generator, dev)
        nonlinear = bernoulli(b, self.nonlinear_prob, generator, dev)
        paint = bernoulli(b, self.paint_prob, generator, dev)
        use_inpaint = bernoulli(b, self.inpaint_share, generator, dev)
        applied = {"shuffle": shuffle, "nonlinear": nonlinear, "inpaint": paint & use_inpaint,
                   "outpaint": paint & ~use_inpaint}
        distorted = _apply_stages(distorted, applied, _genesis_stages(generator, self.num_blocks),
                                  _GENESIS_STAGES)
        return distorted, target, applied


class TransVWDistortion(Distortion):
    """TransVW: in-plane elastic warp of the input, then exactly one of four distortions.

    Args:
        elastic_prob: per-sample probability of the elastic warp (input only).
        shuffle_prob, nonlinear_prob, inpaint_prob, outpaint_prob: probability of choosing each
            (sum <= 1; the remainder means none of them).
        alpha, sigma: elastic warp settings (TransVW: 991, 8).
        flip_prob: probability of each successive flip (input and target alike; 0 = no flips).
        num_blocks: shuffle blocks per sample.

    Raises:
        ValueError: on a probability outside [0, 1] or choice probabilities summing above 1.
    """

    names = _GENESIS_STAGES

    def __init__(self, elastic_prob: float = 1.0, shuffle_prob: float = 0.25, nonlinear_prob: float = 0.25,
                 inpaint_prob: float = 0.25, outpaint_prob: float = 0.25, alpha: float = 991.0, sigma: float = 8.0,
                 flip_prob: float = 0.0, num_blocks: int = 10000) -> None:
        self.elastic_prob = _check_prob("elastic_prob", elastic_prob)
        self.probs = [_check_prob(f"{n}_prob", p) for n, p in
                      zip(self.names, (shuffle_prob, nonlinear_prob, inpaint_prob, outpaint_prob))]
        if sum(self.probs) > 1.0 + 1e-9:
            raise ValueError(f"TransVW choice probabilities {dict(zip(self.names, self.probs))} sum to "
                             f"{sum(self.probs):.3f} > 1; lower them so that exactly one is chosen per sample.")
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.num_blocks = int(num_blocks)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        target, distorted = _flipped_pair(x, generator, self.flip_prob)
        b, dev = x.shape[0], x.device
        elastic = bernoulli(b, self.elastic_prob, generator, dev)
        choice = choose_one(b, self.probs, generator, dev)
        applied = {"elastic": elastic, **{n: choice == i for i, n in enumerate(self.names)}}
        distorted = _apply(distorted, elastic, lambda s: elastic_inplane(s, generator, self.alpha, self.sigma))
        distorted = _apply_stages(distorted, applied, _genesis_stages(generator, self.num_blocks), self.names)
        return distorted, target, applied


class DiRA2DDistortion(Distortion):
    """2D DiRA: exactly one of cutout / outer cutout / patch swap, or none (the remainder, 0.35).

    Args:
        cutout_prob, outer_cutout_prob, patch_swap_prob: probability of choosing each (sum <= 1).
        cutout_boxes, cutout_size: up to this many boxes with sides in this range (px).
        swaps, swap_size: box pairs swapped and their side range (px).
        fill: ``"noise"`` or ``"zero"`` for the cutouts.

    Raises:
        ValueError: on a probability outside [0, 1] or probabilities summing above 1.
    """

    names = ("cutout", "outer_cutout", "patch_swap")

    def __init__(self, cutout_prob: float = 0.3, outer_cutout_prob: float = 0.05, patch_swap_prob: float = 0.3,
                 cutout_boxes: int = 10, cutout_size: tuple[int, int] = (10, 70), swaps: int = 10,
                 swap_size: tuple[int, int] = (10, 15), fill: str = "noise") -> None:
        self.probs = [_check_prob(f"{n}_prob", p) for n, p in
                      zip(self.names, (cutout_prob, outer_cutout_prob, patch_swap_prob))]
        if sum(self.probs) > 1.0 + 1e-9:
            raise ValueError(f"DiRA 2D distortion probabilities {dict(zip(self.names, self.probs))} sum above 1.")
        self.cutout_boxes, self.cutout_size = int(cutout_boxes), tuple(cutout_size)
        self.swaps, self.swap_size, self.fill = int(swaps), tuple(swap_size), fill

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        check_batch(x)
        choice = choose_one(x.shape[0], self.probs, generator, x.device)
        applied = {n: choice == i for i, n in enumerate(self.names)}
        funcs = {
            "cutout": lambda s: cutout(s, generator, prob=1.0, max_boxes=self.cutout_boxes,
                                       size=self.cutout_size, fill=self.fill),
            "outer_cutout": lambda s: outer_cutout(s, generator, prob=1.0, fill=self.fill),
            "patch_swap": lambda s: patch_swap(s, generator, prob=1.0, swaps=self.swaps, size=self.swap_size),
        }
        return _apply_stages(x.clone(), applied, funcs, self.names), x, applied


DISTORTIONS: dict[str, type[Distortion]] = {
    "models_genesis": ModelsGenesisDistortion,
    "transvw": TransVWDistortion,
    "dira2d": DiRA2DDistortion,
    "none": NoDistortion,
}


def default_distortion_args(name: str, patch_size: Sequence[int]) -> dict:
    """Settings of a composition that depend on the patch: TransVW's elastic warp is scaled with
    the patch's in-plane size so that a 64-voxel patch gets the reference (alpha 991, sigma 8) and
    smaller patches the same warp relative to their size (displacements scale as alpha / sigma)."""
    if name != "transvw":
        return {}
    scale = float(patch_size[0]) / 64.0
    return {"alpha": 991.0 * scale**2, "sigma": 8.0 * scale}


def build_distortion(name: str, **overrides: object) -> Distortion:
    """Build a composition by name with constructor overrides.

    Args:
        name: ``"models_genesis"``, ``"transvw"``, ``"dira2d"`` or ``"none"``.
        **overrides: constructor arguments of that composition.

    Returns:
        The composition.

    Raises:
        ValueError: on an unknown name or an unknown override.
    """
    if name not in DISTORTIONS:
        raise ValueError(f"unknown distortion {name!r}; choose one of {sorted(DISTORTIONS)}.")
    cls = DISTORTIONS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"distortion {name!r} has no setting(s) {unknown}; its settings are {allowed}.")
    return cls(**overrides)
