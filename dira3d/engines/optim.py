"""Small helpers for the DiRA training step: AMP settings, optimiser steps, EMA, devices.

Seeds come from :func:`dira3d.utils.seeding.stream_seed`.

Kept apart from :mod:`dira3d.engines.step` so the step reads as the method (G step, then
D step) and these mechanics can be tested on their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dira3d.losses.distributed import is_distributed

__all__ = [
    "AMP_MODES",
    "autocast_context",
    "make_grad_scaler",
    "optimizer_step",
    "ema_update",
    "frozen",
    "learning_rate",
    "unique_parameters",
]

AMP_MODES = ("none", "bf16", "fp16")


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ("bf16", "fp16"), a null context for "none".

    Raises:
        DataError: an unknown ``amp`` value (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle run``).
    """
    if amp not in AMP_MODES:
        from dira3d.data.errors import DataError

        raise DataError(None, f"amp={amp!r} is not supported; choose one of {', '.join(AMP_MODES)}")
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def _average_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients over ranks (our modules are not wrapped in DDP: the trainer calls
    ``encode``/``decode`` directly, which DDP's forward hook would not see).

    One all-reduce per (device, dtype) of all gradients flattened into one buffer, not one per
    parameter: with NCCL every collective is a launch with a fixed latency (tens of µs), and the
    default model has over a hundred parameter tensors. Every rank must hold gradients for the same
    parameters (the same stage and losses on every rank), as with one collective per parameter.
    """
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
) -> None:
    """Backward ``loss`` and step ``optimizer`` (scaled for fp16, averaged across ranks, clipped)."""
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if is_distributed():
        _average_gradients(params)
    if clip_grad_norm:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target ← momentum·target + (1 − momentum)·source`` for every parameter (MoCo key encoder).

    Buffers (BatchNorm statistics) are not averaged: the key encoder keeps its own, as in MoCo.
    """
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in source.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Switch off gradients of ``module`` for the generator step (D is not trained by G's loss)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def learning_rate(optimizer: torch.optim.Optimizer | None) -> float:
    """Learning rate of the first parameter group (0.0 when there is no optimiser)."""
    return float(optimizer.param_groups[0]["lr"]) if optimizer is not None else 0.0


def unique_parameters(modules: Iterable[nn.Module | None]) -> list[nn.Parameter]:
    """Parameters of several modules, each once, in a stable order."""
    seen: set[int] = set()
    params = []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
