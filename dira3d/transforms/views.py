"""Augmented views T(.) for instance discrimination (MoCo-v2, Barlow Twins, SimSiam), batched.

One view = random crop-and-resize, random flips, intensity (colour) jitter, Gaussian noise and
Gaussian blur, each drawn per sample. ``ViewAugment`` holds the settings and returns two
independent views; its defaults follow SimCLR/MoCo-v2 in 2D and a CT-friendly set in 3D.

Every step computes every sample and keeps the result where drawn (``torch.where``): fixed
shapes, nothing read back from the device, on any device. The blur's kernel radius comes from the
configured largest sigma (not from the sigmas drawn), so a sample's view never depends on the
other samples. ``static_shapes`` is accepted for an interface uniform with the distortions; no
step has a subset path (blurring only the drawn samples is not bit-identical: a grouped
convolution of one channel takes another algorithm than one of many).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ._common import bernoulli, check_batch, check_static, to_device, uniform

__all__ = ["ViewSettings", "ViewAugment", "random_views", "gaussian_blur", "blur_radius", "BRIGHTNESS_KINDS"]


@dataclass
class ViewSettings:
    """Settings of one view (see ``random_views`` for their meaning)."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_axes: tuple[int, ...] = (-1,)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    brightness_kind: str = "scale"
    contrast: float = 0.4
    gamma: tuple[float, float] = (1.0, 1.0)
    gamma_prob: float = 0.0
    noise_std: float = 0.0
    noise_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_prob: float = 0.5


BRIGHTNESS_KINDS = ("scale", "shift")


def _defaults(spatial_dims: int) -> ViewSettings:
    if spatial_dims == 2:  # SimCLR / MoCo-v2 on chest X-rays (grey: no saturation or hue)
        return ViewSettings()
    # 3D: milder crops (patches are already small), flips along every axis, gamma and noise; brightness
    # as a shift of the [0, 1] intensities (a HU offset), not a scaling, which would leave air (0) dark.
    return ViewSettings(scale=(0.5, 1.0), ratio=(1.0, 1.0), flip_axes=(0, 1, 2), jitter_prob=0.8, brightness=0.2,
                        brightness_kind="shift", contrast=0.2, gamma=(0.7, 1.5), gamma_prob=0.5, noise_std=0.05,
                        noise_prob=0.5, blur_sigma=(0.1, 1.0), blur_prob=0.5)


def _crop_resize(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float],
                 ratio: tuple[float, float]) -> torch.Tensor:
    """Random crop covering a ``scale`` share of the area/volume, resized back to the input size."""
    b, d = x.shape[0], x.ndim - 2
    u = uniform((b, 3), generator, x.device)
    share = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    side = share ** (1.0 / d)  # per-axis fraction for an isotropic crop of that share
    fractions = side[:, None].expand(b, d).clone()
    if d == 2 and ratio != (1.0, 1.0):  # aspect ratio (W / H) drawn log-uniformly, as torchvision does
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
        r = torch.exp(log_r)
        fractions = torch.stack([side / r.sqrt(), side * r.sqrt()], dim=1)
    fractions = fractions.clamp(max=1.0)
    centres = (uniform((b, d), generator, x.device) * 2 - 1) * (1 - fractions)
    theta = torch.zeros(b, d, d + 1, device=x.device, dtype=torch.float32)
    for i in range(d):  # affine_grid's first coordinate is the last spatial axis
        axis = d - 1 - i
        theta[:, i, i] = fractions[:, axis]
        theta[:, i, d] = centres[:, axis]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


