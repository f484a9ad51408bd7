"""A guard against a oneDNN fault: wrong bf16 3D convolution weight gradients on some CPUs.

Measured on 2026-11-26 on an AMD EPYC CPU with ``avx512_bf16`` (torch 2.13.0+cpu, oneDNN 3.12.0). Under bf16
autocast, the weight gradient of ``Conv3d`` (kernel 3, padding 1) was wrong when its input was 2 voxels deep along
the first spatial axis and had 16 channels or more:
- the values were read from memory nobody wrote, up to 1e38, and different at every call;
- float32, float16, other depths and PyTorch's own convolution (oneDNN off) were right.

Real sizes can reach that shape: the tiny presets' 16×16×8 patches are 2×2×1 at the U-Net's deepest level. With
the fault, the weights blew up and the losses turned NaN (an earlier CPU without ``avx512_bf16`` did not show it).

:func:`onednn_bf16_conv3d_grad_is_wrong` checks this PyTorch on this CPU once per process (a few milliseconds).
Where the check fails, :class:`~dira3d.engines.DiRATrainer` runs its bf16 steps on the CPU with oneDNN switched off
(:func:`onednn_off`): right, and slower. bf16 is meant for GPUs; ``amp: none`` is the CPU setting.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

__all__ = ["onednn_bf16_conv3d_grad_is_wrong", "onednn_off"]


def _weight_grad(x: torch.Tensor, weight: torch.Tensor, bf16: bool) -> torch.Tensor:
    weight = weight.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = F.conv3d(x, weight, padding=1)
    out.float().square().sum().backward()
    return weight.grad


@functools.lru_cache(maxsize=1)
def onednn_bf16_conv3d_grad_is_wrong() -> bool:
    """Whether this PyTorch's oneDNN gives a wrong bf16 weight gradient for a 3D convolution of an input 2 voxels
    deep on this CPU. The check compares against float32, three times, because the wrong values come from
    unwritten memory and can happen to be small. False where oneDNN is not available."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    # 16 channels: with 8 or 4 the same CPU computed the gradient right (another oneDNN kernel)
    x = torch.rand(2, 16, 2, 4, 4, generator=gen)
    weight = torch.randn(16, 16, 3, 3, 3, generator=gen) * 0.1
    with torch.backends.mkldnn.flags(enabled=True, deterministic=None, allow_tf32=None, fp32_precision=None):
        reference = _weight_grad(x, weight, bf16=False)
        scale = float(reference.abs().max())
        for _ in range(3):
            grad = _weight_grad(x, weight, bf16=True)
            # bf16 has 8 bits of mantissa: a right gradient is within about 1 % of float32's
            if not bool(torch.isfinite(grad).all()) or float((grad - reference).abs().max()) > 0.05 * scale:
                return True
    return False


def onednn_off() -> contextlib.AbstractContextManager:
    """A context in which CPU convolutions use PyTorch's own kernels instead of oneDNN's (other flags kept)."""
    return torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None, fp32_precision=None)
