"""Wall time and peak memory of `dira3d visual-words` for growing numbers of volumes and classes.

Each configuration runs in a fresh Python process that writes its synthetic data, resets the
kernel's resident-set high-water mark (``/proc/self/clear_refs``) and then runs the discovery, so
the peak RSS reported (``VmHWM``; ``ru_maxrss`` where /proc is missing) is the discovery's own. The point to check: the peak RSS
stays flat while the shards written (C × K × R instances) grow, because patches stream to disk;
and the wall time grows about linearly with the number of volumes.

    python benchmarks/visual_words.py            # full grid (a few minutes on 2 cores)
    python benchmarks/visual_words.py --quick    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(shape=(128, 128, 64), patch=(64, 64, 32), border=(16, 16, 8), multi_resolution=True,
            grid=[(8, 4, 8), (16, 4, 16), (32, 4, 32), (32, 8, 32), (32, 16, 32)])  # fmt: skip
QUICK = dict(shape=(64, 64, 32), patch=(16, 16, 8), border=(8, 8, 4), multi_resolution=False, grid=[(4, 2, 4), (8, 2, 8)])


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux), so data generation is not counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak resident set size since the last reset (VmHWM), else since the process started."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> None:
    import torch

    from dira3d.visual_words import discover_visual_words

    from dira3d.visual_words.synthetic import write_template_datalist

    torch.set_num_threads(1)
    datalist = Path(args.datalist)
    if not datalist.exists():  # written here, not in the parent, so the parent never imports torch
        write_template_datalist(datalist.parent, templates=4, per_template=max(1, args.volumes // 4), shape=args.shape, seed=args.volumes)
    _reset_peak_rss()
    rss_before_run = _peak_rss_mib()
    start = time.perf_counter()
    manifest = discover_visual_words(
        args.datalist, args.out, classes=args.classes, neighbours=args.neighbours, val_neighbours=0,
        patch_size=args.patch, border=args.border, multi_resolution=args.multi_resolution,
        extractor_size=(32, 32, 16), extractor_epochs=1, extractor_width=0.125, class_block=4, seed=0,
    )  # fmt: skip
    wall = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in Path(args.out, "shards").rglob("*.npy"))
    print(json.dumps({
        "wall_s": wall, "peak_rss_mib": _peak_rss_mib(),
        "start_rss_mib": rss_before_run, "shard_mib": shard_bytes / 2**20,
        "instances": sum(len(c["neighbours"]["training"]["indices"]) for c in manifest["classes"]) * manifest["params"]["resolutions"],
    }))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two tiny configurations (CI smoke test)")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("datalist", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("classes", "neighbours", "volumes"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    for name in ("patch", "border", "shape"):
        parser.add_argument(f"--{name}", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--multi-resolution", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    cfg = QUICK if args.quick else FULL
    work = Path(args.work or tempfile.mkdtemp(prefix="vw-bench-"))
    print(f"volumes {cfg['shape']}, patch {cfg['patch']}, multi-resolution {cfg['multi_resolution']}, 1 thread per run")
    print("| volumes N | classes C | K | instances C×K×R | shards MiB | wall s | s per volume | RSS before run MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, c, k in cfg["grid"]:
        datalist = work / f"data_{n}" / "datalist.json"
        out = work / f"out_{n}_{c}_{k}"
        cmd = [sys.executable, __file__, "--child", "--datalist", str(datalist), "--out", str(out), "--classes", str(c),
               "--neighbours", str(k), "--volumes", str(n), "--shape", *map(str, cfg["shape"]), "--patch", *map(str, cfg["patch"]), "--border", *map(str, cfg["border"])]  # fmt: skip
        cmd += ["--multi-resolution"] if cfg["multi_resolution"] else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {n} | {c} | {k} | {r['instances']} | {r['shard_mib']:.1f} | {r['wall_s']:.1f} | {r['wall_s'] / n:.2f} "
              f"| {r['start_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