def blur_radius(max_sigma: float) -> int:
    """Kernel radius (``ceil(3 * sigma)``, at least 1) that covers every sigma up to ``max_sigma``."""
    return max(1, int(math.ceil(3 * float(max_sigma))))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (``sigma`` ``(B,)``, 0 = unchanged).

    Per-sample kernels are applied at once as a grouped convolution over ``B * C`` channels.

    Args:
        x: ``(B, C, *spatial)`` batch, 1 to 3 spatial dims.
        sigma: ``(B,)`` standard deviations in voxels.
        radius: kernel radius in voxels, the same for every sample; give
            ``blur_radius(largest possible sigma)`` so that a sample's blur does not depend on the
            others' sigmas and nothing is read back from the device. When omitted it is
            ``blur_radius(sigma.max())`` (a device-to-host synchronisation on a GPU).

    Returns:
        The blurred batch (replicate padding at the borders).

    Raises:
        ValueError: on a radius below 1.
    """
    b, c, *spatial = x.shape
    d = len(spatial)
    if radius is None:
        radius = blur_radius(float(sigma.max()))
    if radius < 1:
        raise ValueError(f"gaussian_blur radius must be at least 1 voxel, got {radius}")
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (t[None] / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # sigma -> 0 gives a delta (identity)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, K)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    out = x.reshape(1, b * c, *spatial)
    for axis in range(d):
        shape = [b * c, 1] + [1] * d
        shape[2 + axis] = 2 * radius + 1
        out = F.pad(out, _pad_for(axis, d, radius), mode="replicate")
        out = conv(out, kernel.view(shape), groups=b * c)
    return out.view(b, c, *spatial)


def _pad_for(axis: int, d: int, radius: int) -> list[int]:
    pad = [0] * (2 * d)  # F.pad lists the last axis first
    pad[2 * (d - 1 - axis)] = radius
    pad[2 * (d - 1 - axis) + 1] = radius
    return pad


def random_views(x: torch.Tensor, generator: torch.Generator, settings: ViewSettings | None = None,
                 static_shapes: bool | None = None,
                 return_clean: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One augmented view of every sample of ``x``.

    Steps, each drawn per sample: crop covering ``scale`` of the area/volume (2D aspect in
    ``ratio``) resized back; flip along each of ``flip_axes`` with ``flip_prob``; with
    ``jitter_prob`` brightness and contrast: ``brightness_kind`` ``"scale"`` (the 2D default, MoCo-v2's
    torchvision ``ColorJitter``) multiplies by U(1-b, 1+b), clips, then scales about the new mean by
    U(1-c, 1+c) and clips (a fixed order: ``ColorJitter`` draws the order); ``"shift"`` (the 3D default)
    scales about the mean by U(1-c, 1+c) and adds U(-b, b), then clips;
    with ``gamma_prob`` a gamma in ``gamma`` (log-uniform); with ``noise_prob`` Gaussian noise of
    std U(0, noise_std); with ``blur_prob`` a Gaussian blur of sigma in ``blur_sigma`` (kernel
    radius ``ceil(3 * blur_sigma[1])``). Output clipped to [0, 1].

    Args:
        x: ``(B, C, *spatial)`` batch in [0, 1], 2D or 3D, any device.
        generator: source of randomness (CPU or on ``x``'s device).
        settings: the view settings; the defaults of ``ViewAugment`` for the dims when omitted.
        static_shapes: accepted for an interface uniform with the distortions (validated, no
            effect): every step already has fixed shapes on any device.
        return_clean: also return the view's crop after the flips, before any intensity step
            (jitter, gamma, noise, blur): the restoration target of DiRA (official code: the
            crop before jitter, blur and distortion). Draws nothing more: the view is the same.

    Returns:
        The view, same shape and dtype as ``x``; with ``return_clean`` ``(view, clean)``.

    Raises:
        ValueError: on a badly shaped input or bad settings.
    """
    d = check_batch(x)
    check_static(static_shapes)
    s = settings or _defaults(d)
    if not 0.0 < s.scale[0] <= s.scale[1] <= 1.0:
        raise ValueError(f"view scale must satisfy 0 < min <= max <= 1, got {s.scale}")
    if not 0.0 <= s.blur_sigma[0] <= s.blur_sigma[1]:
        raise ValueError(f"view blur_sigma must satisfy 0 <= min <= max, got {s.blur_sigma}")
    if s.brightness_kind not in BRIGHTNESS_KINDS:
        raise ValueError(f"view brightness_kind must be one of {BRIGHTNESS_KINDS}, got {s.brightness_kind!r}")
    b, dev = x.shape[0], x.device
    out = _crop_resize(x, generator, s.scale, s.ratio)
    for axis in s.flip_axes:
        axis = axis % d
        flip = bernoulli(b, s.flip_prob, generator, dev).view(b, *([1] * (d + 1)))
        out = torch.where(flip, out.flip(2 + axis), out)
    clean = out.clamp(0.0, 1.0).to(x.dtype) if return_clean else None
    view_shape = (b, *([1] * (d + 1)))
    jitter = bernoulli(b, s.jitter_prob, generator, dev).view(view_shape)
    u = uniform((b, 2), generator, dev)
    shift = ((u[:, 0] * 2 - 1) * s.brightness).view(view_shape)
    factor = (1 + (u[:, 1] * 2 - 1) * s.contrast).view(view_shape)
    axes = tuple(range(1, d + 2))
    if s.brightness_kind == "shift":
        mean = out.mean(dim=axes, keepdim=True)
        jittered = ((out - mean) * factor + mean + shift).clamp(0, 1)
    else:  # torchvision ColorJitter: brightness scales by U[1 - b, 1 + b], then contrast about the new mean
        bright = (out * (1 + shift).clamp_min(0)).clamp(0, 1)
        mean = bright.mean(dim=axes, keepdim=True)
        jittered = ((bright - mean) * factor + mean).clamp(0, 1)
    out = torch.where(jitter, jittered, out)
    if s.gamma_prob > 0:
        use = bernoulli(b, s.gamma_prob, generator, dev).view(view_shape)
        lg = math.log(s.gamma[0]) + (math.log(s.gamma[1]) - math.log(s.gamma[0])) * uniform((b,), generator, dev)
        out = torch.where(use, out.clamp_min(0) ** torch.exp(lg).view(view_shape), out)
    if s.noise_prob > 0 and s.noise_std > 0:
        use = bernoulli(b, s.noise_prob, generator, dev).view(view_shape)
        std = (uniform((b,), generator, dev) * s.noise_std).view(view_shape)
        noise = to_device(torch.randn(tuple(x.shape), generator=generator, device=generator.device), dev)
        out = torch.where(use, out + std * noise, out)
    if s.blur_prob > 0:
        use = bernoulli(b, s.blur_prob, generator, dev)
        sigma = s.blur_sigma[0] + (s.blur_sigma[1] - s.blur_sigma[0]) * uniform((b,), generator, dev)
        blurred = gaussian_blur(out, sigma, blur_radius(s.blur_sigma[1]))
        out = torch.where(use.view(view_shape), blurred, out)
    out = out.clamp(0.0, 1.0).to(x.dtype)
    return (out, clean) if return_clean else out


