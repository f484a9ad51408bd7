"""Deployment of dira3d models: MONAI Label, TorchScript / ONNX exports, pretrained weights.

See docs/deployment.md. :mod:`dira3d.deploy.monailabel_tasks` and ``monailabel_app/`` run inside
the separate MONAI Label environment (``monailabel_env.sh``) and are not imported here.
"""

from dira3d.deploy.bundle_network import load_bundle_network
from dira3d.deploy.export import (
    DEFAULT_TOLERANCE,
    AgreementError,
    AgreementReport,
    check_agreement,
    export_onnx,
    export_torchscript,
    scan_patch,
)
from dira3d.deploy.monailabel import MonaiLabelServer, ensure_monailabel_env, find_bundles, prepare_app
from dira3d.deploy.weights import export_pretrained, load_into, read_weights

__all__ = [
    "DEFAULT_TOLERANCE",
    "AgreementError",
    "AgreementReport",
    "check_agreement",
    "export_onnx",
    "export_torchscript",
    "load_bundle_network",
    "scan_patch",
    "MonaiLabelServer",
    "ensure_monailabel_env",
    "find_bundles",
    "prepare_app",
    "export_pretrained",
    "load_into",
    "read_weights",
]
