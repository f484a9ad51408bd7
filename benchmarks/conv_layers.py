"""Where the convolution time of a pretraining step goes: every convolution of the default model, timed alone.

The H100 profile of the compiled step (docs/benchmarks.md) puts about two thirds of its device time
in cuDNN convolutions, forward and backward, with one weight-gradient kernel at 19 ms per step at
batch 64. This benchmark says which layer each millisecond belongs to and how close each layer
runs to the card's matrix rate, so that the next change aims at the right layer.

Every ``Conv3d`` / ``ConvTranspose3d`` (2D: ``Conv2d`` / ``ConvTranspose2d``) of the U-Net, the
visual-word head and the adversary is found with a forward hook on one forward pass at ``--batch``,
with the input shape that pass gives it. Each layer is then timed alone, under bf16 autocast with
fp32 weights (as the engine runs it): the forward, and the backward (input gradient, except for the
U-Net's first layer whose input is the image, and weight gradient). Variants, each on the same
shapes in one run:

- ``cl``: channels-last (the engine's layout with ``channels_last``), cuDNN's heuristic choice;
- ``cl+cudnn``: the same with ``torch.backends.cudnn.benchmark`` (cuDNN times its algorithms);
- ``ncdhw``: the default layout;
- ``split``: only for a convolution fed by the decoder's concatenation ``cat([up(x), skip])``: two
  convolutions, one on each part, summed (``conv(cat(a, b)) == conv_a(a) + conv_b(b)``). It tells
  whether leaving out the concatenation and its copy would pay.
- ``gemm``: only for a 1×1 convolution with at most 7 output channels (the U-Net's output head):
  the layer as one matrix product over channels-last rows (:mod:`dira3d.networks.gemm_head`).

Prints one row per layer and variant (ms forward, ms backward, TFLOP/s) and the totals per
network, and the total if every layer took its fastest variant.

    python benchmarks/conv_layers.py --device cuda --batch 64
    python benchmarks/conv_layers.py --quick                      # CPU smoke
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from dira3d.engines.performance import format_table, mean_ms
from dira3d.networks.gemm_head import use_gemm_head

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from pretrain_throughput import build_networks  # noqa: E402

COLUMNS = ["net", "layer", "variant", "in_shape", "fwd_ms", "bwd_ms", "total_ms", "tflops", "share_%"]
VARIANTS = ("cl", "cl+cudnn", "ncdhw", "split", "gemm")
PARTIAL = ("split", "gemm")  # variants that time only the layers they apply to
_CONVS = (nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class Layer:
    net: str
    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    needs_input_grad: bool
    split_at: int | None = None  # channels of the first part of a concatenated input

    def flops(self) -> float:
        """Forward FLOPs (2 per multiply-add) of this layer on ``in_shape``."""
        m = self.module
        k = math.prod(m.kernel_size)
        batch_voxels = self.in_shape[0] * math.prod(self.in_shape[2:])
        if isinstance(m, _TRANSPOSED):  # every input voxel meets every kernel tap once
            return 2.0 * batch_voxels * m.in_channels * m.out_channels * k / m.groups
        out_voxels = self.in_shape[0] * math.prod(
            (size + 2 * p - d * (kk - 1) - 1) // s + 1
            for size, p, d, kk, s in zip(self.in_shape[2:], m.padding, m.dilation, m.kernel_size, m.stride))
        return 2.0 * out_voxels * m.out_channels * m.in_channels * k / m.groups

    def backward_flops(self) -> float:
        return self.flops() * (2 if self.needs_input_grad else 1)


def find_layers(nets: dict[str, nn.Module], image: torch.Tensor, num_classes: int) -> list[Layer]:
    """Every convolution of the U-Net, head and adversary with the input shape one step gives it."""
    unet, head, adversary = nets["unet"], nets["head"], nets["adversary"]
    split = {}
    for level in getattr(unet.decoder, "levels", []):
        first = next(m for m in level.convs.modules() if isinstance(m, _CONVS))
        split[first] = level.up.out_channels
    layers: list[Layer] = []
    hooks = []
    for net_name, net in nets.items():
        for name, module in net.named_modules():
            if isinstance(module, _CONVS + _TRANSPOSED):
                def record(mod, args, _net=net_name, _name=name):
                    layers.append(Layer(_net, _name, mod, tuple(args[0].shape), True, split.get(mod)))
                hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            bottleneck, skips = unet.encode(image)
            restored = unet.decode(bottleneck, skips)
            head(bottleneck)
            adversary(restored)
    finally:
        for hook in hooks:
            hook.remove()
    if layers:
        layers[0].needs_input_grad = False  # the U-Net's first layer reads the image
    return layers


def applies_gemm_head(module: nn.Module) -> bool:
    """Whether :func:`~dira3d.networks.gemm_head.use_gemm_head` would switch ``module``."""
    return bool(use_gemm_head(copy.deepcopy(module)))


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def _parts(layer: Layer, variant: str, device: torch.device) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, input) pairs whose summed forwards are the layer's forward in ``variant``."""
    channels_last = variant != "ncdhw"
    module = layer.module
    if variant == "gemm":
        gemm = copy.deepcopy(module)
        use_gemm_head(gemm)
        x = torch.rand(layer.in_shape, device=device)
        return [(gemm, _layout(x, True).requires_grad_(layer.needs_input_grad))]
    if variant != "split":
        x = torch.rand(layer.in_shape, device=device)
        return [(module, _layout(x, channels_last).requires_grad_(layer.needs_input_grad))]
    parts = []
    for lo, hi in ((0, layer.split_at), (layer.split_at, module.in_channels)):
        conv = type(module)(hi - lo, module.out_channels, module.kernel_size, module.stride, module.padding,
                            bias=lo == 0).to(device)
        conv = conv.to(memory_format=torch.channels_last_3d if len(layer.in_shape) == 5 else torch.channels_last)
        x = torch.rand((layer.in_shape[0], hi - lo, *layer.in_shape[2:]), device=device)
        parts.append((conv, _layout(x, True).requires_grad_(True)))
    return parts


