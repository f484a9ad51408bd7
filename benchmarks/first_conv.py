"""Forward + backward time of the U-Net's first convolution (1 → 32 channels, 3×3×3), per variant.

On an H100 in channels-last bf16 this one layer's weight gradient took 10.8 ms of a 113.6 ms
training step at batch 32 (docs/benchmarks.md). Rows, each timed on the same input in one run:

- ``cudnn``: ``nn.Conv3d`` as the network has it (cuDNN picks its algorithm by heuristics);
- ``cudnn+benchmark``: the same with ``torch.backends.cudnn.benchmark`` (cuDNN times algorithms);
- ``gemm``: :mod:`dira3d.networks.gemm_wgrad` (same forward; weight gradient as one GEMM);
- ``*+ncdhw``: the layer and its input in the default layout instead of channels-last.

Each row reports ms per forward + backward (the input needs no gradient, as in pretraining) and the
largest difference of its weight gradient from the ``cudnn`` row's, relative to that gradient's
largest value.

    python benchmarks/first_conv.py --device cuda --batch 32 96
    python benchmarks/first_conv.py --quick                      # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from dira3d.engines.performance import format_table, synchronize
from dira3d.networks.gemm_wgrad import use_gemm_weight_grad

COLUMNS = ["variant", "batch", "layout", "ms", "vs_cudnn", "wgrad_rel_diff"]
VARIANTS = ("cudnn", "cudnn+benchmark", "gemm", "cudnn+ncdhw", "gemm+ncdhw")


def time_layer(conv: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, repeats: int) -> tuple[float, torch.Tensor]:
    """Mean ms of forward + backward over ``repeats`` (after 3 warm-ups) and the last weight gradient."""
    device = x.device

    def once() -> None:
        conv.weight.grad = None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = conv(x)
        out.float().mean().backward()

    for _ in range(3):
        once()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / repeats, conv.weight.grad.detach().clone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--channels", type=int, default=32, help="output channels (32: the U-Net at width 1)")
    parser.add_argument("--amp", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny CPU run (16x16x8, 4 channels)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.batch, args.patch, args.channels, args.repeats, args.amp = "cpu", [2], (16, 16, 8), 4, 2, "fp32"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA device is available; use --device cpu.", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"Conv3d(1, {args.channels}, 3, padding=1) on {'x'.join(map(str, args.patch))}; {args.amp}")
    rows = []
    for batch in args.batch:
        torch.manual_seed(0)
        base = nn.Conv3d(1, args.channels, 3, padding=1).to(device)
        x = torch.rand(batch, 1, *args.patch, device=device)
        reference = None
        for variant in VARIANTS:
            conv = nn.Conv3d(1, args.channels, 3, padding=1).to(device)
            conv.load_state_dict(base.state_dict())
            layout = "ncdhw" if variant.endswith("+ncdhw") else "channels_last"
            if layout == "channels_last":
                conv = conv.to(memory_format=torch.channels_last_3d)
            if variant.startswith("gemm"):
                use_gemm_weight_grad(conv)
            torch.backends.cudnn.benchmark = variant == "cudnn+benchmark"
            try:
                ms, grad = time_layer(conv, x, dtype, args.repeats)
            finally:
                torch.backends.cudnn.benchmark = False
            if reference is None:
                reference = (ms, grad)
            diff = ((grad - reference[1]).abs().max() / reference[1].abs().max().clamp_min(1e-30)).item()
            rows.append({"variant": variant, "batch": batch, "layout": layout, "ms": ms,
                         "vs_cudnn": reference[0] / ms, "wgrad_rel_diff": diff})
            print("row:", {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
