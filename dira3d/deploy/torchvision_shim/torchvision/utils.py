"""``make_grid`` and ``save_image`` with the torchvision signatures MONAI Label uses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["make_grid", "save_image"]


def make_grid(
    tensor: torch.Tensor | Sequence[torch.Tensor],
    nrow: int = 8,
    padding: int = 2,
    normalize: bool = False,
    value_range: tuple[float, float] | None = None,
    scale_each: bool = False,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Tile ``(B, C, H, W)`` images (or ``(C, H, W)`` / ``(H, W)``) into one ``(3|C, H', W')`` image.

    ``normalize`` rescales to [0, 1] by ``value_range`` (default: min and max, of each image when
    ``scale_each``). One-channel images are repeated to three channels, as torchvision does.
    """
    if not torch.is_tensor(tensor):
        tensor = torch.stack(list(tensor))
    tensor = tensor.float().clone()
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() == 3:
        tensor = tensor[None] if tensor.shape[0] in (1, 3) else tensor[:, None]
    if tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    if normalize:
        images = tensor if scale_each else [tensor]
        for image in images:
            lo, hi = value_range if value_range else (float(image.min()), float(image.max()))
            image.clamp_(lo, hi).sub_(lo).div_(max(hi - lo, 1e-5))
    if tensor.shape[0] == 1:
        return tensor[0]
    count, channels, height, width = tensor.shape
    cols = min(nrow, count)
    rows = int(math.ceil(count / cols))
    h, w = height + padding, width + padding
    grid = tensor.new_full((channels, rows * h + padding, cols * w + padding), pad_value)
    for k in range(count):
        r, c = divmod(k, cols)
        grid[:, r * h + padding: r * h + padding + height, c * w + padding: c * w + padding + width] = tensor[k]
    return grid


def save_image(tensor: torch.Tensor | Sequence[torch.Tensor], fp, format: str | None = None, **kwargs) -> None:
    """Write :func:`make_grid` of ``tensor`` (values in [0, 1]) as an 8-bit image with Pillow."""
    from PIL import Image

    grid = make_grid(tensor, **kwargs)
    array = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(array.squeeze(-1) if array.shape[-1] == 1 else array)).save(fp, format=format)
