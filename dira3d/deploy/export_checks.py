"""The refusals of ``dira3d export`` that need neither torch nor MONAI, so that they come at once.

- :func:`check_model_export`: ``torchscript`` / ``onnx`` — an unknown bundle (:func:`bundle_paths`), an ``--out`` that
  is a folder or exists (without ``--overwrite``) or cannot be written (:func:`check_new_output`), a missing
  ``--check-scan`` (:func:`check_scan_exists`) or missing fine-tuned weights (:func:`missing_weights_error`).
- :func:`check_pretrained_export`: ``pretrained`` — an unknown format, a missing ``--checkpoint``, an ``--out`` that is a
  file or holds an earlier export (without ``--overwrite``).

:mod:`dira3d.deploy.export`, :mod:`dira3d.deploy.bundle_network` and :mod:`dira3d.deploy.weights` run the same checks
(and re-export these names); ``dira3d export`` runs them before it imports those modules (docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.utils.atomic import check_writable
from dira3d.utils.checkpoint import check_checkpoint_file, checkpoint_problem

__all__ = ["FORMATS", "bundle_paths", "check_model_export", "check_new_output", "check_pretrained_export",
           "check_scan_exists", "missing_weights_error"]

FORMATS = ("pt", "safetensors")  # the file formats of `dira3d export pretrained`


def bundle_paths(bundle_dir: str | os.PathLike, config_file: str) -> tuple[Path, Path, Path]:
    """``(root, config, metadata)`` of a bundle given as a folder or as a name (``luna16_nodule_fpr``),
    resolved as ``dira3d finetune --bundle`` resolves it (:func:`dira3d.evaluation.finetune.bundle_path`)."""
    from dira3d.evaluation.finetune import bundle_path  # light module; one resolution rule for every command

    root = bundle_path(bundle_dir, config_file)  # FileNotFoundError naming the valid bundle names
    config = root / "configs" / config_file
    meta = root / "configs" / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} does not exist: is {root} a dira3d bundle (configs/{config_file}, configs/metadata.json)?")
    return root, config, meta


def missing_weights_error(path: Path) -> FileNotFoundError:
    """The error for fine-tuned weights ``path`` that do not exist, saying how to give them (``--checkpoint``)."""
    problem = "do not exist" if not os.path.isdir(path) else checkpoint_problem(path)
    return FileNotFoundError(f"fine-tuned weights {path} {problem}; pass the model to export with --checkpoint "
                             "(`dira3d finetune --output-dir D` writes D/models/model.pt)")


def check_new_output(out: Path, overwrite: bool, what: str = "--out folder") -> None:
    """Refuse to replace an earlier export unless asked to (``--overwrite``), and a folder ``out`` cannot be
    written to (before the network is built and traced; ``what`` names it in the error).

    Raises:
        FileExistsError: ``out`` is a folder, or exists (without ``overwrite``).
        FolderNotWritableError: its folder cannot be created or written to.
    """
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; give the file to write, e.g. {out / 'model.ts'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (an earlier export); choose another --out, or pass --overwrite "
                              "(overwrite=True) to replace it")
    check_writable(out.parent, what=what, advice="pass --out with a file in a writable folder")


def check_scan_exists(check_scan: str | os.PathLike | None) -> None:
    """Refuse a ``--check-scan`` (``check_scan=``) that does not exist before the network is built; it is read last.

    Raises:
        FileNotFoundError: ``check_scan`` is given and is not a file.
    """
    if check_scan is not None and not Path(check_scan).is_file():
        raise FileNotFoundError(f"--check-scan {check_scan} does not exist (or is not a file); give a CT scan "
                                "(NRRD, NIfTI, MetaImage), or leave it out to check on a random input")


def check_model_export(bundle_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                       checkpoint: str | os.PathLike | None = None, overwrite: bool = False,
                       check_scan: str | os.PathLike | None = None,
                       config_file: str = "inference.json") -> tuple[Path, Path, Path, Path, Path]:
    """The refusals of a TorchScript / ONNX export, in order, before the network is built: the bundle, ``out``
    (default ``<bundle>/models/model.ts``), ``check_scan`` and the weights (default ``<bundle>/models/model.pt``).

    Returns:
        ``(root, config, metadata, out, checkpoint)`` as paths.

    Raises:
        FileNotFoundError: no such bundle, a missing ``check_scan`` or weights file.
        FileExistsError: ``out`` is a folder, or exists (without ``overwrite``).
        FolderNotWritableError: ``out``'s folder cannot be created or written to.
    """
    root, config, meta = bundle_paths(bundle_dir, config_file)
    # the default is inside the bundle, which may be read-only (installed by an admin, in a container image)
    what = "--out folder" if out else "the bundle's models folder (the default --out)"
    out = Path(out) if out else root / "models" / "model.ts"
    check_new_output(out, overwrite, what=what)
    check_scan_exists(check_scan)
    ckpt = Path(checkpoint) if checkpoint else root / "models" / "model.pt"
    if not ckpt.is_file():
        raise missing_weights_error(ckpt)
    return root, config, meta, out, ckpt


def check_pretrained_export(checkpoint: str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike,
                            parts: Sequence[str], formats: Sequence[str] = FORMATS, given_by: str = "checkpoint=",
                            overwrite: bool = False) -> list[Path]:
    """The refusals of :func:`dira3d.deploy.weights.export_pretrained` before the checkpoint is read: an unknown
    format, a missing checkpoint file (``checkpoint`` given as a path), an ``out_dir`` that is a file or holds files
    this export would replace (without ``overwrite``).

    Returns:
        the files the export writes (each part in each format, then ``key_map.json``).

    Raises:
        ValueError: an unknown format, or none.
        FileNotFoundError: the checkpoint file does not exist.
        FileExistsError: ``out_dir`` is a file, or holds files of an earlier export (without ``overwrite``).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)!r}: use one or both of {FORMATS}")
    if isinstance(checkpoint, (str, os.PathLike)):
        check_checkpoint_file(checkpoint, given_by=given_by)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for the exported weights")
    targets = [out / f"{part}.{fmt}" for part in parts for fmt in formats] + [out / "key_map.json"]
    earlier = [p.name for p in targets if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(earlier)} of an earlier export, which this one would replace; "
                              "choose another folder, or pass --overwrite (overwrite=True) to replace them")
    return targets
