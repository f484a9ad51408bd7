"""End-to-end throughput of DiRA pretraining: the real ``DiRATrainer`` step per configuration.

For each configuration (precision, channels-last, ``torch.compile``, optimiser) and batch size it
runs the engine's own iteration (``DiRATrainer.run``; not a copy of the step) on synthetic patches
cached in memory and prints: patches/s, the step time split into data / G step / D step, peak
device memory, model FLOP utilisation (MFU) against the matrix rate of the card measured in the
same run, and the ratio to a plain PyTorch loop of the same networks (fp32 by default;
``--plain-config bf16+cl+compile`` compares with a plain loop at the engine's settings).

Configurations are ``+``-joined tokens: ``fp32`` | ``bf16`` | ``fp16`` (autocast), ``cl``
(channels-last-3d), ``cudnn`` (``torch.backends.cudnn.benchmark``), ``compile`` (``torch.compile``,
inductor, default mode), ``compile-max`` (inductor ``max-autotune-no-cudagraphs``), ``compile-ro``
(inductor ``reduce-overhead``: CUDA graphs), ``forcecl`` (with a compile token: inductor's
channels-last layout optimisation forced in every graph; inductor leaves it off for the U-Net
decoder's graphs), ``plainopt`` (PyTorch's default Adam instead of the
fused / multi-tensor one), ``gemmwg`` (the 1-channel convolutions' weight gradient as one GEMM:
:mod:`dira3d.networks.gemm_wgrad`), ``padch`` (convolutions on channels zero-padded to 8:
:mod:`dira3d.networks.channel_pad`), ``gemmup`` (the up-sampling as one GEMM:
:mod:`dira3d.networks.gemm_upconv`), ``splitcat`` (the decoder's concatenation left out:
:mod:`dira3d.networks.split_concat`), ``gemmhead`` (the 1×1 output head as one GEMM:
:mod:`dira3d.networks.gemm_head`), ``prefetch`` (the next batch's device copy, views and distortion
on a side CUDA stream during the current step: :mod:`dira3d.engines.prefetch`; its ``data_ms`` then
includes preparing the next batch), ``nodist`` (no restorative distortion) and ``subset`` (the
distortions compute only the samples that drew them).

A configuration that fails (out of memory, a compiler error) is reported in the table with the
error and the run goes on; ``--time-budget`` skips what would start after that many seconds, so
that a run on a rented GPU always ends with a table. ``--out FILE`` also writes the table and the
header lines as Markdown. Each configuration also reports ``syncs/it``: device→host
synchronisations per iteration, counted over a few extra iterations with
``torch.cuda.set_sync_debug_mode`` on CUDA and with :class:`dira3d.utils.host_sync.HostSyncDetector`
on the CPU (where the distortions take their subset path, which syncs: harmless without a device
queue).

    python benchmarks/pretrain_throughput.py --device cuda                    # H100: 64x64x32, width 1
    python benchmarks/pretrain_throughput.py --device cuda --batch-sizes 8 32 64 --iters 50
    python benchmarks/pretrain_throughput.py --quick                          # CPU smoke (< 60 s)

Timing: epoch 1 of the run is warm-up + throughput (no host synchronisation inside the step, one
at each end of the timed window); epoch 2 repeats the step with synchronising timers at the
phase boundaries (ignite's GET_BATCH events, the G optimiser's step hook) for the split.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader

from dira3d.engines import DiRATrainer, build_dis_head
from dira3d.engines.performance import (
    build_adam,
    count_flops,
    format_table,
    matmul_tflops,
    peak_memory_mib,
    reset_peak_memory,
    synchronize,
)
from dira3d.losses import AdversarialLoss, RestorationLoss, VisualWordLoss
from dira3d.networks import Adversary, UNet
from dira3d.transforms import build_distortion
from dira3d.transforms.compositions import default_distortion_args
from dira3d.utils.host_sync import HostSyncDetector

__all__ = ["Config", "parse_config", "synthetic_patches", "main"]

COLUMNS = ["config", "batch", "patches/s", "data_ms", "g_step_ms", "d_step_ms", "step_ms", "peak_MiB", "mfu_%",
           "vs_plain", "syncs/it", "note"]
COMPILE_MODES = {"compile": None, "compile-max": "max-autotune-no-cudagraphs", "compile-ro": "reduce-overhead"}
ALL_TERMS = [{"name": "dira", "losses": ["dis", "res", "adv"]}]


@dataclass
class Config:
    """One engine configuration parsed from ``fp32``, ``bf16+cl+compile``, ..."""

    name: str
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_channels_last: bool = False
    cudnn_benchmark: bool = False
    fused: bool = True
    gemm_weight_grad: bool = False
    pad_channels: bool = False
    gemm_upconv: bool = False
    split_concat: bool = False
    gemm_head: bool = False
    prefetch: bool = False
    distortion: str | None = None  # None: --distortion
    static_distortion: bool | None = None  # None: the distortion's default (static off the CPU)
    # cuDNN's deterministic algorithms only, as MONAI's set_determinism (the bundles' initialize) sets for the process
    deterministic: bool = False

    def trainer_kwargs(self) -> dict:
        """The :class:`DiRATrainer` arguments this configuration sets."""
        return dict(amp=self.amp, channels_last=self.channels_last, compile=self.compile,
                    compile_mode=self.compile_mode, compile_channels_last=self.compile_channels_last,
                    cudnn_benchmark=self.cudnn_benchmark,
                    gemm_weight_grad=self.gemm_weight_grad, pad_channels=self.pad_channels,
                    gemm_upconv=self.gemm_upconv, split_concat=self.split_concat, gemm_head=self.gemm_head,
                    prefetch=self.prefetch)


# the tokens that set one Config field: token -> (field, value)
TOKEN_SETTINGS = {
    "cl": ("channels_last", True),
    "cudnn": ("cudnn_benchmark", True),
    "forcecl": ("compile_channels_last", True),
    "plainopt": ("fused", False),
    "gemmwg": ("gemm_weight_grad", True),
    "padch": ("pad_channels", True),
    "gemmup": ("gemm_upconv", True),
    "splitcat": ("split_concat", True),
    "gemmhead": ("gemm_head", True),
    "prefetch": ("prefetch", True),
    "nodist": ("distortion", "none"),
    "subset": ("static_distortion", False),
    "det": ("deterministic", True),
}


def parse_config(name: str) -> Config:
    """Parse a ``+``-joined configuration name.

    Raises:
        ValueError: an unknown token.
    """
    config = Config(name=name)
    for token in name.split("+"):
        if token in ("fp32", "none"):
            config.amp = "none"
        elif token in ("bf16", "fp16"):
            config.amp = token
        elif token in COMPILE_MODES:
            config.compile, config.compile_mode = True, COMPILE_MODES[token]
        elif token in TOKEN_SETTINGS:
            field, value = TOKEN_SETTINGS[token]
            setattr(config, field, value)
        else:
            raise ValueError(f"--configs: unknown token {token!r} in {name!r}; use fp32|bf16|fp16, "
                             f"{'|'.join(COMPILE_MODES)}, {', '.join(TOKEN_SETTINGS)}")
    if config.gemm_weight_grad and config.pad_channels:
        raise ValueError(f"--configs: {name!r} has both gemmwg and padch; they change the same layers, use one")
    if config.gemm_head and config.pad_channels:
        raise ValueError(f"--configs: {name!r} has both gemmhead and padch; they change the same output head, use one")
    if config.compile_channels_last and not config.compile:
        raise ValueError(f"--configs: {name!r} has forcecl without a compile token; forcecl sets a compiler option")
    return config


def synthetic_patches(count: int, patch: tuple[int, ...], num_classes: int, seed: int = 0) -> list[dict]:
    """Smooth random patch pairs in [0, 1] with a class label each (what a visual-word shard holds)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(2 * count, 1, *patch, generator=gen)
    smooth = F.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)
    lo = smooth.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = smooth.amax(dim=(1, 2, 3, 4), keepdim=True)
    smooth = (smooth - lo) / (hi - lo)
    # clones, not views: a view would carry (and a cache copy would deep-copy) the whole batch's storage
    return [{"image": smooth[2 * i].clone(), "image2": smooth[2 * i + 1].clone(), "label": i % num_classes}
            for i in range(count)]