def time_variant(layer: Layer, variant: str, device: torch.device, repeats: int) -> tuple[float, float]:
    """(forward ms, backward ms) of ``layer`` in ``variant`` under bf16 autocast."""
    channels_last = variant != "ncdhw"
    memory_format = torch.channels_last_3d if len(layer.in_shape) == 5 else torch.channels_last
    layer.module.to(memory_format=memory_format if channels_last else torch.contiguous_format)
    torch.backends.cudnn.benchmark = variant == "cl+cudnn"
    parts = _parts(layer, variant, device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16)

    def forward() -> torch.Tensor:
        with torch.autocast(**autocast):
            out = None
            for module, x in parts:
                y = module(x)
                out = y if out is None else out + y
        return out

    with torch.autocast(**autocast):
        grad_out = torch.rand_like(forward())
    inputs = [p for module, x in parts for p in (*module.parameters(), *([x] if x.requires_grad else []))]

    def forward_backward() -> None:
        torch.autograd.grad(forward(), inputs, grad_out)

    try:
        fwd = mean_ms(forward, repeats, device)
        both = mean_ms(forward_backward, repeats, device)
    finally:
        torch.backends.cudnn.benchmark = False
    return fwd, max(both - fwd, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny CPU run (width 1/8, 16x16x8, batch 2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.width, args.patch, args.batch, args.num_classes, args.repeats = "cpu", 0.125, (16, 16, 8), 2, 4, 1
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"--variants: unknown {unknown}; use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    whole = [v for v in variants if v not in PARTIAL]  # 'split' and 'gemm' time only the layers they apply to
    if not whole:
        print("--variants: 'split' and 'gemm' time only the layers they apply to; add cl, cl+cudnn or ncdhw",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA device is available; use --device cpu.", file=sys.stderr)
        return 2
    unet, head, adversary = build_networks(args.width, args.num_classes, device)
    nets = {"unet": unet, "head": head, "adversary": adversary}
    image = torch.rand(args.batch, 1, *args.patch, device=device)
    layers = find_layers(nets, image, args.num_classes)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; patch {'x'.join(map(str, args.patch))}; "
          f"width {args.width}; bf16 autocast, fp32 weights; {len(layers)} convolutions")

    rows, best_total, totals = [], 0.0, {}
    for layer in layers:
        timed = {}
        for variant in variants:
            if variant == "split" and layer.split_at is None:
                continue
            if variant == "gemm" and not applies_gemm_head(layer.module):
                continue
            fwd, bwd = time_variant(layer, variant, device, args.repeats)
            timed[variant] = (fwd, bwd)
            seconds = (fwd + bwd) / 1000
            flop = layer.flops() + layer.backward_flops()
            rows.append({"net": layer.net, "layer": layer.name, "variant": variant,
                         "in_shape": "x".join(map(str, layer.in_shape)), "fwd_ms": round(fwd, 3),
                         "bwd_ms": round(bwd, 3), "total_ms": round(fwd + bwd, 3),
                         "tflops": flop / seconds / 1e12 if seconds > 0 else None, "share_%": None})
            totals[(layer.net, variant)] = totals.get((layer.net, variant), 0.0) + fwd + bwd
        best_total += min(sum(t) for t in timed.values())
    first = whole[0]  # the reference every layer is timed in
    grand = sum(v for (net, variant), v in totals.items() if variant == first)
    for row in rows:
        if row["variant"] == first and grand > 0:
            row["share_%"] = round(100 * row["total_ms"] / grand, 1)
    print(format_table(rows, COLUMNS))
    for (net, variant), value in sorted(totals.items()):
        if variant not in PARTIAL:
            print(f"total {net:9s} {variant:9s} {value:9.2f} ms")
    print(f"all layers in '{first}': {grand:.2f} ms; every layer in its fastest variant: {best_total:.2f} ms "
          f"({grand / best_total if best_total else float('nan'):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
