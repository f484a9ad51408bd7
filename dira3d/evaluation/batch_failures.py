"""What a failure of an input of a batch inference is (:class:`~dira3d.evaluation.batch.InferenceBatch`): its reason in
one line (:func:`failure_reason`), what makes two failures the same error (:func:`failure_key`), whether every later input
would meet it too (:func:`stops_batch`), and a failed collated batch split into its inputs (:func:`split_batch`).

With a ``dataloader#batch_size`` above 1, one input failing failed the whole collated batch, and every input of it not
written yet was ``failed`` with that input's reason, though most of them would have run. ``InferenceBatch`` now runs
the inputs of such a batch not written yet again one at a time, each as a batch of one (MONAI's
:func:`~monai.data.decollate_batch`, then :func:`~monai.data.list_data_collate` of each input): only an input that
fails on its own is ``failed``, with its own reason.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["failure_key", "failure_reason", "file_state", "release_gpu_memory", "split_batch", "stops_batch"]

_SYSTEMIC = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM}
# a path (has a slash) or a file name with an image, archive or model extension, as error messages quote them
_FILE = re.compile(r"[^\s'\"`()\[\]{},;]*[/\\][^\s'\"`()\[\]{},;]*"
                   r"|[\w.+-]+\.(?:nii|gz|nrrd|nhdr|mha|mhd|raw|dcm|png|jpe?g|tiff?|bmp|npy|npz|json|ya?ml|pt|pth|ts"
                   r"|onnx|h5)\b", re.IGNORECASE)


def _cause(err: BaseException) -> BaseException:
    """``err`` without MONAI's "applying transform ..." wrappers."""
    while err.__cause__ is not None and "applying transform" in str(err):
        err = err.__cause__
    return err


def failure_reason(err: BaseException) -> str:
    """``err`` in one line, ``Type: message`` (without MONAI's wrappers); a signal in words."""
    if isinstance(err, KeyboardInterrupt):  # SIGTERM too (dira3d.utils.interrupts.TerminatedBySignal)
        return "stopped by SIGTERM" if getattr(err, "code", None) == 143 else "interrupted (Ctrl-C)"
    err = _cause(err)
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def failure_key(err: BaseException, names: Sequence[str] = ()) -> str:
    """What makes two inputs' failures the same error: its type and message (without MONAI's wrappers), with the
    file ``names`` (the inputs' paths) and anything that looks like a path or a file name left out. A name without a
    folder (``case1.nii.gz``, a DICOM folder ``s1``) is left out only where it stands as a word, and a number (DICOM
    folders ``1``, ``2``, ...) is kept: it also stands in the message's own numbers (``groups=1``)."""
    text = failure_reason(err)
    for name in sorted({n for f in names for n in (str(f), os.path.basename(str(f))) if n}, key=len, reverse=True):
        if "/" in name or "\\" in name:
            text = text.replace(name, "<file>")
        elif not name.isdigit():
            text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", "<file>", text)
    return _FILE.sub("<file>", text)


def stops_batch(err: BaseException) -> bool:
    """Whether every later input would fail the same way (a full disk, a folder that cannot be written)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _SYSTEMIC:
            return True
        current = current.__cause__ or current.__context__
    return False


def split_batch(batchdata: Any, size: int) -> list[Any] | None:
    """The ``size`` inputs of a collated batch, each as a batch of one that the evaluator's iteration takes as it took
    the batch (its image and metadata, the transforms applied, for ``Invertd``); None when ``batchdata`` does not
    split into ``size`` inputs (not a collated dictionary of them)."""
    from monai.data import decollate_batch, list_data_collate

    if not isinstance(batchdata, Mapping) or size < 2:
        return None
    items = decollate_batch(batchdata, detach=False)
    if not isinstance(items, list) or len(items) != size:
        return None
    return [list_data_collate([item]) for item in items]


def file_state(path: str | None) -> tuple[int, ...] | None:
    """What tells a file from the one that was at ``path`` before (a rename puts another inode there), None: no file."""
    try:
        stat = os.stat(path) if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def release_gpu_memory(engine: Any) -> None:
    """After a failed input (e.g. out of GPU memory on a large scan), let go of its output and give the cached GPU
    memory back."""
    import torch

    if getattr(engine, "state", None) is not None:
        engine.state.output = None

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
