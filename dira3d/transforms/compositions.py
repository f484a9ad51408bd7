"""Restorative distortion compositions: Models Genesis, TransVW, 2D DiRA and none.

A composition is called as ``distorted, target = comp(x, generator)``: ``target`` is ``x`` with the
same flips as the input (the restoration target); ``distorted`` has the flips and the distortions.
``comp(x, generator, target=clean)`` flips ``clean`` instead of ``x`` into the target (the views of
the instance modes: ``x`` is the jittered view, ``clean`` its crop before jitter and blur).
``comp.sample(x, generator)`` also returns which distortions each sample received (for tests and
image logging).

Every stage is called on the whole batch with the composition's own per-sample choice
(``selected=``), so it draws its random numbers for every sample; ``static_shapes`` then picks how
the chosen samples are computed (see :mod:`dira3d.transforms._common`): only them (the CPU
default) or all of them, kept with ``torch.where`` (the default elsewhere: no host
synchronisation). Both give the same result for the same seed.
"""

from __future__ import annotations

import inspect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch

from ._common import bernoulli, check_batch, check_static, fill_values, resolve_static, uniform
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
    "distortion_from_settings",
    "default_distortion_args",
    "choose_one",
]

Applied = dict[str, torch.Tensor]
Stage = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (batch, selected) -> distorted batch
_GENESIS_STAGES = ("shuffle", "nonlinear", "inpaint", "outpaint")  # the Models Genesis distortions, in applied order


