"""Seed derivation: a fresh seed from a tuple of integers, so no random stream is carried along.

Seeding every draw from (base seed, purpose, index) instead of carrying a generator makes a resumed
run draw exactly what an uninterrupted run would have drawn. Both widths hash the parts with
:class:`numpy.random.SeedSequence` (well mixed, order-sensitive); the values are part of the
reproducibility contract (a rerun of ``dira3d visual-words`` writes the same bytes, a resumed
pretraining the same weights), so neither function may change what it returns
(``tests/test_seeding.py`` pins values).

- :func:`derive_seed` with ``bits=32`` (visual-word discovery: references, centres, crops; fits
  ``numpy.random.RandomState``) or ``bits=63`` (fits ``torch.Generator.manual_seed``).
- :func:`stream_seed`: the training engines' seed of random ``stream`` at step ``counter``
  (63 bits, base seed folded to 32 bits).
- :func:`check_seed`: a bundle's ``seed`` setting checked for its kind before MONAI's ``set_determinism`` uses it;
  :func:`check_whole_numbers`: other count settings (epochs, intervals) checked as it is, in the same words;
  :func:`check_ranges`: number settings with a range (shares, rates, momenta) checked against it.
  :func:`check_numbers`: settings that take any number (``learning_rate``, ``bn_momentum``, ``width``);
  :func:`check_sizes`: size settings (``roi_size``, ``patch_size``), one whole number per axis of the network, each a
  multiple of its downsampling (:func:`nearest_fitting_sizes`: the sizes it names instead).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["check_numbers", "check_ranges", "check_seed", "check_sizes", "check_whole_numbers", "derive_seed",
           "nearest_fitting_sizes", "stream_seed"]


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int: a whole number >= 0 (2.0, as JSON or YAML may write it, is 2).

    ``python -m monai.bundle run --seed two`` passes text and ``--seed 1.5`` a float: text failed in
    ``set_determinism`` inside MONAI's traceback, 1.5 ran as seed 1 without a word. The bundles call this (or
    :func:`dira3d.evaluation.check_split_settings`) first in ``initialize``.

    Raises:
        DataError: naming the setting and the value (one ``error:`` line under ``python -m monai.bundle run``).
    """
    return _whole_number(seed, name, 0, f"give a whole number >= 0, e.g. --{name} 0")


def check_whole_numbers(minimum: int = 1, **settings: object) -> dict[str, int]:
    """Each of ``settings`` (``name=value``) as an int, a whole number >= ``minimum``, as :func:`check_seed` checks
    the seed; the pretraining bundle calls it first in ``initialize``, before any data are read.

    ``--log_every 0`` failed at the first iteration with a ZeroDivisionError inside MONAI's traceback; ``-1`` logged
    (and ``image_every`` 0 or -1 drew images) every iteration, ``max_epochs`` 1.5 trained 2 epochs, all without a
    word; ``batch_size`` 0 or ``num_workers`` -1 were refused by the DataLoader only after the data were cached.

    Raises:
        DataError: the first setting that is not one, named with its value and what to give.
    """
    return {name: _whole_number(value, name, minimum, f"give a whole number >= {minimum}, e.g. --{name} {minimum}")
            for name, value in settings.items()}


def check_numbers(or_null: bool = False, **settings: object) -> dict[str, float | None]:
    """Each of ``settings`` (``name=value``) as a float: a finite number (``or_null``: null too, e.g. ``bn_momentum``,
    whose null is PyTorch's cumulative average); the task bundles call it in ``initialize``, before any data are read.

    ``python -m monai.bundle run --bn_momentum abc`` (or ``dira3d finetune --tiny --set bn_momentum=abc``: tiny.json's
    default is null, so ``check_overrides`` cannot tell its kind) failed at the first training step inside MONAI's
    traceback (``batch_norm(): argument 'momentum' must be float, not str``), after the data were cached.

    Raises:
        DataError: the first setting that is not one, named with its value and what to give.
    """
    from dira3d.data.errors import DataError

    checked: dict[str, float | None] = {}
    for name, value in settings.items():
        if value is None and or_null:
            checked[name] = None
            continue
        advice = f"give --{name} a number, such as 0.1 or 1e-3" + (", or null" if or_null else "")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DataError(None, f"{name}={value!r} is not a number; {advice}")
        if not math.isfinite(value):
            raise DataError(None, f"{name}={value!r} is not a finite number; {advice}")
        checked[name] = float(value)
    return checked