def build_networks(width: float, num_classes: int, device: torch.device, seed: int = 0):
    """The default 3D model at ``width``: U-Net, visual-word head, 3D adversary (same init per seed)."""
    torch.manual_seed(seed)
    net = UNet(3, 1, 1, width=width)
    head = build_dis_head("visual_words", 3, net.bottleneck_channels, num_classes=num_classes,
                          hidden=max(16, int(round(1024 * width))))
    adversary = Adversary(3, 1, channels=max(4, int(round(64 * width))))
    return net.to(device), head.to(device), adversary.to(device)


def make_loader(dataset, batch: int, device: torch.device, workers: int = 0):
    """The bundle's fast loader (``configs/performance.json``): cached items read in place, loaded
    in the main process (``workers`` > 0: worker processes), pinned memory on CUDA."""
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def distortion(args, patch: tuple[int, ...], config: Config | None = None):
    """The composition the bundle builds for this patch (TransVW's elastic warp scaled with it).

    ``--distortion``, or the configuration's own (``nodist``: none; ``subset``: ``static_shapes=False``).
    """
    name = (config.distortion if config is not None else None) or args.distortion
    options = default_distortion_args(name, patch)
    if config is not None and config.static_distortion is not None:
        options["static_shapes"] = config.static_distortion
    return build_distortion(name, **options)


