"""Checkpoint files: written atomically, read with ``weights_only=True``.

A dira3d pretraining checkpoint is a plain ``dict`` of ``state_dict``s (see
``docs/architecture.md``, "Checkpoint format"). Nothing in it is a pickled class, so it loads
with ``torch.load(path, weights_only=True)`` and cannot execute code.

Light to import (torch is imported inside the functions that need it): ``dira3d finetune`` checks its ``--pretrained``
file and output folder with :func:`check_pretrained_file` and :func:`check_writable` before torch loads.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dira3d.utils.atomic import atomic_write, check_writable

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_save", "checkpoint_problem", "check_pretrained_file", "check_checkpoint_file", "load_checkpoint",
           "check_writable", "on_host"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with ``torch.save`` so that ``path`` is either the old file or the new one.

    The object is written to a temporary file in the same folder, flushed to disk, and renamed
    over ``path`` (``os.replace`` is atomic on POSIX and Windows). A process killed mid-write
    leaves the previous checkpoint intact and at most a stray ``.tmp`` file
    (:func:`dira3d.utils.atomic.atomic_write`). Tensors are written as CPU tensors (:func:`on_host`):
    a checkpoint of a GPU run loads with a plain ``torch.load(path, weights_only=True)`` on a machine
    without that GPU (it raised "Attempting to deserialize object on a CUDA device").
    """
    import torch

    obj = on_host(obj)
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def on_host(obj: Any, _copies: dict | None = None) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples on the CPU (CPU tensors themselves, not copied; a
    tensor found twice, e.g. tied weights, copied once); a ``state_dict``'s ``_metadata`` (the layers' versions that
    ``load_state_dict`` reads) is kept."""
    import torch

    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj
        if id(obj) not in copies:
            copies[id(obj)] = obj.detach().cpu()
        return copies[id(obj)]
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        out.update((k, on_host(v, copies)) for k, v in obj.items())
        if isinstance(out, OrderedDict) and hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        return type(obj)(on_host(v, copies) for v in obj)
    return obj


def checkpoint_problem(path: str | os.PathLike) -> str:
    """Why ``path`` is no checkpoint file, as words after it: ``"does not exist"``, or, for a folder (a
    run's ``models/``), that it is a folder and which checkpoints it holds."""
    if not os.path.isdir(path):
        return "does not exist"
    held = sorted(name for name in os.listdir(path) if name.endswith(".pt"))
    inside = (f"pass a checkpoint in it: {', '.join(os.path.join(str(path), name) for name in held)}" if held
              else "it holds no .pt checkpoint")
    return f"is a folder, not a checkpoint file ({inside})"


PRETRAINED_ADVICE = ("check the bundle's 'pretrained' setting (`dira3d finetune --pretrained`), or leave it empty for "
                     "random initialisation")


def check_pretrained_file(pretrained: str | os.PathLike | None, advice: str = PRETRAINED_ADVICE) -> None:
    """Refuse a ``pretrained`` checkpoint (a task bundle's setting; empty or None: random initialisation) that is no
    file: ``pretrained checkpoint PATH does not exist`` (or is a folder, :func:`checkpoint_problem`), the ``last.pt``
    beside a missing ``best.pt`` (a pretraining without validation writes no ``best.pt``), then ``advice``.

    Raises:
        FileNotFoundError: as above.
    """
    if not pretrained or os.path.isfile(pretrained):
        return
    last = os.path.join(os.path.dirname(str(pretrained)), "last.pt")
    beside = (f"; {last} exists: a pretraining without validation (e.g. on visual words of --val-neighbours 0) "
              "writes last.pt (its last epoch) and no best.pt, so pass that"
              if os.path.basename(str(pretrained)) == "best.pt" and os.path.isfile(last) else "")
    raise FileNotFoundError(f"pretrained checkpoint {pretrained} {checkpoint_problem(pretrained)}{beside}; {advice}")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", given_by: str | None = None) -> dict:
    """Load a checkpoint with ``weights_only=True``.

    Args:
        path: the checkpoint file.
        map_location: where tensors go.
        given_by: the option or setting the path came from (e.g. ``"--checkpoint"``, ``"the bundle's
            'pretrained' setting"``), named in the error when the file is missing.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable torch checkpoint, or holds something other than a dict.
    """
    import torch

    path = check_checkpoint_file(path, given_by)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"checkpoint {path} cannot be read as a weights-only torch file ({_load_failure(err)}); it is "
                         "not a torch checkpoint, or it is truncated or holds Python objects: pass a file a dira3d run "
                         "wrote (e.g. models/best.pt or last.pt)") from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of state_dicts")
    return obj


def check_checkpoint_file(path: str | os.PathLike, given_by: str | None = None) -> Path:
    """``path`` as a :class:`~pathlib.Path`, refused when it is not a file (:func:`load_checkpoint`'s first check,
    which needs no torch: a command runs it before torch loads).

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder: what it holds is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} {checkpoint_problem(path)}; check the path" + (f" given by {given_by}" if given_by else ""))
    return path


def _load_failure(err: Exception) -> str:
    """What ``torch.load(..., weights_only=True)`` refused, in one line (the whole message stays the ``__cause__``).

    A refused pickle makes torch's first line "Weights only load failed. ... Re-running `torch.load` with
    `weights_only` set to `False` will likely succeed, but it can result in arbitrary code execution": cut
    short, that read as advice to turn the check off. For such a file the reason is given instead
    (``Trying to load unsupported GLOBAL posix.system ...``, ``Unsupported operand 149``); for a GLOBAL (a
    class or function to import) it says that the file holds Python objects, which could run code when
    loaded, and that dira3d does not load them.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if not first.startswith("Weights only load failed"):
        return first[:200]
    reason = next((line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))
                   and "weights_only" not in line), "")
    reason = reason.removeprefix("WeightsUnpickler error:").strip()[:160] or "refused by the weights-only unpickler"
    if "global" in reason.lower():  # a class or function to import: what a crafted file uses to run code
        return (f"it holds pickled Python objects, which could run code when loaded, and dira3d loads only tensors "
                f"and plain values: {reason}")
    return reason