_SIZE_EXAMPLES = {2: "[224,224]", 3: "[64,64,32]"}


def check_sizes(spatial_dims: int, multiple: int = 1, **settings: object) -> dict[str, list[int]]:
    """Each of ``settings`` (``name=value``, e.g. ``roi_size``) as a list of ``spatial_dims`` whole numbers >= 1, one
    per axis of the network, each a multiple of ``multiple`` (the network's downsampling: 8 for the 3D U-Net, 32 for
    the 2D ResNets); the bundles call it in ``initialize``, before any data are read.

    ``roi_size=[16,16]`` for a 3D bundle failed while the data were cached, with MONAI's "Sequence must have length 3,
    got 2." naming no setting; ``roi_size=abc`` under ``python -m monai.bundle run`` in a traceback; a size that is not
    a multiple (``patch_size=[60,60,30]``) at the first training step, after the data were cached, in a traceback of
    170 lines (the network's own check, which stays in the TorchScript subset).

    Raises:
        DataError: the first setting that is not one, named with its value and what to give (for a size that is not a
            multiple, the nearest sizes that are); a ``spatial_dims`` other than 2 or 3.
    """
    from dira3d.data.errors import DataError

    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise DataError(None, f"spatial_dims={spatial_dims!r} is not supported; use 2 or 3")
    checked = {}
    for name, value in settings.items():
        example = _SIZE_EXAMPLES.get(spatial_dims, "[" + ",".join(["64"] * spatial_dims) + "]")
        advice = f"give {spatial_dims} whole numbers >= 1, one per axis of the {spatial_dims}D network, e.g. --{name} \"{example}\""
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise DataError(None, f"{name}={value!r} is not a list of sizes; {advice}")
        if len(value) != spatial_dims:
            count = f"{len(value)} number{'' if len(value) == 1 else 's'}"
            raise DataError(None, f"{name}={list(value)!r} has {count}, but the network is {spatial_dims}D; {advice}")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
               or not float(v).is_integer() or v < 1 for v in value):
            raise DataError(None, f"{name}={list(value)!r} is not {spatial_dims} whole numbers >= 1; {advice}")
        sizes = [int(v) for v in value]
        if any(v % multiple for v in sizes):
            nearest = " or ".join(f'"[{",".join(map(str, s))}]"' for s in nearest_fitting_sizes(sizes, multiple))
            raise DataError(None, f"{name}={sizes!r} does not fit the {spatial_dims}D network: each size must be a "
                            f"multiple of {multiple} (its downsampling); give e.g. --{name} {nearest}, the nearest "
                            "sizes that fit")
        checked[name] = sizes
    return checked


