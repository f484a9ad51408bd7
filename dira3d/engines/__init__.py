"""dira3d.engines: DiRA pretraining on MONAI/ignite (see docs/architecture.md).

- :class:`DiRATrainer` — a ``monai.engines.Trainer``: one generator step on the λ-weighted active
  losses, then the discriminator step(s); staged by :class:`StageSchedule`.
- :class:`DiRAEvaluator` — validation loss on a held-out split (criterion for ``best.pt``).
- :class:`DiRACheckpoint` — ``last.pt`` / ``best.pt`` in the documented format, and resume; :func:`pretrained_checkpoint`
  — the one to fine-tune from (``last.pt`` for a run without validation).
- :func:`exit_if_stopped`, :class:`StoppedBySignal` — SIGTERM / Ctrl-C: ``last.pt`` at the step, exit 143 / 130;
  :func:`stop_before_training` — the same exit, with one line, while the data are cached before training.
- :func:`exit_if_finished`, :class:`RunAlreadyFinished` — a rerun of a finished run: one line and exit 0, before any
  data is loaded (:mod:`dira3d.engines.finished`); :func:`data_checksum` — the sha256 of its data ``last.pt`` records.
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

from dira3d.utils.lazy import lazy_exports

# Names resolve on first use (PEP 562, :mod:`dira3d.utils.lazy`): ``import dira3d.engines`` (``dira3d pretrain``'s
# module is in this package; the bundles' configs write ``$dira3d.engines.X``) imports neither torch nor MONAI, so
# the command's refusals of a missing --datalist or --config, a malformed --override or a run folder in use come
# at once (docs/benchmarks.md). Submodules resolve as attributes too (``$dira3d.engines.distributed.X``).
_EXPORTS = {
    "dira3d.engines.cache": ("check_cache_memory", "check_task_cache_memory", "checked_cache_data",
                             "checked_task_cache_data", "shared_cache"),
    "dira3d.engines.diskcache": ("DiskCacheDataset", "cached_dataset"),
    "dira3d.engines.checkpoint": ("DiRACheckpoint", "checkpoint_dict", "pretrained_checkpoint", "restore_checkpoint"),
    "dira3d.engines.checkpoint_folder": ("check_checkpoint_folder_free", "remove_killed_checkpoint_writes"),
    "dira3d.engines.components": ("DIS_MODES", "build_dis_head", "build_dis_loss", "build_predictor", "check_dis_mode"),
    "dira3d.engines.data": ("RandPatchPair", "RandPatchPaird", "with_image_labels"),
    "dira3d.engines.distributed": ("init_distributed", "is_main_process", "maybe_sync_batchnorm"),
    "dira3d.engines.evaluator": ("DiRAEvaluator", "check_validation_size"),
    "dira3d.engines.finished": ("RunAlreadyFinished", "data_checksum", "exit_if_finished"),
    "dira3d.engines.faults": ("CollapseMonitor", "NonFiniteGuard", "NonFiniteLossError"),
    "dira3d.engines.inputs": ("CheckSameShaped", "CheckVolumed", "load_datalist"),
    "dira3d.engines.handlers": ("EpochStatsHandler", "RestorationImageHandler", "rank_zero_handlers", "scalar_output",
                                "side_by_side"),
    "dira3d.engines.optim": ("unique_parameters",),
    "dira3d.engines.stages": ("Stage", "StageSchedule"),
    "dira3d.engines.stopping": ("FinalStageEarlyStop", "StoppedBySignal", "check_early_stop_patience",
                                "end_stop_before_training", "exit_if_stopped", "stop_before_training"),
    "dira3d.engines.trainer": ("DiRATrainer",),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, submodules=True)

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
    "remove_killed_checkpoint_writes",
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
    "check_validation_size",
    "RunAlreadyFinished",
    "exit_if_finished",
    "data_checksum",
]
