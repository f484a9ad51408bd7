"""Speed helpers for the pretraining engine: fused optimisers, in-place compilation, measurements.

The training step itself stays in :mod:`dira3d.engines.step`; what lives here is what a bundle
config or a benchmark calls around it:

- :func:`build_adam` — Adam with ``fused=True`` on CUDA (one kernel per step for all tensors) and
  ``foreach=True`` elsewhere (a handful of multi-tensor ops instead of one op per tensor);
- :func:`apply_layer_options` — the layer switches aimed at slow cuDNN kernels (``gemm_weight_grad``,
  ``pad_channels``, ``gemm_upconv``, ``split_concat``, ``gemm_head``), with a warning for one that changes no layer
  of the network at hand (e.g. ``split_concat`` on the 2D ``ResNetUNet``);
- :func:`compile_modules` — ``torch.compile`` of the U-Net's encoder/decoder, heads and adversary
  *in place* (``nn.Module.compile``), so ``network.encode`` still goes through the compiled
  encoder and checkpoint keys do not change (no ``_orig_mod.`` prefix); :func:`check_compile_mode` refuses a
  ``compile_mode`` that is not one of ``torch.compile``'s, ``compile`` on or off;
- :func:`synchronize`, :func:`peak_memory_mib`, :func:`reset_peak_memory`, :func:`matmul_tflops`,
  :func:`count_flops`, :func:`format_table` — measurements shared by ``benchmarks/*.py``.
"""

from __future__ import annotations

import math
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from dira3d.engines.optim import unique_parameters

