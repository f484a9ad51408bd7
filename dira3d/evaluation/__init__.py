"""dira3d.evaluation: fine-tuning on the target tasks (splits, task networks, metrics) and their bundles.

See ``docs/finetuning.md``. The bundles under ``bundles/`` name these objects in their configs.
"""

from importlib import import_module

# Names resolve on first use (PEP 562), so that ``import dira3d.evaluation`` (which the bundles'
# configs do) does not import SimpleITK or scikit-learn: inference and the GPU benchmarks run on
# images that lack them.
_EXPORTS = {
    "dira3d.evaluation.datalists": ("SPLITS", "holdout_by_patient", "load_split", "select_fraction"),
    "dira3d.evaluation.handlers": ("BestModelSaver", "ProbabilityWriter", "prediction_path", "scan_stem"),
    "dira3d.evaluation.metrics": ("ForegroundDice", "ForegroundIoU", "MeanAUC", "foreground_dice", "foreground_iou",
                                  "mean_auc", "roc_auc"),
    "dira3d.evaluation.pretrained": ("TASK_KINDS", "build_task_network"),
    "dira3d.evaluation.readers": ("SimpleITKReader",),
    "dira3d.evaluation.tasks2d": ("build_resnet_task_network",),
    "dira3d.evaluation.transforms": ("NormalizeMRd", "SelectModalities", "SelectModalitiesd"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        try:  # a submodule named in a config, e.g. ``$dira3d.evaluation.transforms.NormalizeMRd``
            return import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists but needs something missing: say what
            raise AttributeError(f"module 'dira3d.evaluation' has no attribute {name!r}") from None
    value = getattr(import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


__all__ = [
    "SPLITS",
    "TASK_KINDS",
    "BestModelSaver",
    "ForegroundDice",
    "ForegroundIoU",
    "MeanAUC",
    "NormalizeMRd",
    "ProbabilityWriter",
    "SelectModalities",
    "SelectModalitiesd",
    "SimpleITKReader",
    "build_resnet_task_network",
    "build_task_network",
    "foreground_dice",
    "foreground_iou",
    "holdout_by_patient",
    "load_split",
    "mean_auc",
    "prediction_path",
    "roc_auc",
    "scan_stem",
    "select_fraction",
]
