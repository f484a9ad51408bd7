"""dira3d.evaluation: fine-tuning on the target tasks (splits, task networks, metrics) and their bundles.

See ``docs/finetuning.md``. The bundles under ``bundles/`` name these objects in their configs.
"""

from dira3d.evaluation.datalists import SPLITS, holdout_by_patient, load_split, select_fraction
from dira3d.evaluation.handlers import BestModelSaver, ProbabilityWriter, prediction_path, scan_stem
from dira3d.evaluation.metrics import ForegroundDice, ForegroundIoU, MeanAUC, foreground_dice, foreground_iou, mean_auc, roc_auc
from dira3d.evaluation.pretrained import TASK_KINDS, build_task_network
from dira3d.evaluation.readers import SimpleITKReader
from dira3d.evaluation.tasks2d import build_resnet_task_network
from dira3d.evaluation.transforms import NormalizeMRd, SelectModalities, SelectModalitiesd

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
