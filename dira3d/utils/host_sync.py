"""Find device→host synchronisations without a GPU.

On CUDA, any operation whose *result on the host* depends on device data makes the CPU wait for
every queued kernel: ``.item()`` / ``bool(t)`` / ``int(t)``, ``.tolist()``, ``torch.nonzero``,
boolean-mask indexing, ``torch.unique``, ``torch.bincount`` (its length is ``max + 1``),
``repeat_interleave`` with tensor counts, and tensors built from Python data on the device
(``torch.tensor([...], device="cuda")`` is a pageable host→device copy, which CUDA orders after
the queued work). PyTorch can report these only on a GPU
(``torch.cuda.set_sync_debug_mode``); :class:`HostSyncDetector` finds the same operations on any
device by watching the ATen calls (a ``TorchDispatchMode``) plus the few tensor methods that leave
the dispatcher (``tolist``, ``numpy``), so a CPU test can prove that a training step would not
stall a GPU.

Usage::

    with HostSyncDetector() as syncs:
        step()
    assert not syncs.events, syncs.report()

Exempt by default: calls made inside ``torch/optim/``. PyTorch's optimisers keep their step
counters on the host unless they are fused or capturable, and read them there (``.item()`` of a
CPU tensor, which waits for nothing); on a GPU their fused kernels make no host read at all.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "HostSyncDetector", "SYNCING_OPS"]

# ATen overload packets whose output size or value needs device data on the host.
SYNCING_OPS = {
    "aten::_local_scalar_dense": "reads a tensor value on the host (.item(), bool(t), int(t), float(t))",
    "aten::nonzero": "output size depends on the data (torch.nonzero, boolean-mask indexing)",
    "aten::masked_select": "output size depends on the data",
    "aten::unique_dim": "output size depends on the data",
    "aten::_unique2": "output size depends on the data",
    "aten::unique_consecutive": "output size depends on the data",
    "aten::bincount": "output length is max(input) + 1",
    "aten::lift_fresh": "a tensor built from Python data (a pageable host-to-device copy on a GPU)",
    "aten::lift_fresh_copy": "a tensor built from Python data (a pageable host-to-device copy on a GPU)",
    "aten::equal": "returns a Python bool",
    "aten::is_nonzero": "returns a Python bool",
    "aten::allclose": "returns a Python bool",
}


@dataclass
class HostSync:
    """One syncing call: the operator, why it syncs, and where our code made it."""

    op: str
    reason: str
    where: str

    def __str__(self) -> str:
        return f"{self.op}: {self.reason}\n    at {self.where}"


def _stack_has(parts: tuple[str, ...]) -> bool:
    return any(part in frame.filename.replace("\\", "/") for frame in traceback.extract_stack() for part in parts)


def _caller(skip_prefixes: tuple[str, ...]) -> str:
    # the innermost frame outside torch and this module: the line that asked for the sync
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if not any(part in name for part in skip_prefixes):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "<unknown>"


@dataclass
class HostSyncDetector(TorchDispatchMode):
    """Record every operation inside the ``with`` block that would synchronise a GPU with the host.

    Args:
        exempt: path fragments; a call with one of them anywhere on its Python stack is not
            recorded (default: ``torch/optim/``, see the module docstring).

    Attributes:
        events: the :class:`HostSync` records, in call order.
    """

    events: list[HostSync] = field(default_factory=list)
    exempt: tuple[str, ...] = ("torch/optim/",)

    def __post_init__(self) -> None:
        super().__init__()
        self._patched: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        reason = SYNCING_OPS.get(name)
        if reason is None and name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                reason = "boolean-mask indexing (a hidden nonzero)"
        if reason is None and name == "aten::repeat_interleave" and "output_size" not in kwargs:
            if isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)):
                reason = "repeat_interleave with tensor counts and no output_size"
        if reason is not None and not (self.exempt and _stack_has(self.exempt)):
            self.events.append(HostSync(name, reason, _caller(("/torch/", "host_sync.py"))))
        return func(*args, **kwargs)

    def _record_method(self, method: str, reason: str):
        original = getattr(torch.Tensor, method)
        detector = self

        def wrapper(tensor, *args, **kwargs):
            if not (detector.exempt and _stack_has(detector.exempt)):
                detector.events.append(HostSync(f"Tensor.{method}", reason, _caller(("/torch/", "host_sync.py"))))
            return original(tensor, *args, **kwargs)

        self._patched[method] = original
        setattr(torch.Tensor, method, wrapper)

    def __enter__(self):
        # tolist() and numpy() read the data without an ATen call on the CPU
        self._record_method("tolist", "copies the data to Python")
        self._record_method("numpy", "copies the data to the host")
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        for method, original in self._patched.items():
            setattr(torch.Tensor, method, original)
        self._patched.clear()
        return super().__exit__(exc_type, exc, tb)

    def report(self) -> str:
        """All events, one per paragraph (for assertion messages)."""
        return "\n".join(str(e) for e in self.events) or "no host synchronisation"