def _check_prob(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def choose_one(batch: int, probs: Sequence[float], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Per sample, the index of one option drawn with ``probs``; ``len(probs)`` means none (the remainder).

    The index is the number of cumulative thresholds at or below a U[0, 1) draw, counted against
    Python floats (no threshold tensor built from Python data).
    """
    u = uniform((batch,), generator, device, dtype=torch.float64)
    choice = torch.zeros(batch, dtype=torch.long, device=u.device)
    for threshold in itertools.accumulate(float(p) for p in probs):
        choice += u >= threshold
    return choice


class Distortion(ABC):
    """Base class: subclasses implement ``sample``; ``__call__`` drops the record of what was applied."""

    @abstractmethod
    def sample(self, x: torch.Tensor, generator: torch.Generator,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        """Return ``(distorted, target, applied)``: per-sample booleans of what was applied.

        ``target``: the restoration target before the flips (default ``x``), shaped like ``x``; it
        gets the input's flips and nothing else. The random draws do not depend on it.
        """

    def __call__(self, x: torch.Tensor, generator: torch.Generator,
                 target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        distorted, target, _ = self.sample(x, generator, target)
        return distorted, target


def _apply_stages(x: torch.Tensor, applied: Applied, stages: dict[str, Stage], names: Sequence[str]) -> torch.Tensor:
    # Stages run in ``names`` order (the order fixes how the generator is consumed), each on the
    # whole batch with its per-sample choice: a stage draws its random numbers whether or not any
    # sample chose it, so the generator is consumed alike on both paths.
    for name in names:
        x = stages[name](x, applied[name])
    return x


def _flipped_pair(x: torch.Tensor, generator: torch.Generator, flip_prob: float, static: bool,
                  target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target, working copy)``: input and target get the same flips, so flip once and copy
    (or, given a separate ``target``, flip both alike)."""
    check_batch(x)
    if target is None:
        target, _ = random_flip(x, None, generator, prob=flip_prob, static_shapes=static)
        return target, target.clone()
    work, target = random_flip(x, target, generator, prob=flip_prob, static_shapes=static)
    return target, work.clone()


def _genesis_stages(generator: torch.Generator, num_blocks: int, static: bool) -> dict[str, Stage]:
    """The four _GENESIS_STAGES distortions, shared by Models Genesis and TransVW.

    The batch a stage gets is always the composition's own working copy, so the stages write into
    it (``inplace``: saves a batch copy per stage). In- and out-painting never paint the same sample, so they share one
    U[0, 1) noise draw: a batch of noise instead of two, drawn by whichever paints first (always
    in-painting: every stage runs, on both paths), so the batch-sized draw is not held in memory
    through the shuffle.
    """
    opts = {"static_shapes": static, "inplace": True}
    shared: list[torch.Tensor] = []

    def noise(s: torch.Tensor) -> torch.Tensor:
        if not shared:
            shared.append(fill_values(s, generator, "noise"))
        return shared[0]

    return {
        "shuffle": lambda s, sel: local_pixel_shuffle(s, generator, num_blocks=num_blocks, selected=sel, **opts),
        "nonlinear": lambda s, sel: nonlinear_intensity(s, generator, selected=sel, **opts),
        "inpaint": lambda s, sel: inpaint(s, generator, fill=noise(s), selected=sel, **opts),
        "outpaint": lambda s, sel: outpaint(s, generator, fill=noise(s), selected=sel, **opts),
    }


class NoDistortion(Distortion):
    """Identity: the input is returned as distorted and as target (for ablations without L_res).

    Args:
        static_shapes: accepted for a uniform interface (the identity has no data-dependent shapes).

    Raises:
        ValueError: on a ``static_shapes`` other than True, False or None.
    """

    def __init__(self, static_shapes: bool | None = None) -> None:
        self.static_shapes = check_static(static_shapes)

    def sample(self, x: torch.Tensor, generator: torch.Generator,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        check_batch(x)
        return x.clone(), x if target is None else target, {}


class ModelsGenesisDistortion(Distortion):
    """Models Genesis: flip, then independently shuffle, non-linear intensity, and painting.

    Args:
        flip_prob: probability of each successive flip (input and target alike).
        shuffle_prob: probability of local pixel shuffling.
        nonlinear_prob: probability of the Bézier intensity curve.
        paint_prob: probability of painting; then in-painting with ``inpaint_share`` else out-painting.
        inpaint_share: share of in-painting among painted samples.
        num_blocks: shuffle blocks per sample.
        static_shapes: ``True``: compute every sample and keep the chosen ones (fixed shapes, no
            host synchronisation: for a GPU); ``False``: compute only the chosen samples (cheaper
            on a CPU); ``None``: static on any device but the CPU. Both give the same result.

    Raises:
        ValueError: on a probability outside [0, 1] or a bad ``static_shapes``.
    """

    def __init__(self, flip_prob: float = 0.4, shuffle_prob: float = 0.5, nonlinear_prob: float = 0.9,
                 paint_prob: float = 0.9, inpaint_share: float = 0.2, num_blocks: int = 10000,
                 static_shapes: bool | None = None) -> None:
        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.shuffle_prob = _check_prob("shuffle_prob", shuffle_prob)
        self.nonlinear_prob = _check_prob("nonlinear_prob", nonlinear_prob)
        self.paint_prob = _check_prob("paint_prob", paint_prob)
        self.inpaint_share = _check_prob("inpaint_share", inpaint_share)
        self.num_blocks = int(num_blocks)
        self.static_shapes = check_static(static_shapes)

    def sample(self, x: torch.Tensor, generator: torch.Generator,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        static = resolve_static(self.static_shapes, x.device)
        target, distorted = _flipped_pair(x, generator, self.flip_prob, static, target)
        b, dev = x.shape[0], x.device
        shuffle = bernoulli(b, self.shuffle_prob, generator, dev)
        nonlinear = bernoulli(b, self.nonlinear_prob, generator, dev)
        paint = bernoulli(b, self.paint_prob, generator, dev)
        use_inpaint = bernoulli(b, self.inpaint_share, generator, dev)
        applied = {"shuffle": shuffle, "nonlinear": nonlinear, "inpaint": paint & use_inpaint,
                   "outpaint": paint & ~use_inpaint}
        distorted = _apply_stages(distorted, applied, _genesis_stages(generator, self.num_blocks, static),
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
        static_shapes: ``True``: compute every sample and keep the chosen ones (fixed shapes, no
            host synchronisation: for a GPU); ``False``: compute only the chosen samples (cheaper
            on a CPU); ``None``: static on any device but the CPU. Both give the same result.

    Raises:
        ValueError: on a probability outside [0, 1], choice probabilities summing above 1 or a
            bad ``static_shapes``.
    """

    names = _GENESIS_STAGES

    def __init__(self, elastic_prob: float = 1.0, shuffle_prob: float = 0.25, nonlinear_prob: float = 0.25,
                 inpaint_prob: float = 0.25, outpaint_prob: float = 0.25, alpha: float = 991.0, sigma: float = 8.0,
                 flip_prob: float = 0.0, num_blocks: int = 10000, static_shapes: bool | None = None) -> None:
        self.elastic_prob = _check_prob("elastic_prob", elastic_prob)
        self.probs = [_check_prob(f"{n}_prob", p) for n, p in
                      zip(self.names, (shuffle_prob, nonlinear_prob, inpaint_prob, outpaint_prob))]
        if sum(self.probs) > 1.0 + 1e-9:
            raise ValueError(f"TransVW choice probabilities {dict(zip(self.names, self.probs))} sum to "
                             f"{sum(self.probs):.3f} > 1; lower them so that exactly one is chosen per sample.")
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.num_blocks = int(num_blocks)
        self.static_shapes = check_static(static_shapes)

    def sample(self, x: torch.Tensor, generator: torch.Generator,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        static = resolve_static(self.static_shapes, x.device)
        target, distorted = _flipped_pair(x, generator, self.flip_prob, static, target)
        b, dev = x.shape[0], x.device
        elastic = bernoulli(b, self.elastic_prob, generator, dev)
        choice = choose_one(b, self.probs, generator, dev)
        applied = {"elastic": elastic, **{n: choice == i for i, n in enumerate(self.names)}}
        distorted = elastic_inplane(distorted, generator, self.alpha, self.sigma, selected=elastic,
                                    static_shapes=static, inplace=True)
        distorted = _apply_stages(distorted, applied, _genesis_stages(generator, self.num_blocks, static), self.names)
        return distorted, target, applied


class DiRA2DDistortion(Distortion):
    """2D DiRA: exactly one of cutout / outer cutout / patch swap, or none (the remainder, 0.35).

    Args:
        cutout_prob, outer_cutout_prob, patch_swap_prob: probability of choosing each (sum <= 1).
        cutout_boxes, cutout_size: up to this many boxes with sides in this range (px).
        swaps, swap_size: box pairs swapped and their side range (px).
        fill: ``"noise"`` or ``"zero"`` for the cutouts.
        static_shapes: ``True``: compute every sample and keep the chosen ones (fixed shapes, no
            host synchronisation: for a GPU); ``False``: compute only the chosen samples (cheaper
            on a CPU); ``None``: static on any device but the CPU. Both give the same result.

    Raises:
        ValueError: on a probability outside [0, 1], probabilities summing above 1, a bad ``fill``
            or a bad ``static_shapes``.
    """

    names = ("cutout", "outer_cutout", "patch_swap")

    def __init__(self, cutout_prob: float = 0.3, outer_cutout_prob: float = 0.05, patch_swap_prob: float = 0.3,
                 cutout_boxes: int = 10, cutout_size: tuple[int, int] = (10, 70), swaps: int = 10,
                 swap_size: tuple[int, int] = (10, 15), fill: str = "noise",
                 static_shapes: bool | None = None) -> None:
        self.probs = [_check_prob(f"{n}_prob", p) for n, p in
                      zip(self.names, (cutout_prob, outer_cutout_prob, patch_swap_prob))]
        if sum(self.probs) > 1.0 + 1e-9:
            raise ValueError(f"DiRA 2D distortion probabilities {dict(zip(self.names, self.probs))} sum above 1.")
        self.cutout_boxes, self.cutout_size = int(cutout_boxes), tuple(cutout_size)
        if fill not in ("noise", "zero"):
            raise ValueError(f"DiRA 2D fill must be 'noise' or 'zero', got {fill!r}")
        self.swaps, self.swap_size, self.fill = int(swaps), tuple(swap_size), fill
        self.static_shapes = check_static(static_shapes)

    def sample(self, x: torch.Tensor, generator: torch.Generator,
               target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Applied]:
        check_batch(x)
        static = resolve_static(self.static_shapes, x.device)
        choice = choose_one(x.shape[0], self.probs, generator, x.device)
        applied = {n: choice == i for i, n in enumerate(self.names)}
        opts = {"static_shapes": static, "inplace": True}
        # cutout and outer cutout never hit the same sample: one fill draw serves both
        fill = fill_values(x, generator, self.fill)
        funcs = {
            "cutout": lambda s, sel: cutout(s, generator, max_boxes=self.cutout_boxes, size=self.cutout_size,
                                            fill=fill, selected=sel, **opts),
            "outer_cutout": lambda s, sel: outer_cutout(s, generator, fill=fill, selected=sel, **opts),
            "patch_swap": lambda s, sel: patch_swap(s, generator, swaps=self.swaps, size=self.swap_size,
                                                    selected=sel, **opts),
        }
        return _apply_stages(x.clone(), applied, funcs, self.names), x if target is None else target, applied


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


def distortion_from_settings(distortion: str, distortion_args: Mapping[str, object] | None) -> Distortion:
    """The pretraining bundle's ``distortion`` built with its ``distortion_args`` (``None``: the defaults), or one
    ``error:`` line naming both settings.

    ``build_distortion(@distortion, **@distortion_args)`` failed in MONAI's traceback for ``--distortion_args abc``
    (``argument after ** must be a mapping, not str``), naming no setting.

    Raises:
        DataError: ``distortion_args`` that is not a mapping, an unknown distortion or setting of it.
    """
    from dira3d.data.errors import DataError

    if distortion_args is None:
        distortion_args = {}
    if not isinstance(distortion_args, Mapping):
        raise DataError(None, f"distortion_args={distortion_args!r} is not a mapping; give the settings of distortion "
                        f"{distortion!r} by name, e.g. {{'sigma': 4.0}}, or leave distortion_args to its default")
    try:
        return build_distortion(distortion, **distortion_args)
    except ValueError as err:
        raise DataError(None, f"distortion={distortion!r}, distortion_args={dict(distortion_args)!r}: {err}") from err
