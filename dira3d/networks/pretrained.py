"""Hand pretrained weights to a network: :func:`load_pretrained` and its :class:`LoadReport`.

This is the one documented way to start fine-tuning from a dira3d pretraining checkpoint
(``{"encoder": state_dict, "decoder": state_dict, ...}``, see docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dira3d.utils import load_checkpoint

__all__ = ["load_pretrained", "LoadReport", "dims_hint"]

_POLICIES = ("error", "repeat")
_HEAD_POLICIES = ("error", "initialise", "always")
# wrappers some trainers put around a flat state_dict (MONAI CheckpointSaver, Lightning, plain)
_WRAPPERS = ("network", "state_dict", "model")
_SHOWN = 12  # keys listed in an error message before "… and N more"

Shape = tuple[int, ...]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. Keys are prefixed with their part (``encoder.…``).

    Attributes:
        loaded: keys copied from the checkpoint (including adapted ones).
        missing: keys of the network that the checkpoint does not have (left as initialised).
        unexpected: keys of the checkpoint that the network does not have (ignored).
        mismatched: key → (checkpoint shape, network shape) for every shape difference.
        adapted: keys whose pretrained tensor was adapted to the network (``in_channels_policy``).
        parts: the parts that were loaded (:func:`~dira3d.deploy.load_into`: the part the file holds, e.g. ``encoder``).
        source: where the weights came from (a path, or ``"<dict>"``).
        target: the network the weights went into (its class name), set by :func:`~dira3d.deploy.load_into`: the
            summary then counts the file's tensors and the network's apart.
        dropped: keys of the file that ``load_into``'s mapping dropped (a ``None`` value).
        initialised: keys of the decoder's output head left as initialised under ``head_policy="always"``, though
            the checkpoint has them (of any shape).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)
    adapted: list[str] = field(default_factory=list)
    parts: tuple[str, ...] = ()
    source: str = "<dict>"
    target: str = ""
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def _counts(self) -> str:
        if not self.target:  # load_pretrained: the parts are the network's
            return (f"pretrained weights from {self.source} into {', '.join(self.parts)}: "
                    f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, {len(self.unexpected)} unexpected")
        net, loaded = self.target, len(self.loaded)
        in_net = loaded + len(self.missing) + len(self.mismatched)
        in_file = loaded + len(self.unexpected) + len(self.mismatched) + len(self.dropped)
        dropped = f", {len(self.dropped)} of the file's dropped by the mapping" if self.dropped else ""
        return (f"{' and '.join(self.parts)} weights from {self.source} into {net}: {loaded} tensors loaded, of the "
                f"file's {in_file} and of {net}'s {in_net}; {len(self.missing)} of {net}'s not in the file (kept their "
                f"initial values), {len(self.unexpected)} of the file's not in {net} (ignored){dropped}")

    def summary(self) -> str:
        """A few human-readable lines for logs (counts, then the keys that were not copied)."""
        lines = [self._counts()]
        not_adapted = [k for k in self.mismatched if k not in self.adapted]
        if not_adapted:  # not copied: a shape difference leaves the network's tensor as initialised
            lines[0] += f", {len(not_adapted)} of another shape (not loaded)"
        for key in self.adapted:
            ckpt_shape, model_shape = self.mismatched[key]
            lines.append(
                f"  adapted {key}: input channels {ckpt_shape[1]} -> {model_shape[1]} "
                "(kernel averaged over channels and repeated)"
            )
        missing, unexpected = (("missing", "unexpected") if not self.target else
                               (f"in {self.target}, not in the file", f"in the file, not in {self.target}"))
        if self.missing:
            lines.append(f"  {missing} (kept their initial values): {preview_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"  {unexpected} (ignored): {preview_keys(self.unexpected)}")
        if self.initialised:
            lines.append(f"  output head initialised, not loaded (head_policy 'always'): {preview_keys(self.initialised)}")
        if not_adapted:
            shapes = [f"{k} {self.mismatched[k][0]} vs network {self.mismatched[k][1]}" for k in not_adapted]
            lines.append(f"  other shape (kept their initial values): {preview_keys(shapes)}")
        return "\n".join(lines)


def preview_keys(keys: Sequence[str], limit: int = _SHOWN) -> str:
    """The first ``limit`` keys, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