class ViewAugment:
    """Two independent views ``v1, v2 = aug(x, generator)`` of a batch.

    Args:
        spatial_dims: 2 (SimCLR/MoCo-v2 set) or 3 (crop 0.5-1, flips on every axis, jitter,
            gamma, noise, blur).
        static_shapes: see :func:`random_views` (``None``: static off the CPU).
        **overrides: any field of ``ViewSettings`` (e.g. ``scale=(0.3, 1.0)``, ``blur_prob=0``).

    Raises:
        ValueError: on spatial_dims other than 2 or 3, an unknown setting or a bad ``static_shapes``.
    """

    def __init__(self, spatial_dims: int = 3, static_shapes: bool | None = None, **overrides: object) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        check_static(static_shapes)
        settings = asdict(_defaults(spatial_dims))
        unknown = sorted(set(overrides) - set(settings))
        if unknown:
            raise ValueError(f"unknown view setting(s) {unknown}; valid settings are {sorted(settings)}.")
        settings.update(overrides)
        self.spatial_dims, self.static_shapes = spatial_dims, static_shapes
        self.settings = ViewSettings(**settings)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, return_clean: bool = False,
                 return_clean2: bool = False) -> tuple[torch.Tensor, ...]:
        """``(v1, v2)``; with ``return_clean`` ``(v1, v2, clean1)``: ``clean1`` is v1's crop and flips
        without the intensity steps (the restoration target); ``return_clean2`` appends ``clean2``, the
        same for v2 (``(v1, v2, clean1, clean2)`` with both). The views are the same either way."""
        if x.ndim - 2 != self.spatial_dims:
            raise ValueError(f"ViewAugment(spatial_dims={self.spatial_dims}) got a batch of shape {tuple(x.shape)}; "
                             f"expected (B, C) + {self.spatial_dims} spatial dims.")
        v1, clean = random_views(x, generator, self.settings, self.static_shapes, return_clean=True)
        v2 = random_views(x, generator, self.settings, self.static_shapes, return_clean=return_clean2)
        if return_clean2:
            v2, clean2 = v2
        return (v1, v2) + ((clean,) if return_clean else ()) + ((clean2,) if return_clean2 else ())