def is_sync_warning(message: str) -> bool:
    """A warning of ``torch.cuda.set_sync_debug_mode("warn")`` that reports a synchronising call.

    Not the notice that the first ``set_sync_debug_mode`` of a process gives ("Synchronization
    debug mode is a prototype feature..."): counted as a sync, it made the first configuration of
    every run on the H100 show 0.33 syncs/it (one notice over three iterations).
    """
    text = message.lower()
    return "synchronizing" in text and "prototype" not in text


def count_syncs(trainer: DiRATrainer, device: torch.device, iterations: int = 3) -> float:
    """Device→host synchronisations per iteration of the trainer's own step (``_iteration``)."""
    batch_list: list = []
    while len(batch_list) < iterations:  # the synthetic set may hold fewer batches than that
        batch_list += list(itertools.islice(iter(trainer.data_loader), iterations - len(batch_list)))
    trainer.state.epoch = 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for i, batch in enumerate(batch_list, start=1):
                    trainer.state.iteration = i
                    trainer._iteration(trainer, batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        events = sum(is_sync_warning(str(w.message)) for w in caught)
    else:
        with HostSyncDetector() as detector:
            for i, batch in enumerate(batch_list, start=1):
                trainer.state.iteration = i
                trainer._iteration(trainer, batch)
        events = len(detector.events)
    return events / iterations


def run_engine(config: Config, dataset, batch: int, args, device: torch.device) -> dict:
    """Throughput (epoch 1) and the synchronised phase split (epoch 2) of the real trainer, with
    ``torch.backends.cudnn.deterministic`` as the configuration says (put back afterwards)."""
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = config.deterministic
    try:
        return _run_engine(config, dataset, batch, args, device)
    finally:
        torch.backends.cudnn.deterministic = before


def _run_engine(config: Config, dataset, batch: int, args, device: torch.device) -> dict:
    net, head, adversary = build_networks(args.width, args.num_classes, device)
    opt_g = build_adam([net, head], 1e-3, device, fused=config.fused)
    opt_d = build_adam([adversary], 1e-3, device, fused=config.fused)
    length = args.warmup + args.iters
    trainer = DiRATrainer(device, 2, make_loader(dataset, batch, device, args.workers), net, opt_g, head, adversary, opt_d,
                          stages=ALL_TERMS, distortion=distortion(args, tuple(args.patch), config), epoch_length=length,
                          **config.trainer_kwargs())
    marks: dict[str, float] = {}
    split = {"data": 0.0, "g": 0.0, "d": 0.0}

    def now() -> float:
        synchronize(device)
        return time.perf_counter()

    def timing(engine) -> bool:
        return engine.state.epoch == 2

    @trainer.on(Events.ITERATION_COMPLETED)
    def _throughput(engine):
        local = (engine.state.iteration - 1) % length + 1
        if engine.state.epoch == 1 and local == args.warmup:
            reset_peak_memory(device)
            marks["start"] = now()
        elif engine.state.epoch == 1 and local == length:
            marks["end"] = now()
        elif timing(engine):
            t = now()
            split["d"] += t - marks["g_done"]

    @trainer.on(Events.GET_BATCH_STARTED)
    def _batch_start(engine):
        if timing(engine):
            marks["batch"] = now()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _batch_done(engine):
        if timing(engine):
            marks["step"] = now()
            split["data"] += marks["step"] - marks["batch"]

    def _g_done(optimizer, *_):
        if trainer.state.epoch == 2:
            marks["g_done"] = now()
            split["g"] += marks["g_done"] - marks["step"]

    opt_g.register_step_post_hook(_g_done)
    trainer.run()
    elapsed = marks["end"] - marks["start"]
    syncs = count_syncs(trainer, device)
    ms = {k: 1000 * v / length for k, v in split.items()}
    return {
        "config": config.name,
        "batch": batch,
        "patches/s": args.iters * batch / elapsed,
        "data_ms": ms["data"],
        "g_step_ms": ms["g"],
        "d_step_ms": ms["d"],
        "step_ms": 1000 * elapsed / args.iters,
        "peak_MiB": peak_memory_mib(device),
        "syncs/it": syncs,
    }


def flops_per_patch(dataset, batch: int, args, device: torch.device) -> float:
    """FLOPs of one engine iteration (G + D, forward + backward) divided by the batch size."""
    net, head, adversary = build_networks(args.width, args.num_classes, device)
    trainer = DiRATrainer(device, 1, make_loader(dataset, batch, device), net, build_adam([net, head], 1e-3, device),
                          head, adversary, build_adam([adversary], 1e-3, device), stages=ALL_TERMS,
                          distortion=distortion(args, tuple(args.patch)))
    batchdata = next(iter(trainer.data_loader))
    trainer.state.epoch, trainer.state.iteration = 1, 1
    return count_flops(lambda: trainer._iteration(trainer, batchdata)) / batch


def run_plain(dataset, batch: int, args, device: torch.device, config: Config | None = None) -> float:
    """Patches/s of a plain PyTorch loop over the same networks, losses and distortion (torch Adam).

    ``config`` (``--plain-config``): fp32 by default; ``bf16``, ``cl``, ``cudnn`` and ``compile``
    tokens apply the same switches written directly with torch (``torch.autocast``,
    ``.to(memory_format=...)``, ``nn.Module.compile``), so that the engine can be compared with a
    plain loop at the same settings; ``nodist`` and ``subset`` choose its distortion as for the
    engine. The plain loop computes D's gradients in the G step too (it does not freeze D) and
    scores real and restored patches in two forwards.
    """
    config = config or Config(name="fp32")
    net, head, adversary = build_networks(args.width, args.num_classes, device)
    fmt = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    for module in (net, head, adversary):
        module.to(memory_format=fmt)
    if config.compile:
        for module in (net.encoder, net.decoder, head, adversary):
            module.compile(mode=config.compile_mode, dynamic=False)
    torch.backends.cudnn.benchmark = config.cudnn_benchmark
    opt_g = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    opt_d = torch.optim.Adam(adversary.parameters(), lr=1e-3)
    ce, mse, adv = VisualWordLoss(), RestorationLoss("mse"), AdversarialLoss("vanilla")
    distort = distortion(args, tuple(args.patch), config)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=0)
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16")
    done, start = 0, 0.0
    try:
        while done < args.warmup + args.iters:
            for item in loader:
                if done == args.warmup:
                    synchronize(device)
                    start = time.perf_counter()
                if done == args.warmup + args.iters:
                    break
                x, label = item["image"].to(device).contiguous(memory_format=fmt), item["label"].to(device)
                distorted, target = distort(x, gen)
                with autocast:
                    bottleneck, skips = net.encode(distorted)
                    restored = net.decode(bottleneck, skips)
                    g_loss = (ce(head(bottleneck).float(), label) + 100 * mse(restored.float(), target)
                              + adv.generator(adversary(restored).float()))
                opt_g.zero_grad()
                g_loss.backward()
                opt_g.step()
                opt_d.zero_grad()  # also drops the grads the G loss left on D
                with autocast:
                    d_loss = adv.discriminator(adversary(target).float(), adversary(restored.detach()).float())
                d_loss.backward()
                opt_d.step()
                done += 1
        synchronize(device)
    finally:
        torch.backends.cudnn.benchmark = False
    return args.iters * batch / (time.perf_counter() - start)