def dims_hint(ckpt_dims: int, net_dims: int) -> str:
    """What to do with a ``ckpt_dims``-D checkpoint for a ``net_dims``-D network: which pretraining config makes one
    that fits (also named by :func:`dira3d.evaluation.pretrained.dims_mismatch`, before any network is built)."""
    if net_dims == 2:
        return (f"this is a {ckpt_dims}D checkpoint; a 2D bundle needs one pretrained with bundles/dira_pretrain "
                "configs/2d.json (train.json + 2d.json, see docs/2d.md)")
    return (f"this is a {ckpt_dims}D checkpoint; a 3D bundle needs one pretrained with bundles/dira_pretrain "
            "configs/train.json without 2d.json (see bundles/dira_pretrain/docs/README.md)")


def _check_spatial_dims(network: nn.Module, meta: Mapping[str, Any] | None, checkpoint: Mapping[str, Any],
                        parts: Sequence[str], source: str) -> None:
    """Fail with one clear sentence when a 2D checkpoint meets a 3D network or the reverse."""
    net_dims = getattr(network, "spatial_dims", None)
    if not isinstance(net_dims, int):
        return
    ckpt_dims = meta.get("spatial_dims") if meta else None
    how = "meta spatial_dims"
    if not isinstance(ckpt_dims, int):  # no meta (e.g. a flat state_dict): the first kernel's rank tells
        how, ckpt_dims = "kernel shapes", None
        for part in parts:
            nested = checkpoint.get(part)
            state = nested if isinstance(nested, Mapping) else \
                {k[len(part) + 1:]: v for k, v in checkpoint.items() if k.startswith(f"{part}.")}
            own = getattr(network, part, None)
            if not isinstance(own, nn.Module):
                continue
            ckpt_key = _first_conv_key({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
            own_state = own.state_dict()
            own_key = _first_conv_key(own_state)
            if ckpt_key is not None and own_key is not None:  # any conv kernel of an N-D network has rank N + 2
                ckpt_dims, net_dims = state[ckpt_key].dim() - 2, own_state[own_key].dim() - 2
                break
    if isinstance(ckpt_dims, int) and ckpt_dims != net_dims:
        raise ValueError(f"pretrained weights from {source} do not fit {type(network).__name__}, a {net_dims}D network "
                         f"(checkpoint {how}: {ckpt_dims}D): {dims_hint(ckpt_dims, net_dims)}")


def _available_parts(checkpoint: Mapping[str, Any]) -> list[str]:
    """The mappings of weights (some floating-point tensor: not ``meta``, ``trainer`` or an optimizer's state) and
    the first names of the dotted tensor keys."""
    nested = [k for k, v in checkpoint.items()
              if isinstance(v, Mapping) and any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in v.values())]
    flat = {k.split(".", 1)[0] for k, v in checkpoint.items() if isinstance(v, torch.Tensor) and "." in k}
    return sorted(set(nested) | flat)


def _unwrap(checkpoint: Mapping[str, Any], parts: Sequence[str]) -> Mapping[str, Any]:
    """Return the mapping that holds the parts (unwrapping ``{"network": flat_state_dict}``)."""
    if any(p in _available_parts(checkpoint) for p in parts):
        return checkpoint
    for wrapper in _WRAPPERS:
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping) and any(p in _available_parts(inner) for p in parts):
            return inner
    return checkpoint


def _exported_parts(path: str, checkpoint: Mapping[str, Any], parts: Sequence[str]) -> Mapping[str, Any]:
    """A file of ``dira3d export pretrained`` (``weights/encoder.pt`` or ``.safetensors``: one part's flat state_dict,
    its keys without the part's prefix, named after the part) as ``{part: state_dict}``, with the other ``parts``
    from the files of the same export beside it (``decoder.pt``); any other checkpoint is returned as it is. It was
    refused as having "no 'encoder' part; parts available: ['levels']"."""
    name = os.path.basename(path)
    stem, suffix = os.path.splitext(name)
    if stem not in parts or suffix not in (".pt", ".safetensors") or any(p in _available_parts(checkpoint) for p in parts):
        return checkpoint
    if any(isinstance(v, Mapping) for v in checkpoint.values()):
        return checkpoint
    result: dict[str, Any] = {stem: checkpoint}
    for part in parts:
        sibling = os.path.join(os.path.dirname(path), part + suffix)
        if part != stem and os.path.isfile(sibling):
            result[part] = load_checkpoint(sibling)
    return result


