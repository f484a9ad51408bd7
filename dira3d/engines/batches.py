"""What :class:`~dira3d.engines.DiRATrainer` does around its steps: batches, seeds and resume.

:class:`BatchFeedMixin` moves each loader batch to the device (``_prepare``), draws the per-iteration
generator seeded by (seed, rank, iteration) (``step_generator``), seeds each epoch's data order and random
crops from (seed, rank, epoch) (``_seed_epoch``), skips the batches a mid-epoch checkpoint already consumed
when a run resumes (``_setup_engine``), and, with the ``prefetch`` option, wraps the loader's iterator in a
:class:`~dira3d.engines.prefetch.Prefetcher` that prepares the next batch for its step, never across an
epoch's end. Like :class:`~dira3d.engines.step.TrainingStepMixin` it holds no state of its own and reads
the attributes that :class:`~dira3d.engines.trainer.DiRATrainer`'s constructor sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine
from monai.data.utils import set_rnd

from dira3d.engines.distributed import get_rank
from dira3d.engines.prefetch import Prefetcher
from dira3d.engines.step import Prepared
from dira3d.utils.seeding import stream_seed

__all__ = ["BatchFeedMixin", "STREAM_DATA", "STREAM_STEP", "resume_position", "epoch_length_note",
           "saved_epoch_length"]

# seed streams (dira3d.utils.seeding.stream_seed): per-epoch data order, per-iteration views/distortions;
# 0 is the MoCo queue's and 4 (STREAM_SHUFFLE) the shuffle-BN permutation's (dira3d.engines.moco), 3 validation's
STREAM_DATA, STREAM_STEP = 1, 2


def saved_epoch_length(saved: Mapping[str, Any]) -> int:
    """The epoch length of the run that wrote a checkpoint's ``trainer`` entry (0: unknown). A checkpoint written before
    dira3d recorded it: its iteration was then epoch × epoch_length + the iterations done in the next epoch."""
    done, epoch, iteration = (int(saved.get(k, 0)) for k in ("epoch_iteration", "epoch", "iteration"))
    return int(saved.get("epoch_length") or ((iteration - done) // epoch if epoch else 0))


def resume_position(saved: Mapping[str, Any], epoch_length: int | None) -> int:
    """Where a run resumed from a checkpoint's ``trainer`` entry goes on in its epoch: the iterations it had done, or,
    when this run's ``epoch_length`` differs from the checkpoint's (another number of processes, batch_size or data),
    the same share of the epoch in this run's iterations, rounded down (at least one iteration left)."""
    done, before = int(saved.get("epoch_iteration", 0)), saved_epoch_length(saved)
    if not (done and epoch_length and before) or before == epoch_length:
        return done
    return min(done * int(epoch_length) // before, int(epoch_length) - 1)


def epoch_length_note(saved: Mapping[str, Any], epoch_length: int | None) -> str | None:
    """For the resume's log, after the checkpoint's name: how a run whose epoch length differs from the checkpoint's
    goes on (None: the same length, or unknown)."""
    before, done, epoch = saved_epoch_length(saved), int(saved.get("epoch_iteration", 0)), int(saved.get("epoch", 0))
    if not (before and epoch_length) or before == int(epoch_length):
        return None
    go_on = (f"epoch {epoch + 1} goes on at iteration {resume_position(saved, epoch_length)} of its {epoch_length} "
             "(the same share of its data)" if done else f"epoch {epoch + 1} has {epoch_length} iterations")
    return (f"was written with {before} iterations per epoch and this run has {epoch_length} (another number of "
            f"processes, batch_size or data): {go_on}; the iteration counter goes on from the checkpoint's")


class BatchFeedMixin:
    """Batches, draws and epoch seeding of :class:`~dira3d.engines.DiRATrainer` (see the module docstring);
    mixed in before ``monai.engines.Trainer``, whose ``_setup_engine`` / ``_setup_dataloader_iter`` it extends."""

    def _seed_epoch(self, engine: Engine) -> None:
        """Make this epoch's data order and random crops a function of (seed, epoch) only."""
        seed = stream_seed(self.seed, STREAM_DATA + 16 * get_rank(), engine.state.epoch)
        loader = self.data_loader
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)
        if getattr(loader, "num_workers", 0) == 0 and hasattr(loader, "dataset"):
            # with workers, MONAI seeds each worker's transforms from the loader's generator
            set_rnd(loader.dataset, seed % (2**32))
        set_epoch = getattr(getattr(loader, "dataset", None), "set_epoch", None)
        if callable(set_epoch):  # e.g. VisualWordPairDataset: new partners every epoch
            set_epoch(engine.state.epoch)

    @staticmethod
    def _is_done(state: Any) -> bool:
        # epochs, not ignite's count of iterations (iteration >= epoch_length * max_epochs): after a resume with
        # another epoch length (number of processes, batch_size, data) the iteration counter goes on from the
        # checkpoint's, so it is no longer epoch × epoch_length (a larger batch ended such a run at once)
        if state.max_epochs is not None and (state.max_iters is None or state.iteration < state.max_iters):
            return state.epoch >= state.max_epochs
        return Engine._is_done(state)

    def resume_at(self, done: int) -> None:
        """A resume (:func:`~dira3d.engines.checkpoint.restore_checkpoint`): the run goes on ``done`` iterations
        into epoch ``state.epoch + 1`` (0: at its start), wherever the iteration counter stands."""
        self._resume_position = int(done)

    def _forget_epoch_start(self, engine: Engine) -> None:
        # STARTED, before a checkpoint handler resumes: no epoch in progress, no resume position yet
        engine.state.epoch_start_iteration, self._resume_position = None, None

    def _mark_epoch_start(self, engine: Engine) -> None:
        # EPOCH_STARTED: the iteration after which the epoch in progress began (a resumed one: before the resume)
        engine.state.epoch_start_iteration = engine.state.iteration - (getattr(self, "_resume_position", None) or 0)

    def epoch_position(self) -> tuple[int, int]:
        """(completed epochs, iterations done in the epoch in progress) for a checkpoint; (E, 0) at an epoch's end."""
        length, start = self.state.epoch_length or 0, getattr(self.state, "epoch_start_iteration", None)
        if start is None:  # before the first epoch starts (a resumed run that stops at once): where it resumed
            return int(self.state.epoch), int(getattr(self, "_resume_position", None) or 0)
        done = int(self.state.iteration) - int(start)
        if length and done >= length:
            return int(self.state.epoch), 0
        return int(self.state.epoch) - 1, done

    def _setup_engine(self) -> None:
        super()._setup_engine()
        resume = getattr(self, "_resume_position", None)
        if resume is not None:  # ignite takes iteration % epoch_length, wrong after a change of epoch length
            self._init_iter, self._resume_position = resume, None
        # a resume from a mid-epoch checkpoint: draw and drop the batches this epoch already
        # consumed (data only, no step), so order and random crops continue exactly where the
        # interrupted run stopped; the epoch's seeds were set at EPOCH_STARTED, as in that run.
        # With prefetch, from the loader's own iterator: nothing is prepared before the first next()
        source = getattr(self._dataloader_iter, "source", self._dataloader_iter)
        for _ in range(self._init_iter or 0):
            next(source)

    def _setup_dataloader_iter(self) -> None:
        super()._setup_dataloader_iter()
        if self.prefetch and self.state.dataloader is not None:
            self._dataloader_iter = Prefetcher(self._dataloader_iter, self._prepare_ahead, self._another_in_epoch,
                                               self._side_stream)

    def _another_in_epoch(self) -> bool:
        """Asked as the batch of iteration ``state.iteration + 1`` is handed out: is it not the epoch's
        last? (Never prepare across an epoch's end: the next epoch reseeds the data first.)"""
        length, start = self.state.epoch_length, getattr(self.state, "epoch_start_iteration", None) or 0
        return length is None or self.state.iteration + 1 - start < length

    def _prepare_ahead(self, batchdata: Mapping[str, Any], ahead: bool) -> Prepared:
        """The batch of the next iteration (``ahead``: of the one after it), prepared for its step."""
        iteration = self.state.iteration + (2 if ahead else 1)
        stage = self.schedule.stage_at(self.state.epoch, iteration)
        batch = self._prepare(batchdata)
        generator = self.step_generator(iteration)
        return Prepared(batch, generator, self.step_inputs(batch, generator, stage), iteration, stage.name)

    def _prepare(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = self.state.device
        # visual words without classify_both never read the second instance: do not copy it to the
        # device (half the batch's bytes; the host-to-device copy is on the step's stream)
        unused = {"image2"} if self.dis_mode == "visual_words" and not self.classify_both else set()
        out = {}
        for key, value in batch.items():
            if key in unused:
                continue
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=self.non_blocking)
                if value.is_floating_point():
                    value = value.as_subclass(torch.Tensor)  # MetaTensor → plain tensor: cheaper ops
                    if self.memory_format is not None and value.dim() >= 4:
                        value = value.contiguous(memory_format=self.memory_format)
            out[key] = value
        if "image" not in out:
            raise ValueError(f"the batch has no 'image' entry (keys: {sorted(batch)}); check the dataset transforms")
        if self.dis_mode == "visual_words" and "label" not in out:
            raise ValueError("dis_mode='visual_words' needs batch['label'] (the visual-word class index)")
        return out

    def step_generator(self, counter: int, stream: int = STREAM_STEP) -> torch.Generator:
        """A generator on the training device seeded by (seed, stream, counter)."""
        gen = torch.Generator(device=self.state.device)
        # ranks draw different augmentations (rank 0 draws what a single process draws)
        gen.manual_seed(stream_seed(self.seed, stream + 16 * get_rank(), counter))
        return gen
