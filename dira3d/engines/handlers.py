"""Logging helpers for DiRA training: scalar picking and restoration image summaries.

Scalars go through MONAI's own ``StatsHandler`` / ``TensorBoardStatsHandler`` with
:func:`scalar_output` as their ``output_transform``; :class:`RestorationImageHandler` adds
original | distorted | restored slices side by side to TensorBoard. :class:`EpochStatsHandler` is MONAI's
``StatsHandler`` whose console line ``Epoch: e/E, Iter: k/N`` counts ``k`` inside the epoch also after a resume with
another epoch length. :func:`rank_zero_handlers` keeps these
reporting handlers off the ranks other than 0 of a distributed run, whatever their place in the bundle's list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai.handlers import StatsHandler

__all__ = ["scalar_output", "side_by_side", "RestorationImageHandler", "EpochStatsHandler", "rank_zero_handlers"]


def scalar_output(output: Any) -> dict[str, float]:
    """The numeric entries of a trainer output dict as floats (``stage`` names and images dropped).

    Called by the stats handlers only at their log interval, so the ``.item()`` syncs happen there
    and not in every training step.
    """
    if not isinstance(output, Mapping):
        return {}
    scalars = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[key] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = float(value)
    return scalars


class _IterationInEpoch:
    """``engine`` as MONAI's iteration print reads it, with ``state.iteration`` counted as if every epoch had had
    this run's epoch length: ``(iteration - 1) % epoch_length + 1`` is then the iteration in the epoch."""

    def __init__(self, engine: Engine, iteration: int) -> None:
        self._state, self.iteration = engine.state, iteration

    @property
    def state(self) -> "_IterationInEpoch":
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


class EpochStatsHandler(StatsHandler):
    """MONAI's ``StatsHandler`` whose iteration line says the iteration in the epoch after a resume too.

    MONAI prints ``Iter: (iteration - 1) % epoch_length + 1``. A run resumed with another epoch length (another
    number of torchrun processes, batch_size or data) goes on by epochs while the iteration counter goes on from
    the checkpoint's (:func:`dira3d.engines.batches.resume_position`), so that count was off (``Iter: 3/3`` for the
    first iteration of an epoch). The trainer records where the epoch in progress began
    (``state.epoch_start_iteration``, :class:`~dira3d.engines.batches.BatchFeedMixin`); the line is MONAI's own,
    printed from it. An engine without that record prints as MONAI does.
    """

    def _default_iteration_print(self, engine: Engine) -> None:
        start, length = getattr(engine.state, "epoch_start_iteration", None), engine.state.epoch_length
        if start is None or not length:
            return super()._default_iteration_print(engine)
        done = int(engine.state.iteration) - int(start)
        super()._default_iteration_print(_IterationInEpoch(engine, (int(engine.state.epoch) - 1) * int(length) + done))


