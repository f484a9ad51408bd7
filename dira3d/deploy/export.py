"""Export fine-tuned bundles for deployment: TorchScript, ONNX, and a numerical agreement check.

- :func:`~dira3d.deploy.bundle_network.load_bundle_network` (in :mod:`dira3d.deploy.bundle_network`) builds a
  bundle's ``network_def`` and loads ``models/model.pt``.
- :func:`export_torchscript` is ``python -m monai.bundle ckpt_export`` (the same function, called
  in-process) with the arguments a dira3d bundle needs and the configs of :mod:`dira3d.deploy.export_meta` embedded,
  and checks the traced graph against the PyTorch network before the file is put in place (:class:`AgreementError`
  when they disagree).
- :func:`export_onnx` writes an ONNX graph with dynamic batch and spatial axes, checked against the network
  with onnxruntime before the file is put in place (:class:`AgreementError` too).
- :func:`check_agreement` (in :mod:`dira3d.deploy.agreement`, with :class:`AgreementReport` and
  :class:`AgreementError`; importable from here) runs PyTorch, TorchScript and onnxruntime (CPU) on the same input
  and reports the largest absolute difference of the logits; :func:`scan_patch` cuts that input from a real scan.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser, ckpt_export

from dira3d.deploy.agreement import DEFAULT_TOLERANCE, AgreementError, AgreementReport, check_agreement
from dira3d.deploy.bundle_network import bundle_parser, load_bundle_network
from dira3d.deploy.export_checks import (  # check_new_output, check_scan_exists: re-exported
    check_input_shape,
    check_model_export,
    check_new_output,
    check_scan_exists,
    network_divisor,
    split_meta_overrides,
)
from dira3d.deploy.export_meta import embedded_config, exported_meta_overrides, trained_values
from dira3d.utils.atomic import atomic_path, remove_stale_temporaries_of

__all__ = [
    "DEFAULT_TOLERANCE",
    "AgreementError",
    "AgreementReport",
    "export_torchscript",
    "export_torchscript_with_report",
    "export_onnx",
    "export_onnx_with_report",
    "bundle_example_shape",
    "scan_patch",
    "check_agreement",
    "check_new_output",
    "check_scan_exists",
]

ONNX_OPSET = 17


def _example_shape(parser: ConfigParser, input_shape: Sequence[int] | None) -> list[int]:
    roi = parser.get_parsed_content("roi_size") if "roi_size" in parser else None
    if roi is not None and (isinstance(roi, (str, bytes)) or not isinstance(roi, Sequence)
                            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in roi)):
        # roi_size=16 (a number, not a list) raised a TypeError traceback
        raise ValueError(f"roi_size {roi!r} is not a list of positive whole numbers, one per spatial dimension; "
                         'pass e.g. --override "roi_size=[16,16,8]" (3D) or "roi_size=[64,64]" (2D)')
    in_channels = parser.get_parsed_content("in_channels") if "in_channels" in parser else None
    if input_shape:
        # the count, batch, channels and sizes (multiples of the network's downsampling), as dira3d export checks
        # them before torch loads; here with in_channels parsed (an expression in brats_tumor_seg)
        channels = in_channels if isinstance(in_channels, int) and not isinstance(in_channels, bool) else None
        return check_input_shape(input_shape, roi, channels, network_divisor(parser.get()))
    if roi is None:
        raise ValueError("input_shape is needed: the bundle has no 'roi_size' (pass e.g. [1, 1, 64, 64, 32])")
    return [1, int(1 if in_channels is None else in_channels), *roi]


def bundle_example_shape(
    bundle_dir: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    config_file: str = "inference.json",
    overrides: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> list[int]:
    """Example input shape of a bundle: ``input_shape`` if given, else ``[1, in_channels, *roi_size]`` (``checkpoint``:
    the weights, whose folder's ``preprocessing.json`` gives ``brats_tumor_seg``'s sequences, hence ``in_channels``).

    Raises:
        FileNotFoundError: the bundle configs are missing.
        ValueError: no ``input_shape`` and the bundle has no ``roi_size``; an override id the config does not define.
    """
    ckpt_dir = Path(checkpoint).parent if checkpoint else None
    return _example_shape(bundle_parser(bundle_dir, config_file, overrides, ckpt_dir=ckpt_dir), input_shape)


def export_torchscript(
    bundle_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    config_file: str = "inference.json",
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    example: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_scan: str | os.PathLike | None = None,
) -> Path:
    """Write ``model.ts`` with ``monai.bundle.ckpt_export`` (traced; configs embedded), checked against PyTorch.

    The command-line equivalent of the export is::

        python -m monai.bundle ckpt_export network_def --bundle_root B --filepath B/models/model.ts \\
            --ckpt_file B/models/model.pt --meta_file B/configs/metadata.json \\
            --config_file B/configs/inference.json --use_trace True --input_shape "[1, 1, 64, 64, 32]"

    Tracing is used because the task networks check their input shape in Python (skipped while
    tracing); the traced graph has no shape-dependent branches, so it accepts any size divisible by 8.
    Before the file is put in place, the traced graph and the PyTorch network run on ``example``
    (:func:`check_agreement`, the ONNX export's check); when they disagree nothing is written.

    Args:
        bundle_dir: the bundle folder, or a bundle name (``luna16_nodule_fpr``).
        out: output file; default ``<bundle>/models/model.ts``.
        checkpoint: weights; default ``<bundle>/models/model.pt``.
        input_shape: example input ``[B, C, X, Y, Z]`` for tracing; default ``[1, in_channels, *roi_size]``.
        config_file: the config with ``network_def``.
        overrides: config ids to override (e.g. ``{"width": 0.125}``); the embedded ``inference.json`` is the config
            with them applied (the settings the network was exported with), and with the settings it reads from the
            training run's ``preprocessing.json`` (beside ``checkpoint``) resolved to values
            (:mod:`dira3d.deploy.export_meta`). ``_meta_#...`` ids (``{"_meta_#version": "0.2.0"}``) set fields of
            the embedded ``metadata.json``, whose ``network_data_format`` also describes the network exported.
        overwrite: replace an existing ``out`` (refused otherwise). The file is written under a
            temporary name and renamed, so a failed export leaves an earlier one as it was.
        example: the input of the agreement check (e.g. :func:`scan_patch` of a real scan); default a
            seeded uniform [0, 1) batch of the ``input_shape``.
        tolerance: accepted max |logit difference| per unit of logit scale (see :class:`AgreementReport`).
        check_scan: a CT scan whose central crop of the ``input_shape`` is the check's input (instead of
            ``example``): read only after ``out``, the checkpoint and the weights' fit are checked, so that a run
            that is refused does not read a large scan first.

    Returns:
        the path of the TorchScript file (exactly ``out``, whatever its suffix).

    Raises:
        FileExistsError: ``out`` exists (without ``overwrite``) or is a folder.
        FolderNotWritableError: ``out``'s folder cannot be written (the default one is in the bundle).
        FileNotFoundError: bundle configs, checkpoint or ``check_scan`` missing.
        AgreementError: the traced graph does not compute what the PyTorch network computes (a ``ValueError``;
            ``out`` is not written, an earlier file there is kept).
        ValueError: the checkpoint does not fit the network (pass the overrides it was trained with),
            an override id the config (``_meta_#...``: ``metadata.json``) does not define, a garbled
            ``preprocessing.json`` beside the checkpoint, both ``example`` and ``check_scan`` given, or a
            ``check_scan`` smaller than the example shape.
    """
    return export_torchscript_with_report(bundle_dir, out, checkpoint, input_shape, config_file, overrides, overwrite,
                                          example, tolerance, check_scan)[0]


def export_torchscript_with_report(
    bundle_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    config_file: str = "inference.json",
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    example: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_scan: str | os.PathLike | None = None,
) -> tuple[Path, AgreementReport]:
    """:func:`export_torchscript` that also returns the agreement check's :class:`AgreementReport`
    (``dira3d export torchscript`` prints it). Same arguments and errors."""
    if example is not None and check_scan is not None:
        raise ValueError("give example= or check_scan= (the input of the agreement check), not both")
    root, config, meta, out, ckpt = check_model_export(bundle_dir, out, checkpoint, overwrite, check_scan, config_file,
                                                       input_shape, overrides)
    # ckpt_export's load_state_dict dumps every size mismatch without a hint: check the fit first
    network = load_bundle_network(root, ckpt, config_file, overrides)
    # ckpt_dir: the weights' folder, whose preprocessing.json the embedded inference.json's values are read from
    parser = bundle_parser(root, config_file, overrides, ckpt_dir=ckpt.parent)
    shape = _example_shape(parser, input_shape)
    resolved = trained_values(parser)  # before the scan: a garbled preprocessing.json is refused first
    if check_scan is not None:  # read last: every refusal above comes before a (large) scan is read
        example = scan_patch(check_scan, shape[2:])
    elif example is None:
        example = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    # the temporary name ends in .ts: ckpt_export appends .ts to a name without a suffix; an export killed (SIGKILL)
    # while it wrote left its temporary, which no later export would replace
    remove_stale_temporaries_of(out, ".ts", what="export")
    with tempfile.TemporaryDirectory(prefix="dira3d-export-") as folder, _FinalNameInLogs(out) as logs, \
            atomic_path(out, suffix=".ts") as partial:
        logs.partial = str(partial)
        embedded = embedded_config(config, overrides, Path(folder), resolved)
        logs.renames[str(embedded)] = str(config)
        # the description of the network exported first; a _meta_#... override of the user's wins
        described = {**exported_meta_overrides(parser, _read_config(config)), **split_meta_overrides(overrides)[1]}
        ckpt_export(
            net_id="network_def",
            filepath=str(partial),
            ckpt_file=str(ckpt),
            meta_file=str(meta),
            config_file=str(embedded),
            use_trace=True,
            input_shape=shape,
            bundle_root=str(root),
            **{**dict(overrides or {}), **described},
        )
        # checked before the rename: a graph that disagrees never replaces an earlier export
        report = check_agreement(network, example, torchscript=partial, tolerance=tolerance)
        if not report.ok:
            raise AgreementError(report, out)
    return out, report


def _read_config(config: Path) -> dict[str, Any]:
    """The bundle's config as written (before the export's overrides), as JSON; {} when it is not a JSON object."""
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


class _FinalNameInLogs(logging.Filter):
    """While ``ckpt_export`` writes the temporary file :attr:`partial`, MONAI's log lines (``monai.bundle.scripts``:
    its input summary, ``exported to file: ...``) name ``out``, the file the user asked for, instead of the temporary
    name (and the bundle's config instead of the merged copy in :attr:`renames`); the ``exported to file`` line is
    held and logged on a clean exit only. Entered before :func:`atomic_path`, so that it exits after it: the line comes
    once ``out`` is in place (after the agreement check and the rename), and not at all when the export fails."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out, self.partial, self.held = str(out), "", []
        self.renames: dict[str, str] = {}  # other temporary paths -> the names shown (the merged config -> the bundle's)
        self.logger = logging.getLogger(ckpt_export.__module__)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        renames = {self.partial: self.out, **self.renames} if self.partial else self.renames
        if not any(old in message for old in renames if old != renames[old]):
            return True
        shown = message
        for old, new in renames.items():
            shown = shown.replace(old, new)
        record.msg, record.args = shown, ()
        if message.startswith("exported to file"):
            self.held.append(record.msg)
            return False
        return True

    def __enter__(self) -> _FinalNameInLogs:
        self.logger.addFilter(self)
        return self

    def __exit__(self, kind, *_) -> None:
        self.logger.removeFilter(self)
        for line in self.held if kind is None else ():
            self.logger.info(line)


def export_onnx(
    network: torch.nn.Module,
    example: torch.Tensor,
    out: str | os.PathLike,
    opset: int = ONNX_OPSET,
    dynamic: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """Export ``network`` to ONNX (TorchScript-based exporter, ``dynamo=False``), checked against ``network``.

    The graph is written under a temporary name in ``out``'s folder, checked with ``onnx.checker`` and run by
    onnxruntime (CPU) on ``example`` against ``network`` (:func:`check_agreement`, as :func:`export_torchscript`
    checks its traced graph), and only then renamed to ``out``: when they disagree nothing is written.

    Args:
        network: the PyTorch network (put in eval mode here).
        example: an input batch ``(B, C, *spatial)``: the export's example and the agreement check's input.
        out: the ``.onnx`` file to write.
        opset: ONNX opset.
        dynamic: make batch and spatial axes dynamic (input ``image``, output ``pred``).
        overwrite: replace an existing ``out`` (refused otherwise); a failed export or check leaves an earlier
            one as it was.
        tolerance: accepted max |logit difference| per unit of logit scale (see :class:`AgreementReport`).

    Returns:
        the path of the ONNX file (exactly ``out``).

    Raises:
        FileExistsError: ``out`` exists (without ``overwrite``) or is a folder.
        FolderNotWritableError: ``out``'s folder cannot be written.
        ImportError: ``onnx`` or ``onnxruntime`` is not installed (``pip install dira3d[deploy]``).
        AgreementError: onnxruntime's output does not match the network's (a ``ValueError``; ``out`` is not
            written, an earlier file there is kept).
    """
    return export_onnx_with_report(network, example, out, opset, dynamic, overwrite, tolerance)[0]


def export_onnx_with_report(
    network: torch.nn.Module,
    example: torch.Tensor,
    out: str | os.PathLike,
    opset: int = ONNX_OPSET,
    dynamic: bool = True,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[Path, AgreementReport]:
    """:func:`export_onnx` that also returns the agreement check's :class:`AgreementReport`
    (``dira3d export onnx`` prints it). Same arguments and errors."""
    # optional dependencies; onnxruntime runs the check, so it is asked for before the export, not after
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs the {' and '.join(missing)} package(s): pip install 'dira3d[deploy]' "
                          "(onnx, onnxruntime)")
    import onnx
    out = Path(out)
    check_new_output(out, overwrite)
    network = network.eval()
    axes = None
    if dynamic:
        names = {0: "batch", **{i: f"dim{i - 2}" for i in range(2, example.dim())}}
        with torch.no_grad():
            out_dims = network(example).dim()
        axes = {"image": names, "pred": {i: names[i] for i in names if i < out_dims}}
    remove_stale_temporaries_of(out, ".onnx", what="export")  # an export killed while it wrote (SIGKILL) left its own
    with atomic_path(out, suffix=".onnx") as partial, torch.no_grad():
        torch.onnx.export(
            network, (example,), str(partial), input_names=["image"], output_names=["pred"],
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
        onnx.checker.check_model(str(partial))
        # checked before the rename: a graph that disagrees never replaces an earlier export
        report = check_agreement(network, example, onnx_path=partial, tolerance=tolerance)
        if not report.ok:
            raise AgreementError(report, out)
    return out, report


def scan_patch(
    path: str | os.PathLike,
    size: Sequence[int] = (64, 64, 32),
    window: tuple[float, float] = (-1000.0, 1000.0),
    center: Sequence[int] | None = None,
) -> torch.Tensor:
    """A ``(1, 1, *size)`` float32 crop of a CT scan in RAS, windowed to HU ``window`` and scaled to [0, 1].

    Args:
        path: any file SimpleITK reads (NRRD, NIfTI, MetaImage).
        size: crop size (x, y, z), each at most the scan's size.
        window: HU window mapped to [0, 1].
        center: voxel centre of the crop; default the centre of the scan.

    Returns:
        the patch as a batch of one.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the crop does not fit in the scan.
    """
    from dira3d.data.io import image_to_xyz, read_image, to_ras  # reader with clear errors

    if not Path(path).exists():
        raise FileNotFoundError(f"scan {path} does not exist")
    volume = image_to_xyz(to_ras(read_image(path))).astype(np.float32)
    center = [s // 2 for s in volume.shape] if center is None else list(center)
    starts = [c - s // 2 for c, s in zip(center, size)]
    if any(a < 0 or a + s > n for a, s, n in zip(starts, size, volume.shape)):
        raise ValueError(f"a {tuple(size)} crop at {tuple(center)} does not fit in {path} of size {volume.shape}; "
                         "give a smaller --input-shape (the crop's size) or a larger --check-scan")
    crop = volume[tuple(slice(a, a + s) for a, s in zip(starts, size))]
    lo, hi = window
    crop = (np.clip(crop, lo, hi) - lo) / (hi - lo)
    return torch.from_numpy(np.ascontiguousarray(crop))[None, None]
