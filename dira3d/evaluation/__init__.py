"""dira3d.evaluation: fine-tuning on the target tasks (splits, task networks, metrics) and their bundles.

See ``docs/finetuning.md``. The bundles under ``bundles/`` name these objects in their configs.
"""

from dira3d.utils.lazy import lazy_exports

# Names resolve on first use (PEP 562), so that ``import dira3d.evaluation`` (which the bundles'
# configs do) does not import SimpleITK or scikit-learn: inference and the GPU benchmarks run on
# images that lack them.
_EXPORTS = {
    "dira3d.evaluation.batch": ("InferenceBatch",),
    "dira3d.evaluation.datalists": ("SPLITS", "holdout_by_patient", "load_split", "select_fraction"),
    "dira3d.evaluation.handlers": ("BestModelSaver", "ClosingProgressBar", "FineTunedCheckpointLoader", "ProbabilityWriter",
                                   "fine_tuned_weights", "prediction_path", "scan_stem"),
    "dira3d.evaluation.inputs": ("CheckInferenceInputd", "check_inference_input", "screen_inputs"),
    "dira3d.evaluation.metrics": ("ForegroundDice", "ForegroundIoU", "MeanAUC", "foreground_dice", "foreground_iou",
                                  "mean_auc", "roc_auc"),
    "dira3d.evaluation.outputs": ("CheckPredictionFiles", "SavePredictiond", "check_prediction_targets", "is_own_prediction",
                                  "prediction_target"),
    "dira3d.evaluation.preprocessing": ("datalist_preprocessing", "trained_preprocessing", "trained_spacing",
                                        "training_preprocessing"),
    "dira3d.evaluation.run_folders": ("claim_run_folders", "release_run_folders"),
    "dira3d.evaluation.stopping": ("exit_if_training_stopped", "run_training", "stop_before_training"),
    "dira3d.evaluation.pretrained": ("TASK_KINDS", "build_task_network"),
    "dira3d.evaluation.radiographs": ("DicomRadiographReader", "LoadRadiographd", "PrepareRadiographd",
                                     "RadiographReader"),
    "dira3d.evaluation.readers": ("SimpleITKReader",),
    "dira3d.evaluation.tasks2d": ("build_resnet_task_network",),
    "dira3d.evaluation.transforms": ("NormalizeMRd", "NormalizeScand", "SelectModalities", "SelectModalitiesd"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, submodules=True)

__all__ = [
    "InferenceBatch",
    "LoadRadiographd",
    "SPLITS",
    "TASK_KINDS",
    "BestModelSaver",
    "ClosingProgressBar",
    "CheckInferenceInputd",
    "CheckPredictionFiles",
    "DicomRadiographReader",
    "FineTunedCheckpointLoader",
    "ForegroundDice",
    "ForegroundIoU",
    "MeanAUC",
    "NormalizeMRd",
    "NormalizeScand",
    "PrepareRadiographd",
    "ProbabilityWriter",
    "RadiographReader",
    "SavePredictiond",
    "SelectModalities",
    "SelectModalitiesd",
    "SimpleITKReader",
    "build_resnet_task_network",
    "build_task_network",
    "check_inference_input",
    "check_prediction_targets",
    "claim_run_folders",
    "datalist_preprocessing",
    "exit_if_training_stopped",
    "stop_before_training",
    "fine_tuned_weights",
    "foreground_dice",
    "foreground_iou",
    "holdout_by_patient",
    "is_own_prediction",
    "load_split",
    "mean_auc",
    "prediction_path",
    "prediction_target",
    "release_run_folders",
    "roc_auc",
    "run_training",
    "scan_stem",
    "screen_inputs",
    "select_fraction",
    "trained_preprocessing",
    "trained_spacing",
    "training_preprocessing",
]
