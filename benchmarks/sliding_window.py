"""Sliding-window inference time for a whole CT volume with the LiTS bundle's settings.

The network definition, ``roi_size``, ``overlap``, blending ``mode`` and ``sw_batch_size`` are read
from ``bundles/lits_liver_seg/configs/inference.json`` with ``monai.bundle.ConfigParser``; the
volume is synthetic (the time does not depend on the values), 512×512×300 by default, a typical
abdominal CT. Rows: fp32 and autocast (bf16 on CUDA) for each ``--sw-batch-sizes`` value.

    python benchmarks/sliding_window.py --device cuda                    # 512x512x300, width 1
    python benchmarks/sliding_window.py --device cuda --sw-batch-sizes 4 16 64
    python benchmarks/sliding_window.py --quick                          # CPU smoke (seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from dira3d.engines.performance import format_table, peak_memory_mib, reset_peak_memory, synchronize

__all__ = ["bundle_settings", "main"]

COLUMNS = ["precision", "sw_batch", "roi", "overlap", "volume", "windows", "seconds", "windows/s", "peak_MiB"]
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "lits_liver_seg" / "configs" / "inference.json"


class _Counting(torch.nn.Module):
    """Wraps the network and counts the windows it is given."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.windows = network, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.network(x)


def bundle_settings(config_file: Path, width: float | None = None) -> tuple[torch.nn.Module, dict]:
    """The bundle's network (random weights) and its inferer settings.

    Raises:
        FileNotFoundError: the bundle's inference.json is missing.
    """
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; pass --config the LiTS bundle's configs/inference.json")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["pretrained"] = ""  # random weights: the time does not depend on them
    if width is not None:
        parser["width"] = width
    network = parser.get_parsed_content("network_def")
    inferer = parser.get_parsed_content("inferer")
    settings = {"roi_size": tuple(inferer.roi_size), "overlap": inferer.overlap, "mode": inferer.mode,
                "sw_batch_size": inferer.sw_batch_size}
    return network, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=Path, default=BUNDLE, help="the bundle's inference.json")
    parser.add_argument("--volume", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    parser.add_argument("--width", type=float, default=None, help="override the bundle's width (default: as configured)")
    parser.add_argument("--sw-batch-sizes", type=int, nargs="+", default=None, help="default: the bundle's value")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny CPU run for smoke tests (width 1/8, 96x64x32)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.volume, args.width = "cpu", (96, 64, 32), 0.125
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA device is available; use --device cpu.", file=sys.stderr)
        return 2
    try:
        network, settings = bundle_settings(args.config, args.width)
    except (FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    net = _Counting(network.to(device).eval())
    volume = torch.rand(1, 1, *args.volume, device=device)
    sw_batches = args.sw_batch_sizes or [settings["sw_batch_size"]]
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]  # CPU bf16 convs are emulated
    print(f"device: {device}; bundle {args.config}; roi {settings['roi_size']}, overlap {settings['overlap']}, "
          f"mode {settings['mode']}, bundle sw_batch_size {settings['sw_batch_size']}")
    rows = []
    for precision in precisions:
        for sw_batch in sw_batches:
            inferer = SlidingWindowInferer(settings["roi_size"], sw_batch_size=sw_batch, overlap=settings["overlap"],
                                           mode=settings["mode"])
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.inference_mode(), autocast:
                inferer(volume[..., : settings["roi_size"][-1]], net)  # warm-up: kernels, allocator
                reset_peak_memory(device)
                net.windows = 0
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.repeats):
                    inferer(volume, net)
                synchronize(device)
            seconds = (time.perf_counter() - start) / args.repeats
            windows = net.windows // args.repeats
            rows.append({"precision": precision, "sw_batch": sw_batch, "roi": "x".join(map(str, settings["roi_size"])),
                         "overlap": settings["overlap"], "volume": "x".join(map(str, args.volume)), "windows": windows,
                         "seconds": seconds, "windows/s": windows / seconds, "peak_MiB": peak_memory_mib(device)})
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
