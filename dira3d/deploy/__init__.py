"""Deployment of dira3d models: MONAI Label, TorchScript / ONNX exports, pretrained weights.

See docs/deployment.md. :mod:`dira3d.deploy.monailabel_tasks` and ``monailabel_app/`` run inside
the separate MONAI Label environment (``monailabel_env.sh``) and are not imported here.
"""

from dira3d.utils.lazy import lazy_exports

# Names resolve on first use (PEP 562, :mod:`dira3d.utils.lazy`): ``dira3d export`` (its module is in this package)
# refuses a missing bundle, checkpoint or --check-scan, or an --out it would overwrite, before torch and MONAI are
# imported (:mod:`dira3d.deploy.export_checks`, docs/benchmarks.md).
_EXPORTS = {
    "dira3d.deploy.bundle_network": ("load_bundle_network",),
    "dira3d.deploy.export": ("DEFAULT_TOLERANCE", "AgreementError", "AgreementReport", "check_agreement", "export_onnx",
                             "export_torchscript", "scan_patch"),
    "dira3d.deploy.monailabel": ("MonaiLabelServer", "ensure_monailabel_env", "find_bundles", "prepare_app"),
    "dira3d.deploy.weights": ("export_pretrained", "load_into", "read_weights"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, submodules=True)

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