def _files_to_give(parts: Sequence[str]) -> str:
    """The files that hold ``parts``, for a caller who gives a checkpoint file and cannot choose parts."""
    exported = ("the encoder.pt of `dira3d export pretrained --parts encoder decoder` (its decoder.pt beside it)"
                if "decoder" in parts else "the encoder.pt of `dira3d export pretrained`")
    return f"the best.pt or last.pt of `dira3d pretrain`, or {exported}"


def _part_state_dict(checkpoint: Mapping[str, Any], part: str, source: str, parts: Sequence[str] = (),
                     option: str | None = None) -> dict[str, torch.Tensor]:
    nested = checkpoint.get(part)
    if isinstance(nested, Mapping) and nested:
        state = dict(nested)
    else:
        prefix = f"{part}."
        state = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if not state:
        stem, suffix = os.path.splitext(os.path.basename(source))
        exported = (f" ({source} holds the {stem} alone, as `dira3d export pretrained` writes it; the {part} is read "
                    f"from {part}{suffix} beside it, which that export writes from a checkpoint that has one, with "
                    f"`--parts {' '.join([*checkpoint, part])}`)" if stem in checkpoint else "")
        way_out = (f"{option} needs a checkpoint with {' and '.join(repr(p) for p in parts or (part,))}: give it "
                   f"{_files_to_give(parts or (part,))}" if option
                   else "Choose parts among those (e.g. parts=('encoder',))")
        raise ValueError(
            f"checkpoint {source} has no (or an empty) '{part}' part; parts available: "
            f"{_available_parts(checkpoint) or 'none'}. {way_out}{exported}"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"checkpoint {source}: '{part}' is not a state_dict (entries {preview_keys(bad)} are not tensors)"
        )
    return state


def _first_conv_key(state: Mapping[str, torch.Tensor]) -> str | None:
    """Key of the first convolution kernel (``(out, in, *kernel)``) in a module's state_dict."""
    for key, value in state.items():
        if key.endswith("weight") and value.dim() >= 3:
            return key
    return None


