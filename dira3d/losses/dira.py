"""The joint DiRA objective: a λ-weighted sum of the active loss terms.

    L = λ_dis·L_dis + λ_res·L_res + λ_adv·L_adv

summed over the terms that are *active* in the current training stage (DiRA trains in stages:
``dis`` alone, then ``dis + res``, then ``dis + res + adv``). 3D defaults (DiRA_TransVW):
λ_dis = 1, λ_res = 100, λ_adv = 1. The official 2D code uses 1, 10, 0.001.

Reference: DiRA patent US12387324B2; Haghighi et al., "DiRA: Discriminative, Restorative, and
Adversarial Learning for Self-supervised Medical Image Analysis", CVPR 2022.

Example:
    >>> import torch
    >>> loss = DiRALoss(parse_weights("res=10"))
    >>> total, weighted = loss({"dis": torch.tensor(2.0), "res": torch.tensor(0.5)}, active={"dis", "res"})
    >>> float(total), sorted(weighted)
    (7.0, ['dis', 'res'])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dira3d.data.errors import DataError

__all__ = ["TERM_NAMES", "DEFAULT_WEIGHTS", "parse_weights", "DiRALoss"]

TERM_NAMES = ("dis", "res", "adv")
DEFAULT_WEIGHTS: dict[str, float] = {"dis": 1.0, "res": 100.0, "adv": 1.0}


def parse_weights(weights: Mapping[str, float] | str) -> dict[str, float]:
    """Read loss weights from a dict or a ``"dis=1,res=100,adv=1"`` string (CLI overrides).

    Args:
        weights: mapping of term name to λ, or comma-separated ``name=value`` pairs.

    Returns:
        ``{name: float}`` for the names given (others are not filled in).

    Raises:
        ValueError: on an unknown name, a malformed pair, or a negative / non-finite value.
    """
    if isinstance(weights, str):
        parsed: dict[str, float] = {}
        for pair in filter(None, (p.strip() for p in weights.split(","))):
            name, sep, value = pair.partition("=")
            try:
                if not sep:
                    raise ValueError
                parsed[name.strip()] = float(value)
            except ValueError:
                raise DataError(
                    None, f"loss weights: cannot read {pair!r}; write name=value pairs such as 'dis=1,res=100,adv=1'."
                ) from None
        weights = parsed
    result: dict[str, float] = {}
    for name, value in dict(weights).items():
        if name not in TERM_NAMES:
            raise DataError(None, f"loss weights: unknown term {name!r}; the terms are {', '.join(TERM_NAMES)}.")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise DataError(None, f"loss weights: λ for {name!r} must be a finite number >= 0, got {value}.")
        result[name] = value
    return result


class DiRALoss(nn.Module):
    """λ-weighted sum of the active DiRA terms.

    Args:
        weights: λ per term, a dict or ``"name=value,..."`` string; names left out keep their
            defaults (``dis=1, res=100, adv=1``).

    Raises:
        ValueError: on unknown term names or invalid values (see :func:`parse_weights`).
    """

    def __init__(self, weights: Mapping[str, float] | str | None = None) -> None:
        super().__init__()
        self.weights: dict[str, float] = {**DEFAULT_WEIGHTS, **parse_weights(weights or {})}

    def forward(
        self, terms: Mapping[str, torch.Tensor], active: Iterable[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum the active terms, each times its λ; inactive terms in ``terms`` are ignored.

        Args:
            terms: scalar loss per term name (unweighted).
            active: names of the terms that count in the current stage (one name may be given as a string).

        Returns:
            ``(total, weighted)``: the scalar sum and ``{name: λ·term}`` for the active names.

        Raises:
            ValueError: if ``active`` is empty, names an unknown term, names a term missing from
                ``terms``, or a term is not a scalar.
        """
        if isinstance(active, str):  # "dis" is one term, not the terms "d", "i", "s"
            active = [active]
        active = list(dict.fromkeys(active))  # de-duplicate, keep order
        if not active:
            raise ValueError(f"DiRALoss: no active terms; name at least one of {', '.join(TERM_NAMES)} in the stage.")
        weighted: dict[str, torch.Tensor] = {}
        for name in active:
            if name not in self.weights:
                raise ValueError(f"DiRALoss: unknown active term {name!r}; the terms are {', '.join(TERM_NAMES)}.")
            if name not in terms:
                raise ValueError(
                    f"DiRALoss: term {name!r} is active but was not computed (got {sorted(terms)}); "
                    "compute it in this stage or remove it from the stage's losses."
                )
            if terms[name].ndim != 0:
                raise ValueError(f"DiRALoss: term {name!r} must be a scalar, got shape {tuple(terms[name].shape)}.")
            weighted[name] = self.weights[name] * terms[name]
        total = torch.stack(list(weighted.values())).sum()
        return total, weighted

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.weights.items())
