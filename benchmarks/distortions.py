"""Throughput of the batched Models Genesis distortion next to a per-patch NumPy implementation.

The NumPy side is a straightforward per-patch version of the same algorithm, written here the way
the Models Genesis reference works (Python loops over 10,000 shuffle blocks, ``np.interp`` on a
Bézier curve, box-by-box painting); it is the yardstick, not library code. Each side reports its
throughput over ``--repeats`` calls after a warm-up (patches processed / total time), both on the
wall clock and in CPU time (process time, all threads); on a shared, oversubscribed machine the
CPU-time figure is the steadier one. Every call draws which patches get which distortion, so the
work per call varies (the shuffle alone, ~60 % of the time, hits Binomial(32, 0.5) patches); the
total over many calls measures the expected workload, where the fastest single call would
measure the luckiest draw.

    python benchmarks/distortions.py                 # batch 32 of 64x64x32 on CPU
    python benchmarks/distortions.py --device cuda   # the batched side on a GPU
    python benchmarks/distortions.py --quick         # seconds, for CI smoke tests
    python benchmarks/distortions.py --static        # the static-shape path (the GPU default) on the CPU

The batched side runs the subset path on the CPU by default (only the chosen patches are
computed) and the static-shape path elsewhere (every patch computed, no host synchronisation);
``--static`` / ``--subset`` force one. Both give the same output for the same seed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np
import torch

from dira3d.transforms import build_distortion

__all__ = ["numpy_models_genesis", "main"]


def _bezier_table(rng: random.Random, n: int = 100000) -> tuple[np.ndarray, np.ndarray]:
    r = [rng.random() for _ in range(4)]
    t = np.linspace(0.0, 1.0, n)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    return r[0] * b1 + r[2] * b2 + b3, r[1] * b1 + r[3] * b2 + b3


def _np_nonlinear(x: np.ndarray, rng: random.Random) -> np.ndarray:
    xs, ys = _bezier_table(rng)
    xs, ys = np.sort(xs), np.sort(ys)
    if rng.random() < 0.5:
        ys = ys[::-1]
    return np.interp(x, xs, ys)


def _np_shuffle(x: np.ndarray, rng: random.Random, nprng: np.random.Generator, blocks: int) -> np.ndarray:
    out = x.copy()
    _, sx, sy, sz = x.shape
    for _ in range(blocks):  # the per-block Python loop the batched version replaces
        bx, by, bz = rng.randint(1, sx // 10), rng.randint(1, sy // 10), rng.randint(1, sz // 10)
        ox, oy, oz = rng.randint(0, sx - bx), rng.randint(0, sy - by), rng.randint(0, sz - bz)
        window = x[0, ox:ox + bx, oy:oy + by, oz:oz + bz].flatten()
        nprng.shuffle(window)
        out[0, ox:ox + bx, oy:oy + by, oz:oz + bz] = window.reshape(bx, by, bz)
    return out


def _np_box(rng: random.Random, dim: int, low: int, high: int) -> tuple[int, int]:
    side = rng.randint(low, high)
    start = rng.randint(3, max(3, dim - side - 3))
    return start, side


def _np_inpaint(x: np.ndarray, rng: random.Random, nprng: np.random.Generator) -> np.ndarray:
    _, sx, sy, sz = x.shape
    count = 5
    while count > 0 and rng.random() < 0.95:
        (ox, bx), (oy, by), (oz, bz) = (_np_box(rng, s, s // 6, s // 3) for s in (sx, sy, sz))
        x[:, ox:ox + bx, oy:oy + by, oz:oz + bz] = nprng.random((bx, by, bz))
        count -= 1
    return x


def _np_outpaint(x: np.ndarray, rng: random.Random, nprng: np.random.Generator) -> np.ndarray:
    _, sx, sy, sz = x.shape
    out = nprng.random(x.shape)
    count = 5
    while count > 0:
        (ox, bx), (oy, by), (oz, bz) = (_np_box(rng, s, s - 4 * s // 7, s - 3 * s // 7) for s in (sx, sy, sz))
        out[:, ox:ox + bx, oy:oy + by, oz:oz + bz] = x[:, ox:ox + bx, oy:oy + by, oz:oz + bz]
        count -= 1
        if rng.random() >= 0.95:
            break
    return out


def numpy_models_genesis(x: np.ndarray, rng: random.Random, nprng: np.random.Generator,
                         blocks: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch NumPy Models Genesis distortion of one ``(1, X, Y, Z)`` patch -> (distorted, target)."""
    y = x
    for _ in range(3):
        if rng.random() >= 0.4:
            break
        axis = rng.choice([1, 2, 3])
        x, y = np.flip(x, axis), np.flip(y, axis)
    x = np.ascontiguousarray(x)
    if rng.random() < 0.5:
        x = _np_shuffle(x, rng, nprng, blocks)
    if rng.random() < 0.9:
        x = _np_nonlinear(x, rng)
    if rng.random() < 0.9:
        x = _np_inpaint(x.copy(), rng, nprng) if rng.random() < 0.2 else _np_outpaint(x, rng, nprng)
    return x, np.ascontiguousarray(y)