def failure_note(err: BaseException) -> str:
    """One short line for the table: the error type and the first line of its message."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"failed: {type(err).__name__}: {first[:100]}"


def release(device: torch.device) -> None:
    """Drop what a finished configuration left: its graphs, caches, allocator blocks, and the
    process-wide cuDNN autotuning switch that a ``cudnn`` configuration's trainer turns on (the
    configurations after it would otherwise be autotuned too)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--configs", default="fp32,bf16,bf16+cl,bf16+cl+cudnn,bf16+cl+cudnn+compile")
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--width", type=float, default=1.0, help="U-Net channel multiplier (1.0: 19.1 M parameters)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation, autotuning)")
    parser.add_argument("--num-classes", type=int, default=50, help="visual words")
    parser.add_argument("--distortion", default="transvw")
    parser.add_argument("--workers", type=int, default=0,
                        help="loader worker processes (default 0, as in performance.json: on the lent H100 "
                             "in-process loading was 2.6x faster than 4 or 8 workers)")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch reference loop")
    parser.add_argument("--plain-config", default="fp32",
                        help="settings of the plain loop: fp32 (default) or bf16, with cl, cudnn, compile tokens")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: configurations that would start later are reported as skipped")
    parser.add_argument("--out", type=Path, default=None, help="also write the header and table here (Markdown)")
    parser.add_argument("--quick", action="store_true", help="tiny CPU run for smoke tests (width 1/8, 16x16x8)")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.width, args.patch, args.batch_sizes = "cpu", 0.125, (16, 16, 8), [2]
        args.iters, args.warmup, args.matmul_size, args.num_classes = 2, 1, 512, 4
        if args.configs == parser.get_default("configs"):
            args.configs = "fp32,bf16+cl"
    args.warmup, args.iters = max(1, args.warmup), max(1, args.iters)  # the timed window starts after warm-up
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA device is available; use --device cpu.", file=sys.stderr)
        return 2
    if any(p % 8 for p in args.patch):
        print(f"--patch {args.patch}: every size must be divisible by 8 (three poolings).", file=sys.stderr)
        return 2
    try:
        configs = [parse_config(c.strip()) for c in args.configs.split(",") if c.strip()]
        plain_config = parse_config(args.plain_config)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    changes_layers = any((plain_config.gemm_weight_grad, plain_config.pad_channels, plain_config.gemm_upconv,
                          plain_config.split_concat, plain_config.gemm_head, plain_config.compile_channels_last))
    if plain_config.amp == "fp16" or changes_layers or not plain_config.fused:
        print(f"--plain-config {args.plain_config!r}: the plain loop takes fp32 or bf16 with cl, cudnn, compile, "
              "nodist and subset tokens only", file=sys.stderr)
        return 2
    began = time.perf_counter()

    def out_of_time() -> bool:
        return args.time_budget is not None and time.perf_counter() - began > args.time_budget

    header: list[str] = []

    def say(line: str) -> None:
        header.append(line)
        print(line, flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32  # what cuDNN's fp32 convolutions use
    rates = {"none": matmul_tflops(device, torch.float32, args.matmul_size, 3, tf32=tf32)}
    rates["bf16"] = rates["fp16"] = matmul_tflops(device, torch.bfloat16, args.matmul_size, 3)
    patch = tuple(args.patch)
    dataset = CacheDataset(synthetic_patches(max(args.batch_sizes) * 2, patch, args.num_classes), transform=None,
                           progress=False, copy_cache=False)  # as the pretraining bundle's CacheDataset
    say(f"device: {name}; torch {torch.__version__}; patch {'x'.join(map(str, patch))}; width {args.width}; "
        f"one G step + one D step (dis + res + adv), distortion {args.distortion}; loader: DataLoader, "
        f"{args.workers} workers; {time.strftime('%Y-%m-%d %H:%M')}")
    say(f"measured matmul rate: fp32{' (TF32, as cuDNN runs fp32 convolutions)' if tf32 else ''} "
        f"{rates['none']:.3g} TFLOP/s, bf16 {rates['bf16']:.3g} TFLOP/s "
        f"({args.matmul_size}^3)")
    rows = []
    for batch in args.batch_sizes:
        if out_of_time():
            rows += [{"config": c.name, "batch": batch, "note": "skipped: time budget"} for c in configs]
            continue
        try:
            flops = flops_per_patch(dataset, batch, args, device)
            plain = None if args.no_plain else run_plain(dataset, batch, args, device, plain_config)
        except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. the batch does not fit
            say(f"batch {batch}: {failure_note(err)}")
            release(device)
            continue
        release(device)  # the plain loop's compiled graphs and memory
        say(f"batch {batch}: {flops / 1e12:.4g} TFLOP per patch (G + D, fwd + bwd); plain PyTorch loop "
            f"({plain_config.name}): "
            + (f"{plain:.3g} patches/s" if plain else "skipped"))
        for config in configs:
            if out_of_time():
                rows.append({"config": config.name, "batch": batch, "note": "skipped: time budget"})
                continue
            try:
                row = run_engine(config, dataset, batch, args, device)
                row["mfu_%"] = 100 * row["patches/s"] * flops / (rates[config.amp] * 1e12)
                row["vs_plain"] = None if plain is None else row["patches/s"] / plain
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                row = {"config": config.name, "batch": batch, "note": failure_note(err)}
            release(device)
            rows.append(row)
            print("row:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    table = format_table(rows, COLUMNS)
    print(table)
    measured = [r for r in rows if r.get("patches/s") and r.get("vs_plain") is not None]
    summary = ""
    if measured:
        best = max(measured, key=lambda r: r["patches/s"])
        summary = (f"ratio: {best['vs_plain']:.2f}x  (best engine configuration '{best['config']}' at batch "
                   f"{best['batch']}: {best['patches/s']:.1f} patches/s, vs the plain PyTorch loop)")
        print(summary)
    if args.out is not None:
        command = "python benchmarks/pretrain_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.write_text("\n".join([f"`{command}`", "", *header, "", "```", table, "```", summary, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
