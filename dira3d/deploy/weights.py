"""Pretrained weights for other codebases: plain state_dicts, safetensors, a key map, a loader.

:func:`export_pretrained` writes each part of a dira3d pretraining checkpoint (``encoder``,
``decoder``) as ``<part>.pt`` (a plain state_dict, ``torch.load(..., weights_only=True)``) and
``<part>.safetensors``, plus ``key_map.json`` that documents every key: its shape, the layer it
belongs to and what it does, and the layout of the checkpoint's network (3D Models Genesis U-Net,
or the 2D ResNet U-Net of the chest X-ray configs, after ``meta.spatial_dims``). :func:`load_into`
copies such a file into any user network by name (optionally renamed by a ``mapping``) and reports
every key that did not fit.

Why no converter to ``monai.networks.nets.BasicUNet`` / ``UNet``: the Models Genesis U-Net doubles
the channels inside each encoder level (e.g. 1→32→64) where BasicUNet keeps them (1→32→32) and
MONAI's ``UNet`` uses strided residual units, so no tensor of ours has the shape of theirs;
a "converter" would only rename keys that then fail to load. The key map documents the layout
instead, and ``load_into(..., mapping=...)`` renames keys for a network built to match it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dira3d.deploy.export_checks import FORMATS as _FORMATS, check_pretrained_export
from dira3d.networks import LoadReport
from dira3d.utils import atomic_save, load_checkpoint
from dira3d.utils.atomic import atomic_path, atomic_write_text, remove_stale_temporaries_of
from dira3d.utils.checkpoint import check_writable

__all__ = ["KEY_MAP_VERSION", "export_pretrained", "describe_key", "read_weights", "load_into"]

KEY_MAP_VERSION = 1

# Our layouts. dira3d.networks.UNet (dira3d/networks/unet.py): encoder.levels.<i>.conv{1,2}.{conv,adn.N}.*,
# the decoder's levels.<i>.up (transposed conv) and levels.<i>.convs.conv{1,2}.*, then decoder.head.
# dira3d.networks.ResNetUNet (the 2D network, dira3d/networks/resnet_unet.py): encoder conv1/bn1/layer<s>.<b>.*
# (MONAI ResNetFeatures), decoder blocks.<i>.{upsample.preconv,convs.conv_<j>}.* and head.0 (FlexibleUNet).
# "{k}" is the kernel text of the spatial dims (3x3x3 in 3D, 3x3 in 2D).
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^levels\.(\d+)\.conv([12])\.conv\.(weight|bias)$"),
     "encoder level {0} (resolution 1/2^{0}), convolution {1} ({k3}): {2}"),
    (re.compile(r"^levels\.(\d+)\.conv([12])\.adn\.N\.(\w+)$"),
     "encoder level {0}, normalisation after convolution {1}: {2}"),
    (re.compile(r"^levels\.(\d+)\.up\.(weight|bias)$"),
     "decoder level {0}, {k2} transposed convolution (upsampling): {1}"),
    (re.compile(r"^levels\.(\d+)\.convs\.conv([12])\.conv\.(weight|bias)$"),
     "decoder level {0}, convolution {1} ({k3}) after concatenating the skip: {2}"),
    (re.compile(r"^levels\.(\d+)\.convs\.conv([12])\.adn\.N\.(\w+)$"),
     "decoder level {0}, normalisation after convolution {1}: {2}"),
    (re.compile(r"^conv1\.(weight|bias)$"), "ResNet stem convolution (stride 2): {0}"),
    (re.compile(r"^bn1\.(\w+)$"), "ResNet stem normalisation: {0}"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.(weight|bias)$"), "ResNet stage {0}, block {1}, convolution {2}: {3}"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(\w+)$"),
     "ResNet stage {0}, block {1}, normalisation after convolution {2}: {3}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.(weight|bias)$"),
     "ResNet stage {0}, block {1}, shortcut projection (1x1 convolution): {2}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"), "ResNet stage {0}, block {1}, shortcut normalisation: {2}"),
    (re.compile(r"^blocks\.(\d+)\.upsample\.preconv\.(weight|bias)$"),
     "decoder level {0}, 1x1 convolution before the nearest-neighbour upsampling: {1}"),
    (re.compile(r"^blocks\.(\d+)\.convs\.conv_(\d)\.conv\.(weight|bias)$"),
     "decoder level {0}, convolution conv_{1} ({k3}) after concatenating the skip: {2}"),
    (re.compile(r"^blocks\.(\d+)\.convs\.conv_(\d)\.adn\.N\.(\w+)$"),
     "decoder level {0}, normalisation after convolution conv_{1}: {2}"),
]


def _kernel(size: int, spatial_dims: int) -> str:
    return "x".join([str(size)] * spatial_dims)


def describe_key(key: str, spatial_dims: int = 3) -> str:
    """A one-line description of a key of ``UNet`` / ``ResNetUNet`` ``.encoder`` / ``.decoder`` (without the part prefix).

    ``spatial_dims`` sets the kernel sizes in the text (3x3x3 in 3D, 3x3 in 2D).
    """
    for pattern, text in _PATTERNS:
        match = pattern.match(key)
        if match:
            return text.format(*match.groups(), k3=_kernel(3, spatial_dims), k2=_kernel(2, spatial_dims))
    return "other (head / output convolution): " + key


def _layout(meta: Mapping[str, Any], parts: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[int, str]:
    """``(spatial_dims, layout text)`` of a checkpoint: from ``meta``, else from its keys and kernel ranks."""
    dims = meta.get("spatial_dims")
    keys = [k for state in parts.values() for k in state]
    if not isinstance(dims, int):
        kernels = [v.dim() - 2 for state in parts.values() for v in state.values() if v.dim() >= 3]
        dims = kernels[0] if kernels else 3
    axes = ["x", "y", "z"][:dims]
    weights = f"conv weights are (out, in, {', '.join('k' + a for a in axes)})"
    inputs = f"inputs are (B, C, {', '.join(a.upper() for a in axes)})"
    resnet = meta.get("network") == "ResNetUNet" or any(k == "conv1.weight" or k.startswith("layer1.") for k in keys)
    if resnet:
        backbone = f"{meta['backbone']} " if isinstance(meta.get("backbone"), str) else ""
        name = (f"dira3d ResNetUNet, {dims}D ({backbone}encoder = MONAI ResNetFeatures, decoder = MONAI FlexibleUNet's): "
                "names as in dira3d.networks.ResNetUNet.<part>")
    else:
        name = f"dira3d UNet (Models Genesis U-Net), {dims}D: names as in dira3d.networks.UNet.<part>"
    return dims, f"{name}; {weights}; {inputs}"


def _tensors(state: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) else {}


def _holds_weights(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether tensors are weights: some floating-point one (not only ``meta``, ``trainer`` or the RNG state)."""
    return any(v.is_floating_point() for v in state.values())