def _middle_slice(x: torch.Tensor) -> torch.Tensor:
    """``(1, C, *spatial)`` → 2D ``(H, W)`` image: channel 0, middle slice along the last (z) axis in 3D."""
    img = x[0, 0].detach().float().cpu()
    if img.dim() == 3:
        img = img[..., img.shape[-1] // 2]
    return img


def side_by_side(images: Mapping[str, torch.Tensor | None], order: tuple[str, ...] = ("original", "distorted", "restored")) -> torch.Tensor:
    """Concatenate the middle slices of the given images along the width, clipped to [0, 1].

    Returns:
        ``(1, H, n·W)`` image for ``SummaryWriter.add_image`` (missing entries are left out).

    Raises:
        ValueError: no image to show.
    """
    slices = [_middle_slice(images[k]) for k in order if images.get(k) is not None]
    if not slices:
        raise ValueError(f"side_by_side: none of {order} is present in the images")
    # the slice is (x, y); transpose so that x runs left-right as in a radiological view
    return torch.cat([s.T for s in slices], dim=1).clamp(0, 1)[None]


class RestorationImageHandler:
    """Every ``interval`` iterations, write original | distorted | restored (middle slice) to TensorBoard.

    Reads ``engine.state.images`` as set by :class:`~dira3d.engines.DiRATrainer`. In stages without
    restoration only original | distorted are shown.

    Args:
        summary_writer: a ``SummaryWriter`` to share with the scalar handler; or
        log_dir: folder for a writer of its own (closed when the run ends, also by an error).
        interval: iterations between images.
        tag: image tag.
    """

    def __init__(self, summary_writer: Any = None, log_dir: str = "./runs", interval: int = 50, tag: str = "restoration") -> None:
        self.summary_writer, self.log_dir = summary_writer, log_dir
        self.interval, self.tag = max(int(interval), 1), tag
        self._own_writer = summary_writer is None

    def attach(self, engine: Engine) -> None:
        from dira3d.engines.distributed import is_main_process

        if not is_main_process():  # rank 0 alone writes TensorBoard: the other ranks would repeat its images
            return
        if self._own_writer:
            from dira3d.engines.summary import LazySummaryWriter, WriterCloser  # no event file before the first image

            self.summary_writer = LazySummaryWriter(log_dir=self.log_dir)
            WriterCloser([self.summary_writer]).attach(engine)  # also when the run raises
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def close(self) -> None:
        """Close the writer if this handler made it (as MONAI's ``TensorBoardHandler.close``)."""
        if self._own_writer and self.summary_writer is not None:
            self.summary_writer.close()

    def __call__(self, engine: Engine) -> None:
        images = getattr(engine.state, "images", None) or {}
        if images.get("original") is None:
            return
        self.summary_writer.add_image(self.tag, side_by_side(images), engine.state.iteration, dataformats="CHW")
        self.summary_writer.flush()


def rank_zero_handlers(handlers: Iterable[Any]) -> list[Any]:
    """The handlers this process attaches: all of them on rank 0 and in a single-process run; on the other ranks of a
    distributed run, all but those that only report: MONAI's ``StatsHandler`` (the console summary) and
    ``TensorBoardHandler`` subclasses (``TensorBoardStatsHandler``, ``TensorBoardImageHandler``), and
    :class:`RestorationImageHandler`, which would repeat rank 0's output once per rank.

    Picked by the handler's class, not by its place in a bundle's list: a config or an override that replaces or
    reorders ``train#handlers`` (a ``_disabled_`` switch keyed on a list index would be lost with the list, or land on
    another handler, such as the checkpoint handler or the evaluator, whose collectives every rank must join) still
    leaves rank 0 alone reporting. The checkpoint handler and the evaluator run on every rank (they decide on rank 0).

    The fine-tuning bundles pass their ``train#handlers`` and ``validate#handlers`` through it too
    (``train.json``: ``"train_handlers": "$dira3d.engines.rank_zero_handlers(@train#handlers)"``): MONAI's
    ``ValidationHandler``, ``LrScheduleHandler``, ``EarlyStopHandler``, ``CheckpointSaver`` (ignite saves on rank 0)
    and dira3d's ``BestModelSaver`` (rank 0 writes) stay on every rank, since the validation's metrics gather over the
    ranks and every rank must step its learning rate and stop together. A MONAI TensorBoard handler built without a
    ``summary_writer`` opened a writer of its own, and torch's ``SummaryWriter`` creates its event file as it is built:
    on a rank that leaves the handler out, that writer is closed and the file it created (a header, nothing logged)
    removed, so rank 0's are the run's only event files.
    """
    from monai.handlers import StatsHandler, TensorBoardHandler

    from dira3d.engines.distributed import is_main_process

    handlers = list(handlers)
    if is_main_process():
        return handlers
    kept = []
    for handler in handlers:
        if isinstance(handler, TensorBoardHandler) and getattr(handler, "internal_writer", False):
            _discard_writer(handler._writer)
        if not isinstance(handler, (StatsHandler, TensorBoardHandler, RestorationImageHandler)):
            kept.append(handler)
    return kept


def _discard_writer(writer: Any) -> None:
    """Close a ``SummaryWriter`` nothing has logged to and remove the event file it created (only the header)."""
    import os

    file_writer = getattr(writer, "file_writer", None)  # None: a lazy writer that made no file yet
    path = getattr(getattr(file_writer, "event_writer", None), "_file_name", None)
    writer.close()
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