def _repeat_in_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Average the kernel over its input channels and repeat it ``channels`` times, scaled so that
    an image copied into every channel gives the response the pretrained network gave."""
    mean = weight.sum(dim=1, keepdim=True) / channels
    return mean.expand(-1, channels, *weight.shape[2:]).clone()


def _match_part(part: str, ckpt_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                in_channels_policy: str, report: LoadReport, errors: list[str],
                head_policy: str = "error") -> dict[str, torch.Tensor]:
    """The tensors of ``ckpt_state`` that fit ``model_state`` (the first conv adapted under the
    ``"repeat"`` policy; the decoder's output head of other output channels left out under the ``"initialise"``
    ``head_policy``, of any shape under ``"always"``); records every key in ``report`` and each unfixable shape in ``errors``."""
    first_conv = _first_conv_key(model_state)
    selected: dict[str, torch.Tensor] = {}
    for key, model_value in model_state.items():
        name = f"{part}.{key}"
        if key not in ckpt_state:
            report.missing.append(name)
            continue
        value = ckpt_state[key]
        if head_policy == "always" and part == "decoder" and key.startswith("head."):
            report.initialised.append(name)  # the pretraining's output layer (e.g. restoration) is not the task's
            continue
        if value.shape == model_value.shape:
            selected[key] = value
            report.loaded.append(name)
            continue
        report.mismatched[name] = (tuple(value.shape), tuple(model_value.shape))
        only_in_channels = (
            key == first_conv
            and value.dim() == model_value.dim()
            and value.shape[0] == model_value.shape[0]
            and value.shape[2:] == model_value.shape[2:]
        )
        if (head_policy == "initialise" and part == "decoder" and key.startswith("head.")
                and value.shape[1:] == model_value.shape[1:]):
            continue  # only the output channels differ: kept as initialised (report.mismatched lists it)
        if only_in_channels and in_channels_policy == "repeat":
            selected[key] = _repeat_in_channels(value, model_value.shape[1])
            report.loaded.append(name)
            report.adapted.append(name)
        else:
            hint = " (only the input channels differ: in_channels_policy='repeat' adapts it)" if only_in_channels else ""
            errors.append(f"{name}: checkpoint {tuple(value.shape)} vs network {tuple(model_value.shape)}{hint}")
    report.unexpected.extend(f"{part}.{key}" for key in ckpt_state if key not in model_state)
    return selected


def _shape_mismatch_error(network: nn.Module, source: str, meta: Mapping[str, Any] | None, errors: Sequence[str],
                          report: LoadReport, option: str | None = None) -> ValueError:
    """The error listing the shape mismatches, with the way out that fits them."""
    described = f" (checkpoint meta: {dict(meta)})" if meta else ""
    head_only = all(name.startswith("decoder.head.") for name in report.mismatched)
    way_out = ("\nOnly the decoder's output head differs (out_channels): to keep the rest of the pretrained "
               "decoder, load a copy without the head (its keys are then missing, left as initialised): "
               "ckpt = dira3d.utils.load_checkpoint(path); ckpt['decoder'] = {k: v for k, v in "
               "ckpt['decoder'].items() if not k.startswith('head.')}; load_pretrained(network, ckpt, "
               "parts=('encoder', 'decoder'))" if head_only else
               "\nBuild the network with the checkpoint's width / in_channels / out_channels, or load fewer "
               "parts (e.g. parts=('encoder',) when only the output channels differ)")
    if option and not head_only:  # parts are not theirs to choose, nor is the network built by hand
        way_out = (f"\nGive {option} a checkpoint pretrained with this network's width / in_channels / out_channels "
                   f"({_files_to_give(report.parts)}), or fine-tune with the settings it was pretrained at")
    widths_differ = any(c[:1] != n[:1] for k, (c, n) in report.mismatched.items() if not k.startswith("decoder.head."))
    if not head_only and widths_differ and meta and meta.get("width") is not None:  # e.g. a --tiny (width 0.125) run
        way_out += (f"; this checkpoint was pretrained at width={meta['width']}: "
                    + (f"fine-tune with width {meta['width']} (`dira3d finetune --set width={meta['width']}`, "
                       f"`--width {meta['width']}` under python -m monai.bundle run)" if option
                       else f"build {type(network).__name__}(..., width={meta['width']})"))
    return ValueError(
        f"pretrained weights from {source} do not fit {type(network).__name__}: {len(errors)} shape "
        f"mismatch(es){described}:\n  " + "\n  ".join(errors[:_SHOWN])
        + (f"\n  … and {len(errors) - _SHOWN} more" if len(errors) > _SHOWN else "")
        + way_out
    )


def load_pretrained(
    network: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    parts: Sequence[str] = ("encoder",),
    strict: bool = False,
    in_channels_policy: str = "error",
    head_policy: str = "error",
    *,
    option: str | None = None,
) -> LoadReport:
    """Copy ``checkpoint[part]`` into ``network.<part>`` for each part.

    Args:
        network: a :class:`~dira3d.networks.UNet`, :class:`~dira3d.networks.Classifier`,
            :class:`~dira3d.networks.Segmenter` (or any module with those sub-modules).
        checkpoint: a checkpoint path (read with ``weights_only=True``), a dict in the dira3d
            checkpoint format (``{"encoder": state_dict, "decoder": state_dict, ...}``), or a flat
            state_dict with ``encoder.`` / ``decoder.`` prefixes (optionally under ``"network"``,
            ``"state_dict"`` or ``"model"``).
        parts: the sub-modules to load: ``("encoder",)`` for classification,
            ``("encoder", "decoder")`` for segmentation.
        strict: also fail when keys are missing or unexpected.
        in_channels_policy: ``"error"`` (default) or ``"repeat"``: when the only mismatch is the
            first conv's input channels (e.g. a 4-channel BraTS network from a 1-channel CT
            encoder), average the pretrained kernel over its input channels and repeat it.
        head_policy: ``"error"`` (default) or ``"initialise"``: the decoder's output head (``decoder.head.*``) of
            another number of output channels is left as initialised, not copied (listed in the report as of
            another shape), e.g. the 4-channel restoration head of a BraTS pretraining (``in_channels`` 4) for a
            1-channel segmentation; its other mismatches are errors as before. ``"always"``: the output head is left as
            initialised even when its shape fits (``report.initialised`` lists it), e.g. a 1-channel restoration head
            (image intensity) that would otherwise start a 1-channel segmentation.
        option: the setting the checkpoint was given by, for a caller who cannot choose ``parts`` (``"--pretrained"``:
            ``dira3d finetune``, the task bundles): the errors then say which file to give it (a ``dira3d pretrain``
            best.pt / last.pt, or the encoder.pt of ``dira3d export pretrained``) instead of which ``parts=`` to pass.

    Returns:
        a :class:`LoadReport`; ``report.summary()`` is meant for the log.

    Raises:
        FileNotFoundError: the checkpoint path does not exist.
        ValueError: the checkpoint is 2D and the network 3D or the reverse (``meta.spatial_dims``,
            else the kernels' rank); a part is absent from the checkpoint or the network; shapes
            differ (keys and both shapes are listed); with ``strict``, missing or unexpected keys.
            Nothing is copied when an error is raised.

    Example::

        net = Segmenter(spatial_dims=3, in_channels=1, out_channels=1)
        report = load_pretrained(net, "pretrained/dira_transvw.pt", parts=("encoder", "decoder"))
        print(report.summary())
    """
    if in_channels_policy not in _POLICIES:
        raise ValueError(f"in_channels_policy={in_channels_policy!r} is not supported; use one of {_POLICIES}")
    if head_policy not in _HEAD_POLICIES:
        raise ValueError(f"head_policy={head_policy!r} is not supported; use one of {_HEAD_POLICIES}")
    if isinstance(parts, str):
        parts = (parts,)
    if not parts:
        raise ValueError("parts is empty; name at least one sub-module, e.g. parts=('encoder',)")
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        checkpoint = load_checkpoint(checkpoint)
    elif isinstance(checkpoint, Mapping):
        source = "<dict>"
    else:
        raise ValueError(
            f"checkpoint must be a path or a dict of state_dicts, got {type(checkpoint).__name__}"
        )
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), Mapping) else None
    checkpoint = _unwrap(_exported_parts(source, checkpoint, parts), parts)
    # before the keys: a 3D checkpoint in a 2D network (or the reverse) would list every key
    _check_spatial_dims(network, meta, checkpoint, parts, source)

    report = LoadReport(parts=tuple(parts), source=source)
    to_copy: dict[str, dict[str, torch.Tensor]] = {}
    errors: list[str] = []
    for part in parts:
        module = getattr(network, part, None)
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"{type(network).__name__} has no sub-module '{part}' to load pretrained weights into; "
                f"use parts among its children: {[name for name, _ in network.named_children()]}"
            )
        to_copy[part] = _match_part(part, _part_state_dict(checkpoint, part, source, parts, option), module.state_dict(),
                                    in_channels_policy, report, errors, head_policy)
    if errors:
        raise _shape_mismatch_error(network, source, meta, errors, report, option)
    if strict and (report.missing or report.unexpected):
        way_out = (f"give {option} {_files_to_give(parts)} of this network's settings" if option
                   else "use strict=False to load what matches")
        raise ValueError(
            f"strict loading from {source} failed: missing keys [{preview_keys(report.missing)}], "
            f"unexpected keys [{preview_keys(report.unexpected)}]; {way_out}"
        )
    with torch.no_grad():
        for part, selected in to_copy.items():
            getattr(network, part).load_state_dict(selected, strict=False)
    return report