def _available_parts(checkpoint: Mapping[str, Any]) -> list[str]:
    """The parts of a checkpoint: its mappings of weights (a pretraining checkpoint's ``encoder``, ``decoder``, ...;
    not its ``meta``, ``trainer``, optimizer or RNG states) and the first names of its tensor keys (a fine-tuned
    ``model.pt``, a flat state_dict: ``encoder``, ``decoder`` or ``fc``)."""
    nested = {k for k, v in checkpoint.items() if _holds_weights(_tensors(v))}
    flat = {k.split(".", 1)[0] for k, v in checkpoint.items() if isinstance(v, torch.Tensor) and "." in k}
    return sorted(nested | flat)


def _part(checkpoint: Mapping[str, Any], part: str, source: str, cli: bool = False) -> dict[str, torch.Tensor]:
    state = _tensors(checkpoint.get(part))
    if not _holds_weights(state):
        prefix = f"{part}."
        state = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if not _holds_weights(state):  # a part of no weights (``meta``) would be written as an empty state_dict
        available = _available_parts(checkpoint)
        if not available:
            raise ValueError(f"checkpoint {source} holds no weights to export (no encoder, decoder or other part); "
                             "give a dira3d pretraining checkpoint or a fine-tuned models/model.pt")
        choice = f"--parts {' '.join(available)}" if cli else f"parts={tuple(available)!r}"
        raise ValueError(f"checkpoint {source} has no '{part}' part (parts available: {', '.join(available)}); "
                         f"choose parts among those, e.g. {choice}")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_pretrained(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    parts: Sequence[str] = ("encoder", "decoder"),
    formats: Sequence[str] = _FORMATS,
    given_by: str = "checkpoint=",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the pretrained parts as plain state_dicts / safetensors and a documented key map (atomically).

    Args:
        checkpoint: a dira3d pretraining checkpoint (path or dict ``{"encoder": sd, "decoder": sd, "meta": ...}``),
            or a fine-tuned ``models/model.pt`` (a flat state_dict: parts ``encoder``, ``decoder``, ``fc``).
        out_dir: folder for ``<part>.pt``, ``<part>.safetensors`` and ``key_map.json``.
        parts: parts to export; ``("encoder",)`` for classification backbones.
        formats: any of ``"pt"`` and ``"safetensors"``.
        given_by: the option that named ``checkpoint``, for the error when it is missing
            (``"--checkpoint"`` from the command line).
        overwrite: replace files of an earlier export in ``out_dir`` (refused otherwise).

    Returns:
        name → path of every file written (``"encoder.pt"``, ``"encoder.safetensors"``, ``"key_map.json"``, ...).

    Raises:
        FileNotFoundError: the checkpoint path does not exist.
        FileExistsError: ``out_dir`` is a file, or holds files this export would replace (without ``overwrite``).
        FolderNotWritableError: ``out_dir`` cannot be created or written to.
        ValueError: a part is missing from the checkpoint or a format is unknown.
        ImportError: safetensors requested but not installed.
    """
    # the refusals that need no torch first (`dira3d export pretrained` runs them before torch loads)
    targets = check_pretrained_export(checkpoint, out_dir, parts, formats, given_by=given_by, overwrite=overwrite)
    out = Path(out_dir)
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<dict>"
    ckpt = load_checkpoint(checkpoint, given_by=given_by) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if "safetensors" in formats:
        try:
            from safetensors.torch import save_file
        except ImportError as err:
            raise ImportError("safetensors export needs the 'safetensors' package: pip install 'dira3d[deploy]'") from err
    meta = dict(ckpt.get("meta") or {}) if isinstance(ckpt.get("meta"), Mapping) else {}
    states = {part: _part(ckpt, part, source, cli=given_by.startswith("--")) for part in parts}
    spatial_dims, layout = _layout(meta, states)  # 2D (chest X-ray) and 3D checkpoints have different layouts
    # only now: a checkpoint refused above leaves no empty folder behind
    check_writable(out, what="output folder (--out)")
    for target in targets:  # an export killed (SIGKILL) while it wrote left its temporaries, which no rerun replaces
        for suffix in dict.fromkeys((".tmp", target.suffix)):
            remove_stale_temporaries_of(target, suffix, what="export")
    written: dict[str, Path] = {}
    key_map: dict[str, Any] = {
        "version": KEY_MAP_VERSION,
        "source": source,
        "meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list)) or v is None},
        "spatial_dims": spatial_dims,
        "layout": layout,
        "load_with": "dira3d.deploy.load_into(network, '<part>.safetensors', mapping={...})",
        "parts": {},
    }
    for part, state in states.items():
        if "pt" in formats:
            written[f"{part}.pt"] = atomic_save(state, out / f"{part}.pt")
        if "safetensors" in formats:
            path = out / f"{part}.safetensors"
            with atomic_path(path, suffix=".safetensors") as tmp:
                save_file(state, str(tmp), metadata={"part": part, "dira3d_key_map": "key_map.json"})
            written[f"{part}.safetensors"] = path
        key_map["parts"][part] = {
            key: {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                  "full_name": f"{part}.{key}", "meaning": describe_key(key, spatial_dims)}
            for key, value in state.items()
        }
    path = out / "key_map.json"
    written["key_map.json"] = atomic_write_text(path, json.dumps(key_map, indent=1))
    return written


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file does not hold a flat mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    state = load_checkpoint(path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a flat state_dict (entries {bad[:5]} are not tensors); "
                         "export one with dira3d.deploy.export_pretrained")
    return dict(state)


def _rename(key: str, mapping: Mapping[str, str] | Callable[[str], str | None] | None) -> str | None:
    """Apply a mapping: a callable, or prefix → prefix (longest prefix wins; ``""`` adds a prefix)."""
    if mapping is None:
        return key
    if callable(mapping):
        return mapping(key)
    for old in sorted(mapping, key=len, reverse=True):
        if key.startswith(old):
            new = mapping[old]
            return None if new is None else new + key[len(old):]
    return key


def load_into(
    network: nn.Module,
    weights_path: str | os.PathLike,
    mapping: Mapping[str, str] | Callable[[str], str | None] | None = None,
    strict: bool = False,
) -> LoadReport:
    """Copy exported weights into a user's network by (mapped) name and report what did not fit.

    Keys whose name and shape match are copied; every other key is listed and left untouched.

    Args:
        network: any ``nn.Module`` (e.g. a user's own MONAI network).
        weights_path: ``<part>.safetensors`` or ``<part>.pt`` from :func:`export_pretrained`.
        mapping: renames our keys to the network's: a dict of prefix → prefix (e.g.
            ``{"levels.0.": "features.0."}``; ``""`` prefixes every key, a ``None`` value drops
            keys), or a callable ``key -> new key | None``.
        strict: raise if anything is missing, unexpected or mismatched.

    Returns:
        a :class:`dira3d.networks.LoadReport`: ``loaded`` / ``missing`` / ``unexpected`` (network
        key names after mapping), ``mismatched`` (key → (file shape, network shape)) and ``dropped`` (the file's
        keys the mapping dropped); its ``summary()`` says what went where: ``encoder weights from <file> into
        <network class>: N tensors loaded, of the file's F and of <network class>'s T; ...``.

    Warns:
        UserWarning: not one weight tensor was loaded (only counters such as ``num_batches_tracked``,
            or nothing): the names or widths do not fit, so the network keeps its initial values.

    Raises:
        FileNotFoundError: ``weights_path`` does not exist.
        ValueError: the file's kernels are of another rank than the network's (a 3D file in a 2D
            network or the reverse: only biases and normalisation statistics would fit); the mapping
            renames two of the file's keys to one network key; with
            ``strict``, when any key did not fit (the message lists keys and shapes).
    """
    source = read_weights(weights_path)
    target = network.state_dict()
    report = LoadReport(source=str(weights_path), parts=(Path(weights_path).stem,), target=type(network).__name__)
    selected: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}  # network key -> the file's key mapped to it
    for key, value in source.items():
        name = _rename(key, mapping)
        if name is None:
            report.dropped.append(key)
            continue
        if name in renamed:  # two of the file's tensors would be loaded into one of the network's: the last won silently
            raise ValueError(f"load_into: the mapping renames both {renamed[name]!r} and {key!r} of {weights_path} to "
                             f"{name!r}; each network key can take one tensor: fix the mapping (a None value drops keys)")
        renamed[name] = key
        if name not in target:
            report.unexpected.append(name)
        elif tuple(target[name].shape) != tuple(value.shape):
            report.mismatched[name] = (tuple(value.shape), tuple(target[name].shape))
        else:
            selected[name] = value
            report.loaded.append(name)
    seen = set(report.loaded) | set(report.mismatched)
    report.missing.extend(k for k in target if k not in seen)
    ranks = {name: shapes for name, shapes in report.mismatched.items()
             if len(shapes[0]) != len(shapes[1]) and min(len(shapes[0]), len(shapes[1])) >= 3}
    if ranks:  # conv kernels (out, in, *k) of another rank: another spatial_dims
        name, (file_shape, net_shape) = next(iter(ranks.items()))
        raise ValueError(
            f"weights {weights_path} are {len(file_shape) - 2}D and {type(network).__name__} is {len(net_shape) - 2}D "
            f"({name}: file {file_shape} vs network {net_shape}); only biases and normalisation statistics would "
            "load: export weights pretrained with the same spatial_dims (key_map.json gives the file's spatial_dims)"
        )
    if not any(selected[k].is_floating_point() for k in selected):
        warnings.warn(
            f"load_into: no weight tensor of {weights_path} fits {type(network).__name__} ({len(report.unexpected)} "
            f"unexpected, {len(report.mismatched)} of another shape), so the network keeps its initial values; "
            "compare its keys with key_map.json and pass mapping= (print(report.summary()) lists them)",
            stacklevel=2,
        )
    if strict and (report.missing or report.unexpected or report.mismatched):
        shapes = [f"{k}: file {a} vs network {b}" for k, (a, b) in report.mismatched.items()]
        raise ValueError(
            f"weights {weights_path} do not fit {type(network).__name__}: mismatched {shapes}, "
            f"missing {report.missing[:12]}, unexpected {report.unexpected[:12]}; "
            "fix the mapping= or build the network with the exported widths (see key_map.json)"
        )
    with torch.no_grad():
        network.load_state_dict(selected, strict=False)
    return report
