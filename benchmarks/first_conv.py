"""Forward + backward time of the image-facing convolutions (1 channel on one side), per variant.

On an H100 in channels-last bf16 the U-Net's first layer's weight gradient took 10.8 ms of a
113.6 ms training step at batch 32 (docs/benchmarks.md): cuDNN has no tensor-core kernel for a
1-channel side. Layers (``--layers``), as the default model has them on a 64×64×32 patch:

- ``unet_in``: the U-Net's first convolution, 1 → 32, 3×3×3 (its input needs no gradient);
- ``unet_out``: the U-Net's output head, 64 → 1, 1×1×1 (input gradient needed);
- ``adv_in``: the adversary's first convolution, 1 → 64, 3×3×3, stride 2 (input gradient needed:
  the G step back-propagates through it into the restored patch).

Variants, each timed on the same input in one run:

- ``cudnn``: ``nn.Conv3d`` as the network has it (cuDNN picks its algorithm by heuristics);
- ``cudnn+benchmark``: the same with ``torch.backends.cudnn.benchmark`` (cuDNN times algorithms);
- ``gemm``: :mod:`dira3d.networks.gemm_wgrad` (same forward; weight gradient as one GEMM; layers
  with one input channel only);
- ``pad`` / ``pad+benchmark``: :mod:`dira3d.networks.channel_pad` (channels zero-padded to 8);
- ``cudnn+ncdhw``: the layer and its input in the default layout instead of channels-last.

Each row reports ms per forward + backward and the largest difference of its weight gradient from
the ``cudnn`` row's, relative to that gradient's largest value.

    python benchmarks/first_conv.py --device cuda --batch 32 96
    python benchmarks/first_conv.py --quick                      # CPU smoke
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from dira3d.engines.performance import format_table, mean_ms
from dira3d.networks.channel_pad import use_padded_channels
from dira3d.networks.gemm_wgrad import use_gemm_weight_grad

COLUMNS = ["layer", "variant", "batch", "layout", "ms", "vs_cudnn", "wgrad_rel_diff"]
VARIANTS = ("cudnn", "cudnn+benchmark", "gemm", "pad", "pad+benchmark", "cudnn+ncdhw")
# name: (in channels, out channels at width 1, kernel, stride, padding, input needs a gradient)
LAYERS = {
    "unet_in": (1, 32, 3, 1, 1, False),
    "unet_out": (64, 1, 1, 1, 0, True),
    "adv_in": (1, 64, 3, 2, 1, True),
}


def time_layer(conv: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, repeats: int) -> tuple[float, torch.Tensor]:
    """Mean ms of forward + backward over ``repeats`` (after 3 warm-ups) and the last weight gradient."""
    device = x.device

    def once() -> None:
        conv.weight.grad, x.grad = None, None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = conv(x)
        out.float().mean().backward()

    return mean_ms(once, repeats, device), conv.weight.grad.detach().clone()


def build(layer: str, variant: str, scale: float, device: torch.device, state: dict | None) -> nn.Conv3d:
    """The layer of ``variant`` (weights from ``state`` when given), in its layout."""
    cin, cout, kernel, stride, padding, _ = LAYERS[layer]
    cin, cout = (max(1, round(c * scale)) if c > 1 else c for c in (cin, cout))
    conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding).to(device)
    if state is not None:
        conv.load_state_dict(state)
    fmt = None if variant.endswith("+ncdhw") else torch.channels_last_3d
    if fmt is not None:
        conv = conv.to(memory_format=fmt)
    if variant.startswith("gemm"):
        use_gemm_weight_grad(conv)
    elif variant.startswith("pad"):
        use_padded_channels(conv, memory_format=fmt)
    return conv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=list(LAYERS))
    parser.add_argument("--width", type=float, default=1.0, help="channel scale of the wide side (1: the default model)")
    parser.add_argument("--amp", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny CPU run (16x16x8, width 1/8)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.batch, args.patch, args.width, args.repeats, args.amp = "cpu", [2], (16, 16, 8), 0.125, 2, "fp32"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA device is available; use --device cpu.", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"patch {'x'.join(map(str, args.patch))}; width {args.width}; {args.amp}")
    rows = []
    for layer in args.layers:
        cin, _, _, _, _, input_grad = LAYERS[layer]
        for batch in args.batch:
            torch.manual_seed(0)
            state = build(layer, "cudnn", args.width, device, None).state_dict()
            channels = cin if cin == 1 else max(1, round(cin * args.width))
            x = torch.rand(batch, channels, *args.patch, device=device).contiguous(memory_format=torch.channels_last_3d)
            x.requires_grad_(input_grad)
            reference = None
            for variant in VARIANTS:
                if variant.startswith("gemm") and cin != 1:
                    continue
                conv = build(layer, variant, args.width, device, state)
                layout = "ncdhw" if variant.endswith("+ncdhw") else "channels_last"
                xv = x if layout == "channels_last" else x.detach().contiguous().requires_grad_(input_grad)
                torch.backends.cudnn.benchmark = variant.endswith("benchmark")
                try:
                    ms, grad = time_layer(conv, xv, dtype, args.repeats)
                finally:
                    torch.backends.cudnn.benchmark = False
                if reference is None:
                    reference = (ms, grad)
                diff = ((grad - reference[1]).abs().max() / reference[1].abs().max().clamp_min(1e-30)).item()
                rows.append({"layer": layer, "variant": variant, "batch": batch, "layout": layout, "ms": ms,
                             "vs_cudnn": reference[0] / ms, "wgrad_rel_diff": diff})
                print("row:", {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in rows[-1].items()},
                      flush=True)
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
