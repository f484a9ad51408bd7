"""MONAI Label infer tasks for dira3d bundles (import this only inside the MONAI Label environment).

- :class:`SegmentationBundleTask`: MONAI Label's own ``BundleInferTask`` on a LOCAL bundle folder
  (no model-zoo download), with two fixes for dira3d bundles: config overrides (e.g. the ``width``
  the weights were trained with), and label values — our segmenters have one sigmoid channel
  whose ``channel_def`` is ``{"0": "<structure>"}``, while the mask they produce marks that
  structure with 1, so the label map sent to 3D Slicer / OHIF must be ``{"<structure>": 1}``.
- :class:`ClassificationBundleTask`: the same bundle machinery with ``type=classification`` and
  without the ``Restored`` post transform MONAI Label appends by default (it resizes the output to
  the image's spatial shape, which turns a probability vector into garbage). The result is JSON:
  ``{"prediction": [{"idx", "label", "score"}], "probabilities": {name: p}}``, the outputs named by the bundle's
  ``class_names`` (with the overrides), as ``inference.json`` names them.
- :func:`infer_tasks` builds one task per bundle found by :func:`dira3d.deploy.monailabel.find_bundles`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from dira3d.deploy.monailabel import bundle_kind, check_served_bundle, find_bundles, first_output, parse_overrides

__all__ = ["SegmentationBundleTask", "ClassificationBundleTask", "infer_tasks", "parse_overrides"]

logger = logging.getLogger(__name__)


class _OverridableBundleTask(BundleInferTask):
    """``BundleInferTask`` whose config gets ``overrides`` before anything is instantiated."""

    def __init__(self, path: str, conf: Mapping[str, str], overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._overrides = dict(overrides or {})
        super().__init__(path, dict(conf), **kwargs)

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        parser = super()._load_bundle_config(path, config)
        for key, value in self._overrides.items():
            parser[key] = value
        return parser

    def _get_network(self, device: Any, data: Any) -> Any:
        """MONAI Label's own ``torch.load`` of the model file is weights-only only because torch's default
        says so (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns that off, and a crafted ``model.pt`` would then
        run code on the server): the file is read with ``weights_only=True`` first, each time it changes. A model
        replaced while the server runs is checked against the network as at the start (:func:`check_served_bundle`):
        one that does not fit is refused with the overrides that fit, not loaded in part or with PyTorch's list."""
        path = self.get_path()
        if path and os.path.isfile(path) and str(path).endswith(".pt"):
            stamp = (str(path), os.stat(path).st_mtime_ns)
            if stamp != getattr(self, "_checked_model", None):
                from dira3d.utils.checkpoint import load_checkpoint

                load_checkpoint(path)  # refuses pickled Python objects with a message naming the file
                check_served_bundle(os.path.basename(self.bundle_path), self.bundle_path, self._overrides)
                self._checked_model = stamp
        return super()._get_network(device, data)

    def run_pre_transforms(self, data: dict[str, Any], transforms: Any) -> dict[str, Any]:
        """The bundle's preprocessing without MONAI Label's ``image_path`` in view. MONAI's ``Spacingd``,
        on a NIfTI input, calls ``.update(meta)`` on every ``image_*`` key as if it were a meta dict:
        the path (a str) made every NIfTI scan fail with an ``AttributeError`` (HTTP 500). The key is put
        back afterwards (the writer names its output after it)."""
        hidden = {k: data.pop(k) for k in [k for k, v in data.items()
                                           if isinstance(k, str) and k.startswith("image_") and not isinstance(v, Mapping)]}
        result = super().run_pre_transforms(data, transforms)
        result.update(hidden)
        return result