def nearest_fitting_sizes(sizes: Sequence[int], multiple: int) -> list[list[int]]:
    """The sizes nearest ``sizes`` (whole numbers >= 1) that are multiples of ``multiple``: each rounded down (to at
    least ``multiple``), and each rounded up; one list when both are the same. :func:`check_sizes` names them, and
    so does ``dira3d export`` for an ``--input-shape`` that does not fit the network."""
    below = [max(multiple, v // multiple * multiple) for v in sizes]
    above = [-(-v // multiple) * multiple for v in sizes]
    return [below] if below == above else [below, above]


def _whole_number(value: object, name: str, minimum: int, advice: str) -> int:
    from dira3d.data.errors import DataError

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(None, f"{name}={value!r} is not a number; {advice}")
    if not float(value).is_integer():
        raise DataError(None, f"{name}={value!r} is not a whole number; {advice}")
    if value < minimum:
        raise DataError(None, f"{name}={value!r} is {'negative' if minimum == 0 else f'less than {minimum}'}; {advice}")
    return int(value)


def derive_seed(*parts: int, bits: int) -> int:
    """A seed in ``[0, 2**bits)`` from the integers ``parts`` (order-sensitive; ``SeedSequence``
    pads with zeros, so trailing zero parts do not change it: give each purpose its own leading
    parts rather than an appended 0).

    Args:
        parts: non-negative integers of any size (``SeedSequence`` refuses negative ones).
        bits: 32 (the first 32-bit word of ``SeedSequence(parts)``) or 63 (its first two words,
            the second without its lowest bit).

    Raises:
        ValueError: ``bits`` other than 32 or 63; a negative part.
    """
    if bits not in (32, 63):
        raise ValueError(f"bits={bits!r} is not supported; choose 32 or 63")
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(1 if bits == 32 else 2, np.uint32)
    if bits == 32:
        return int(words[0])
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def stream_seed(seed: int, stream: int, counter: int) -> int:
    """The 63-bit seed of random ``stream`` at step ``counter`` (epoch or iteration) of a run seeded
    ``seed``, as the training engines draw it (``DiRATrainer``, ``DiRAEvaluator``, shuffle BN).

    ``seed`` is folded to its low 32 bits first, so any integer seed (a negative one too) is accepted.
    """
    return derive_seed(int(seed) & 0xFFFFFFFF, stream, counter, bits=63)


_INTERVAL = re.compile(r"^([\[(])(-?(?:inf|\d+(?:\.\d+)?)), (-?(?:inf|\d+(?:\.\d+)?))([\])])( or null)?$")


def check_ranges(**settings: tuple[object, str]) -> dict[str, float | None]:
    """Each of ``settings`` (``name=(value, range)``) as a float inside ``range``, written as intervals are: ``'[0, 1]'``
    (both ends allowed), ``'[0, 1)'`` (1 not), ``'(0, inf)'`` (above 0); ``' or null'`` after it lets the setting be
    null (None). The bundles call it in ``initialize`` after :func:`check_whole_numbers`, before any data are read; a
    setting whose id is nested is passed as ``**{'validate#inferer#overlap': (...)}`` (MONAI turns the ``#`` of an
    expression into ``::``, even in its text; the error names the id with ``#``, as the docs and overrides write it).

    ``--collapse_gap 2`` (D's real-minus-restored probability gap, never above 1) never warned; ``--num_samples_cache 2``
    or ``--cache_rate 2`` cached every entry and -1 none (MONAI's ``CacheDataset`` clips the count); ``--bn_momentum 2``
    or ``--moco_momentum 2`` averaged away from the running values; all without a word. A sliding-window ``overlap`` of
    1 failed in MONAI's traceback only at the first validation, after an epoch of training.

    Raises:
        DataError: the first setting that is not a number in its range, named with its value and the range.
        ValueError: a range not written as above (the bundle's mistake, not the user's).
    """
    from dira3d.data.errors import DataError

    checked: dict[str, float | None] = {}
    for key, (value, interval) in settings.items():
        name = key.replace("::", "#")
        match = _INTERVAL.match(interval)
        if match is None:
            raise ValueError(f"check_ranges: {name}'s range {interval!r} is not written as '[0, 1)', '(0, inf)', ...")
        opening, low, high, closing, nullable = match.groups()
        if value is None and nullable:
            checked[name] = None
            continue
        plain = interval.removesuffix(" or null")
        advice = f"give a number in {plain}" + (" or null" if nullable else "")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DataError(None, f"{name}={value!r} is not a number; {advice}")
        number = float(value)
        above = number > float(low) if opening == "(" else number >= float(low)
        below = number < float(high) if closing == ")" else number <= float(high)
        if not (above and below):  # NaN is neither
            raise DataError(None, f"{name}={value!r} is outside {plain}; {advice}")
        checked[name] = number
    return checked
