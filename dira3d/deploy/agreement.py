"""The numerical agreement check of an exported graph against its PyTorch network: :func:`check_agreement` runs
PyTorch, TorchScript and onnxruntime (CPU) on the same input, :class:`AgreementReport` judges the largest logit
difference against :data:`DEFAULT_TOLERANCE`, and :class:`AgreementError` is what an export that disagrees raises.

These names are also importable from :mod:`dira3d.deploy.export` and :mod:`dira3d.deploy`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["DEFAULT_TOLERANCE", "AgreementError", "AgreementReport", "check_agreement"]

# Max |logit difference| accepted between PyTorch and an exported graph (float32, CPU). The
# runtimes reorder the same float32 sums, so differences are ~1e-6; 1e-4 leaves room for wider
# networks without hiding a wrong graph (a wrong weight or op moves logits by >1e-2).
DEFAULT_TOLERANCE = 1e-4

@dataclass
class AgreementReport:
    """Largest logit difference of each exported runtime against PyTorch, judged against the logits' size.

    A runtime agrees when max |y_runtime − y_torch| ≤ ``tolerance`` · max(1, max |y_torch|): float32
    rounding grows with the magnitude of the logits, and a trained segmentation's background logits
    reach 10³ (7e-4 apart at −1,589 is rounding, not a wrong graph). Logits below 1 are held to the
    absolute ``tolerance``.

    Attributes:
        max_abs_diff: runtime name (``"torchscript"``, ``"onnxruntime"``) → max |y_runtime − y_torch|.
        tolerance: the accepted difference per unit of logit scale.
        output_shape: shape of the PyTorch output.
        scale: max |y_torch|.
    """

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    tolerance: float = DEFAULT_TOLERANCE
    output_shape: tuple[int, ...] = ()
    scale: float = 0.0

    @property
    def allowed(self) -> float:
        """The largest accepted difference: ``tolerance · max(1, scale)``."""
        return self.tolerance * max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        return all(v <= self.allowed for v in self.max_abs_diff.values())

    def failures(self) -> str:
        """One line per runtime outside the tolerance ('' when all agree)."""
        return "\n".join(f"{name}: max |logit difference| {diff:.3g} > {self.allowed:.3g} (tolerance {self.tolerance:g} x "
                         f"max(1, max |logit| {self.scale:.4g})): the exported graph does not compute what the PyTorch "
                         "network computes" for name, diff in self.max_abs_diff.items() if diff > self.allowed)

    def to_json(self) -> str:
        return json.dumps({"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "scale": self.scale,
                           "allowed": self.allowed, "output_shape": list(self.output_shape), "ok": self.ok}, indent=2)


def check_agreement(
    network: torch.nn.Module,
    inputs: torch.Tensor,
    torchscript: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> AgreementReport:
    """Run PyTorch, TorchScript and onnxruntime (CPU) on ``inputs`` and compare the outputs.

    Args:
        network: the reference PyTorch network, on any device (one on a GPU is run from a copy on the CPU,
            where the runtimes run).
        inputs: the input batch (e.g. :func:`scan_patch` of a real scan), on any device.
        torchscript: a ``.ts`` file to compare (skipped when None).
        onnx_path: an ``.onnx`` file to compare with onnxruntime's CPU provider (skipped when None).
        tolerance: the accepted max |difference| per unit of logit scale (see :class:`AgreementReport`).

    Returns:
        an :class:`AgreementReport`; ``report.ok`` says whether every runtime is within tolerance.

    Raises:
        ValueError: nothing to compare, or an exported graph returns another shape.
        ImportError: ``onnx_path`` given but onnxruntime is not installed.
    """
    if torchscript is None and onnx_path is None:
        raise ValueError("give torchscript= and/or onnx_path= to compare against PyTorch")
    # the runtimes run on the host (TorchScript loaded there, onnxruntime's CPU provider): so does the reference. A
    # network or input on a GPU failed the check (a CUDA tensor to numpy; a CPU graph fed a CUDA input), and a GPU's
    # float32 convolutions (TF32 by default) may be further from the host's sums than the tolerance is meant for
    inputs = inputs.detach().cpu()
    if any(t.device.type != "cpu" for t in [*network.parameters(), *network.buffers()]):
        network = copy.deepcopy(network).cpu()
    with torch.no_grad():
        reference = network.eval()(inputs).float()
    outputs: dict[str, torch.Tensor] = {}
    if torchscript is not None:
        scripted = torch.jit.load(str(torchscript), map_location="cpu").eval()
        with torch.no_grad():
            outputs["torchscript"] = scripted(inputs).float()
    if onnx_path is not None:
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError("the ONNX check needs onnxruntime: pip install 'dira3d[deploy]'") from err
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        result = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
        outputs["onnxruntime"] = torch.from_numpy(result).float()
    report = AgreementReport(tolerance=tolerance, output_shape=tuple(reference.shape),
                             scale=float(reference.abs().max()) if reference.numel() else 0.0)
    for name, value in outputs.items():
        if value.shape != reference.shape:
            raise ValueError(f"{name} output shape {tuple(value.shape)} differs from PyTorch {tuple(reference.shape)}")
        report.max_abs_diff[name] = float((value - reference).abs().max())
    return report


class AgreementError(ValueError):
    """An exported graph that disagrees with the PyTorch network: :func:`export_torchscript` or
    :func:`export_onnx` wrote nothing (the graph was checked under a temporary name, which is removed).

    Attributes:
        report: the :class:`AgreementReport` of the check.
        out: the file that was not written.
    """

    def __init__(self, report: AgreementReport, out: Path) -> None:
        super().__init__(f"{report.failures()}; {out} was not written"
                         f"{' (the earlier export there is kept)' if out.exists() else ''}")
        self.report, self.out = report, out
