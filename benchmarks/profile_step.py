"""Where the time of one DiRA pretraining step goes: ``torch.profiler`` over the real trainer step.

Runs ``DiRATrainer._iteration`` (the engine's own step, not a copy) on one fixed batch of synthetic
cached patches, after warm-up, under ``torch.profiler`` and prints the operators that take the most
device time (CUDA) or CPU time, and the time of the batch distortion alone. Use it to decide what to
make faster next; ``pretrain_throughput.py`` gives the end-to-end figures. The step is called with a
loader batch, so the ``prefetch`` token changes nothing here (its overlap shows only end to end).

    python benchmarks/profile_step.py --device cuda --batch 32 --config bf16+cl
    python benchmarks/profile_step.py --quick                                   # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dira3d.engines import DiRATrainer
from dira3d.engines.performance import build_adam, synchronize

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from pretrain_throughput import ALL_TERMS, build_networks, distortion, make_loader, parse_config, synthetic_patches  # noqa: E402


def _callers(event, depth: int) -> tuple[str, ...]:
    """Names of the ``depth`` profiler events enclosing ``event``, innermost first."""
    names, parent = [], event.cpu_parent
    while parent is not None and len(names) < depth:
        names.append(parent.name[:90])
        parent = parent.cpu_parent
    return tuple(names)


def print_by_shape(prof, op: str, sort: str, steps: int, rows: int, callers: int) -> None:
    """``op``'s time per input shape (and, with ``callers`` > 0, per chain of enclosing events)."""
    if callers <= 0:
        found = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key == op),
                       key=lambda e: getattr(e, sort), reverse=True)
        table = [(getattr(e, sort), e.count, str(e.input_shapes), ()) for e in found]
    else:
        device = sort.startswith("self_device")
        groups: dict[tuple, list[float]] = {}
        for e in prof.events():
            if e.name != op:
                continue
            key = (str(e.input_shapes), _callers(e, callers))
            spent = e.self_device_time_total if device else e.self_cpu_time_total
            total = groups.setdefault(key, [0.0, 0])
            total[0] += spent
            total[1] += 1
        table = sorted(((t, n, shape, chain) for (shape, chain), (t, n) in groups.items()), reverse=True)
    print(f"{op} per input shape{' and callers' * (callers > 0)} ({len(table)} rows; ms over {steps} steps, calls):")
    for spent, count, shape, chain in table[:rows]:
        print(f"  {spent / 1000:9.3f} ms  {count:5d}x  {shape}")
        for name in chain:
            print(f"        in {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--config", default="bf16+cl", help="as in pretrain_throughput.py (compile works too)")
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=50)
    parser.add_argument("--distortion", default="transvw")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--rows", type=int, default=None, help="rows per table (default 30; 10 with --quick)")
    parser.add_argument("--by-shape", default="", metavar="OP[,OP...]",
                        help="also list these operators (e.g. aten::copy_) per input shape: which tensors they move")
    parser.add_argument("--callers", type=int, default=0, metavar="N",
                        help="with --by-shape: group by the N enclosing profiler events too (e.g. AccumulateGrad, "
                             "ConvolutionBackward0, a compiled graph) and print them: who calls the op")
    parser.add_argument("--quick", action="store_true", help="tiny CPU run (width 1/8, 16x16x8)")
    args = parser.parse_args(argv)
    args.rows = args.rows or (10 if args.quick else 30)
    if args.quick:
        args.device, args.width, args.patch, args.batch, args.num_classes = "cpu", 0.125, (16, 16, 8), 2, 4
        args.warmup, args.steps = 1, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA device is available; use --device cpu.", file=sys.stderr)
        return 2
    config = parse_config(args.config)
    torch.backends.cudnn.benchmark = config.cudnn_benchmark
    torch.backends.cudnn.deterministic = config.deterministic
    patch = tuple(args.patch)
    dataset = synthetic_patches(args.batch, patch, args.num_classes)
    net, head, adversary = build_networks(args.width, args.num_classes, device)
    opt_g, opt_d = build_adam([net, head], 1e-3, device), build_adam([adversary], 1e-3, device)
    distort = distortion(args, patch, config)
    trainer = DiRATrainer(device, 1, make_loader(dataset, args.batch, device), net, opt_g, head, adversary, opt_d,
                          stages=ALL_TERMS, distortion=distort, **config.trainer_kwargs())
    batch = next(iter(trainer.data_loader))
    trainer.state.epoch = 1

    def step(i: int) -> None:
        trainer.state.iteration = i
        trainer._iteration(trainer, batch)

    for i in range(1, args.warmup + 1):
        step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + 1 + i)
    synchronize(device)
    step_ms = 1000 * (time.perf_counter() - start) / args.steps
    x = batch["image"].to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    distort(x, gen)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        distort(x, gen)
    synchronize(device)
    distort_ms = 1000 * (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with profile(activities=activities, record_shapes=bool(args.by_shape)) as prof:
        for i in range(args.steps):
            step(args.warmup + args.steps + 1 + i)
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"config {args.config}; batch {args.batch}; patch {'x'.join(map(str, patch))}; width {args.width}")
    print(f"step (G + D, the trainer's own): {step_ms:.1f} ms = {1000 * args.batch / step_ms:.0f} patches/s "
          f"(no loader); distortion '{args.distortion}' alone: {distort_ms:.1f} ms per batch")
    print(f"top operators by {sort} over {args.steps} steps:")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    for op in (o.strip() for o in args.by_shape.split(",") if o.strip()):
        print_by_shape(prof, op, sort, args.steps, args.rows, args.callers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