def _mean_time(fn, repeats: int) -> tuple[float, float]:
    """Mean wall-clock and mean CPU time (this process, all threads) per call over ``repeats`` calls
    after a warm-up call. CPU time is the steadier of the two when the cores are oversubscribed
    (time spent waiting for a core is not counted)."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--blocks", type=int, default=10000, help="shuffle blocks per patch")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per side (different random draws)")
    parser.add_argument("--device", default="cpu", help="device of the batched side (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the NumPy side is single-threaded too)")
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--static", dest="static_shapes", action="store_const", const=True, default=None,
                      help="static-shape path: every patch computed, no host sync (default off the CPU)")
    path.add_argument("--subset", dest="static_shapes", action="store_const", const=False,
                      help="subset path: only the chosen patches computed (default on the CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.patch, args.blocks, args.repeats = 4, (32, 32, 16), 500, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA device is available; use --device cpu.", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    shape = (args.batch, 1, *args.patch)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    comp = build_distortion("models_genesis", num_blocks=args.blocks, static_shapes=args.static_shapes)
    static = (device.type != "cpu") if args.static_shapes is None else args.static_shapes
    gen = torch.Generator(device=device).manual_seed(1)

    def batched() -> None:
        comp(x, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()

    x_np = x.cpu().numpy().astype(np.float64)
    rng, nprng = random.Random(1), np.random.default_rng(1)

    def per_patch() -> None:
        for i in range(args.batch):
            numpy_models_genesis(x_np[i], rng, nprng, blocks=args.blocks)

    t_ours, c_ours = _mean_time(batched, args.repeats)
    t_ref, c_ref = _mean_time(per_patch, args.repeats)
    print(f"models_genesis distortion (mean of {args.repeats} calls), batch {args.batch} x {'x'.join(map(str, args.patch))}, "
          f"{args.blocks} shuffle blocks, torch threads {torch.get_num_threads()}, "
          f"{'static-shape' if static else 'subset'} path")
    print(f"{'implementation':<34}{'device':<8}{'patches/s':>12}{'patches/CPU-s':>15}")
    cpu_ours = f"{args.batch / c_ours:>15.1f}" if device.type == "cpu" and c_ours > 0 else f"{'-':>15}"
    print(f"{'dira3d batched torch':<34}{str(device):<8}{args.batch / t_ours:>12.1f}{cpu_ours}")
    print(f"{'per-patch NumPy (reference style)':<34}{'cpu':<8}{args.batch / t_ref:>12.1f}{args.batch / c_ref:>15.1f}")
    cpu_ratio = f", CPU time {c_ref / c_ours:.1f}x" if device.type == "cpu" and c_ours > 0 else ""
    print(f"ratio: {t_ref / t_ours:.1f}x (wall clock{cpu_ratio})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