class SegmentationBundleTask(_OverridableBundleTask):
    """A dira3d segmentation bundle served by MONAI Label (mask values as the bundle writes them)."""

    def __init__(self, path: str, conf: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(path, conf, overrides, type=InferType.SEGMENTATION)
        if not self.is_valid():
            return
        output = first_output(path)
        self._spatial_dims = len(output.get("spatial_shape") or ()) or 3
        channels = output.get("channel_def") or {}
        if int(output.get("num_channels", len(channels))) == 1 and len(channels) == 1:
            # one sigmoid channel thresholded to {0, 1}: the structure is label 1
            self.labels = {next(iter(channels.values())).lower(): 1}

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, dict]:
        """The mask written as ``inference.json`` writes it: ``uint8`` 0/1, without a channel axis. MONAI Label's writer
        kept the ``float32`` of the post transforms, which ITK cannot write as PNG, and its ``Restored`` drops the
        channel of a 3D mask only: every request of a 2D bundle on a PNG radiograph was an HTTP 500 ("PNG supports
        unsigned char and unsigned short"), and a (1, H, W) mask would be written as an image one pixel wide."""
        pred = data.get(self.output_label_key)
        if getattr(self, "_spatial_dims", 3) == 2 and getattr(pred, "ndim", 0) == 3 and pred.shape[0] == 1:
            data[self.output_label_key] = pred[0]
        return super().writer(data, extension, "uint8" if dtype is None else dtype)


class ClassificationBundleTask(_OverridableBundleTask):
    """A dira3d classification bundle served by MONAI Label, returning class probabilities as JSON."""

    def __init__(self, path: str, conf: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__(path, conf, overrides, type=InferType.CLASSIFICATION, add_post_restore=False)
        if self.is_valid() and "class_names" in self.bundle_config:
            # the outputs named as inference.json names them (its class_names, with the overrides: a CheXpert model of
            # 14 outputs served with {"out_channels": 14, "class_names": [...]}), not as MONAI Label names them, from
            # metadata.json's channel_def in lower case: that answer gave 5 of the 14 probabilities, the first
            # ("No Finding") named "atelectasis" (check_served_bundle refuses class_names of another length)
            self.labels = {str(n): i for i, n in enumerate(self.bundle_config.get_parsed_content("class_names"))}

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, dict]:
        _, result = super().writer(data, extension, dtype)
        result["probabilities"] = {item["label"]: item["score"] for item in result.get("prediction", [])}
        return None, result


def infer_tasks(conf: Mapping[str, str]) -> dict[str, InferTask]:
    """One infer task per local bundle named by the app conf.

    Conf keys: ``bundles`` (bundle folder(s) or folders of bundles, ``,``-separated; default the
    repository's ``bundles/``), ``models`` (``,``-separated names to serve; default all with
    weights), ``bundle_overrides`` (JSON, see :func:`parse_overrides`).

    A bundle refused by :func:`check_served_bundle` (weights that do not fit, an unknown id in its own
    ``bundle_overrides``) is logged as an error and left out; the others are served.

    Raises:
        FileNotFoundError: a bundle path or a requested model does not exist.
        ValueError: ``bundle_overrides`` is not a JSON object.
    """
    from dira3d.deploy.monailabel import REPO_ROOT

    paths = conf.get("bundles") or str(REPO_ROOT / "bundles")
    names = [n.strip() for n in conf.get("models", "").split(",") if n.strip()] or None
    tasks: dict[str, InferTask] = {}
    refused: list[str] = []
    for name, folder in find_bundles(paths, names, given_by="--conf bundles").items():
        overrides = parse_overrides(conf, name)
        try:  # the other bundles are served; this one's error is in the log, with what to pass
            check_served_bundle(name, folder, overrides, conf)
        except ValueError as err:
            logger.error(f"dira3d: bundle {name} ({folder}) is not served: {err}")
            refused.append(name)
            continue
        kind = bundle_kind(folder)
        task_cls = SegmentationBundleTask if kind == "segmentation" else ClassificationBundleTask
        task = task_cls(str(folder), conf, overrides)
        if task.is_valid():
            logger.info(f"dira3d: serving {kind} bundle {name} from {folder} (overrides {overrides})")
            tasks[name] = task
        else:
            logger.warning(f"dira3d: bundle {folder} is not valid for MONAI Label; skipped")
    if not tasks and refused:
        logger.warning(f"dira3d: no bundle served: {', '.join(refused)} refused (see the errors above)")
    elif not tasks:
        logger.warning(f"dira3d: no bundle with weights found under {paths}; train one (models/model.pt) first")
    return tasks