__all__ = [
    "COMPILE_BACKENDS",
    "LAYER_OPTIONS",
    "apply_layer_options",
    "build_adam",
    "check_compile_mode",
    "compile_modules",
    "synchronize",
    "mean_ms",
    "reset_peak_memory",
    "peak_memory_mib",
    "matmul_tflops",
    "count_flops",
    "format_table",
]

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def _valid_betas(betas: Any) -> bool:
    """Whether ``betas`` is two finite numbers in [0, 1), as ``torch.optim.Adam`` needs them."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        return False
    return all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)


def build_adam(
    modules: Iterable[nn.Module | None],
    lr: float,
    device: str | torch.device,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    fused: bool = True,
    name: str = "lr",
) -> torch.optim.Adam:
    """Adam over the unique parameters of ``modules`` (None entries skipped), moved to ``device`` first.

    Args:
        modules: the modules to optimise (e.g. ``[network, dis_head, predictor]``).
        lr: learning rate.
        device: training device; the modules are moved there so that the optimiser state is
            created on it and the fused kernel sees device tensors only.
        betas / weight_decay: as in ``torch.optim.Adam``.
        fused: ``True``: fused kernel on CUDA, multi-tensor (``foreach``) elsewhere; ``False``:
            PyTorch's default implementation choice.
        name: the setting ``lr`` came from (``lr_g`` / ``lr_d`` in the pretraining bundle), named in errors.

    Returns:
        The optimiser. All choices compute the same update up to floating-point rounding.

    Raises:
        ValueError: no parameter in ``modules``, ``lr`` negative or not a finite number, or ``betas`` not two
            numbers in [0, 1) (named as ``betas_d`` for ``name='lr_d'``).
    """
    from dira3d.data.errors import DataError

    try:
        valid = not isinstance(lr, (bool, str)) and math.isfinite(float(lr)) and float(lr) >= 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        # DataError: one `error:` line under python -m monai.bundle run too (a ValueError came in MONAI's traceback)
        raise DataError(None, f"{name}={lr!r}: the learning rate must be a finite number >= 0, e.g. {name}=0.001")
    if not _valid_betas(betas):  # betas_d=[0.9] failed in Adam's step with a bare IndexError inside MONAI's traceback
        setting = f"betas_{name.partition('_')[2]}" if "_" in name else "betas"
        raise DataError(None, f"{setting}={betas!r}: Adam's betas must be a list of two numbers in [0, 1), "
                        f"e.g. {setting}=[0.9,0.999]")
    device = torch.device(device)
    mods = [m.to(device) for m in modules if m is not None]
    params = unique_parameters(mods)
    if not params:
        raise ValueError("build_adam: the given modules have no parameters; check the network/head settings")
    options: dict[str, Any] = {}
    if fused:
        options = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **options)


LAYER_OPTIONS = ("gemm_weight_grad", "pad_channels", "gemm_upconv", "split_concat", "gemm_head")


def apply_layer_options(network: nn.Module, adversary: nn.Module | None = None,
                        memory_format: torch.memory_format | None = None, **options: bool) -> dict[str, list[str]]:
    """Switch the layers that each option set to true applies to, in place (keys and values unchanged).

    ``gemm_weight_grad`` and ``pad_channels`` act on ``network`` and ``adversary`` (their 1-channel
    convolutions), ``gemm_upconv``, ``split_concat`` and ``gemm_head`` on ``network`` (the U-Net
    decoder and its 1×1 output head). An option
    that finds no layer to switch in these networks warns once, naming the option and the network:
    it has no effect there, which a user who set it for speed should know.

    Returns:
        ``{option: switched layer names}`` for the options set to true.

    Raises:
        ValueError: an unknown option, or ``pad_channels`` with ``gemm_weight_grad`` (both change the
        1-channel convolutions) or with ``gemm_head`` (both change the 1-channel output head).
    """
    from dira3d.networks.channel_pad import use_padded_channels
    from dira3d.networks.gemm_head import use_gemm_head
    from dira3d.networks.gemm_upconv import use_gemm_upconv
    from dira3d.networks.gemm_wgrad import use_gemm_weight_grad
    from dira3d.networks.split_concat import use_split_concat

    unknown = sorted(set(options) - set(LAYER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown layer option(s) {unknown}; the options are {list(LAYER_OPTIONS)}")
    if options.get("gemm_weight_grad") and options.get("pad_channels"):
        raise ValueError("gemm_weight_grad and pad_channels both change the 1-channel convolutions; set one of them")
    if options.get("gemm_head") and options.get("pad_channels"):  # pad would take the head and gemm_head find none
        raise ValueError("gemm_head and pad_channels both change the 1-channel output head; set one of them")
    both = tuple(m for m in (network, adversary) if m is not None)
    switches = {  # option: (the switch, the networks it looks at)
        "gemm_weight_grad": (use_gemm_weight_grad, both),
        "pad_channels": (partial(use_padded_channels, memory_format=memory_format), both),
        "gemm_upconv": (use_gemm_upconv, (network,)),
        "split_concat": (use_split_concat, (network,)),
        "gemm_head": (use_gemm_head, (network,)),
    }
    switched = {}
    for option in LAYER_OPTIONS:
        if options.get(option):
            switch, targets = switches[option]
            switched[option] = switch(*targets)
            if not switched[option]:
                names = " / ".join(type(m).__name__ for m in targets)
                warnings.warn(f"{option}=True changes no layer of {names}: it has no effect on this network "
                              f"(set it to false to silence this)", stacklevel=2)
    return switched


def check_compile_mode(mode: object) -> str | None:
    """``mode`` (the bundles' ``compile_mode``) if it is null or one of ``torch.compile``'s modes, whether or not
    ``compile`` is on: ``--compile_mode fast`` with ``compile`` false ran without a word (exit 0), and with ``compile``
    on failed in torch's traceback once the trainer was built. The pretraining bundle calls it in ``initialize``,
    before any data are read; :class:`~dira3d.engines.DiRATrainer` and :func:`compile_modules` call it too.

    Raises:
        DataError: naming ``compile_mode``, its value and the modes of this PyTorch (one ``error:`` line).
    """
    if mode is None:
        return None  # inductor's default; torch._inductor (a second to import) is read only for a mode given
    import torch._inductor

    modes = list(torch._inductor.list_mode_options())
    if not isinstance(mode, str) or mode not in modes:
        from dira3d.data.errors import DataError

        raise DataError(None, f"compile_mode={mode!r} is not one of torch.compile's modes; give one of "
                        f"{', '.join(modes)}, or null (the default mode)")
    return mode


def compile_modules(modules: Mapping[str, nn.Module | None], backend: str = "inductor", mode: str | None = None,
                    channels_last: bool = False) -> list[str]:
    """``torch.compile`` each module in place (its ``forward`` is compiled, its keys unchanged).

    For a U-Net (anything with ``encoder`` and ``decoder`` children) the two halves are compiled
    separately, because the trainer calls ``encode`` / ``decode`` rather than ``forward``.

    Args:
        modules: name → module (None entries skipped), e.g. ``trainer.modules()``.
        backend: ``inductor`` (generated kernels; needs a C++ compiler on CPU), ``aot_eager``
            or ``eager`` (graph capture only: for debugging and tests).
        mode: inductor mode, e.g. ``"max-autotune-no-cudagraphs"`` (None: default).
        channels_last: force inductor's channels-last layout optimisation in every graph
            (``force_layout_optimization``). Inductor decides it per graph and leaves it off for a
            graph with a convolution whose input channels are at least twice its output channels,
            as the first convolution of every U-Net decoder level (768 → 256, 384 → 128, 192 → 64 at
            full resolution): the encoder's graphs run with it, the decoder's without. Whether forcing it is faster is
            for ``benchmarks/pretrain_throughput.py`` (token ``forcecl``) to say on the GPU at hand.

    Returns:
        The names of the compiled modules (``network.encoder``, ``network.decoder``, ...).

    Raises:
        DataError: an unknown backend or mode (a ``ValueError``; one ``error:`` line under ``python -m monai.bundle
            run``).
    """
    mode = check_compile_mode(mode)
    if backend not in COMPILE_BACKENDS:
        from dira3d.data.errors import DataError

        raise DataError(None, f"compile backend {backend!r} (the bundles' compile setting) is not supported; choose "
                        f"false, true (inductor) or one of {', '.join(COMPILE_BACKENDS)}")
    # static shapes: patches have a fixed size and the batch only a few values (B in the G step,
    # 2B for the adversary's joint real + restored forward, the last validation batch), so one
    # specialised graph per batch size beats a graph with a symbolic batch dimension
    options: dict[str, Any] = {"backend": backend, "dynamic": False}
    if channels_last and backend == "inductor":  # torch.compile takes a mode or options, not both
        import torch._inductor

        extra = dict(torch._inductor.list_mode_options(mode)) if mode is not None else {}
        options["options"] = {**extra, "force_layout_optimization": True}
    elif mode is not None:
        options["mode"] = mode
    compiled = []
    for name, module in modules.items():
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters()):
            continue  # the MoCo queue holds buffers only: nothing to compile
        parts = {name: module}
        if isinstance(getattr(module, "encoder", None), nn.Module) and isinstance(getattr(module, "decoder", None), nn.Module):
            parts = {f"{name}.encoder": module.encoder, f"{name}.decoder": module.decoder}
        for part_name, part in parts.items():
            part.compile(**options)
            compiled.append(part_name)
    return compiled


def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work (CUDA); a no-op on the CPU. Used only at measurement points."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_ms(fn: Callable[[], Any], repeats: int, device: str | torch.device, warmup: int = 3) -> float:
    """Mean wall-clock ms per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones,
    with the device's queued work waited for before and after (a benchmark helper)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / repeats


def reset_peak_memory(device: str | torch.device) -> None:
    """Reset the peak-memory counter of a CUDA device (the CPU's peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: str | torch.device) -> float:
    """Peak allocated memory of a CUDA device since the last reset, or the process's peak RSS on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def matmul_tflops(device: str | torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192, repeats: int = 10,
                  tf32: bool = False) -> float:
    """The measured matrix-multiply rate of ``device`` in TFLOP/s (``size``² × ``size`` products).

    This is the denominator of model FLOP utilisation: a rate measured on the same card in the
    same run, rather than a datasheet number. ``tf32=True`` lets float32 products use TF32 tensor
    cores, as cuDNN's float32 convolutions do by default (``torch.backends.cudnn.allow_tf32``):
    the strict float32 rate (≈ 51 TFLOP/s on an H100 against ≈ 400 with TF32) would put an fp32
    network above 100 % utilisation.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        torch.mm(a, b)  # warm-up (kernel selection, allocator)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2.0 * size**3 * repeats / elapsed / 1e12


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and backward, matmuls and convolutions).

    Uses ``torch.utils.flop_counter.FlopCounterMode`` (counts what runs, including the backward);
    elementwise ops are not counted, as in the usual MFU convention.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (one header line, one line per row); floats with 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        return "-" if value is None else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)
