"""dira3d.engines: DiRA pretraining on MONAI/ignite (see docs/architecture.md).

- :class:`DiRATrainer` — a ``monai.engines.Trainer``: one generator step on the λ-weighted active
  losses, then the discriminator step(s); staged by :class:`StageSchedule`.
- :class:`DiRAEvaluator` — validation loss on a held-out split (criterion for ``best.pt``).
- :class:`DiRACheckpoint` — ``last.pt`` / ``best.pt`` in the documented format, and resume; :func:`pretrained_checkpoint`
  — the one to fine-tune from (``last.pt`` for a run without validation).
- :func:`exit_if_stopped`, :class:`StoppedBySignal` — SIGTERM / Ctrl-C: ``last.pt`` at the step, exit 143 / 130;
  :func:`stop_before_training` — the same exit, with one line, while the data are cached before training.
- :func:`exit_if_finished`, :class:`RunAlreadyFinished` — a rerun of a finished run: one line and exit 0, before any
  data is loaded (:mod:`dira3d.engines.finished`).
- :class:`FinalStageEarlyStop`, :func:`check_early_stop_patience` — opt-in early stopping on the validation
  loss in the final stage (``DiRACheckpoint(early_stop_patience=N)``).
- :class:`RestorationImageHandler`, :func:`scalar_output` — TensorBoard images and scalars;
  :class:`EpochStatsHandler` — MONAI's console line, its ``Iter`` counted in the epoch also after a resume;
  :func:`rank_zero_handlers` — the reporting handlers on rank 0 alone.
- :func:`checked_cache_data`, :func:`shared_cache` — the volumes cached before training: the estimate logged, a
  cache that would not fit refused (``num_samples_cache``), one copy when validation uses the training list;
  :func:`checked_task_cache_data` the same for the task bundles' caches (``cache_rate``), measured after their
  deterministic preprocessing; with the bundle setting ``cache_dir``, :func:`cached_dataset` keeps them on disk
  instead (:class:`DiskCacheDataset`, a MONAI ``PersistentDataset``: a restart or resume reads them back), and the
  check is of the free disk space there.
- Factories for the mode-dependent parts and the volume → patch-pair transforms.
"""

from dira3d.engines.cache import (check_cache_memory, check_task_cache_memory, checked_cache_data,
                                  checked_task_cache_data, shared_cache)
from dira3d.engines.diskcache import DiskCacheDataset, cached_dataset
from dira3d.engines.checkpoint import (DiRACheckpoint, check_checkpoint_folder_free, checkpoint_dict, pretrained_checkpoint,
                                       restore_checkpoint)
from dira3d.engines.components import DIS_MODES, build_dis_head, build_dis_loss, build_predictor, check_dis_mode
from dira3d.engines.data import RandPatchPair, RandPatchPaird, with_image_labels
from dira3d.engines.distributed import init_distributed, is_main_process, maybe_sync_batchnorm
from dira3d.engines.evaluator import DiRAEvaluator
from dira3d.engines.finished import RunAlreadyFinished, exit_if_finished
from dira3d.engines.faults import CollapseMonitor, NonFiniteGuard, NonFiniteLossError
from dira3d.engines.inputs import CheckSameShaped, CheckVolumed, load_datalist
from dira3d.engines.handlers import (EpochStatsHandler, RestorationImageHandler, rank_zero_handlers, scalar_output,
                                     side_by_side)
from dira3d.engines.optim import unique_parameters
from dira3d.engines.stages import Stage, StageSchedule
from dira3d.engines.stopping import (FinalStageEarlyStop, StoppedBySignal, check_early_stop_patience,
                                     end_stop_before_training, exit_if_stopped, stop_before_training)
from dira3d.engines.trainer import DiRATrainer

__all__ = [
    "check_cache_memory",
    "check_task_cache_memory",
    "checked_cache_data",
    "checked_task_cache_data",
    "shared_cache",
    "DiskCacheDataset",
    "cached_dataset",
    "init_distributed",
    "is_main_process",
    "maybe_sync_batchnorm",
    "CollapseMonitor",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "CheckSameShaped",
    "CheckVolumed",
    "load_datalist",
    "DiRATrainer",
    "DiRAEvaluator",
    "DiRACheckpoint",
    "checkpoint_dict",
    "check_checkpoint_folder_free",
    "pretrained_checkpoint",
    "restore_checkpoint",
    "DIS_MODES",
    "build_dis_head",
    "build_dis_loss",
    "build_predictor",
    "check_dis_mode",
    "RandPatchPair",
    "RandPatchPaird",
    "with_image_labels",
    "RestorationImageHandler",
    "EpochStatsHandler",
    "rank_zero_handlers",
    "scalar_output",
    "side_by_side",
    "unique_parameters",
    "Stage",
    "StageSchedule",
    "StoppedBySignal",
    "exit_if_stopped",
    "stop_before_training",
    "end_stop_before_training",
    "FinalStageEarlyStop",
    "check_early_stop_patience",
    "RunAlreadyFinished",
    "exit_if_finished",
]
